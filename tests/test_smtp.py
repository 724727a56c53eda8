"""The relay step over SMTP, end to end: replies (rejections, partial delivery, 4xx, 421,
5xx at MAIL or DATA, an outcome unknown), logins over STARTTLS, certificates, timeouts, and
pooled sessions (retired, replaced when dead, stale at MAIL); the real `pickupd run`
process against a real aiosmtpd server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.smtp.transaction import PROBE_AFTER
from pickupd.spool.sidecar import to_timestamp

Rejection = tuple[str, dict[str, Any], bytes | None]


def test_relay_rejections_and_partial_delivery(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Per recipient: 5xx at RCPT -> a failed/ copy with those recipients, 4xx -> deferred/
    with those, the rest sent; the sidecars and the log say which."""
    smtp_server.fail_rcpt = {
        "gone@example.net": "550 5.1.1 no such user",
        "busy@example.net": "452 4.2.2 mailbox full",
    }
    daemon = make_daemon(smtp_server, retry={"schedule": ["1h"]})
    drop_maildir(daemon.spool, message(to="ok@example.net, gone@example.net, busy@example.net"))
    (got,) = smtp_server.wait_for(1)
    assert got.rcpt_tos == ["ok@example.net"]
    (failed,) = daemon.wait_sidecars("failed")
    (deferred,) = daemon.wait_sidecars("deferred")
    assert failed["reason"] == "rejected" and failed["recipients"] == ["gone@example.net"]
    assert "550 5.1.1 no such user" in failed["detail"]
    assert failed["split_from"] == deferred["id"]
    assert deferred["recipients"] == ["busy@example.net"] and deferred["attempts"] == 1
    assert deferred["next_attempt"] and deferred["history"][-1]["code"] == 452
    assert daemon.events("sent")[0]["recipients"] == ["ok@example.net"]


@pytest.mark.parametrize("where", ["mail", "data"])
def test_5xx_at_mail_or_data_is_rejected(
    where: str, smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A permanent refusal of MAIL FROM or of the DATA fails the message as `rejected` with
    the server's reply in the detail."""
    setattr(smtp_server, f"fail_{where}", "554 5.7.1 policy says no")
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message())
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "rejected" and "554 5.7.1 policy says no" in failed["detail"]
    assert failed["history"][-1]["code"] == 554 and failed["attempts"] == 1
    assert daemon.census()["deferred"] == 0


def test_transient_failure_is_retried_then_sent(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A 451 defers the message with a sidecar; the retry (schedule 300ms) sends it, and the
    deferred files are gone afterwards."""
    smtp_server.fail_mail = "451 4.3.0 try again later"
    smtp_server.fail_next = 1
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message())
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "app@example.com"
    (deferred,) = daemon.events("deferred")
    assert deferred["code"] == 451 and deferred["attempt"] == 1
    (sent,) = daemon.wait_event("sent")
    assert sent["attempt"] == 2 and sent["id"] == deferred["id"]
    wait_until(lambda: not daemon.files("deferred"), 5, "deferred/ to empty")


def test_outcome_unknown_defers_and_keeps_message_id(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Connection lost after the final dot: deferred (a duplicate beats a loss), logged as
    outcome_unknown with the Message-ID, which is unchanged when the retry sends it."""
    smtp_server.drop_after_data = True
    smtp_server.fail_next = 1
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(message_id="<unknown-1@example.com>"))
    (got,) = smtp_server.wait_for(1)
    (unknown,) = daemon.events("outcome_unknown")
    assert unknown["message_id"] == "<unknown-1@example.com>"
    # Named as what happened: the message went out, the reply never came.
    assert unknown["detail"].startswith("outcome unknown: the session ended after DATA, before")
    assert "connection lost" in unknown["detail"] and "cannot connect" not in unknown["detail"]
    assert b"Message-ID: <unknown-1@example.com>\r\n" in got.data
    assert daemon.wait_event("sent")[0]["attempt"] == 2


def test_421_closes_session_and_defers(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A 421 defers what the session carried; the next attempt opens a new session."""
    smtp_server.reply_421_at = "MAIL"
    smtp_server.fail_next = 1
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message())
    smtp_server.wait_for(1)
    assert daemon.events("deferred")[0]["code"] == 421
    assert smtp_server.sessions == 2


def test_per_sender_credentials_over_starttls(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], test_ca: Any
) -> None:
    """Each sender's mail is relayed logged in with that sender's own credentials (the server
    sees the right username per message), over STARTTLS verified against the test CA, and a
    session logged in as one sender never carries another sender's mail."""
    server = smtp_factory(
        security="starttls",
        users={"relay-user": "pw-relay", "billing": "pw-billing"},
        require_auth=True,
    )
    daemon = make_daemon(
        relays={
            "main": _verified(
                server,
                test_ca,
                "starttls",
                username="relay-user",
                password_env="PICKUPD_TEST_RELAY_PW",
            )
        },
        senders={
            "billing@example.com": {
                "relay": "main",
                "username": "billing",
                "password_file": "billing.pw",
            },
            "*@example.com": {"relay": "main"},
        },
        start=False,
    )
    (daemon.dir / "billing.pw").write_text("pw-billing\n")
    (daemon.dir / "billing.pw").chmod(0o600)
    daemon.start(env={"PICKUPD_TEST_RELAY_PW": "pw-relay"})
    for n in range(3):
        drop_maildir(daemon.spool, message(sender="billing@example.com", subject=f"invoice {n}"))
        drop_maildir(daemon.spool, message(sender="app@example.com", subject=f"app {n}"))
    got = server.wait_for(6)
    assert all(r.tls for r in got)
    for r in got:
        assert r.username == ("billing" if r.mail_from == "billing@example.com" else "relay-user")
    by_session: dict[int, set[str | None]] = {}
    for r in got:
        by_session.setdefault(r.session, set()).add(r.username)
    assert all(len(users) == 1 for users in by_session.values())
    log = daemon.log_path.read_text()
    assert "pw-billing" not in log and "pw-relay" not in log


def test_starttls_required_but_not_offered_defers(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A relay with security = "starttls" whose server does not offer STARTTLS: nothing is
    sent in clear, the message is deferred with a TLS reason."""
    server = smtp_factory(security="none", offer_starttls=False)
    daemon = make_daemon(
        relays={"main": {"host": "127.0.0.1", "port": server.port, "security": "starttls"}}
    )
    drop_maildir(daemon.spool, message())
    (deferred,) = daemon.wait_sidecars("deferred")
    assert "TLS" in deferred["detail"] or "STARTTLS" in deferred["detail"]
    assert "MAIL" not in server.commands and server.received == []


def test_auth_failure_defers_and_logs_an_error(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], test_ca: Any
) -> None:
    """A wrong password (535) defers the message and logs an error an operator will see,
    without the password in it."""
    server = smtp_factory(security="tls", users={"u": "right"}, require_auth=True)
    daemon = make_daemon(
        relays={"main": _verified(server, test_ca, "tls", username="u", password="wrong-pw")},
    )
    drop_maildir(daemon.spool, message())
    (deferred,) = daemon.wait_sidecars("deferred")
    assert "535" in deferred["detail"]
    (error,) = daemon.wait_event("relay_auth_failed")
    assert error["level"] == "error" and error["code"] == 535
    assert "wrong-pw" not in daemon.log_path.read_text()


def test_fixing_the_password_rescues_deferred_mail(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], test_ca: Any
) -> None:
    """Credentials are looked up at each attempt, never frozen into the queued message: after
    the operator fixes the password and restarts, the deferred mail goes out."""
    server = smtp_factory(security="tls", users={"u": "right"}, require_auth=True)
    relay = _verified(server, test_ca, "tls", username="u", password="wrong")
    daemon = make_daemon(relays={"main": relay}, retry={"schedule": ["500ms"]})
    drop_maildir(daemon.spool, message())
    daemon.wait_sidecars("deferred")
    assert daemon.stop() == 0
    daemon.write_config({**daemon.doc, "relays": {"main": {**relay, "password": "right"}}})
    daemon.start()
    (got,) = server.wait_for(1)
    assert got.username == "u"
    wait_until(lambda: not daemon.files("deferred"), 5, "deferred/ to empty")


def test_server_size_limit_fails_as_too_large(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A message larger than the server's advertised SIZE fails as too_large, never sent."""
    server = smtp_factory(size_limit=600)
    daemon = make_daemon(server)
    drop_maildir(daemon.spool, message(body="x" * 1000 + "\n"))
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "too_large" and "SIZE limit of 600" in failed["detail"]
    assert "MAIL" not in server.commands


@pytest.mark.parametrize(("stall", "unknown"), [("MAIL", False), ("DOT", True)])
def test_every_command_has_a_timeout(
    stall: str, unknown: bool, smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A server that stops answering is given up on after the relay's timeout: deferred; if it
    went quiet after the final dot, the outcome is unknown and logged as such."""
    smtp_server.stall = stall
    relays = {"main": relay_for(smtp_server, timeout="1s")}
    daemon = make_daemon(relays=relays, retry={"schedule": ["1h"]})
    drop_maildir(daemon.spool, message(message_id="<slow@example.com>"))
    (deferred,) = daemon.wait_sidecars("deferred")
    assert "timed out" in deferred["detail"]
    assert bool(daemon.events("outcome_unknown", message_id="<slow@example.com>")) is unknown


def test_dead_pooled_session_is_replaced(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A pooled session the server dropped while idle is replaced before the message counts
    as failed: the next message is sent on a new session, nothing deferred."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(subject="first"))
    smtp_server.wait_for(1)
    daemon.wait_event("sent")
    smtp_server.drop_connections()
    drop_maildir(daemon.spool, message(subject="second"))
    second = smtp_server.wait_for(2)[1]
    assert second.session == 2
    daemon.wait_event("sent", count=2)
    assert not daemon.events("deferred")


def test_sessions_are_retired_politely(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A session is retired after max_messages_per_connection messages and closed after
    idle_timeout, each time with QUIT rather than a dropped connection."""
    relays = {
        "main": relay_for(
            smtp_server, max_messages_per_connection=2, idle_timeout="300ms", max_connections=1
        )
    }
    daemon = make_daemon(relays=relays)
    for n in range(4):
        drop_maildir(daemon.spool, message(subject=f"retire {n}"))
    got = smtp_server.wait_for(4)
    assert sorted({r.session for r in got}) == [1, 2]
    assert [len([r for r in got if r.session == s]) for s in (1, 2)] == [2, 2]
    wait_until(lambda: smtp_server.commands.count("QUIT") == 2, 5, "two QUITs")


def test_session_that_fails_its_rset_is_replaced(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A session idle in the pool is probed with RSET before it is used again; when the RSET
    gets 421 (the server is going away) the session is replaced at once: the message goes
    out on a new session, without a deferral."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(subject="first"))
    smtp_server.wait_for(1)
    (sent,) = daemon.wait_event("sent")
    # The session must sit idle longer than PROBE_AFTER, counted from when it was last used.
    idle_until = to_timestamp(sent["timestamp"]) + PROBE_AFTER + 0.2
    wait_until(lambda: time.time() > idle_until, PROBE_AFTER + 5, "the session to be idle")
    smtp_server.reply_421_at, smtp_server.fail_next = "RSET", 1
    drop_maildir(daemon.spool, message(subject="second"))
    assert smtp_server.wait_for(2)[1].session == 2
    assert not daemon.events("deferred")


def test_421_at_rcpt_defers_the_rest(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A 421 in answer to a RCPT closes the session: that recipient and the ones not yet
    tried are deferred together, and the retry delivers to all of them."""
    smtp_server.reply_421_at, smtp_server.fail_next = "RCPT", 1
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(to="a@example.net, b@example.net"))
    (got,) = smtp_server.wait_for(1)
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    (deferred,) = daemon.events("deferred")
    assert deferred["code"] == 421 and deferred["recipients"] == ["a@example.net", "b@example.net"]


def test_unverifiable_certificate_is_never_trusted(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A server whose certificate does not verify against the system store (no ca_file for
    the test CA) gets no mail and no password: deferred, saying why."""
    server = smtp_factory(security="tls", users={"u": "pw"})
    relays = {
        "main": {
            "host": "localhost",
            "port": server.port,
            "security": "tls",
            "username": "u",
            "password": "pw",
        }
    }
    daemon = make_daemon(relays=relays)
    drop_maildir(daemon.spool, message())
    (deferred,) = daemon.wait_sidecars("deferred")
    assert "certificate verification failed" in deferred["detail"]
    assert server.auth_attempts == [] and server.received == []


def test_session_closed_between_messages_is_replaced_at_mail(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A session the server closes right after a message (as servers with a per-connection
    limit do) fails at the next MAIL: it is replaced and the message still goes out, not
    deferred."""
    daemon = make_daemon(smtp_server, dispatch={"workers": 1})  # one pool: its second message
    drop_maildir(daemon.spool, message(subject="first"))
    smtp_server.wait_for(1)
    daemon.wait_event("sent")
    smtp_server.drop_at, smtp_server.fail_next = "MAIL", 1
    drop_maildir(daemon.spool, message(subject="second"))
    second = smtp_server.wait_for(2)[1]
    assert second.session == 2 and b"Subject: second" in second.data
    daemon.wait_event("sent", count=2)
    assert not daemon.events("deferred")


def _verified(server: SmtpServer, test_ca: Any, security: str, **login: str) -> dict[str, Any]:
    """A relay table for a test server with TLS (`security`) whose certificate the test CA
    signed (verified against `ca_file`), with the login given."""
    return {
        "host": "localhost",
        "port": server.port,
        "security": security,
        "ca_file": test_ca.ca_file,
        **login,
    }

"""End to end: the real `pickupd run` process, a real SMTP server, real folders."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, drop_eml, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd import ids
from pickupd.smtp.transaction import PROBE_AFTER
from pickupd.spool.sidecar import Sidecar, from_timestamp, to_timestamp


def test_maildir_drop_is_relayed_byte_for_byte(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A Maildir drop reaches the server with the envelope from its headers, the bytes as
    dropped (LF turned into CRLF, 8-bit UTF-8 kept), Bcc removed, and leaves no file behind."""
    daemon = make_daemon(smtp_server)
    body = "Grüße, 東京 — ünïcödé body.\n"
    raw = message(
        to="Alice <alice@example.net>",
        extra="Cc: bob@example.net\nBcc: carol@example.net\n",
        body=body,
    )
    drop_maildir(daemon.spool, raw)
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["alice@example.net", "bob@example.net", "carol@example.net"]
    expected = raw.replace(b"Bcc: carol@example.net\n", b"").replace(b"\n", b"\r\n")
    assert got.data == expected
    assert "BODY=8BITMIME" in got.mail_options
    daemon.wait_event("sent")
    assert daemon.census() == {"pickup/new": 0, "active": 0, "deferred": 0, "failed": 0, "sent": 0}
    (claimed,) = daemon.events("claimed")
    (sent,) = daemon.events("sent")
    assert sent["id"] == claimed["id"] and sent["relay"] == "main" and sent["attempt"] == 1
    assert sent["code"] == 250 and sent["sender"] == "app@example.com"


def test_direct_eml_and_x_sender_format(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """An IIS/System.Net.Mail style .eml written straight into pickup/ is taken once settled;
    its X-Sender/X-Receiver lines give the envelope and are not relayed. It has no Date: and
    no Message-ID:, so pickupd adds both in front (the id its own, on the sender's domain),
    every other byte as dropped."""
    daemon = make_daemon(smtp_server)
    raw = (
        b"X-Sender: app@example.com\r\n"
        b"X-Receiver: one@example.net\r\nX-Receiver: two@example.net\r\n"
        b"From: App <app@example.com>\r\nTo: someone-else@example.net\r\n"
        b"Subject: iis\r\n\r\nbody\r\n"
    )
    drop_eml(daemon.spool, "iis-style.eml", raw)
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["one@example.net", "two@example.net"]
    daemon.wait_event("sent")
    (claimed,) = daemon.events("claimed")
    assert claimed["source"] == "iis-style.eml"
    added, dropped = got.data.split(b"From: App", 1)
    assert b"From: App" + dropped == raw.split(b"X-Receiver: two@example.net\r\n", 1)[1]
    date, message_id = added.decode().splitlines()
    assert date.startswith("Date: ") and date.endswith(" GMT")
    assert message_id == f"Message-ID: <{claimed['id']}@example.com>"
    assert daemon.census()["pickup/new"] == 0


def test_messages_already_waiting_are_taken_at_start(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Files dropped while pickupd was down are all sent when it starts, over a few reused
    sessions."""
    daemon = make_daemon(smtp_server, start=False)
    for n in range(20):
        drop_maildir(daemon.spool, message(subject=f"waiting {n}"))
    daemon.start()
    got = smtp_server.wait_for(20)
    assert len(got) == 20
    daemon.wait_event("sent", count=20)
    # Connection reuse: 20 messages, 8 workers, default max_connections 4; back to back, a
    # session needs no RSET after a completed transaction.
    assert smtp_server.sessions <= 4
    assert smtp_server.commands.count("RSET") == 0


Rejection = tuple[str, dict[str, Any], bytes | None]


def _refusal_cases(tmp: Path) -> list[tuple[str, bytes, dict[str, Any]]]:
    return [
        ("malformed", b"this is not\na message at all\n", {}),
        ("malformed", message(sender='"unbalanced <app@example.com>'), {}),
        ("malformed", message(sender="alice@example.org)<app@example.com>"), {}),
        ("no_sender", b"To: alice@example.net\nSubject: x\n\nbody\n", {}),
        ("sender_not_allowed", message(sender="mallory@evil.example"), {}),
        (
            "header_from_not_allowed",
            b"Sender: app@example.com\nFrom: ceo@bank.example\nTo: alice@example.net\n\nx\n",
            {},
        ),
        ("no_recipients", b"From: app@example.com\nSubject: nobody\n\nx\n", {}),
        ("too_many_recipients", message(to=", ".join(f"r{i}@example.net" for i in range(4))), {}),
        ("too_large", message(body="x" * 5000), {}),
    ]


def test_every_policy_reason_fails_without_connecting(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Each policy refusal lands in failed/ with its reason code and a readable detail, the
    original bytes kept, and no connection is ever made to the relay."""
    daemon = make_daemon(smtp_server, policy={"max_recipients": 3, "max_message_size": 4000})
    cases = _refusal_cases(daemon.dir)
    for _, raw, _ in cases:
        drop_maildir(daemon.spool, raw)
    sidecars = daemon.wait_sidecars("failed", len(cases))
    assert sorted(s["reason"] for s in sidecars) == sorted(reason for reason, _, _ in cases)
    for sidecar in sidecars:
        assert sidecar["detail"] and sidecar["history"][-1]["outcome"] == "failed"
        eml = daemon.spool / "failed" / f"{sidecar['id']}.eml"
        assert eml.read_bytes() in [raw for _, raw, _ in cases]
    assert smtp_server.sessions == 0
    failed = daemon.events("failed")
    assert len(failed) == len(cases) and all(e["reason"] for e in failed)


def test_unsafe_files_go_to_failed_without_being_read(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A symlink and a FIFO planted in the pickup folder go to failed/ as unsafe_file; the
    symlink's target is never read or sent, the FIFO does not block the daemon, and a normal
    message dropped after them is still relayed."""
    daemon = make_daemon(smtp_server)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(message(body="TOP SECRET\n"))
    os.symlink(secret, daemon.spool / "pickup" / "new" / "link")
    os.mkfifo(daemon.spool / "pickup" / "new" / "fifo")
    os.symlink(secret, daemon.spool / "pickup" / "linked.eml")
    drop_maildir(daemon.spool, message(subject="after the traps"))
    smtp_server.wait_for(1)
    sidecars = daemon.wait_sidecars("failed", 3)
    assert {s["reason"] for s in sidecars} == {"unsafe_file"}
    assert all(b"TOP SECRET" not in r.data for r in smtp_server.received)
    assert secret.exists()
    for sidecar in sidecars:
        assert os.path.lexists(daemon.spool / "failed" / f"{sidecar['id']}.eml")


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


def test_expiry(smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]) -> None:
    """Mail still undelivered after max_age fails as `expired`, after a last attempt."""
    smtp_server.fail_rcpt = {"alice@example.net": "450 4.2.1 mailbox busy"}
    daemon = make_daemon(smtp_server, retry={"schedule": ["200ms"], "max_age": "1s"})
    drop_maildir(daemon.spool, message())
    (failed,) = daemon.wait_sidecars("failed", timeout=15)
    assert failed["reason"] == "expired" and failed["attempts"] >= 3
    assert "450 4.2.1 mailbox busy" in failed["detail"]
    assert daemon.census()["deferred"] == 0


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
            "main": {
                "host": "localhost",
                "port": server.port,
                "security": "starttls",
                "ca_file": test_ca.ca_file,
                "username": "relay-user",
                "password_env": "PICKUPD_TEST_RELAY_PW",
            }
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
        relays={
            "main": {
                "host": "localhost",
                "port": server.port,
                "security": "tls",
                "ca_file": test_ca.ca_file,
                "username": "u",
                "password": "wrong-pw",
            }
        },
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
    relay = {
        "host": "localhost",
        "port": server.port,
        "security": "tls",
        "ca_file": test_ca.ca_file,
        "username": "u",
        "password": "wrong",
    }
    daemon = make_daemon(relays={"main": relay}, retry={"schedule": ["500ms"]})
    drop_maildir(daemon.spool, message())
    daemon.wait_sidecars("deferred")
    assert daemon.stop() == 0
    daemon.write_config({**daemon.doc, "relays": {"main": {**relay, "password": "right"}}})
    daemon.start()
    (got,) = server.wait_for(1)
    assert got.username == "u"
    wait_until(lambda: not daemon.files("deferred"), 5, "deferred/ to empty")


def test_sigterm_loses_nothing(smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]) -> None:
    """SIGTERM in the middle of a backlog: exit 0, and every message is either received by
    the server or still in the spool (pickup or deferred), never in active/, never twice."""
    daemon = make_daemon(smtp_server, start=False)
    total = 200
    for n in range(total):
        drop_maildir(daemon.spool, message(subject=f"m{n}", message_id=f"<m{n}@example.com>"))
    daemon.start()
    smtp_server.wait_for(5)
    assert daemon.stop() == 0
    census = daemon.census()
    assert census["active"] == 0
    received = {r.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for r in smtp_server.received}
    assert len(received) == len(smtp_server.received)  # nothing sent twice
    assert len(received) + census["pickup/new"] + census["deferred"] == total


def test_a_second_sigterm_drops_a_stalled_session_without_quit(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """The server never answers the final dot; the first SIGTERM waits for the send, the
    second ends the wait at once: the session is dropped without a QUIT it could never
    answer, the message is put back in deferred/, and pickupd exits 0."""
    smtp_server.stall = "DOT"
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message())
    wait_until(lambda: "DATA" in smtp_server.commands, 10, "the message to be sent")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_event("stopping")
    second = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=10) == 0
    # A QUIT waiting for its reply took pool.QUIT_TIMEOUT (2 s) before the fix.
    assert time.monotonic() - second < 1.5
    assert "QUIT" not in smtp_server.commands
    assert len(daemon.files("deferred", ".eml")) == 1 and daemon.census()["active"] == 0


def test_stale_claims_are_recovered_at_start(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A message left in active/ by a run of this host that died (kill -9) is sent when the
    next run starts."""
    smtp_server.stall = "MAIL"
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(message_id="<stuck@example.com>"))
    wait_until(lambda: daemon.files("active"), 5, "the claim")
    daemon.stop(signal.SIGKILL)
    assert len(daemon.files("active")) == 1
    smtp_server.stall = None
    daemon.start()
    (got,) = smtp_server.wait_for(1)
    assert b"<stuck@example.com>" in got.data
    wait_until(lambda: not daemon.files("active"), 5, "active/ to empty")
    assert daemon.events("recovered")


def test_run_once_exits_when_done(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`pickupd run --once` sends what is waiting and exits 0."""
    daemon = make_daemon(smtp_server, start=False)
    for n in range(5):
        drop_maildir(daemon.spool, message(subject=f"once {n}"))
    result = daemon.run_once()
    assert result.returncode == 0, daemon.stderr()
    assert len(smtp_server.received) == 5
    assert daemon.census()["pickup/new"] == 0


def test_keep_sent_archives_with_sidecar(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """With keep_sent, a relayed message is moved to sent/ beside its sidecar."""
    daemon = make_daemon(smtp_server, spool={"keep_sent": True})
    drop_maildir(daemon.spool, message())
    (sidecar,) = daemon.wait_sidecars("sent")
    assert sidecar["attempts"] == 1 and sidecar["history"][-1]["outcome"] == "sent"
    assert sidecar["recipients"] == ["alice@example.net"]


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


def test_direct_eml_is_not_taken_while_its_writer_holds_it_open(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A writer that pauses longer than `settle` in the middle of a direct .eml: pickupd
    waits for it to close the file, then relays the whole message."""
    daemon = make_daemon(smtp_server, log={"level": "debug"})
    raw = message(body="first half\n" + "second half\n" * 10)
    path = daemon.spool / "pickup" / "slow-writer.eml"
    with path.open("wb") as handle:
        handle.write(raw[:60])
        handle.flush()
        # Seen on its events (not settled yet), then once settled, still open: not taken.
        daemon.scans(2)
        assert smtp_server.received == [] and path.exists()
        handle.write(raw[60:])
    (got,) = smtp_server.wait_for(1)
    assert got.data == raw.replace(b"\n", b"\r\n")


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


def test_hostile_file_names_are_relayed_and_shown_safely(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A Maildir name with a newline, a terminal escape and bytes that are not UTF-8 is
    relayed like any other; its `source` in the log is printable."""
    daemon = make_daemon(smtp_server, start=False)
    name = b"evil\nname\x1b[31m\xff"
    with open(os.path.join(os.fsencode(daemon.spool / "pickup" / "new"), name), "wb") as handle:
        handle.write(message(subject="hostile name"))
    daemon.start()
    smtp_server.wait_for(1)
    (claimed,) = daemon.wait_event("claimed")
    assert claimed["source"] == "new/evil?name?[31m\ufffd"


def test_smtputf8_addresses(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A UTF-8 address is relayed with SMTPUTF8 when the server offers it; a server that does
    not gets no attempt at all: the message fails as rejected, saying why."""
    with_utf8 = smtp_factory(smtputf8=True)
    without = smtp_factory(smtputf8=False)
    relays = {"main": relay_for(with_utf8), "old": relay_for(without)}
    senders = {"app@example.com": {"relay": "main"}, "legacy@example.com": {"relay": "old"}}
    daemon = make_daemon(relays=relays, senders=senders)
    drop_maildir(daemon.spool, message(to="jürgen@bücher.example"))
    (got,) = with_utf8.wait_for(1)
    assert got.rcpt_tos == ["jürgen@bücher.example"] and "SMTPUTF8" in got.mail_options
    drop_maildir(daemon.spool, message(sender="legacy@example.com", to="jürgen@bücher.example"))
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "rejected" and "SMTPUTF8" in failed["detail"]
    assert "MAIL" not in without.commands


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


def test_large_messages_go_a_few_at_a_time(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Messages over 1 MiB are relayed two at a time (bounded memory), while small ones
    keep flowing beside them."""
    smtp_server.stall = "DOT"
    relays = {"main": relay_for(smtp_server, max_connections=8, timeout="3s")}
    daemon = make_daemon(relays=relays, retry={"schedule": ["1h"]})
    big = "y" * 100 + "\n"
    for n in range(5):
        drop_maildir(daemon.spool, message(subject=f"big {n}", body=big * 12_000))
    wait_until(lambda: smtp_server.sessions == 2, 5, "two sessions")
    # A message is claimed (in active/) before it waits its turn: once four are (each worker
    # process has four lanes, so the fifth may wait for a lane), a third session would be
    # open if the limit did not hold.
    wait_until(lambda: daemon.census()["active"] >= 4, 5, "four claims")
    assert smtp_server.sessions == 2  # the other three wait their turn
    smtp_server.stall = None
    drop_maildir(daemon.spool, message(subject="small"))
    # The two stalled big ones may finish first, now that the server goes on: the small one
    # arrives beside them, not after the three that waited.
    wait_until(
        lambda: any(b"Subject: small" in r.data for r in smtp_server.received), 10, "the small one"
    )


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


def test_a_killed_daemons_lock_file_is_removed_at_the_next_start(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """kill -9 of a daemon that held no claims leaves the .owner lock files of its processes
    in active/ (its workers die with it); the next start removes them (logged as
    leftovers_cleaned) and keeps its own."""
    daemon = make_daemon(smtp_server)
    assert daemon.proc is not None
    killed = daemon.proc.pid
    processes = int(daemon.wait_event("ready")[0]["workers"])
    old = [p.name for p in (daemon.spool / "active").iterdir()]
    assert len(old) == processes, old  # "ready" comes once every worker holds its lock
    daemon.stop(signal.SIGKILL)
    assert [name for name in old if name.endswith(f"-{killed}")], old
    # The workers die with the main process, a moment after it: a lock still held by a
    # live process is not a leftover, so the next start comes once they are all gone.
    pids = [int(name.rsplit("-", 1)[1]) for name in old]
    wait_until(lambda: not any(_alive(pid) for pid in pids), 10, "the killed workers' end")
    daemon.start()
    (cleaned,) = daemon.wait_event("leftovers_cleaned")
    assert cleaned["locks"] == processes
    locks = [p.name for p in (daemon.spool / "active").iterdir()]
    assert len(locks) == processes and not set(locks) & set(old), locks


@pytest.mark.parametrize("offers_dsn", [False, True])
def test_exchange_replay_envelope_lines_with_esmtp_parameters(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], offers_dsn: bool
) -> None:
    """X-Sender / X-Receiver lines as Exchange's Replay folder writes them, with ESMTP
    parameters after the address and one folded: the file is relayed; RET/ENVID and
    NOTIFY/ORCPT go to a server that offers DSN and are dropped for one that does not."""
    server = smtp_factory(dsn=offers_dsn)
    daemon = make_daemon(server)
    raw = (
        b"X-Sender: <app@example.com> BODY=8BITMIME RET=HDRS ENVID=order-42\r\n"
        b"X-Receiver: <alice@example.net> NOTIFY=FAILURE,DELAY\r\n"
        b"\tORCPT=rfc822;alice@example.net\r\n"
        b"X-Receiver: <bob@example.net>\r\n"
        b"From: app@example.com\r\nTo: alice@example.net\r\nSubject: replay\r\n\r\nbody\r\n"
    )
    drop_maildir(daemon.spool, raw)
    (got,) = server.wait_for(1)
    assert got.rcpt_tos == ["alice@example.net", "bob@example.net"]
    dsn_mail = [o for o in got.mail_options if o.startswith(("RET=", "ENVID="))]
    if offers_dsn:
        assert dsn_mail == ["RET=HDRS", "ENVID=ORDER-42"]  # (aiosmtpd upper-cases them)
        assert got.rcpt_options == ["NOTIFY=FAILURE,DELAY", "ORCPT=RFC822;ALICE@EXAMPLE.NET"]
    else:
        assert dsn_mail == [] and got.rcpt_options == []
    assert b"X-Sender" not in got.data and b"BODY=" not in got.data


def test_a_dead_hosts_claim_is_taken_over_after_its_lease(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A claim in active/ of another host whose lease nobody has renewed for claim_lease (that
    host died, on a shared spool: its lock file's mtime is old) is taken over and sent, with
    its sidecar's history; one of a host that renews its lease is left alone, whatever the
    claimed file's own mtime (its writer's to set)."""
    daemon = make_daemon(smtp_server, start=False, spool={"claim_lease": "5s"})
    active, deferred = daemon.spool / "active", daemon.spool / "deferred"
    active.mkdir()
    deferred.mkdir()
    dead, alive = ids.new(), ids.new()
    for msg_id, age, owner in ((dead, 60, "other-host-4242"), (alive, 0, "other-host-4243")):
        claim = active / f"{msg_id}.{owner}"
        claim.write_bytes(message(subject=msg_id))
        then = time.time() - age
        (active / f".owner.{owner}").write_bytes(b"")
        os.utime(active / f".owner.{owner}", (then, then))
        os.utime(claim, (0, 0))
        car = Sidecar(
            msg_id, "new/x", "app@example.com", ("alice@example.net",), 1, from_timestamp(then)
        )
        (deferred / f"{msg_id}.json").write_bytes(car.to_json())
    daemon.start()
    (got,) = smtp_server.wait_for(1)
    assert f"Subject: {dead}".encode() in got.data
    (sent,) = daemon.wait_event("sent")
    assert sent["id"] == dead and sent["attempt"] == 2
    assert (active / f"{alive}.other-host-4243").exists()


def test_lines_starting_with_a_dot_arrive_intact(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Dot-stuffing (RFC 5321 4.5.2): body lines ".", "..", ".x" and a last line without a
    newline reach the server exactly as dropped (with CRLF line ends)."""
    daemon = make_daemon(smtp_server)
    body = b".\n..\n.hidden\nend\n.\n.last"
    drop_maildir(daemon.spool, b"From: app@example.com\nTo: alice@example.net\n\n" + body)
    (got,) = smtp_server.wait_for(1)
    assert got.data.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n") + b"\r\n")


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended: its locks are released)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

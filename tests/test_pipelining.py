"""PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write where the server offers it, one
command at a time where it does not; the same outcomes either way. Real daemon, real server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from harness import Daemon, drop_maildir, message
from smtpserver import SmtpServer


@pytest.mark.parametrize("pipelining", [True, False])
def test_commands_go_together_only_where_the_server_offers_it(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], pipelining: bool
) -> None:
    """Three messages, three recipients each: all arrive whole either way; pipelined, every
    MAIL comes with its RCPTs and DATA in the same write, else each command alone."""
    server = smtp_factory(pipelining=pipelining)
    daemon = make_daemon(server, dispatch={"workers": 1})
    to = "alice@example.net, bob@example.net, carol@example.net"
    for n in range(3):
        drop_maildir(daemon.spool, message(to=to, subject=f"p{n}"))
    got = server.wait_for(3)
    assert all(len(r.rcpt_tos) == 3 for r in got)
    assert server.mail_with_more == [pipelining] * len(server.mail_with_more)
    daemon.wait_event("sent", count=3)


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_recipients_among_accepted_ones(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], pipelining: bool
) -> None:
    """One recipient refused for good, one for now, one accepted: the message goes to the
    one, waits for the other, and the refused one is reported; pipelined or not."""
    server = smtp_factory(pipelining=pipelining)
    server.fail_rcpt["nobody@example.net"] = "550 5.1.1 No such user"
    server.fail_rcpt["later@example.net"] = "451 4.2.0 Try later"
    daemon = make_daemon(server, retry={"schedule": ["1h"], "max_age": "1d"})
    drop_maildir(
        daemon.spool, message(to="nobody@example.net, alice@example.net, later@example.net")
    )
    (got,) = server.wait_for(1)
    assert got.rcpt_tos == ["alice@example.net"]
    (deferred,) = daemon.wait_event("deferred")
    assert deferred["recipients"] == ["later@example.net"]
    assert daemon.files("deferred", ".eml")


@pytest.mark.parametrize("pipelining", [True, False])
def test_every_recipient_refused_leaves_the_session_fit_for_the_next(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], pipelining: bool
) -> None:
    """All recipients refused: pipelined, the server also refuses the DATA sent along
    (no valid recipients); the message fails, and the next goes on the same session."""
    server = smtp_factory(pipelining=pipelining)
    server.fail_rcpt["nobody@example.net"] = "550 5.1.1 No such user"
    daemon = make_daemon(server, dispatch={"workers": 1})
    drop_maildir(daemon.spool, message(to="nobody@example.net", subject="refused"))
    (failed,) = daemon.wait_event("failed")
    assert failed["reason"] == "rejected"
    drop_maildir(daemon.spool, message(subject="next"))
    (got,) = server.wait_for(1)
    assert b"Subject: next" in got.data
    assert server.sessions == 1

"""Classes of mail under a limit (message/priority.py, limits/lines.py): the mail that matters
goes first. Real daemons, a real SMTP server; across hosts, UTS namespaces sharing a real
Redis."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, free_port, message, scrape, wait_until
from redisserver import RedisServer
from smtpserver import Received, SmtpServer

from pickupd import policy
from pickupd.config.loading import load as load_config
from pickupd.message import envelope
from pickupd.message.priority import MailClass

WINDOW = 2.0
LIMIT = [f"10 messages/{WINDOW:g}s"]
# .NET's MailPriority.High, PHPMailer's Priority = 1, Outlook's "High importance".
URGENT = "X-Priority: 1\nPriority: urgent\nImportance: high\n"
BULK = "Precedence: bulk\nList-Unsubscribe: <mailto:leave@example.com>\n"


def _subject(r: Received) -> str:
    return r.data.split(b"Subject: ")[1].split(b"\r")[0].decode()


def _most_in_a_window(got: Sequence[Received], window: float) -> int:
    times = sorted(r.at for r in got)
    return max(sum(1 for t in times if end - window < t <= end) for end in times)


def _arrived(server: SmtpServer, subject: str, timeout: float) -> float:
    found: list[float] = []

    def seen() -> bool:
        found[:] = [r.at for r in server.received if _subject(r) == subject]
        return bool(found)

    wait_until(seen, timeout, f"{subject} to arrive")
    return found[0]


def _backlog(server: SmtpServer, spool: Path, kind: str, extra: str, count: int = 60) -> None:
    """`count` messages of a kind dropped at once; returns when the first window is spent."""
    for n in range(count):
        drop_maildir(spool, message(subject=f"{kind}{n}", extra=extra))
    wait_until(lambda: len(server.received) >= 10, 15, "the first window's messages")


def _all_once(server: SmtpServer, subjects: set[str], timeout: float) -> list[Received]:
    got = server.wait_for(len(subjects), timeout=timeout)
    counts = collections.Counter(_subject(r) for r in got)
    assert set(counts) == subjects and max(counts.values()) == 1, counts
    assert _most_in_a_window(got, WINDOW) <= 10
    return got


def _daemon(make_daemon: Callable[..., Daemon], server: SmtpServer, **sections: object) -> Daemon:
    return make_daemon(
        server,
        senders={"app@example.com": {"relay": "main", "limits": LIMIT}},
        retry={"schedule": ["1h"], "max_age": "1d"},
        **sections,
    )


def test_an_urgent_message_goes_ahead_of_a_normal_backlog(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """10 messages per 2 s; 60 normal ones dropped, then one marked urgent as .NET writes it:
    it arrives within about a window of its drop (before: after all 60, 12 s), the limit
    holds in every window, every message arrives once; its waiting line says its class."""
    daemon = _daemon(make_daemon, smtp_server)
    _backlog(smtp_server, daemon.spool, "normal", "")
    dropped = time.time()
    drop_maildir(daemon.spool, message(subject="reset", extra=URGENT))
    waited = _arrived(smtp_server, "reset", 15) - dropped
    assert waited < 2 * WINDOW, waited
    later = [r for r in smtp_server.received if _subject(r).startswith("normal")]
    assert len(later) < 40, "the urgent message went ahead of most of the backlog"
    _all_once(smtp_server, {f"normal{n}" for n in range(60)} | {"reset"}, 40)
    waiting = daemon.events("waiting")
    assert any("in line" in e["detail"] and e["mail_class"] == "normal" for e in waiting)
    for event in waiting:  # the urgent one may wait for a turn booked ahead, never in line
        assert event["mail_class"] == "normal" or "in line" not in event["detail"], event


def test_a_normal_message_goes_ahead_of_a_bulk_backlog(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """60 bulk messages (a newsletter: Precedence: bulk, List-Unsubscribe), then one unmarked:
    it arrives within about a window; the newsletter still goes at the full rate (not starved:
    it takes every room the other classes leave) and every message once. The metrics count
    the newsletter waiting in line, by class, for the whole service (two workers)."""
    port = free_port()
    daemon = _daemon(make_daemon, smtp_server, metrics={"listen": f"127.0.0.1:{port}"})
    _backlog(smtp_server, daemon.spool, "bulk", BULK)
    key = 'pickupd_limit_waiting_messages{class="bulk"}'
    wait_until(lambda: scrape(port).get(key, 0) > 20, 5, "the bulk line in the metrics")
    assert scrape(port).get('pickupd_limit_waiting_messages{class="urgent"}') == 0
    dropped = time.time()
    drop_maildir(daemon.spool, message(subject="receipt"))
    waited = _arrived(smtp_server, "receipt", 15) - dropped
    assert waited < 2 * WINDOW, waited
    got = _all_once(smtp_server, {f"bulk{n}" for n in range(60)} | {"receipt"}, 40)
    # 61 messages at 10 per 2 s (plus the windows' margins): about 12 s, not more.
    span = max(r.at for r in got) - min(r.at for r in got)
    assert span < 12 * 1.5, span
    waiting = daemon.events("waiting")
    assert {e.get("mail_class") for e in waiting} <= {"bulk", "normal"}
    assert any(e.get("mail_class") == "bulk" for e in waiting)
    wait_until(lambda: scrape(port).get(key) == 0, 5, "the bulk line empty in the metrics")


def test_the_operator_caps_a_sender_and_a_writer(tmp_path: Path) -> None:
    """A sender entry's highest_class and [policy] highest_class (by writer) cap what a
    message's fields mark; mail_class sets it whatever they mark."""
    path = tmp_path / "pickupd.toml"
    path.write_text(
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        '[relays.main]\nhost = "127.0.0.1"\nport = 2525\nsecurity = "none"\n'
        '[senders."app@example.com"]\nrelay = "main"\nhighest_class = "normal"\n'
        '[senders."news@example.com"]\nrelay = "main"\nmail_class = "bulk"\n'
        '[senders."ops@example.com"]\nrelay = "main"\n'
        '[policy]\nhighest_class = {"root" = "bulk"}\n'
    )
    config = load_config(path)

    def klass(sender: str, extra: str, owner: int | None) -> MailClass:
        parsed = envelope.parse(message(sender=sender, extra=extra))
        assert isinstance(parsed, envelope.Envelope)
        rule = config.sender_rule(sender)
        assert rule is not None
        return policy.mail_class(parsed, rule, config, owner)

    nobody = 65534
    assert klass("ops@example.com", URGENT, nobody) is MailClass.URGENT
    assert klass("ops@example.com", "", nobody) is MailClass.NORMAL
    assert klass("ops@example.com", BULK, nobody) is MailClass.BULK
    assert klass("ops@example.com", URGENT + "Precedence: list\n", nobody) is MailClass.BULK
    assert klass("app@example.com", URGENT, nobody) is MailClass.NORMAL  # capped
    assert klass("app@example.com", BULK, nobody) is MailClass.BULK
    assert klass("news@example.com", URGENT, nobody) is MailClass.BULK  # set
    assert klass("ops@example.com", URGENT, 0) is MailClass.BULK  # root's files: bulk at most


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("X-Priority: 1 (Highest)\n", MailClass.URGENT),
        ("X-Priority: 2\n", MailClass.URGENT),
        ("X-Priority: 3\n", MailClass.NORMAL),
        ("X-Priority: 5 (Lowest)\n", MailClass.BULK),
        ("Importance: High\n", MailClass.URGENT),
        ("Importance: low\n", MailClass.BULK),
        ("Priority: non-urgent\n", MailClass.BULK),
        ("Precedence: junk\n", MailClass.BULK),
        ("Precedence: first-class\n", MailClass.NORMAL),
        ("List-Unsubscribe: <https://example.com/u>\n", MailClass.BULK),
        ("X-Priority: \n", MailClass.NORMAL),
    ],
)
def test_the_marks_mail_libraries_write(fields: str, expected: MailClass) -> None:
    parsed = envelope.parse(message(extra=fields))
    assert isinstance(parsed, envelope.Envelope)
    assert parsed.marked is expected


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -u needs root (CI is root)")
def test_an_urgent_message_on_another_host_goes_ahead_of_this_hosts_backlog(
    smtp_server: SmtpServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Hosts alpha and beta (UTS namespaces, spools of their own) share one Redis and one
    mailbox at 10 per 2 s. alpha has 60 normal messages; an urgent one dropped on beta
    arrives within about a window, and the fleet keeps the limit in every window."""
    relays = {"main": {"host": smtp_server.host, "port": smtp_server.port, "security": "none"}}
    senders = {"app@example.com": {"relay": "main", "limits": LIMIT}}
    sections = {
        "dispatch": {"workers": 2, "settle": "100ms"},
        "retry": {"schedule": ["1h"], "max_age": "1d"},
        "limits": {"store": redis_server.url, "hosts": 2},
    }
    alpha = Daemon(tmp_path / "alpha", relays, senders, **sections)
    beta = Daemon(tmp_path / "beta", relays, senders, **sections)
    alpha.start(host="alpha")
    beta.start(host="beta")
    try:
        _backlog(smtp_server, alpha.spool, "normal", "")
        dropped = time.time()
        drop_maildir(beta.spool, message(subject="reset", extra=URGENT))
        waited = _arrived(smtp_server, "reset", 15) - dropped
        assert waited < 2 * WINDOW, waited
        _all_once(smtp_server, {f"normal{n}" for n in range(60)} | {"reset"}, 40)
    finally:
        assert alpha.stop() == 0
        assert beta.stop() == 0

"""Provider limits: limits on relays and senders (and the older `rate`), the ledger's rolling
windows, and slowing down when a relay throttles us.

The real daemon and a real SMTP server; times are read from the daemon's own log lines, and
only lower bounds are asserted (a slow machine can only make the spacing larger).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, message, pickupd, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.config.loading import load
from pickupd.errors import ConfigError
from pickupd.limits.replies import PAUSE_FIRST, is_throttling
from pickupd.spool.sidecar import to_timestamp
from pickupd.units import parse_limit


def test_over_the_limit_waits_its_turn_without_an_attempt(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """At 1/min, of three messages one goes now; the others wait in deferred/ with no attempt
    counted, each expected a minute after the other, and the reason in the sidecar (one
    process: with several, each has its own line and its estimates)."""
    daemon = make_daemon(
        relays={"main": relay_for(smtp_server, rate="1/min")}, dispatch={"workers": 1}
    )
    for n in range(3):
        drop_maildir(daemon.spool, message(subject=f"n{n}"))
    smtp_server.wait_for(1)
    waiting = daemon.wait_event("waiting", count=2)
    sidecars = daemon.wait_sidecars("deferred", count=2)
    assert len(smtp_server.received) == 1
    for sidecar in sidecars:
        assert sidecar["attempts"] == 0 and sidecar["history"] == []
        assert "relays.main.limits: 1 messages/min" in sidecar["detail"]
        assert sidecar["recipients"] == ["alice@example.net"]
    (sent,) = daemon.wait_event("sent")
    turns = sorted(to_timestamp(w["next_attempt"]) for w in waiting)
    start = to_timestamp(sent["timestamp"])
    assert turns[0] - start > 55 and turns[1] - turns[0] > 59.9, (start, turns)
    assert daemon.events("deferred") == [] and daemon.events("failed") == []


def test_sender_rate_spaces_messages_out(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A sender entry's 5/s lets five go at once, then one every 200 ms: ten messages take at
    least a second, and all of them arrive."""
    daemon = make_daemon(smtp_server, senders={"app@example.com": {"relay": "main", "rate": "5/s"}})
    for n in range(10):
        drop_maildir(daemon.spool, message(subject=f"n{n}"))
    smtp_server.wait_for(10, timeout=15)
    sent = daemon.wait_event("sent", count=10)
    times = sorted(to_timestamp(e["timestamp"]) for e in sent)
    assert times[-1] - times[0] >= 0.9, times
    assert daemon.events("waiting"), "some messages must have waited for their turn"
    assert wait_until(lambda: daemon.census()["deferred"] == 0, 5, "deferred/ to empty")


def test_throttling_reply_pauses_the_relay(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """SES's "454 Throttling failure" defers the message and pauses the whole relay: the next
    message waits (no attempt) instead of hammering it, and both go once the pause is over."""
    daemon = make_daemon(smtp_server)
    smtp_server.fail_mail = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
    smtp_server.fail_next = 1
    drop_maildir(daemon.spool, message(subject="first"))
    (throttled,) = daemon.wait_event("relay_throttled")
    assert throttled["relay"] == "main" and throttled["code"] == 454
    daemon.wait_event("deferred")
    drop_maildir(daemon.spool, message(subject="second"))
    (waiting, *_) = daemon.wait_event("waiting")
    assert "is paused (the account is sending too fast" in waiting["detail"]
    paused_until = to_timestamp(throttled["paused_until"])
    got = smtp_server.wait_for(2, timeout=PAUSE_FIRST + 10)
    assert sorted(r.data.split(b"Subject: ")[1][:6] for r in got) == [b"first\r", b"second"]
    # The server has both before the daemon has logged the second: wait for its lines.
    sent = daemon.wait_event("sent", count=2)
    assert min(to_timestamp(e["timestamp"]) for e in sent) >= paused_until - 0.05


def test_which_replies_count_as_throttling() -> None:
    """Throttling replies are told apart from other 4xx replies (4.7.0 alone is not one)."""
    assert is_throttling(454, "4.7.0 Throttling failure: Maximum sending rate exceeded.")
    assert is_throttling(451, "4.7.500 Server busy. Please try again later.")
    assert is_throttling(421, "4.7.28 Our system has detected an unusual rate of mail")
    assert not is_throttling(452, "4.2.2 Mailbox full, quota exceeded")
    assert not is_throttling(451, "4.3.0 Temporary local problem")
    assert not is_throttling(451, "4.7.0 Temporary authentication failure")
    assert not is_throttling(554, "5.7.1 Throttling failure")  # permanent: not ours to pace
    assert not is_throttling(None, "throttled")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pickupd.toml"
    path.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n{text}')
    return path


def test_limits_as_providers_say_them(tmp_path: Path) -> None:
    """The presets fill each mailbox's limits, a relay's own override them kind by kind,
    `rate` is the older spelling, and `pickupd check` shows what applies and who set it."""
    path = _config(
        tmp_path,
        """
[relays.m365]
provider = "microsoft365"
mailbox_limits = ["20 messages/min"]
[relays.ses]
provider = "ses"
region = "eu-west-1"
limits = ["14 recipients/s", "50,000 recipients/day"]
[senders."noreply@example.com"]
relay = "m365"
[senders."billing@example.com"]
relay = "ses"
rate = "5/s"
""",
    )
    config = load(path)
    m365 = config.relays["m365"]
    assert [str(x) for x in m365.mailbox_limits or ()] == [
        "10000 recipients/day",
        "3 connections",
        "500 recipients/message",
        "20 messages/min",
    ]
    assert [str(x) for x in config.relays["ses"].limits or ()] == [
        "50 recipients/message",
        "14 recipients/s",
        "50000 recipients/day",
    ]
    assert config.sender_rule("billing@example.com").limits == (  # type: ignore[union-attr]
        parse_limit("5 messages/s"),
    )
    checked = pickupd("check", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    assert (
        "limits: relays.m365.mailbox_limits (each login): 10000 recipients/day"
        " (microsoft365's), 3 connections (microsoft365's), 500 recipients/message"
        " (microsoft365's), 20 messages/min"
    ) in checked.stdout
    assert f"kept in {tmp_path / 'spool' / 'ledger.json'}" in checked.stdout


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('["30 messages"]', 'has no window ("/min", "/day", "/60s")'),
        ('["3 connections/min"]', "connections are counted open at once"),
        ('["10 messages/fortnight"]', 'unknown window "/fortnight"'),
        ('["0 recipients/day"]', "at least 1"),
        ('"30/min"', "expected an array like"),
    ],
)
def test_a_bad_limit_names_its_key(tmp_path: Path, value: str, says: str) -> None:
    path = _config(
        tmp_path,
        f'[relays.main]\nhost = "h"\nlimits = {value}\n[senders."a@b.c"]\nrelay = "main"\n',
    )
    with pytest.raises(ConfigError) as raised:
        load(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}: relays.main.limits: ") and says in problem, problem


def test_a_store_password_never_goes_in_clear(tmp_path: Path) -> None:
    secret = tmp_path / "redis.password"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    path = _config(
        tmp_path,
        f'[limits]\nstore = "redis://redis.example.net:6379/0"\npassword_file = "{secret}"\n'
        '[relays.main]\nhost = "h"\n[senders."a@b.c"]\nrelay = "main"\n',
    )
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert "limits.store: the password would go in clear to redis.example.net" in str(
        raised.value.problems
    )

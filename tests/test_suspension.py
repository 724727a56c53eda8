"""A relay that does not answer is suspended and probed, not hammered (smtp/suspension.py), and
deferred mail is taken by its due time, also when another process made it due."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from harness import PICKUPD, Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.outcome import Delivery, RecipientResult, SessionFault
from pickupd.smtp.suspension import HOLD_PROBES, Change, Suspensions, Turned
from pickupd.workers.shares import Part, owns


def _dead(relay: str = "main") -> Delivery:
    return Delivery(
        relay,
        deferred=(RecipientResult("a@b.c", 0, "x"),),
        text="cannot connect: refused",
        session_error=SessionFault.CONNECT,
    )


def test_the_suspension_arithmetic() -> None:
    """Three failures suspend; the first message to wait comes back for the probe, the rest
    wait longer; one probe at a time; a failed probe arms the next from the waiting ones; the
    first success ends it and hands back what waited; a failed login never counts."""
    s = Suspensions()
    now = 1000.0

    def seen(delivery: Delivery, at: float, probe: bool = False, msg_id: str = "") -> Change:
        return s.observe(
            "main", delivery, at, msg_id, suspend_after=3, probe_interval=30, probe=probe
        )

    for _ in range(2):
        assert seen(_dead(), now) == Change()
    auth = Delivery(
        "main", deferred=(RecipientResult("a@b.c", 535, "no"),), session_error=SessionFault.AUTH
    )
    assert seen(auth, now) == Change()
    assert s.admit("main", now, 30).go  # the login failure reset the count
    seen(_dead(), now, msg_id="F1")
    seen(_dead(), now, msg_id="F2")
    assert seen(_dead(), now, msg_id="F3") == Change(Turned.SUSPENDED)
    armed = s.admit("main", now + 1, 30)
    assert not armed.go and armed.until == now + 30  # back for the probe
    assert "relay_suspended" in armed.detail and "cannot connect: refused" in armed.detail
    s.waiting("main", "ID0")
    held = s.admit("main", now + 1, 30)
    assert not held.go and held.until == now + 1 + 30 * HOLD_PROBES
    s.waiting("main", "ID1")
    assert s.admit("other", now + 1, 30).go  # other relays are untouched
    assert not s.admit("main", now + 29, 30).go
    probe = s.admit("main", now + 31, 30)
    assert probe.go and probe.probe
    assert not s.admit("main", now + 32, 30).go  # one probe at a time
    assert seen(_dead(), now + 32, probe=True, msg_id="P1") == Change(rearm=("F1", now + 62))
    assert not s.admit("main", now + 40, 30).go
    probe = s.admit("main", now + 63, 30)
    assert probe.probe
    sent = Delivery("main", sent=("a@b.c",), code=250)
    # Back: what failed in the outage comes back with what waited, the first probe too.
    resumed = seen(sent, now + 63, probe=True)
    assert resumed == Change(Turned.RESUMED, ("F2", "F3", "ID0", "ID1", "P1"))
    assert s.admit("main", now + 64, 30).go and s.suspended() == []


def test_a_dead_relay_is_suspended_probed_and_resumed(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A relay that greets with 421 gets three connections, then one probe a second; the
    other relay's mail flows meanwhile; once it answers, all of its mail goes at once, none
    of it counted as more than the attempts really made."""
    dead, other = smtp_factory(greeting="421"), smtp_factory()
    relays = {
        "main": relay_for(dead, probe_interval="1s"),
        "other": relay_for(other),
    }
    senders = {"app@example.com": {"relay": "main"}, "ops@example.com": {"relay": "other"}}
    daemon = make_daemon(
        relays=relays,
        senders=senders,
        dispatch={"workers": 1, "concurrency": 1},
        retry={"schedule": ["1h"]},
    )
    for n in range(20):
        drop_maildir(daemon.spool, message(subject=f"m{n}"))
    (suspended,) = daemon.wait_event("relay_suspended")
    assert suspended["relay"] == "main" and "421" in suspended["detail"]
    assert dead.sessions == 3
    for n in range(3):
        drop_maildir(daemon.spool, message(sender="ops@example.com", subject=f"o{n}"))
    other.wait_for(3)
    daemon.wait_event("waiting", count=17)
    queue = subprocess.run(
        [PICKUPD, "queue", "-c", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert queue.returncode == 0, queue.stderr
    assert queue.stdout.count("relay_suspended: main is not answering") >= 17, queue.stdout
    started, before = time.monotonic(), dead.sessions
    wait_until(lambda: dead.sessions >= before + 2, 5, "two probes")
    probes = dead.sessions - before
    assert probes <= (time.monotonic() - started) / 1.0 + 2  # about one a second, never more
    dead.greeting = None  # it answers again
    got = dead.wait_for(20, timeout=10)
    assert len({r.data for r in got}) == 20
    (resumed,) = daemon.wait_event("relay_resumed")
    assert resumed["waiting"] >= 1
    waited = [e for e in daemon.events("waiting") if "relay_suspended" in e.get("detail", "")]
    assert waited, "the suspended relay's mail waited (no attempt each)"
    wait_until(lambda: daemon.census()["deferred"] == 0, 5, "deferred/ to empty")


def test_mail_made_due_by_another_process_is_taken_at_once(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A message the daemon deferred for an hour, made due by `pickupd retry` (another
    process), goes out within a second: the watch reports it and one stat dates it, with no
    rescan of deferred/."""
    daemon = make_daemon(
        smtp_server, retry={"schedule": ["1h"]}, dispatch={"rescan_interval": "1h"}
    )
    smtp_server.fail_mail, smtp_server.fail_next = "451 4.3.0 try later", 1
    drop_maildir(daemon.spool, message())
    (deferred,) = daemon.wait_event("deferred")
    retried = subprocess.run(
        [PICKUPD, "retry", "-c", str(daemon.config_path), deferred["id"]],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert retried.returncode == 0, retried.stderr
    started = time.monotonic()
    smtp_server.wait_for(1, timeout=5)
    assert time.monotonic() - started < 2.0
    (sent,) = daemon.wait_event("sent")
    assert sent["id"] == deferred["id"]


def test_one_process_finding_a_relay_dead_holds_it_so_for_the_whole_service(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """Two processes and a relay that greets with 421: the main process's own mail fails
    three times and suspends it; mail that is the worker's to send, dropped afterwards, waits
    without a connection (the main process told the worker), where the worker used to open
    three more; when a probe gets through, the mail of both goes."""
    dead = smtp_factory(greeting="421")
    daemon = make_daemon(
        relays={"main": relay_for(dead, probe_interval="4s")},
        dispatch={"workers": 2, "concurrency": 2},
        retry={"schedule": ["1h"]},
    )

    def drop_for(worker: int, count: int) -> None:
        names = (f"{worker}-{n}.pk" for n in range(1000))
        for name in [n for n in names if owns(Part(worker, 2), n)][:count]:
            path = daemon.spool / "pickup" / "tmp" / name
            path.write_bytes(message(subject=name))
            path.rename(daemon.spool / "pickup" / "new" / name)

    drop_for(0, 3)
    daemon.wait_event("relay_suspended")
    assert dead.sessions == 3
    drop_for(1, 3)
    wait_until(lambda: len(daemon.events("waiting")) >= 3, 5, "the worker's mail to wait")
    assert dead.sessions == 3, "the worker connected to a relay the service holds dead"
    dead.greeting = None  # it answers again
    got = dead.wait_for(6, timeout=15)
    assert len({r.data for r in got}) == 6

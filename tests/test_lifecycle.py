"""The service's life, end to end: start (what waits is taken, stale claims recovered, a
killed daemon's locks removed, a dead host's claims taken over), stop (SIGTERM loses
nothing), --once, and the outcomes a run leaves in its folders (sent/, expiry)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from harness import Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd import ids
from pickupd.spool.sidecar import Sidecar, from_timestamp


def test_expiry(smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]) -> None:
    """Mail still undelivered after max_age fails as `expired`, after a last attempt."""
    smtp_server.fail_rcpt = {"alice@example.net": "450 4.2.1 mailbox busy"}
    daemon = make_daemon(smtp_server, retry={"schedule": ["200ms"], "max_age": "1s"})
    drop_maildir(daemon.spool, message())
    (failed,) = daemon.wait_sidecars("failed", timeout=15)
    assert failed["reason"] == "expired" and failed["attempts"] >= 3
    assert "450 4.2.1 mailbox busy" in failed["detail"]
    assert daemon.census()["deferred"] == 0


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


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended: its locks are released)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

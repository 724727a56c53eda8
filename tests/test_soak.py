"""Soak: a few thousand messages through restarts, kills and a flaky server. Slow: -m slow."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, message, wait_until
from smtpserver import SmtpServer

TOTAL = 3000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nothing_lost_through_restarts_kills_and_faults(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """Messages dropped while the daemon is stopped (SIGTERM), killed (SIGKILL) and restarted,
    and while the server defers and drops connections now and then: every one is received,
    nothing is left in the spool, and duplicates happen only where an outcome was unknown or
    a process was killed mid-send."""
    relays = {"main": {"host": smtp_server.host, "port": smtp_server.port, "security": "none"}}
    daemon = Daemon(
        tmp_path,
        relays,
        {"app@example.com": {"relay": "main"}},
        retry={"schedule": ["200ms"], "max_age": "1h"},
    )
    daemon.start()
    ids = [f"<soak-{n}@example.com>" for n in range(TOTAL)]
    for n, mid in enumerate(ids):
        drop_maildir(daemon.spool, message(subject=f"soak {n}", message_id=mid))
        if n == TOTAL // 5:
            smtp_server.fail_mail, smtp_server.fail_next = "451 4.3.0 busy", 20
        elif n == 2 * TOTAL // 5:
            assert daemon.stop(signal.SIGTERM) == 0
            daemon.start()
        elif n == 3 * TOTAL // 5:
            smtp_server.drop_after_data, smtp_server.fail_next = True, 5
        elif n == 4 * TOTAL // 5:
            daemon.stop(signal.SIGKILL)
            daemon.start()
    wait_until(
        lambda: (
            {
                r.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
                for r in smtp_server.received
            }
            >= set(ids)
        ),
        120,
        "every message to arrive",
    )
    wait_until(lambda: not any(daemon.census().values()), 30, "the spool to empty")
    assert daemon.stop() == 0
    counts = Counter(
        r.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode() for r in smtp_server.received
    )
    duplicates = sum(c - 1 for c in counts.values())
    unknown = len(daemon.events("outcome_unknown"))
    # A duplicate needs an unknown outcome or the kill (at most one message per worker).
    assert duplicates <= unknown + 8, (duplicates, unknown)
    print(
        f"soak: {TOTAL} messages, {duplicates} duplicates, {unknown} unknown outcomes,"
        f" {smtp_server.sessions} sessions, {time.strftime('%X')}"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crash_loop_loses_nothing_and_leaves_nothing_out_of_place(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """20 times kill -9 over a backlog of 600 messages, each time at another moment: every
    message arrives; a duplicate only for a message in flight at a kill (at most concurrency
    per kill); afterwards nothing is left in active/, deferred/ or pickup/, and no stray
    sidecar, temp or lock file of the killed processes."""
    relays = {"main": {"host": smtp_server.host, "port": smtp_server.port, "security": "none"}}
    daemon = Daemon(tmp_path, relays, {"app@example.com": {"relay": "main"}})
    ids = [f"<crash-{n}@example.com>" for n in range(600)]
    for n, mid in enumerate(ids):
        drop_maildir(daemon.spool, message(subject=f"crash {n}", message_id=mid))
    kills = 20
    for cycle in range(kills):
        daemon.start()
        time.sleep(0.05 + (cycle % 5) * 0.04)  # kill at a different moment each time
        daemon.stop(signal.SIGKILL)
    daemon.start()

    def received() -> Counter[str]:
        return Counter(
            r.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
            for r in smtp_server.received
        )

    wait_until(lambda: set(received()) >= set(ids), 120, "every message to arrive")
    wait_until(lambda: not any(daemon.census().values()), 30, "the spool to empty")
    assert daemon.stop() == 0
    duplicates = sum(c - 1 for c in received().values())
    assert duplicates <= kills * 8, duplicates  # concurrency 8: in flight at each kill
    leftovers = [
        p.relative_to(daemon.spool)
        for folder in ("active", "deferred", "pickup/new", "pickup/tmp")
        for p in (daemon.spool / folder).iterdir()
    ]
    assert leftovers == [], leftovers
    print(f"crash loop: {len(ids)} messages, {kills} kills, {duplicates} duplicates")

"""Several hosts on one spool, as several hosts: each daemon in a UTS namespace of its own
(`unshare -u`, its own host name), all on one spool, sharing one Redis. Needs root (CI runs
as root)."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, message, wait_until
from redisserver import RedisServer
from smtpserver import SmtpServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unshare -u needs root (CI is root)")


def _subject(data: bytes) -> bytes:
    return data.split(b"Subject: ")[1].split(b"\r")[0]


def test_a_host_killed_on_a_shared_spool_loses_nothing(
    smtp_server: SmtpServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Hosts alpha and beta share one spool and one Redis. alpha is killed with -9 while its
    sessions hang at the final dot: beta takes its claims once their lease runs out (its log
    says lease_expired), every message arrives, and only those alpha had in flight can
    arrive twice."""
    spool = tmp_path / "spool"
    sections = {
        "spool": {"path": str(spool), "claim_lease": "3s"},
        "dispatch": {"workers": 1, "concurrency": 2, "settle": "100ms", "rescan_interval": "1s"},
        "retry": {"schedule": ["300ms"], "max_age": "1h"},
        "limits": {"store": redis_server.url, "hosts": 2},
    }
    relays = {"main": {"host": smtp_server.host, "port": smtp_server.port, "security": "none",
                       "timeout": "2s"}}  # fmt: skip
    senders = {"app@example.com": {"relay": "main", "limits": ["1000 messages/min"]}}
    alpha = Daemon(tmp_path / "alpha", relays, senders, **sections)
    beta = Daemon(tmp_path / "beta", relays, senders, **sections)
    smtp_server.stall = "DOT"  # every session hangs at the final dot: claims stay in flight
    alpha.start(host="alpha")
    try:
        for n in range(12):
            drop_maildir(spool, message(subject=f"m{n}"))
        active = spool / "active"

        def held() -> list[str]:
            return [p.name for p in active.iterdir() if ".alpha-" in p.name and p.name[0] != "."]

        wait_until(lambda: len(held()) >= 2, 10, "alpha to hold two claims")
        beta.start(host="beta")
        alpha.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        alpha.proc.wait(10)  # type: ignore[union-attr]
        in_flight = held()
        assert in_flight
        smtp_server.stall = None
        got = smtp_server.wait_for(12, timeout=40)
        taken = beta.wait_event("lease_expired", count=len(in_flight), timeout=20)
        assert {e["id"] for e in taken} >= {name.split(".")[0] for name in in_flight}
        wait_until(lambda: len({_subject(r.data) for r in smtp_server.received}) == 12, 20)
        counts = collections.Counter(_subject(r.data) for r in smtp_server.received)
        assert set(counts) == {f"m{n}".encode() for n in range(12)}
        twice = [s for s, n in counts.items() if n > 1]
        assert len(twice) <= len(in_flight), (twice, in_flight)
        wait_until(lambda: not [p for p in active.iterdir() if not p.name.startswith(".")], 10)
        assert beta.census()["deferred"] == 0 and beta.census()["failed"] == 0
        assert len(got) >= 12
    finally:
        alpha.stop(signal.SIGKILL)
        assert beta.stop() == 0

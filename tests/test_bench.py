"""The benchmarks run end to end on a tiny workload (figures are not judged here: speed is
proven by running them, see bench/README.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.mark.skipif(
    shutil.which("smtp-sink") is None and not Path("/usr/sbin/smtp-sink").exists(),
    reason="needs Postfix's smtp-sink (tests/debian-packages.sh installs it)",
)
def test_compare_runs_end_to_end_on_a_tiny_workload() -> None:
    """bench/compare.py relays through pickupd (and, as root, a private Postfix instance)
    and the ceilings, and reports a median for every scenario it ran."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--rounds", "1", "--small", "20", "--large", "3", "--latency", "2", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    medians = doc["medians"]
    expected = {"pickupd 2KB warm", "pickupd 2KB cold", "pickupd 100KB warm", "pickupd latency"}
    expected |= {"smtp-source 2KB", "aiosmtplib 2KB", "smtp-source 100KB", "aiosmtplib 100KB"}
    if doc["postfix"]:  # as root, with Postfix installed and a private instance starting
        expected |= {"postfix 2KB warm", "postfix 2KB cold", "postfix 100KB warm"}
    assert expected <= set(medians), sorted(medians)
    assert all(value["msg_per_s"] > 0 for key, value in medians.items() if "latency" not in key)


@pytest.mark.skipif(
    shutil.which("smtp-sink") is None and not Path("/usr/sbin/smtp-sink").exists(),
    reason="needs Postfix's smtp-sink (tests/debian-packages.sh installs it)",
)
def test_backlog_runs_end_to_end_on_a_tiny_workload() -> None:
    """bench/backlog.py defers a storm, idles over a waiting backlog and rides out a dead
    relay, checking every message, and reports each figure."""
    done = subprocess.run(
        [
            sys.executable, str(BENCH / "backlog.py"), "--storm", "300", "--waiting", "2000",
            "--idle", "2", "--latency", "3", "--dead", "300", "--probe", "1s", "--outage", "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["storm"]["messages"] == 300 and doc["storm"]["first_rate"] > 0
    assert doc["waiting"]["latency_waiting"]["p50_ms"] > 0
    dead = doc["dead"]
    assert 0 < dead["connection_attempts_while_down"] < 300  # suspended, not hammered
    assert dead["first_sent_after_return_s"] >= 0

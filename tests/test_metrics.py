"""The Prometheus endpoint: the real daemon with `[metrics] listen`, scraped over HTTP."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from daemon import PICKUPD, Daemon, drop_maildir, message, wait_until
from smtpserver import SmtpServer

from pickupd.metrics import Metrics
from pickupd.spool import Spool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value, from the text exposition format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_daemon_metrics_count_outcomes_and_queue(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    port = free_port()
    daemon = make_daemon(
        smtp_server,
        metrics={"listen": f"127.0.0.1:{port}"},
        retry={"schedule": ["1h"], "max_age": "1d"},
    )
    smtp_server.fail_rcpt["nobody@example.net"] = "550 5.1.1 No such user"
    smtp_server.fail_rcpt["later@example.net"] = "451 4.2.0 Try later"
    drop_maildir(daemon.spool, message(to="alice@example.net"))
    drop_maildir(daemon.spool, message(to="nobody@example.net"))
    drop_maildir(daemon.spool, message(to="later@example.net"))
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    daemon.wait_event("failed", count=2)
    daemon.wait_event("deferred")

    m = wait_until(
        lambda: (
            (s := scrape(port)).get('pickupd_messages_total{outcome="sent",reason="",relay="main"}')
            and s
        ),
        5,
        "the sent counter",
    )
    assert m['pickupd_messages_total{outcome="sent",reason="",relay="main"}'] == 1
    assert m['pickupd_messages_total{outcome="failed",reason="rejected",relay="main"}'] == 1
    assert m['pickupd_messages_total{outcome="failed",reason="sender_not_allowed",relay=""}'] == 1
    assert m['pickupd_messages_total{outcome="deferred",reason="",relay="main"}'] == 1
    assert m['pickupd_send_duration_seconds_count{relay="main"}'] == 3
    assert m['pickupd_queue_messages{folder="deferred"}'] == 1
    assert m['pickupd_queue_messages{folder="failed"}'] == 2
    assert m['pickupd_queue_messages{folder="pickup"}'] == 0
    assert m['pickupd_queue_messages{folder="active"}'] == 0
    assert 0 <= m["pickupd_oldest_deferred_age_seconds"] < 60


def test_connection_errors_are_counted_by_kind(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    port, closed = free_port(), free_port()
    relay = {"host": "127.0.0.1", "port": closed, "security": "none"}
    daemon = make_daemon(relays={"main": relay}, metrics={"listen": f"127.0.0.1:{port}"})
    drop_maildir(daemon.spool, message())
    daemon.wait_event("deferred")
    samples = scrape(port)
    assert samples['pickupd_relay_connection_errors_total{kind="connect",relay="main"}'] >= 1


def test_oldest_deferred_age_comes_from_the_oldest_sidecar(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.ensure()
    for msg_id, first_seen in (
        ("01ARZ3NDEKTSV4RRFFQ69G5FAV", "2020-01-01T00:00:00.000+00:00"),
        ("06H0WFKWKHYM6MMWHCS4K1C59W", "2026-01-01T00:00:00.000+00:00"),
    ):
        (spool.deferred / f"{msg_id}.eml").write_bytes(b"x")
        (spool.deferred / f"{msg_id}.json").write_text(
            f'{{"id": "{msg_id}", "first_seen": "{first_seen}", "recipients": [], "attempts": 1}}'
        )
    metrics = Metrics(spool)
    port = free_port()
    metrics.start(("127.0.0.1", port))
    try:
        samples = scrape(port)
    finally:
        metrics.stop()
    assert samples["pickupd_oldest_deferred_age_seconds"] > 6 * 365 * 86400
    assert samples['pickupd_queue_messages{folder="deferred"}'] == 2


def test_a_busy_port_is_a_one_line_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(
            tmp_path,
            {"main": {"host": "localhost", "security": "none"}},
            {"app@example.com": {"relay": "main"}},
            metrics={"listen": f"127.0.0.1:{port}"},
        )
        done = subprocess.run(
            [PICKUPD, "run", "-c", str(daemon.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 78
    assert re.search(rf"metrics.listen: cannot listen on 127.0.0.1:{port}", done.stderr)
    assert "Traceback" not in done.stderr

"""The Prometheus endpoint: the real daemon with `[metrics] listen`, scraped over HTTP."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    PICKUPD,
    Daemon,
    NotifySocket,
    drop_eml,
    drop_maildir,
    free_port,
    message,
    pickupd,
    scrape,
    secret_file,
    wait_until,
)
from smtpserver import SmtpServer, TestCA

from pickupd.config.metrics import MetricsConfig
from pickupd.hosting.metrics import Metrics
from pickupd.spool.folders import Spool


def test_daemon_metrics_count_outcomes_and_queue(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A scrape of the running daemon counts each outcome and each folder of the spool."""
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

    # Worker processes report their counts to the main process every 0.2 s.
    m = wait_until(
        lambda: (
            (s := scrape(port)).get('pickupd_send_duration_seconds_count{relay="main"}') == 3
            and s.get(
                'pickupd_messages_total{outcome="failed",reason="sender_not_allowed",relay=""}'
            )
            and s
        ),
        5,
        "the counters of all four outcomes",
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
    """A relay that refuses connections counts a connection error of kind "connect"."""
    port, closed = free_port(), free_port()
    relay = {"host": "127.0.0.1", "port": closed, "security": "none"}
    daemon = make_daemon(relays={"main": relay}, metrics={"listen": f"127.0.0.1:{port}"})
    drop_maildir(daemon.spool, message())
    daemon.wait_event("deferred")
    key = 'pickupd_relay_connection_errors_total{kind="connect",relay="main"}'
    # A worker process's count reaches the main process's endpoint within 0.2 s.
    samples = wait_until(lambda: (s := scrape(port)).get(key) and s, 5, "the error counter")
    assert samples[key] >= 1


def test_oldest_deferred_age_comes_from_the_oldest_sidecar(tmp_path: Path) -> None:
    """The oldest-deferred gauge reads the first_seen of the oldest id's sidecar."""
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
    metrics.start(MetricsConfig(listen=("127.0.0.1", port)))
    try:
        samples = scrape(port)
    finally:
        metrics.stop()
    assert samples["pickupd_oldest_deferred_age_seconds"] > 6 * 365 * 86400
    assert samples['pickupd_queue_messages{folder="deferred"}'] == 2


def test_a_busy_port_is_a_one_line_config_error(tmp_path: Path) -> None:
    """A metrics port already in use stops `pickupd run` with one line and exit 78."""
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
    # Refused before the spool was touched: none of its folders were made.
    assert not [d for d in ("active", "deferred", "failed", "hold") if (daemon.spool / d).exists()]


def test_queue_metrics_and_status_line_count_alike(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], notify_socket: NotifySocket
) -> None:
    """`pickupd queue`, the Prometheus gauge and the systemd status line count each folder
    by one rule: dotfiles and pickup/tmp/ files are not messages, `.EML` is one."""
    port = free_port()
    smtp_server.fail_mail = "451 4.3.0 Try again later"
    daemon = make_daemon(
        smtp_server,
        start=False,
        metrics={"listen": f"127.0.0.1:{port}"},
        dispatch={"settle": "1h"},  # direct .eml files stay in pickup/ for the count
        retry={"schedule": ["1h"], "max_age": "1d"},
    )
    daemon.start(env={"NOTIFY_SOCKET": str(notify_socket.path)})
    drop_maildir(daemon.spool, message())  # deferred: the relay answers 451
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))  # failed
    daemon.wait_sidecars("deferred")
    daemon.wait_sidecars("failed")
    drop_eml(daemon.spool, "UPPER.EML", message())
    drop_eml(daemon.spool, "lower.eml", message())
    drop_eml(daemon.spool, ".hidden.eml", message())
    drop_eml(daemon.spool, "notes.txt", b"not mail")
    (daemon.spool / "pickup" / "new" / ".half-written").write_bytes(message())
    (daemon.spool / "pickup" / "tmp" / "being-written").write_bytes(message())
    (daemon.spool / "deferred" / ".stray.eml").write_bytes(b"x")

    assert daemon.proc is not None
    before = len(notify_socket.having("STATUS"))
    daemon.proc.send_signal(signal.SIGHUP)  # a reload says READY=1 with a fresh status line
    statuses = wait_until(
        lambda: len(found := notify_socket.having("STATUS")) > before and found, 5, "STATUS"
    )
    status = statuses[-1]["STATUS"].partition("queue: ")[2]
    from_status = {k: int(v) for k, v in (part.split(" ") for part in status.split(", "))}
    listed = json.loads(pickupd("queue", "--json", "-c", str(daemon.config_path)).stdout)
    from_queue = {name: f["count"] for name, f in listed["folders"].items()}
    samples = scrape(port)
    from_metrics = {
        name: int(samples[f'pickupd_queue_messages{{folder="{name}"}}']) for name in from_queue
    }
    expected = {"pickup": 2, "deferred": 1, "hold": 0, "failed": 1}
    assert from_status == expected, status
    assert {k: from_queue[k] for k in expected} == expected, from_queue
    assert from_metrics == from_queue


def test_metrics_over_tls_with_basic_auth_and_no_store_gauge_without_a_store(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], test_ca: TestCA, tmp_path: Path
) -> None:
    """With tls_cert_file and basic_auth_user, /metrics answers HTTPS only, with a
    certificate the CA verifies, 401 without the user's password (or with a wrong one), and
    the metrics with it; without a store there is no pickupd_limit_store_up to alert on."""
    port = free_port()
    cert, key = test_ca.server_files(tmp_path)
    key.chmod(0o600)
    secret = secret_file(tmp_path / "metrics.password", "scrape-s3cret")
    make_daemon(
        smtp_server,
        metrics={
            "listen": f"127.0.0.1:{port}",
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            "basic_auth_user": "prometheus",
            "basic_auth_password_file": str(secret),
        },
    )
    url = f"https://127.0.0.1:{port}/metrics"
    context = test_ca.client_context()

    def get(user: str | None, password: str = "") -> tuple[int, str]:
        request = urllib.request.Request(url)
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    assert get(None)[0] == 401
    assert get("prometheus", "wrong")[0] == 401
    status, text = get("prometheus", "scrape-s3cret")
    assert status == 200 and "pickupd_queue_messages" in text
    assert "pickupd_limit_store_up" not in text
    with pytest.raises(OSError):  # plain HTTP is not served (a reset, or an error)
        scrape(port)


def test_metrics_that_would_send_a_password_in_clear_are_refused(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """basic_auth_user on a non-loopback listen without TLS is a config error naming the key;
    an endpoint open beyond loopback with no auth is a warning of check, saying what it shows."""
    secret = secret_file(tmp_path / "metrics.password", "pw")
    daemon = make_daemon(
        smtp_server,
        start=False,
        metrics={
            "listen": "0.0.0.0:9464",
            "basic_auth_user": "prometheus",
            "basic_auth_password_file": str(secret),
        },
    )
    refused = pickupd("check", "-c", str(daemon.config_path))
    assert refused.returncode == 78
    assert "metrics.basic_auth_user: the password would go in clear" in refused.stderr
    daemon.write_config({**daemon.doc, "metrics": {"listen": "0.0.0.0:9464"}})
    warned = pickupd("check", "-c", str(daemon.config_path))
    assert warned.returncode == 0, warned.stderr
    assert "metrics.listen: 0.0.0.0:9464 shows the sender logins" in warned.stdout

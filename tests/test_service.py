"""Service integration: the systemd unit, the notify protocol and classic daemon mode, each
with the real `pickupd` process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from harness import PICKUPD, Daemon, NotifySocket, drop_maildir, manual, message, wait_until
from smtpserver import SmtpServer

UNIT = Path(__file__).parent.parent / "systemd" / "pickupd.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped unit, with ExecStart pointing at this venv's pickupd (the unit names
    /opt/pickupd/bin/pickupd, absent here), verifies without a word on stderr; it names
    the virtualenv the README's install steps make."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, (
        "systemd-analyze is needed (Debian's systemd; tests/debian-packages.sh installs it)"
    )
    unit = tmp_path / "pickupd.service"
    unit.write_text(UNIT.read_text().replace("/opt/pickupd/bin/pickupd", PICKUPD))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "KillMode=mixed",  # SIGTERM to the main process, which passes it on to its workers
        "RestartPreventExitStatus=78",
        "User=pickupd",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH\n",  # to read the drops, nothing more
        "AmbientCapabilities=CAP_DAC_READ_SEARCH\n",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "ProcSubset=pid",
        "InaccessiblePaths=-/etc/shadow ",  # what CAP_DAC_READ_SEARCH must not reach
        " -/etc/ssh ",
        " -/etc/ssl/private ",
    ):
        assert directive in text, directive
    readme = manual()
    assert "ExecStart=/opt/pickupd/bin/pickupd run" in text
    assert "python3 -m venv /opt/pickupd && /opt/pickupd/bin/pip install ." in readme
    # RestartPreventExitStatus= does not cover ExecStartPre=: a pre-check would restart a
    # broken config for ever; `pickupd run` refuses it with 78 itself.
    assert "\nExecStartPre=" not in text


def test_unit_exposure_score_is_ok(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the shipped unit's exposure at most 2.0 ("OK"); the
    score is printed."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, (
        "systemd-analyze is needed (Debian's systemd; tests/debian-packages.sh installs it)"
    )
    unit = tmp_path / "pickupd.service"
    unit.write_text(UNIT.read_text().replace("/opt/pickupd/bin/pickupd", PICKUPD))
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for pickupd.service: ([0-9.]+) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    print(f"systemd-analyze security: exposure {found.group(1)} {found.group(2)}")
    assert float(found.group(1)) <= 2.0, done.stdout


def test_notify_ready_status_watchdog_reload_stopping(
    smtp_server: SmtpServer,
    make_daemon: Callable[..., Daemon],
    notify_socket: NotifySocket,
) -> None:
    """Under Type=notify: READY with the status line, WATCHDOG pings, RELOADING, STOPPING."""
    daemon = make_daemon(smtp_server, start=False)
    daemon.start(env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"})
    (ready, *_) = wait_until(lambda: notify_socket.having("READY"), 5, "READY=1")
    assert ready["READY"] == "1" and "queue: pickup 0, deferred 0" in ready["STATUS"]
    drop_maildir(daemon.spool, message())
    smtp_server.wait_for(1)
    wait_until(lambda: len(notify_socket.having("WATCHDOG")) >= 5, 5, "WATCHDOG=1 pings")

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify_socket.having("RELOADING"), 5, "RELOADING=1")
    reload_at = notify_socket.messages.index(notify_socket.having("RELOADING")[-1])
    wait_until(lambda: len(notify_socket.having("READY")) >= 2, 5, "READY=1 after the reload")
    after = notify_socket.having("READY")[-1]
    assert notify_socket.messages.index(after) > reload_at
    assert "sent 1," in after["STATUS"]
    assert notify_socket.having("RELOADING")[-1]["MONOTONIC_USEC"].isdigit()

    assert daemon.stop() == 0
    assert notify_socket.having("STOPPING")


def test_no_watchdog_pings_without_watchdog_usec(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], notify_socket: NotifySocket
) -> None:
    """Without WATCHDOG_USEC no WATCHDOG=1 is sent."""
    daemon = make_daemon(smtp_server, start=False)
    daemon.start(env={"NOTIFY_SOCKET": str(notify_socket.path)})
    wait_until(lambda: notify_socket.having("READY"), 5, "READY=1")
    # A reload's RELOADING and second READY come after the heartbeat's first round, which
    # would have pinged right after the first READY (datagrams keep their order).
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(notify_socket.having("READY")) >= 2, 5, "READY=1 after the reload")
    assert notify_socket.having("WATCHDOG") == []


def test_daemon_mode_detaches_with_a_locked_pidfile(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """run --daemon detaches, holds a locked pidfile a second instance respects."""
    daemon = make_daemon(smtp_server, start=False)
    pidfile, log = tmp_path / "pickupd.pid", tmp_path / "daemon.log"
    run = [PICKUPD, "run", "-c", str(daemon.config_path), "--daemon", "--pidfile", str(pidfile)]
    started = subprocess.run([*run, "--log-file", str(log)], timeout=30, check=False)
    assert started.returncode == 0
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 5, "pid"))
    try:
        assert pid != os.getpid()
        os.kill(pid, 0)  # alive
        wait_until(lambda: log.exists() and '"event": "ready"' in log.read_text(), 10, "ready")
        drop_maildir(daemon.spool, message())
        smtp_server.wait_for(1)

        second = subprocess.run(run, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 75
        assert f"pickupd is already running as pid {pid}" in second.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), 40, "the pidfile to be removed")
    assert '"event": "stopped"' in log.read_text()
    assert daemon.census()["active"] == 0

    no_pidfile = subprocess.run(
        [PICKUPD, "run", "-c", str(daemon.config_path), "--daemon"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert no_pidfile.returncode == 64 and "--pidfile" in no_pidfile.stderr

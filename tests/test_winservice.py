"""The Windows service's lifecycle, run on Linux: the real dispatcher in a ServiceHost, the
service manager played by a recorder of the states it is told (what cli/service.py passes on
to pywin32's ReportServiceStatus). The pywin32 calls themselves run only on Windows."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from harness import PICKUPD, Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.config.loading import load
from pickupd.hosting.servicehost import ServiceHost, State
from pickupd.service import GRACE, Service


class Manager:
    """Records every status report, as the Windows service manager would receive them."""

    def __init__(self) -> None:
        self.reports: list[tuple[State, float]] = []

    def __call__(self, state: State, wait_hint: float) -> None:
        self.reports.append((state, wait_hint))

    def states(self) -> list[State]:
        """The sequence of states, repeats (checkpoints) folded."""
        folded: list[State] = []
        for state, _ in self.reports:
            if not folded or folded[-1] is not state:
                folded.append(state)
        return folded


def test_start_relay_stop_with_a_send_in_flight(smtp_server: SmtpServer, tmp_path: Path) -> None:
    """The service host reports its states, relays, and on stop puts a stalled send back."""
    daemon = Daemon(
        tmp_path,
        {"main": relay_for(smtp_server, timeout="3s")},
        {"app@example.com": {"relay": "main"}},
    )
    manager = Manager()
    host = ServiceHost(load(daemon.config_path), manager, Service, GRACE)
    assert host.start(timeout=15)
    assert manager.states() == [State.START_PENDING, State.RUNNING]

    drop_maildir(daemon.spool, message(subject="while running"))
    smtp_server.wait_for(1)

    smtp_server.stall = "MAIL"  # the next send hangs until the relay's 3 s timeout
    drop_maildir(daemon.spool, message(subject="in flight at stop"))
    wait_until(lambda: "MAIL" in " ".join(smtp_server.commands[-1:]), 5, "the stalled MAIL")
    stopper = threading.Thread(target=host.stop)
    stopper.start()
    stopper.join(GRACE + 15)  # the manager's patience: the wait hint we gave it
    assert not stopper.is_alive()
    assert manager.states() == [
        State.START_PENDING,
        State.RUNNING,
        State.STOP_PENDING,
        State.STOPPED,
    ]
    assert all(hint >= 3 for state, hint in manager.reports if state is State.STOP_PENDING)
    (deferred,) = daemon.wait_sidecars("deferred")  # nothing lost: back in the queue
    assert deferred["attempts"] == 1
    assert daemon.census()["active"] == 0 and daemon.census()["pickup/new"] == 0


def test_a_dispatcher_that_cannot_start_reports_stopped(tmp_path: Path) -> None:
    """A dispatcher that cannot start makes the service host report STOPPED."""
    daemon = Daemon(
        tmp_path,
        {"main": {"host": "localhost", "security": "none"}},
        {"a@example.com": {"relay": "main"}},
    )
    config = load(daemon.config_path)
    (daemon.spool / "active").write_text("a file where a folder must be")
    manager = Manager()
    assert not ServiceHost(config, manager, Service, GRACE).start(timeout=10)
    assert manager.states() == [State.START_PENDING, State.STOPPED]


def test_service_command_says_windows_only_on_linux() -> None:
    """`pickupd service` on Linux says it is Windows only and exits 64."""
    done = subprocess.run(
        [PICKUPD, "service", "install"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 64
    assert done.stderr.strip().startswith("pickupd service: Windows only")

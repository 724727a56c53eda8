"""`pickupd service install|remove|start|stop|debug`: the dispatcher as a Windows service.

The only Windows-specific module. pywin32 (`pip install pickupd[windows]`) is imported here
and only when a `service` command runs on Windows; everything the service does is
hosting.servicehost.ServiceHost, which is plain Python and is tested on Linux.

Defaults: the config `%ProgramData%\\pickupd\\pickupd.toml`, and in it a spool such as
`%ProgramData%\\pickupd\\spool` (`pickupd init -c ... --spool ...` writes both).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pickupd.cli.common import EX_CONFIG, EX_OK, EX_USAGE, add_command, load_config
from pickupd.config.loading import Config
from pickupd.errors import CommandError
from pickupd.hosting.servicehost import ServiceHost, State, StatusReporter

__all__ = ["SERVICE_NAME", "default_config_path", "register"]

SERVICE_NAME = "pickupd"
DISPLAY_NAME = "pickupd mail dispatcher"
DESCRIPTION = "Relays mail dropped as files in a pickup folder over SMTP."


def default_config_path() -> Path:
    """%ProgramData%\\pickupd\\pickupd.toml (C:\\ProgramData when the variable is unset)."""
    return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "pickupd" / "pickupd.toml"


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the `service` subcommand; it sets `handler` (args -> exit code)."""
    service = add_command(
        commands,
        "service",
        _service,
        config=False,
        help="install, remove, start or stop pickupd as a Windows service (Windows only)",
        description="Manage the pickupd Windows service (needs pickupd[windows], i.e. "
        "pywin32). The service runs the same dispatcher as `pickupd run`, with the config "
        r"%ProgramData%\pickupd\pickupd.toml unless -c says otherwise. `debug` runs it in "
        "this console, as the service would.",
    )
    service.add_argument("action", choices=["install", "remove", "start", "stop", "debug"])
    service.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=r"config file (default: %%ProgramData%%\pickupd\pickupd.toml)",
    )


def _service(args: argparse.Namespace) -> int:
    if sys.platform != "win32":
        raise CommandError(
            EX_USAGE,
            "pickupd service: Windows only; on Linux use the systemd unit (systemd/) or"
            " `pickupd run --daemon`",
        )
    config_arg = args.config or str(default_config_path())
    if args.action in ("install", "debug"):
        load_config(config_arg)
    try:
        return _Win32().act(args.action, config_arg)
    except ImportError:
        raise CommandError(
            EX_CONFIG, "pickupd service: needs pywin32: pip install 'pickupd[windows]'"
        ) from None


class _Win32:
    """pywin32 calls, kept to this class: install/remove/start/stop and the service class."""

    def act(self, action: str, config_arg: str) -> int:
        import win32serviceutil

        if action == "install":
            win32serviceutil.InstallService(
                f"{__name__}.PickupdService",
                SERVICE_NAME,
                DISPLAY_NAME,
                startType=2,  # SERVICE_AUTO_START
                description=DESCRIPTION,
                exeArgs=f'-c "{config_arg}"',
            )
            print(
                f"installed service {SERVICE_NAME} (config {config_arg}); start it with"
                " `pickupd service start`"
            )
        elif action == "remove":
            win32serviceutil.RemoveService(SERVICE_NAME)
            print(f"removed service {SERVICE_NAME}")
        elif action == "start":
            win32serviceutil.StartService(SERVICE_NAME)
            win32serviceutil.WaitForServiceStatus(SERVICE_NAME, 4, 60)  # SERVICE_RUNNING
            print(f"service {SERVICE_NAME} running")
        elif action == "stop":
            win32serviceutil.StopService(SERVICE_NAME)
            print(f"service {SERVICE_NAME} stopped")
        else:  # debug: the service's work in this console, Ctrl-C stops it
            config = load_config(config_arg)
            host = _host(config, lambda state, hint: print(f"service: {state.value}"))
            if not host.start():
                return EX_CONFIG
            try:
                host.wait()
            except KeyboardInterrupt:
                host.stop()
        return EX_OK


def _host(config: Config, report: StatusReporter) -> ServiceHost:
    """A host of the service (imported here: the command line builds its parser from every
    command's module, and the service imports the whole pipeline)."""
    from pickupd.service import GRACE, Service

    return ServiceHost(config, report, Service, GRACE)


def _service_class() -> type:
    """The pywin32 ServiceFramework subclass (built on Windows only: it needs pywin32)."""
    import servicemanager
    import win32service
    import win32serviceutil

    states = {
        State.START_PENDING: win32service.SERVICE_START_PENDING,
        State.RUNNING: win32service.SERVICE_RUNNING,
        State.STOP_PENDING: win32service.SERVICE_STOP_PENDING,
        State.STOPPED: win32service.SERVICE_STOPPED,
    }

    class PickupdService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: list[str]) -> None:
            super().__init__(args)
            self.host: ServiceHost | None = None
            self.config_arg = str(default_config_path())
            if "-c" in args:
                self.config_arg = args[args.index("-c") + 1]

        def _report(self, state: State, wait_hint: float) -> None:
            self.ReportServiceStatus(states[state], waitHint=int(wait_hint * 1000))

        def SvcDoRun(self) -> None:
            try:
                config = load_config(self.config_arg)
            except CommandError as exc:
                servicemanager.LogErrorMsg(f"pickupd: bad config {self.config_arg}: {exc}")
                return
            self.host = _host(config, self._report)
            if self.host.start():
                self.host.wait()

        def SvcStop(self) -> None:
            if self.host is not None:
                self.host.stop()

    return PickupdService


def __getattr__(name: str) -> Any:
    # pythonservice.exe imports "pickupd.cli.service.PickupdService": build it on first use.
    if name == "PickupdService":
        return _service_class()
    raise AttributeError(name)

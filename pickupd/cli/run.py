"""`pickupd run`: the dispatcher in the foreground (systemd), or detached (--daemon)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pickupd import log as logs
from pickupd.cli.common import EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_USAGE, add_command, load_config
from pickupd.config.advice import advice
from pickupd.config.loading import Config
from pickupd.errors import (
    CommandError,
    ConfigError,
    DaemonError,
    EndpointError,
    PickupdError,
    SpoolLocked,
)
from pickupd.hosting import daemon
from pickupd.roles import Worker
from pickupd.service import GRACE, Service
from pickupd.workers import shares, uplink

__all__ = ["loop_factory", "register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `run`."""
    run = add_command(
        commands,
        "run",
        _run,
        help="run the dispatcher in the foreground (right for systemd)",
        description=(
            "Recover messages left in active/ by an earlier run of this host, take everything "
            "waiting, then relay new files as they are dropped. SIGTERM/SIGINT: finish in-flight "
            f"sends (up to {GRACE:g} s), put the rest back, exit 0."
        ),
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="process everything waiting and every deferred message that is due, then exit",
    )
    run.add_argument(
        "--daemon",
        action="store_true",
        help="detach from the terminal (for hosts without systemd); needs --pidfile",
    )
    run.add_argument(
        "--pidfile",
        metavar="FILE",
        type=Path,
        help="with --daemon: write the process id here, locked; a second pickupd with the same"
        " pidfile refuses to start",
    )
    run.add_argument(
        "--log-file",
        metavar="FILE",
        type=Path,
        help="with --daemon: append the log here (default: the log is discarded)",
    )


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux and macOS): the same asyncio API, and about 10%
    more messages a second on the same CPU; else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.daemon and args.pidfile is None:
        raise CommandError(EX_USAGE, "pickupd run: --daemon needs --pidfile FILE")
    if (args.pidfile or args.log_file) and not args.daemon:
        raise CommandError(EX_USAGE, "pickupd run: --pidfile and --log-file go with --daemon")
    detached: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if args.daemon:
        try:
            detached = daemon.detached(args.pidfile, args.log_file)
        except DaemonError as exc:
            raise CommandError(EX_TEMPFAIL, f"pickupd run: {exc}") from None
    with detached:
        return _serve(config, once=args.once)


async def _serve_signals(service: Service) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    if hasattr(signal, "SIGHUP"):  # POSIX: reload the config, as every daemon does
        loop.add_signal_handler(signal.SIGHUP, service.reload)
        loop.add_signal_handler(signal.SIGUSR1, service.flush)
    await service.run()


def _metrics_port_free(config: Config) -> None:
    """CommandError (78) if `[metrics] listen` cannot be bound now (the endpoint binds it for
    real a moment later; this only says so before the spool is touched)."""
    if config.metrics.listen is None:
        return
    host, port = config.metrics.listen
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the endpoint does
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CommandError(
                EX_CONFIG,
                f"{config.path}: metrics.listen: cannot listen on {host}:{port}:"
                f" {exc.strerror or exc}",
            ) from None


def _serve(config: Config, *, once: bool) -> int:
    logs.configure(config.log.level, config.log.format)
    part = shares.Part.from_env()
    if part is not None:  # started by the main process as one of its workers
        uplink.die_with_parent(int(os.environ.get(shares.PARENT, "0")))
        service = Service(config, once=once, part=part, role=Worker())
    else:
        total, why = shares.count(config, os.cpu_count())
        if why:
            logs.get().warning(
                "workers_capped", asked=config.dispatch.workers or "auto", workers=total, why=why
            )
        service = Service(config, once=once, part=shares.Part(0, total))
    if part is None and not once:
        _metrics_port_free(config)  # a busy port refuses before any folder is made
    if part is None:
        for line in advice(config):
            logs.get().warning("config_warning", detail=line)
    try:
        service.spool.ensure()
    except OSError as exc:
        where = exc.filename or config.spool.path
        raise CommandError(
            EX_CONFIG, f"{config.path}: spool.path: cannot create {where}: {exc.strerror or exc}"
        ) from None
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_serve_signals(service))
    except SpoolLocked:
        raise CommandError(
            EX_CONFIG,
            f"{config.spool.path}: another pickupd with the same host name and process id"
            " (a container?) holds the spool lock",
        ) from None
    except (EndpointError, ConfigError) as exc:
        raise CommandError(EX_CONFIG, f"{config.path}: {exc}") from None
    except PickupdError as exc:  # anything else the start could not get past, in one line
        raise CommandError(EX_CONFIG, f"{config.path}: {exc}") from None
    return EX_OK

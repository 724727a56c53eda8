"""The `pickupd` command: argparse subcommands; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, daemonize, probe, queuetools, sendmail, starter, winservice
from . import log as logs
from .commands import (
    CONFIG_HELP,
    EX_CONFIG,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    load_or_exit_code,
)
from .config import Config
from .dispatcher import Dispatcher
from .errors import PickupdError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64 (EX_USAGE) as sysexits.h says, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pickupd",
        description=(
            "Relays mail dropped as files in a pickup folder over SMTP: allow-listed senders "
            "only, per-sender credentials, retries for transient failures, failed/ for the rest."
        ),
        epilog=(
            "Exit codes: 0 ok, 64 usage error, 66 no such message, 75 temporary failure,"
            " 78 configuration error. `pickupd COMMAND --help` explains each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pickupd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="run the dispatcher in the foreground (right for systemd)",
        description=(
            "Recover messages left in active/ by an earlier run of this host, take everything "
            "waiting, then relay new files as they are dropped. SIGTERM/SIGINT: finish in-flight "
            "sends (up to 30 s), put the rest back, exit 0."
        ),
    )
    run.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
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

    check = commands.add_parser(
        "check",
        help="validate the config: exit 0 if good, 78 with one line per problem if not",
    )
    check.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    check.add_argument(
        "--connect",
        action="store_true",
        help="then connect to every relay with every credential set (EHLO, STARTTLS, AUTH;"
        " no mail is sent) and print one line each: exit 0 only if all are ok",
    )

    demo = commands.add_parser(
        "demo",
        help="a first look without any mail server: capture server, dispatcher, sample mail",
        description=(
            "Writes a demo config and spool under DIR, starts a capture SMTP server on a free "
            "loopback port (it stores what it receives in DIR/received/), runs the dispatcher, "
            "drops three sample messages, prints where each ended up and why, then keeps "
            "running so you can drop your own files, until Ctrl-C."
        ),
    )
    demo.add_argument(
        "--dir", default="pickupd-demo", type=Path, help="where to put it (default: ./pickupd-demo)"
    )
    commands.add_parser(
        "sendmail",
        help="a /usr/sbin/sendmail for submission: reads a message on stdin into the pickup folder",
        add_help=False,
    )
    starter.register(commands)
    queuetools.register(commands)
    winservice.register(commands)
    return parser


def _check(args: argparse.Namespace) -> int:
    config = load_or_exit_code(args.config)
    if isinstance(config, int):
        return config
    print(
        f"{config.path}: ok: {len(config.relays)} relay(s), {len(config.senders)} sender"
        f" entr{'y' if len(config.senders) == 1 else 'ies'}, spool {config.spool.path}"
    )
    if args.connect:
        return probe.run(config)
    return EX_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux and macOS): the same asyncio API, and about 10%
    more messages a second on the same CPU; else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(dispatcher: Dispatcher) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, dispatcher.stop)
    if hasattr(signal, "SIGHUP"):  # POSIX: reload the config, as every daemon does
        loop.add_signal_handler(signal.SIGHUP, dispatcher.reload)
        loop.add_signal_handler(signal.SIGUSR1, dispatcher.flush)
    await dispatcher.run()


def _run(args: argparse.Namespace) -> int:
    config = load_or_exit_code(args.config)
    if isinstance(config, int):
        return config
    if args.daemon and args.pidfile is None:
        print("pickupd run: --daemon needs --pidfile FILE", file=sys.stderr)
        return EX_USAGE
    if (args.pidfile or args.log_file) and not args.daemon:
        print("pickupd run: --pidfile and --log-file go with --daemon", file=sys.stderr)
        return EX_USAGE
    detached: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if args.daemon:
        try:
            detached = daemonize.detached(args.pidfile, args.log_file)
        except PickupdError as exc:
            print(f"pickupd run: {exc}", file=sys.stderr)
            return EX_TEMPFAIL
    with detached:
        return _serve_config(config, args)


def _serve_config(config: Config, args: argparse.Namespace) -> int:
    logs.configure(config.log.level, config.log.format)
    dispatcher = Dispatcher(config, once=args.once)
    try:
        dispatcher.spool.ensure()
    except OSError as exc:
        where = exc.filename or config.spool.path
        print(
            f"{config.path}: spool.path: cannot create {where}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EX_CONFIG
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(dispatcher))
    except PickupdError as exc:
        print(f"{config.path}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except BlockingIOError:
        print(
            f"{config.spool.path}: another pickupd with the same host name and process id"
            " (a container?) holds the spool lock",
            file=sys.stderr,
        )
        return EX_CONFIG
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pickupd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sendmail"]:
        # sendmail's own flags (-t, -f ADDR, -oi, -odi...) are not argparse-shaped.
        return sendmail.main(argv[1:])
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is not None:
        return handler(args)
    if args.command == "run":
        return _run(args)
    if args.command == "check":
        return _check(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.dir)
    _parser().print_help(sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())

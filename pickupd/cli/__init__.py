"""The `pickupd` command: argparse subcommands, one module each; a `CommandError` becomes
its lines on stderr and its exit code here, in one place."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pickupd import __version__
from pickupd.cli.common import EX_TEMPFAIL, EX_USAGE, Handler
from pickupd.errors import CommandError
from pickupd.spool.access import SERVICE_USER

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64 (EX_USAGE) as sysexits.h says, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand registered by its module (imported here:
    `pickupd-sendmail`, which a web app may run for every mail, needs none of them)."""
    from pickupd.cli import check, demo, drop, init, moves, queue, run, sendmail, service

    top = _Parser(
        prog="pickupd",
        description=(
            "Relays mail dropped as files in a pickup folder over SMTP or Microsoft Graph:"
            " allow-listed senders only, per-sender credentials, retries for transient"
            " failures, failed/ for the rest."
        ),
        epilog=(
            "Exit codes: 0 ok, 64 usage error, 66 no such message, 75 temporary failure,"
            " 78 configuration error. `pickupd COMMAND --help` explains each command."
        ),
    )
    top.add_argument("--version", action="version", version=f"pickupd {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (run, check, demo, sendmail, init, queue, moves, drop, service):
        module.register(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pickupd` console script (and of `python -m pickupd`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sendmail"]:
        # sendmail's own flags (-t, -f ADDR, -oi, -odi...) are not argparse-shaped.
        from pickupd.cli import sendmail

        return sendmail.main(argv[1:])
    top = parser()
    args = top.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        top.print_help(sys.stderr)
        return EX_USAGE
    try:
        return handler(args)
    except CommandError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    except PermissionError as exc:
        # An app's user running an operator's command: one line that says whose it is.
        print(
            f"pickupd {args.command}: {exc.filename or ''}: {exc.strerror}: this command needs"
            f" the service's rights: run it as root (or as {SERVICE_USER})",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    except BrokenPipeError:
        # The reader went away (`pickupd queue | head`): end quietly, as coreutils do (they
        # die of SIGPIPE: 128 + 13), and let nothing more be flushed into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

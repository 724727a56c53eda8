"""What every subcommand shares: exit codes (sysexits.h), the --config option, loading the
config and opening its spool. Problems are raised as `CommandError`; `cli.main` prints them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from pickupd.config.loading import DEFAULT_CONFIG_PATH, Config, config_path, load
from pickupd.errors import CommandError, ConfigError
from pickupd.spool.access import SERVICE_USER
from pickupd.spool.folders import Spool

__all__ = [
    "CONFIG_HELP",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_USAGE",
    "Handler",
    "add_command",
    "load_config",
    "open_spool",
    "say",
    "warn",
]

# sysexits.h, as sendmail and Postfix use them.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65  # the message itself cannot be taken (too large)
EX_NOINPUT = 66  # no such message (or input file)
EX_TEMPFAIL = 75
EX_CONFIG = 78
CONFIG_HELP = f"config file (default: $PICKUPD_CONFIG or {DEFAULT_CONFIG_PATH})"

Handler = Callable[[argparse.Namespace], int]


def add_command(
    commands: argparse._SubParsersAction[Any],
    name: str,
    handler: Handler,
    *,
    config: bool = True,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add subcommand `name`, run by `handler(args) -> exit code`, with `-c FILE` unless
    `config` is False. The one way every subcommand is registered."""
    if "help" in kwargs:  # `pickupd <name> --help` says what the command is for, too
        kwargs.setdefault("description", kwargs["help"])
    parser: argparse.ArgumentParser = commands.add_parser(name, **kwargs)
    if config:
        parser.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    parser.set_defaults(handler=handler)
    return parser


def load_config(path_arg: str | None) -> Config:
    """The config named by `-c` (or its defaults); CommandError(78) with one line per
    problem if it is unusable."""
    try:
        return load(config_path(path_arg))
    except ConfigError as exc:
        if (
            os.name == "posix"
            and os.geteuid() != 0
            and any("Permission denied" in problem for problem in exc.problems)
        ):
            # A secret of the service's, read by someone else (an app's user): say whose.
            raise CommandError(
                EX_TEMPFAIL,
                f"pickupd: {config_path(path_arg)} names secrets only the service may read:"
                f" run this as root (or as {SERVICE_USER}); apps drop mail with pickupd drop"
                " or pickupd-sendmail",
            ) from None
        raise CommandError(EX_CONFIG, "\n".join(exc.problems)) from None


def open_spool(path_arg: str | None) -> tuple[Config, Spool]:
    """The config and its spool, which must exist."""
    config = load_config(path_arg)
    spool = Spool(config.spool.path)
    if not spool.root.is_dir():
        raise CommandError(
            EX_CONFIG,
            f"{config.path}: spool.path: {spool.root} does not exist (pickupd run or pickupd"
            " init creates it)",
        )
    return config, spool


def warn(text: str) -> None:
    """One line on stderr, for a problem that does not end the command."""
    print(f"pickupd: {text}", file=sys.stderr)


def say(count: int, noun: str, rest: str) -> None:
    """`1 message put back`, `2 messages put back`."""
    print(f"{count} {noun}{'s' if count != 1 else ''} {rest}")


def for_terminal(text: str, keep_newlines: bool = True) -> str:
    """`text` safe to print on an operator's terminal: control characters (an escape
    sequence in a hostile Subject: retitles or clears it) are shown as \\xNN, as the
    sidecar already escapes them."""
    return "".join(
        ch if ch.isprintable() or (keep_newlines and ch in "\n\t") else f"\\x{ord(ch):02x}"
        for ch in text
    )

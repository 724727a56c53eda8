"""`pickupd drop`: enqueue message files (or stdin) with the Maildir protocol."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from pickupd.cli.common import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    add_command,
    warn,
)
from pickupd.config.loading import config_path, load_submission
from pickupd.errors import CommandError, ConfigError
from pickupd.message import envelope
from pickupd.outcome import Refusal
from pickupd.spool.access import not_allowed
from pickupd.spool.folders import Spool

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `drop`."""
    drop = add_command(
        commands,
        "drop",
        _drop,
        help="enqueue .eml files (or - for stdin) with the Maildir protocol",
        description="Copies each message into pickup/tmp/, fsyncs it and renames it into "
        "pickup/new/, where the daemon takes it. A message the daemon would refuse as "
        "malformed is not enqueued (exit 65, the reason said); the daemon checks the sender "
        "as usual.",
    )
    drop.add_argument("files", metavar="FILE", nargs="+", help="a message file, or - for stdin")


def _read_input(name: str, limit: int) -> bytes | str:
    """The message bytes, or a one-line problem."""
    if name == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            with open(name, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    return "not a regular file"
                data = handle.read(limit + 1)
        except OSError as exc:
            return str(exc.strerror or exc)
    if len(data) > limit:
        return f"larger than policy.max_message_size ({limit} bytes)"
    if not data.strip():
        return "empty"
    return data


def _drop(args: argparse.Namespace) -> int:
    # What an app's user may read: the spool's path and the policy, never a secret.
    try:
        policy = load_submission(config_path(args.config))
    except ConfigError as exc:
        raise CommandError(EX_CONFIG, "\n".join(exc.problems)) from None
    spool = Spool(policy.spool_path)
    if args.files.count("-") > 1:
        raise CommandError(EX_USAGE, "pickupd: stdin (-) can be given once")
    code = EX_OK
    for name in args.files:
        data = _read_input(name, policy.max_message_size)
        shown = "stdin" if name == "-" else name
        if isinstance(data, str):
            warn(f"{shown}: {data}: not enqueued")
            code = EX_NOINPUT
            continue
        # What the daemon would refuse as malformed is refused now, by the same parser.
        parsed = envelope.parse(
            data, max_header_size=policy.max_header_size, local_domain=policy.local_domain
        )
        if isinstance(parsed, Refusal):
            warn(f"{shown}: malformed: {parsed.detail}: not enqueued")
            code = EX_DATAERR
            continue
        try:
            path = spool.drop(data)
        except PermissionError:
            raise CommandError(
                EX_TEMPFAIL, f"pickupd: {not_allowed(spool.root, f'write into {spool.pickup}')}"
            ) from None
        except FileNotFoundError:
            raise CommandError(
                EX_CONFIG,
                f"pickupd: {spool.new} does not exist: pickupd run or pickupd init creates it",
            ) from None
        except OSError as exc:
            raise CommandError(
                EX_TEMPFAIL,
                f"pickupd: {shown}: cannot write into {spool.pickup}: {exc.strerror or exc}",
            ) from None
        print(f"{shown} -> {path}")
    return code

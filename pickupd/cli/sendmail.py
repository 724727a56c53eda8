"""`pickupd-sendmail` / `pickupd sendmail`: a /usr/sbin/sendmail for submission.

usage: pickupd-sendmail [-t] [-i] [-f ADDR] [-F NAME] [-C CONFIG] [RECIPIENT ...] < message

Reads one message on stdin and puts it in the pickup folder (Maildir protocol, fsynced), with
the envelope as `X-Sender:` / `X-Receiver:` lines in front, the format the daemon reads. It
decides nothing about who may send: the daemon checks the allow-list, as it does for every
drop. It needs only to read the config's `[spool] path` and `[policy]` keys and to write into
pickup/tmp and pickup/new, so apps in the pickup folder's group can run it.

Flags follow Postfix's sendmail(1): `-t` adds the To/Cc/Bcc recipients to those given as
arguments; `-f`/`-r` set the envelope sender (else the single From:, else the login name);
`-F` is the full name for a From: added when the message has none; `-i`/`-oi` keep a line
with a lone dot as text. Date: and Message-ID: are added when missing, as Postfix does.
"""

from __future__ import annotations

import argparse
import email.utils
import getpass
import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pickupd.cli.common import EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_USAGE, add_command
from pickupd.config.loading import Submission, config_path, load_submission
from pickupd.errors import CommandError, ConfigError
from pickupd.message import envelope
from pickupd.message.addresses import unique
from pickupd.outcome import Refusal
from pickupd.spool.access import not_allowed
from pickupd.spool.folders import Spool

__all__ = ["main", "register"]

PROG = "pickupd-sendmail"

# Flags clients pass that change nothing here: delivery mode (-od*), error mode (-oe*), other
# -o options, body type (-B), DSN (-N, -R, -V), verbose (-v), and a few more sendmail knows.
_IGNORED_WITH_ARGUMENT = frozenset("BNRVXLhO")
_IGNORED_ALONE = frozenset("vmnUGA")
# A bare local part ("root", "www-data"): the daemon qualifies it with [policy] local_domain.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _usage(problem: str) -> CommandError:
    """A bad command line: one line for stderr, exit 64."""
    return CommandError(EX_USAGE, problem)


@dataclass(slots=True)
class _Options:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False  # -t
    dots_are_text: bool = False  # -i / -oi
    config: str | None = None  # -C FILE
    recipients: list[str] = field(default_factory=list)


def _parse_args(argv: Sequence[str]) -> _Options:
    options = _Options()
    args = list(argv)
    i = 0

    def value(flag: str, rest: str) -> str:
        nonlocal i
        if rest:
            return rest
        i += 1
        if i >= len(args):
            raise _usage(f"option -{flag} needs a value")
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "--":
            options.recipients.extend(args[i + 1 :])
            break
        if not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
        else:
            flag, rest = arg[1], arg[2:]
            if flag in "fr":
                options.sender = value(flag, rest)
            elif flag == "F":
                options.full_name = value(flag, rest)
                if any(ord(char) < 32 or ord(char) == 127 for char in options.full_name):
                    # A newline would start a header field of the caller's choosing.
                    raise CommandError(
                        EX_USAGE, "-F: control characters (a newline) are not allowed"
                    )
            elif flag == "C":
                options.config = value(flag, rest)
            elif arg == "-t":
                options.from_headers = True
            elif arg in ("-i", "-oi"):
                options.dots_are_text = True
            elif flag == "o":
                pass  # -odi, -odb, -oem, -oee, -oQ..., -oX...: nothing to do here
            elif flag == "b":
                if rest != "m":
                    hint = ": use `pickupd queue`" if rest == "p" else ""
                    raise CommandError(
                        EX_USAGE, f"-b{rest}: only -bm (submit a message) is supported{hint}"
                    )
            elif flag in _IGNORED_WITH_ARGUMENT:
                value(flag, rest)
            elif flag in _IGNORED_ALONE and not rest:
                pass
            elif flag == "q":
                raise CommandError(
                    EX_USAGE, f"{arg}: the queue is run by the pickupd daemon (`pickupd flush`)"
                )
            else:
                raise _usage(f"unknown option {arg}")
        i += 1
    return options


def _read_message(dots_are_text: bool, limit: int) -> bytes | None:
    """The message on stdin (None if larger than `limit`). Without -i a line holding a lone
    dot ends it, as sendmail does."""
    stdin = sys.stdin.buffer
    if dots_are_text:
        data = stdin.read(limit + 1)
        return None if len(data) > limit else data
    lines: list[bytes] = []
    size = 0
    while True:
        # Never more than the limit in memory, however long a line (a gigabyte without one
        # newline is refused after limit + 2 bytes).
        line = stdin.readline(limit - size + 2)
        if not line or line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > limit:
            return None
        lines.append(line)
    return b"".join(lines)


def _addresses(text: str, local_domain: str | None) -> list[str]:
    """The addr-specs in one argument (it may be a list); a bare name is kept bare."""
    if _LOCAL_PART.fullmatch(text.strip()):
        return [text.strip()]
    try:
        return envelope.parse_address_list(text, local_domain)
    except envelope.AddressError as error:
        raise _usage(f"bad address {text!r}: {error}") from None


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `sendmail` to the help (`cli.main` hands its arguments to `main` untouched)."""
    add_command(
        commands,
        "sendmail",
        lambda args: main(["--help"]),
        config=False,
        help="a /usr/sbin/sendmail for submission: reads a message on stdin into the pickup folder",
        add_help=False,
    )


def _head_and_body(data: bytes) -> tuple[bytes, bytes]:
    """The header section and the body (starting with its empty line), LF line ends. As
    Postfix's sendmail does, the header section ends at the first line that is not a header
    field (or its continuation): `echo body | sendmail you@example.net` is all body."""
    if data.startswith(b"From "):
        # An mbox "From sender date" line, as some tools write first: not a header field
        # (sendmail and Postfix drop it too).
        data = data.partition(b"\n")[2]
    head, body = envelope.split(data)
    end = envelope.header_end(head)
    if end < len(head):
        head, body = head[:end], b"\r\n" + head[end:] + body
    # Written with LF line ends, as the sendmail of Postfix writes its maildrop files.
    return head.replace(b"\r\n", b"\n"), body.replace(b"\r\n", b"\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Read a message on stdin into the pickup folder; exit 0, 64 (usage), 65 (too large, or
    malformed: the daemon would refuse it) or 75 (the spool cannot be written: try again)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--help"], ["-help"]):
        print(__doc__)
        return EX_OK
    try:
        options = _parse_args(args)
        settings = _settings(options)
        recipients, sender = _envelope(options, settings.local_domain)
        data = _read_message(options.dots_are_text, settings.max_message_size)
        if data is None:
            limit = settings.max_message_size
            raise CommandError(EX_DATAERR, f"message larger than max_message_size ({limit} bytes)")
        _drop(settings, _composed(options, data, recipients, sender, settings.local_domain))
    except CommandError as exc:
        for line in exc.message.splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return exc.exit_code
    return EX_OK


def _settings(options: _Options) -> Submission:
    """What the config says of submission; a config that cannot be read is a temporary
    failure (75): the caller keeps the message and tries again."""
    path = config_path(options.config)
    if path.exists() and not os.access(path, os.R_OK):
        raise CommandError(EX_TEMPFAIL, not_allowed(path, f"read {path}"))
    try:
        return load_submission(path)
    except ConfigError as exc:
        raise CommandError(EX_TEMPFAIL, "\n".join(exc.problems)) from None


def _envelope(options: _Options, local_domain: str | None) -> tuple[list[str], str]:
    """The recipients and the sender the command line gives (-f; "" when not given)."""
    recipients = [a for r in options.recipients for a in _addresses(r, local_domain)]
    sender = options.sender or ""
    if sender not in ("", "<>"):
        found = _addresses(sender, local_domain)
        if len(found) != 1:
            raise _usage(f"-f {sender!r}: give one address")
        sender = found[0]
    return recipients, sender


def _composed(
    options: _Options,
    data: bytes,
    recipients: list[str],
    sender: str,
    local_domain: str | None,
) -> bytes:
    """The file to drop: the envelope's X-Sender/X-Receiver lines, the header fields a
    message needs and lacks (From, Date, Message-ID), then the message. Checked by the
    daemon's own parser: what it would refuse as malformed is refused here (65), now."""
    head, body = _head_and_body(data)
    if head and not head.endswith(b"\n"):
        head += b"\n"
    parsed = envelope.parse(head + b"\n", local_domain=local_domain)
    if options.from_headers:
        if isinstance(parsed, Refusal):
            raise _usage(f"-t: {parsed.detail}")
        recipients = recipients + list(parsed.recipients)
    if not recipients:
        raise _usage("no recipients (give them as arguments, or -t)")
    if options.sender is None:
        # The message's own sender, else the user running us (as sendmail does).
        own = None if isinstance(parsed, Refusal) else parsed.sender
        sender = own or getpass.getuser()
    added = ""
    present = envelope.field_names(head)
    if "from" not in present:
        name = options.full_name
        added += f"From: {name} <{sender}>\n" if name else f"From: {sender}\n"
    if "date" not in present:
        added += f"Date: {email.utils.formatdate(localtime=True)}\n"
    if "message-id" not in present:
        domain = sender.partition("@")[2] or local_domain or socket.getfqdn()
        added += f"Message-ID: {email.utils.make_msgid(domain=domain)}\n"
    lines = f"X-Sender: <{sender}>\n" if sender else "X-Sender: <>\n"
    for recipient in unique(recipients):
        lines += f"X-Receiver: <{recipient}>\n"
    composed = (lines + added).encode() + head + body
    checked = envelope.parse(composed, local_domain=local_domain)
    if isinstance(checked, Refusal):
        raise CommandError(EX_DATAERR, f"malformed message: {checked.detail}")
    return composed


def _drop(settings: Submission, data: bytes) -> None:
    """Into the pickup folder, as a writer of the drop group; 75 when it cannot be."""
    spool = Spool(settings.spool_path)
    try:
        spool.drop(data)
    except PermissionError:
        raise CommandError(
            EX_TEMPFAIL, not_allowed(spool.root, f"write into {spool.pickup}")
        ) from None
    except OSError as exc:
        where = exc.filename or settings.spool_path
        raise CommandError(
            EX_TEMPFAIL, f"cannot write into {where}: {exc.strerror or exc}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())

"""`pickupd queue` and `pickupd show`: what the spool holds, read-only.

They work while daemons run on the same spool; a message that moves while being read is
shown where it was, or not at all, never twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pickupd import ids
from pickupd.auth.owners import describe_uid
from pickupd.cli.common import EX_DATAERR, EX_NOINPUT, EX_OK, add_command, for_terminal, open_spool
from pickupd.errors import CommandError
from pickupd.spool import moves
from pickupd.spool.census import FOLDERS, take
from pickupd.spool.files import file_kind, read_limited
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import Sidecar, from_timestamp, to_timestamp
from pickupd.units import format_duration

__all__ = ["OPERATOR_OUTCOMES", "no_such", "register", "resolve", "sidecar_of"]

# History entries an operator's command adds (not attempts on a relay).
OPERATOR_OUTCOMES = ("retried", "released", "held")
# `show` prints at most this much of a header section.
_HEADER_LIMIT = 64 * 1024
# What `show` prints of a header section at most: a binary file is not dumped whole.
_SHOW_LINES = 200
_SHOW_WIDTH = 1000


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `queue` and `show`."""
    queue = add_command(
        commands,
        "queue",
        _queue,
        help="what is queued: counts per folder, then each deferred, held and failed message",
        description="Counts and the oldest message's age per folder, then one entry per message "
        "in deferred/, hold/ and failed/: id, age, sender, recipients, attempts, next attempt or "
        "reason, and the last SMTP reply.",
    )
    queue.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    show = add_command(commands, "show", _show, help="a message's sidecar and its header section")
    show.add_argument("id", metavar="ID", help="a message id, as `pickupd queue` shows it")


def sidecar_of(folder: Path, msg_id: str) -> Sidecar | None:
    """The sidecar of message `msg_id` in `folder`, if it has a readable one."""
    return Spool.read_sidecar(folder / f"{msg_id}.json")


def resolve(spool: Spool, given: list[str]) -> Iterator[tuple[str, Path | None]]:
    """Each given id with the folder that holds it (None: no such message, or not an id)."""
    for text in given:
        msg_id = text.strip().upper()
        if ids.is_valid(msg_id):
            yield msg_id, moves.locate(spool, msg_id)
        else:
            yield text, None


def no_such(text: str) -> str:
    """The line for an id that is nowhere."""
    shown = text if ids.is_valid(text) else repr(text)
    return f"{shown}: no such message in deferred/, hold/, failed/ or sent/"


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(max(0.0, seconds))


def _seconds_since(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    try:
        return now - to_timestamp(iso)
    except ValueError:
        return None


def _rows(spool: Spool, now: float) -> list[dict[str, Any]]:
    rows = []
    for folder in (spool.deferred, spool.hold, spool.failed):
        for msg_id in spool.ids_in(folder):
            sidecar = sidecar_of(folder, msg_id)
            if sidecar is None:
                # A message whose sidecar is missing or unreadable is still a message.
                rows.append({"id": msg_id, "folder": folder.name, "sidecar": False})
                continue
            next_attempt = sidecar.next_attempt
            if folder == spool.deferred:  # the sidecar's mtime is the due time; show that one
                next_attempt = from_timestamp(spool.due_time(msg_id, now))
            # The last attempt on a relay, not the operator's own retry/hold/release entries.
            relayed = [h for h in sidecar.history if h.outcome not in OPERATOR_OUTCOMES]
            last = relayed[-1] if relayed else None
            rows.append(
                {
                    "id": msg_id,
                    "folder": folder.name,
                    "age_seconds": _seconds_since(sidecar.first_seen, now),
                    "sender": sidecar.sender,
                    "recipients": list(sidecar.recipients),
                    "owner": sidecar.owner,
                    "owner_uid": sidecar.owner_uid,
                    "attempts": sidecar.attempts,
                    "next_attempt": next_attempt,
                    "mail_class": sidecar.mail_class,
                    "reason": sidecar.reason,
                    "detail": sidecar.detail,
                    "last_reply": (
                        {
                            "time": last.time,
                            "relay": last.relay,
                            "code": last.code,
                            "text": last.text,
                        }
                        if last
                        else None
                    ),
                }
            )
    return rows


def _queue(args: argparse.Namespace) -> int:
    _, spool = open_spool(args.config)
    now = time.time()
    census = {
        name: {"count": counted.count, "oldest_age_seconds": counted.oldest_age}
        for name, counted in take(spool, now, ages=FOLDERS).items()
    }
    rows = _rows(spool, now)
    strays = spool.strays()
    if args.json:
        doc = {"spool": str(spool.root), "time": from_timestamp(now), "folders": census}
        doc["ignored"] = strays
        print(json.dumps({**doc, "messages": rows}, indent=2, ensure_ascii=False))
        return EX_OK
    print(f"spool {spool.root}")
    for name, numbers in census.items():
        oldest = numbers["oldest_age_seconds"]
        tail = f"  oldest {_age(oldest)}" if oldest is not None else ""
        print(f"  {name:<9}{numbers['count']:>7}{tail}")
    if strays:
        shown = ", ".join(for_terminal(name, keep_newlines=False) for name in strays[:5])
        more = f" and {len(strays) - 5} more" if len(strays) > 5 else ""
        print(f"  ignored  {len(strays):>7}  in pickup/, not messages (not *.eml): {shown}{more}")
    if not rows:
        print("\nNothing deferred, held or failed.")
        return EX_OK
    for row in rows:
        print()
        _print_row(row, now)
    return EX_OK


def _print_row(row: dict[str, Any], now: float) -> None:
    if not row.get("sidecar", True):
        print(f"{row['id']}  {row['folder']}  (no readable sidecar)")
        return
    if row["folder"] == "deferred" and row["next_attempt"]:
        due = -(_seconds_since(row["next_attempt"], now) or 0.0)
        state = "due now" if due <= 0 else f"next attempt in {_age(due)}"
        if row.get("mail_class"):
            state += f" ({row['mail_class']})"
    elif row["folder"] == "failed":
        state = f"reason {row['reason']}"
    else:
        state = "held"
    print(
        f"{row['id']}  {row['folder']}  age {_age(row['age_seconds'])}"
        f"  attempts {row['attempts']}  {state}"
    )
    writer = ""
    if row["owner_uid"] is not None:
        writer = f"  (written by {describe_uid(row['owner_uid'], row['owner'] or '')})"
    sender = row["sender"] or "(no sender)"
    print(for_terminal(f"  {sender} -> {', '.join(row['recipients']) or '-'}{writer}"))
    last = row["last_reply"]
    if last:
        relay = f" (relay {last['relay']})" if last["relay"] else ""
        print(for_terminal(f"  last: {last['text']}{relay}"[:200]))
    elif row["detail"]:
        print(for_terminal(f"  {row['detail']}"[:200]))


def _show(args: argparse.Namespace) -> int:
    _, spool = open_spool(args.config)
    ((msg_id, folder),) = resolve(spool, [args.id])
    if folder is None:
        raise CommandError(EX_NOINPUT, f"pickupd: {no_such(args.id)}")
    print(f"{folder.name}/{msg_id}.eml")
    sidecar_path = folder / f"{msg_id}.json"
    recorded = sidecar_of(folder, msg_id)
    if recorded is not None and recorded.owner_uid is not None:
        print(for_terminal(f"written by {describe_uid(recorded.owner_uid, recorded.owner or '')}"))
    try:
        text = read_limited(sidecar_path, 16 * 1024 * 1024).decode("utf-8", "replace").rstrip()
        print(for_terminal(text))
    except OSError as exc:
        print(f"(no sidecar: {exc.strerror or exc})")
    print()
    eml = folder / f"{msg_id}.eml"
    with contextlib.suppress(OSError):
        mode = os.lstat(eml).st_mode
        if not stat.S_ISREG(mode):
            raise CommandError(
                EX_DATAERR,
                f"pickupd: {msg_id}: {folder.name}/{eml.name} is {file_kind(mode)}: not read",
            )
    try:
        data = read_limited(eml, _HEADER_LIMIT)
    except OSError as exc:
        raise CommandError(
            EX_NOINPUT, f"pickupd: {msg_id}: cannot read the message: {exc.strerror or exc}"
        ) from None
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=-1)
    header = data if end < 0 else data[:end]
    lines = header.decode("utf-8", "replace").replace("\r\n", "\n").rstrip().split("\n")
    for line in lines[:_SHOW_LINES]:
        print(for_terminal(line, keep_newlines=False)[:_SHOW_WIDTH])
    if len(lines) > _SHOW_LINES or end < 0:
        what = "no blank line ends the header section" if end < 0 else "longer"
        print(f"({what}: {len(lines)} lines, {len(header)} bytes; the first {_SHOW_LINES} shown)"
              if len(lines) > _SHOW_LINES else f"({what})")  # fmt: skip
    return EX_OK

"""Operator commands on a spool: queue, show, retry, flush, delete, hold, release, drop.

Each works while daemons run on the same spool: every move is one rename in spool.py that
either wins or loses cleanly against a dispatcher's claim, and a running dispatcher sees what
was put back into deferred/ within a second (its watch on that folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import ids
from .commands import (
    CONFIG_HELP,
    EX_CONFIG,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    load_or_exit_code,
)
from .config import Config
from .outcome import Reason
from .sidecar import Attempt, Sidecar, from_timestamp, to_timestamp
from .spool import Spool, read_limited
from .units import format_duration

__all__ = ["register"]

FOLDERS = ("pickup", "active", "deferred", "hold", "failed", "sent")
_OPERATOR_OUTCOMES = ("retried", "released", "held")
_IDS_HELP = "message ids, as `pickupd queue` shows them"
# `show` prints at most this much of a header section.
_HEADER_LIMIT = 64 * 1024


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands; each sets `handler` (args -> exit code)."""

    def add(name: str, handler: Callable[[argparse.Namespace], int], **kwargs: Any) -> Any:
        parser = commands.add_parser(name, **kwargs)
        parser.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
        parser.set_defaults(handler=handler)
        return parser

    queue = add(
        "queue",
        _queue,
        help="what is queued: counts per folder, then each deferred, held and failed message",
        description="Counts and the oldest message's age per folder, then one entry per message "
        "in deferred/, hold/ and failed/: id, age, sender, recipients, attempts, next attempt or "
        "reason, and the last SMTP reply.",
    )
    queue.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    show = add("show", _show, help="a message's sidecar and its header section")
    show.add_argument("id", metavar="ID", help="a message id, as `pickupd queue` shows it")

    retry = add(
        "retry",
        _retry,
        help="put failed messages back in the queue (a running daemon sends them at once)",
        description="Moves messages from failed/ back to deferred/, due now. Their history is "
        "kept; attempts and max_age count afresh.",
    )
    retry.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    retry.add_argument("--all", action="store_true", help="every message in failed/")
    retry.add_argument(
        "--reason",
        choices=[r.value for r in Reason],
        metavar="CODE",
        help="with --all: only messages that failed with this reason code",
    )

    add(
        "flush",
        _flush,
        help="make every deferred message due now (a running daemon sends them at once)",
    )

    delete = add(
        "delete",
        _delete,
        help="remove messages from deferred/, hold/ or failed/",
        description="Removes messages for good. Asks for confirmation on a terminal.",
    )
    delete.add_argument("ids", metavar="ID", nargs="+", help=_IDS_HELP)
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")

    hold = add(
        "hold",
        _hold,
        help="put deferred messages aside in hold/, where nothing is sent",
        description="Moves deferred messages into hold/: nothing there is sent until "
        "`pickupd release`. Use it while a sender's credentials are being fixed.",
    )
    hold.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    hold.add_argument("--sender", metavar="ADDR", help="every deferred message from ADDR")

    release = add(
        "release",
        _release,
        help="put held messages back in the queue, due now",
    )
    release.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    release.add_argument("--all", action="store_true", help="every message in hold/")
    release.add_argument("--sender", metavar="ADDR", help="every held message from ADDR")

    drop = add(
        "drop",
        _drop,
        help="enqueue .eml files (or - for stdin) with the Maildir protocol",
        description="Copies each message into pickup/tmp/, fsyncs it and renames it into "
        "pickup/new/, where the daemon takes it. The daemon checks the sender as usual.",
    )
    drop.add_argument("files", metavar="FILE", nargs="+", help="a message file, or - for stdin")


# -- plumbing --------------------------------------------------------------------------------


def _spool(args: argparse.Namespace) -> tuple[Config, Spool] | int:
    """The config and its spool, or an exit code after a one-line error."""
    config = load_or_exit_code(args.config)
    if isinstance(config, int):
        return config
    spool = Spool(config.spool.path)
    if not spool.root.is_dir():
        print(
            f"{config.path}: spool.path: {spool.root} does not exist (pickupd run or pickupd"
            " init creates it)",
            file=sys.stderr,
        )
        return EX_CONFIG
    return config, spool


def _err(text: str) -> None:
    print(f"pickupd: {text}", file=sys.stderr)


def _sidecar(folder: Path, msg_id: str) -> Sidecar | None:
    return Spool.read_sidecar(folder / f"{msg_id}.json")


def _resolve(spool: Spool, given: list[str]) -> Iterator[tuple[str, Path | None]]:
    """Each given id with the folder that holds it (None: no such message, or not an id)."""
    for text in given:
        msg_id = text.strip().upper()
        if ids.is_valid(msg_id):
            yield msg_id, spool.locate(msg_id)
        else:
            yield text, None


def _no_such(text: str) -> None:
    shown = text if ids.is_valid(text) else repr(text)
    _err(f"{shown}: no such message in deferred/, hold/, failed/ or sent/")


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(max(0.0, seconds))


def _seconds_since(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    try:
        return now - to_timestamp(iso)
    except ValueError:
        return None


# -- queue -----------------------------------------------------------------------------------


def _entries(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except FileNotFoundError:
        return


def _census(spool: Spool, now: float) -> dict[str, dict[str, Any]]:
    """Count and oldest age per folder. Ages come from sidecars (first_seen) where there is
    one; pickup/ files and claims in active/ have only their file times."""
    census: dict[str, dict[str, Any]] = {}
    for name in FOLDERS:
        count = 0
        oldest: float | None = None
        if name == "pickup":
            files = [e for e in _entries(spool.new) if not e.name.startswith(".")]
            files += [
                e
                for e in _entries(spool.pickup)
                if not e.name.startswith(".") and e.name.lower().endswith(".eml")
            ]
        elif name == "active":
            files = [e for e in _entries(spool.active) if not e.name.startswith(".")]
        else:
            files = [e for e in _entries(spool.root / name) if e.name.endswith(".eml")]
        for entry in files:
            if name in ("pickup", "active"):
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
            else:
                sidecar = _sidecar(spool.root / name, entry.name[:-4])
                age = _seconds_since(sidecar.first_seen if sidecar else None, now) or 0.0
            count += 1
            oldest = age if oldest is None else max(oldest, age)
        census[name] = {"count": count, "oldest_age_seconds": oldest}
    return census


def _rows(spool: Spool, now: float) -> list[dict[str, Any]]:
    rows = []
    for folder in (spool.deferred, spool.hold, spool.failed):
        for msg_id in spool.ids_in(folder):
            sidecar = _sidecar(folder, msg_id)
            if sidecar is None:
                # A message whose sidecar is missing or unreadable is still a message.
                rows.append({"id": msg_id, "folder": folder.name, "sidecar": False})
                continue
            # The last attempt on a relay, not the operator's own retry/hold/release entries.
            relayed = [h for h in sidecar.history if h.outcome not in _OPERATOR_OUTCOMES]
            last = relayed[-1] if relayed else None
            rows.append(
                {
                    "id": msg_id,
                    "folder": folder.name,
                    "age_seconds": _seconds_since(sidecar.first_seen, now),
                    "sender": sidecar.sender,
                    "recipients": list(sidecar.recipients),
                    "attempts": sidecar.attempts,
                    "next_attempt": sidecar.next_attempt,
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
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    now = time.time()
    census = _census(spool, now)
    rows = _rows(spool, now)
    if args.json:
        doc = {"spool": str(spool.root), "time": from_timestamp(now), "folders": census}
        print(json.dumps({**doc, "messages": rows}, indent=2, ensure_ascii=False))
        return EX_OK
    print(f"spool {spool.root}")
    for name, numbers in census.items():
        oldest = numbers["oldest_age_seconds"]
        tail = f"  oldest {_age(oldest)}" if oldest is not None else ""
        print(f"  {name:<9}{numbers['count']:>7}{tail}")
    if not rows:
        print("\nNothing deferred, held or failed.")
        return EX_OK
    for row in rows:
        print()
        if not row.get("sidecar", True):
            print(f"{row['id']}  {row['folder']}  (no readable sidecar)")
            continue
        if row["folder"] == "deferred" and row["next_attempt"]:
            due = -(_seconds_since(row["next_attempt"], now) or 0.0)
            state = "due now" if due <= 0 else f"next attempt in {_age(due)}"
        elif row["folder"] == "failed":
            state = f"reason {row['reason']}"
        else:
            state = "held"
        print(
            f"{row['id']}  {row['folder']}  age {_age(row['age_seconds'])}"
            f"  attempts {row['attempts']}  {state}"
        )
        print(f"  {row['sender'] or '(no sender)'} -> {', '.join(row['recipients']) or '-'}")
        last = row["last_reply"]
        if last:
            relay = f" (relay {last['relay']})" if last["relay"] else ""
            print(f"  last: {last['text']}{relay}"[:200])
        elif row["detail"]:
            print(f"  {row['detail']}"[:200])
    return EX_OK


# -- show ------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    ((msg_id, folder),) = _resolve(spool, [args.id])
    if folder is None:
        _no_such(args.id)
        return EX_NOINPUT
    print(f"{folder.name}/{msg_id}.eml")
    sidecar_path = folder / f"{msg_id}.json"
    try:
        print(read_limited(sidecar_path, 16 * 1024 * 1024).decode("utf-8", "replace").rstrip())
    except OSError as exc:
        print(f"(no sidecar: {exc.strerror or exc})")
    print()
    try:
        data = read_limited(folder / f"{msg_id}.eml", _HEADER_LIMIT)
    except OSError as exc:
        _err(f"{msg_id}: cannot read the message: {exc.strerror or exc}")
        return EX_NOINPUT
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=-1)
    header = data if end < 0 else data[:end]
    print(header.decode("utf-8", "replace").replace("\r\n", "\n").rstrip())
    if end < 0 and len(data) >= _HEADER_LIMIT:
        print(f"(header section longer than {_HEADER_LIMIT} bytes: cut)")
    return EX_OK


# -- moves -----------------------------------------------------------------------------------


def _note(sidecar: Sidecar | None, msg_id: str, outcome: str, text: str, now: float) -> Sidecar:
    """The sidecar with an operator's action appended to its history (a minimal one if the
    message had lost its sidecar)."""
    base = sidecar or Sidecar(
        id=msg_id, source="", sender=None, recipients=(), attempts=0, first_seen=from_timestamp(now)
    )
    return base.with_attempt(Attempt(from_timestamp(now), None, outcome, None, text))


def _requeue(spool: Spool, msg_id: str, folder: Path, outcome: str, text: str) -> bool:
    now = time.time()
    noted = _note(_sidecar(folder, msg_id), msg_id, outcome, text, now)
    changes: dict[str, Any] = {"next_attempt": from_timestamp(now), "reason": None}
    if outcome == "retried":
        changes["attempts"] = 0
    return spool.requeue(msg_id, folder, dataclasses.replace(noted, **changes), now)


def _selected(
    spool: Spool, folder: Path, given: list[str], everything: bool, sender: str | None
) -> tuple[list[str], int]:
    """The ids to act on in `folder` (given ones that are there, or all, or a sender's), and
    the exit code so far (66 if a given id was not found there)."""
    code = EX_OK
    if everything or sender:
        chosen = []
        for msg_id in spool.ids_in(folder):
            sidecar = _sidecar(folder, msg_id)
            if sender and (sidecar is None or (sidecar.sender or "").lower() != sender.lower()):
                continue
            chosen.append(msg_id)
        return chosen, code
    chosen = []
    for msg_id, where in _resolve(spool, given):
        if where is None:
            _no_such(msg_id)
            code = EX_NOINPUT
        elif where != folder:
            _err(f"{msg_id} is in {where.name}/, not {folder.name}/{_hint(where)}")
            code = EX_NOINPUT
        else:
            chosen.append(msg_id)
    return chosen, code


def _hint(where: Path) -> str:
    return {
        "failed": ": `pickupd retry` puts it back",
        "hold": ": `pickupd release` puts it back",
        "deferred": ": it is queued already (`pickupd flush` makes it due now)",
        "sent": ": it was sent",
    }.get(where.name, "")


def _need_selection(args: argparse.Namespace, flags: str) -> bool:
    if args.ids and (getattr(args, "all", False) or getattr(args, "sender", None)):
        _err(f"give IDs or {flags}, not both")
        return False
    if not args.ids and not getattr(args, "all", False) and not getattr(args, "sender", None):
        _err(f"give one or more IDs, or {flags}")
        return False
    return True


def _retry(args: argparse.Namespace) -> int:
    if not _need_selection(args, "--all"):
        return EX_USAGE
    if args.reason and not args.all:
        _err("--reason goes with --all")
        return EX_USAGE
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    chosen, code = _selected(spool, spool.failed, args.ids, args.all, None)
    moved = 0
    for msg_id in chosen:
        if args.reason:
            sidecar = _sidecar(spool.failed, msg_id)
            if sidecar is None or sidecar.reason != args.reason:
                continue
        if _requeue(spool, msg_id, spool.failed, "retried", "put back by pickupd retry"):
            print(f"{msg_id}: failed/ -> deferred/, due now")
            moved += 1
        else:
            _err(f"{msg_id}: gone from failed/ meanwhile")
    print(f"{moved} message{'s' if moved != 1 else ''} put back in the queue")
    return code


def _release(args: argparse.Namespace) -> int:
    if not _need_selection(args, "--all or --sender ADDR"):
        return EX_USAGE
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    chosen, code = _selected(spool, spool.hold, args.ids, args.all, args.sender)
    moved = 0
    for msg_id in chosen:
        if _requeue(spool, msg_id, spool.hold, "released", "released by pickupd release"):
            print(f"{msg_id}: hold/ -> deferred/, due now")
            moved += 1
    print(f"{moved} message{'s' if moved != 1 else ''} released")
    return code


def _hold(args: argparse.Namespace) -> int:
    if not _need_selection(args, "--sender ADDR"):
        return EX_USAGE
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    chosen, code = _selected(spool, spool.deferred, args.ids, False, args.sender)
    moved = 0
    for msg_id in chosen:

        def held(sidecar: Sidecar | None, msg_id: str = msg_id) -> Sidecar:
            noted = _note(sidecar, msg_id, "held", "held by pickupd hold", time.time())
            return dataclasses.replace(noted, next_attempt=None)

        if spool.hold_message(msg_id, held):
            print(f"{msg_id}: deferred/ -> hold/")
            moved += 1
        else:
            _err(f"{msg_id}: in flight (a dispatcher took it first): not held")
            code = EX_NOINPUT
    print(f"{moved} message{'s' if moved != 1 else ''} held")
    return code


def _flush(args: argparse.Namespace) -> int:
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    count = spool.make_due(time.time())
    print(f"{count} deferred message{'s' if count != 1 else ''} made due now")
    return EX_OK


def _delete(args: argparse.Namespace) -> int:
    found = _spool(args)
    if isinstance(found, int):
        return found
    _, spool = found
    if not args.yes and not sys.stdin.isatty():
        _err("delete removes mail for good: add --yes when not on a terminal")
        return EX_USAGE
    code = EX_OK
    targets = []
    for msg_id, folder in _resolve(spool, args.ids):
        if folder is None or folder == spool.sent:
            _no_such(msg_id)
            code = EX_NOINPUT
        else:
            targets.append((msg_id, folder))
    if targets and not args.yes:
        listing = ", ".join(f"{folder.name}/{msg_id}" for msg_id, folder in targets)
        answer = input(f"Delete {listing} for good? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted")
            return code
    for msg_id, folder in targets:
        if spool.delete(msg_id, folder):
            print(f"{msg_id}: deleted from {folder.name}/")
        else:
            _err(f"{msg_id}: in flight (a dispatcher took it): not deleted")
            code = EX_NOINPUT
    return code


# -- drop ------------------------------------------------------------------------------------


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
    found = _spool(args)
    if isinstance(found, int):
        return found
    config, spool = found
    if args.files.count("-") > 1:
        _err("stdin (-) can be given once")
        return EX_USAGE
    code = EX_OK
    for name in args.files:
        data = _read_input(name, config.policy.max_message_size)
        shown = "stdin" if name == "-" else name
        if isinstance(data, str):
            _err(f"{shown}: {data}: not enqueued")
            code = EX_NOINPUT
            continue
        try:
            path = spool.drop(data)
        except FileNotFoundError:
            _err(f"{spool.new} does not exist: pickupd run or pickupd init creates it")
            return EX_CONFIG
        except OSError as exc:
            _err(f"{shown}: cannot write into {spool.pickup}: {exc.strerror or exc}")
            return EX_TEMPFAIL
        print(f"{shown} -> {path}")
    return code

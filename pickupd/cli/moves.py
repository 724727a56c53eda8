"""`pickupd retry`, `flush`, `hold`, `release` and `delete`: an operator moving messages.

Each works while daemons run on the same spool: every move is one rename in spool/moves.py that
either wins or loses cleanly against a dispatcher's claim, and a running dispatcher sees what
was put back into deferred/ within a second (its watch on that folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from pickupd.cli.common import EX_NOINPUT, EX_OK, EX_USAGE, add_command, open_spool, say, warn
from pickupd.cli.queue import no_such, resolve, sidecar_of
from pickupd.errors import CommandError
from pickupd.outcome import Reason
from pickupd.spool import moves
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import Attempt, Sidecar, from_timestamp

__all__ = ["register"]

_IDS_HELP = "message ids, as `pickupd queue` shows them"


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `retry`, `flush`, `delete`, `hold` and `release`."""
    retry = add_command(
        commands,
        "retry",
        _retry,
        help="send failed (or deferred) messages again now (a running daemon sends at once)",
        description="Moves messages from failed/ back to deferred/, due now: their history is "
        "kept; attempts and max_age count afresh. A deferred message given by its ID is made "
        "due now (its attempts go on counting).",
    )
    retry.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    retry.add_argument("--all", action="store_true", help="every message in failed/")
    retry.add_argument(
        "--reason",
        choices=[r.value for r in Reason],
        metavar="CODE",
        help="with --all: only messages that failed with this reason code",
    )
    add_command(
        commands,
        "flush",
        _flush,
        help="make every deferred message due now (a running daemon sends them at once)",
    )
    delete = add_command(
        commands,
        "delete",
        _delete,
        help="remove messages from deferred/, hold/ or failed/",
        description="Removes messages for good. Asks for confirmation on a terminal.",
    )
    delete.add_argument("ids", metavar="ID", nargs="+", help=_IDS_HELP)
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")
    hold = add_command(
        commands,
        "hold",
        _hold,
        help="put deferred messages aside in hold/, where nothing is sent",
        description="Moves deferred messages into hold/: nothing there is sent until "
        "`pickupd release`. Use it while a sender's credentials are being fixed.",
    )
    hold.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    hold.add_argument("--sender", metavar="ADDR", help="every deferred message from ADDR")
    release = add_command(
        commands, "release", _release, help="put held messages back in the queue, due now"
    )
    release.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    release.add_argument("--all", action="store_true", help="every message in hold/")
    release.add_argument("--sender", metavar="ADDR", help="every held message from ADDR")


def _note(sidecar: Sidecar | None, msg_id: str, outcome: str, text: str, now: float) -> Sidecar:
    """The sidecar with an operator's action appended to its history (a minimal one if the
    message had lost its sidecar)."""
    base = sidecar or Sidecar(
        id=msg_id, source="", sender=None, recipients=(), attempts=0, first_seen=from_timestamp(now)
    )
    return base.with_attempt(Attempt(from_timestamp(now), None, outcome, None, text))


def _requeue(spool: Spool, msg_id: str, folder: Path, outcome: str, text: str) -> bool:
    now = time.time()
    noted = _note(sidecar_of(folder, msg_id), msg_id, outcome, text, now)
    changes: dict[str, Any] = {"next_attempt": from_timestamp(now), "reason": None}
    if outcome == "retried":
        changes["attempts"] = 0
    return moves.requeue(spool, msg_id, folder, dataclasses.replace(noted, **changes), now)


def _selected(
    spool: Spool, folder: Path, given: list[str], everything: bool, sender: str | None
) -> tuple[list[str], int]:
    """The ids to act on in `folder` (given ones that are there, or all, or a sender's), and
    the exit code so far (66 if a given id was not found there)."""
    code = EX_OK
    if everything or sender:
        chosen = []
        for msg_id in spool.ids_in(folder):
            sidecar = sidecar_of(folder, msg_id)
            if sender and (sidecar is None or (sidecar.sender or "").lower() != sender.lower()):
                continue
            chosen.append(msg_id)
        return chosen, code
    chosen = []
    for msg_id, where in resolve(spool, given):
        if where is None:
            warn(no_such(msg_id))
            code = EX_NOINPUT
        elif where != folder:
            warn(f"{msg_id} is in {where.name}/, not {folder.name}/{_hint(where)}")
            code = EX_NOINPUT
        else:
            chosen.append(msg_id)
    return chosen, code


def _hint(where: Path) -> str:
    return {
        "failed": ": `pickupd retry` puts it back",
        "hold": ": `pickupd release` puts it back",
        "deferred": ": it is queued already (`pickupd retry ID` makes it due now)",
        "sent": ": it was sent",
    }.get(where.name, "")


def _need_selection(args: argparse.Namespace, flags: str) -> None:
    chose_many = getattr(args, "all", False) or getattr(args, "sender", None)
    if args.ids and chose_many:
        raise CommandError(EX_USAGE, f"pickupd: give IDs or {flags}, not both")
    if not args.ids and not chose_many:
        raise CommandError(EX_USAGE, f"pickupd: give one or more IDs, or {flags}")


def _retry(args: argparse.Namespace) -> int:
    _need_selection(args, "--all")
    if args.reason and not args.all:
        raise CommandError(EX_USAGE, "pickupd: --reason goes with --all")
    _, spool = open_spool(args.config)
    given = args.ids
    if given:  # deferred ones given by id: due now; the rest go on as failed ones
        located = list(resolve(spool, given))
        due_now = [i for i, where in located if where == spool.deferred]
        for msg_id in due_now:
            if moves.make_one_due(spool, msg_id, time.time()):
                print(f"{msg_id}: deferred/, made due now")
            else:
                print(f"{msg_id}: deferred/, due already (or in flight)")
        given = [i for i, where in located if where != spool.deferred]
        if not given:
            return EX_OK
    chosen, code = _selected(spool, spool.failed, given, args.all, None)
    moved = 0
    for msg_id in chosen:
        if args.reason:
            sidecar = sidecar_of(spool.failed, msg_id)
            if sidecar is None or sidecar.reason != args.reason:
                continue
        if _requeue(spool, msg_id, spool.failed, "retried", "put back by pickupd retry"):
            print(f"{msg_id}: failed/ -> deferred/, due now")
            moved += 1
        else:
            warn(f"{msg_id}: gone from failed/ meanwhile")
    say(moved, "message", "put back in the queue")
    return code


def _release(args: argparse.Namespace) -> int:
    _need_selection(args, "--all or --sender ADDR")
    _, spool = open_spool(args.config)
    chosen, code = _selected(spool, spool.hold, args.ids, args.all, args.sender)
    moved = 0
    for msg_id in chosen:
        if _requeue(spool, msg_id, spool.hold, "released", "released by pickupd release"):
            print(f"{msg_id}: hold/ -> deferred/, due now")
            moved += 1
    say(moved, "message", "released")
    return code


def _hold(args: argparse.Namespace) -> int:
    _need_selection(args, "--sender ADDR")
    _, spool = open_spool(args.config)
    chosen, code = _selected(spool, spool.deferred, args.ids, False, args.sender)
    moved = 0
    for msg_id in chosen:

        def held(sidecar: Sidecar | None, msg_id: str = msg_id) -> Sidecar:
            noted = _note(sidecar, msg_id, "held", "held by pickupd hold", time.time())
            return dataclasses.replace(noted, next_attempt=None)

        if moves.hold(spool, msg_id, held):
            print(f"{msg_id}: deferred/ -> hold/")
            moved += 1
        else:
            warn(f"{msg_id}: in flight (a dispatcher took it first): not held")
            code = EX_NOINPUT
    say(moved, "message", "held")
    return code


def _flush(args: argparse.Namespace) -> int:
    _, spool = open_spool(args.config)
    say(moves.make_due(spool, time.time()), "deferred message", "made due now")
    return EX_OK


def _delete(args: argparse.Namespace) -> int:
    _, spool = open_spool(args.config)
    if not args.yes and not sys.stdin.isatty():
        raise CommandError(
            EX_USAGE, "pickupd: delete removes mail for good: add --yes when not on a terminal"
        )
    code = EX_OK
    targets = []
    for msg_id, folder in resolve(spool, args.ids):
        if folder is None or folder == spool.sent:
            warn(no_such(msg_id))
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
        if moves.delete(spool, msg_id, folder):
            print(f"{msg_id}: deleted from {folder.name}/")
        else:
            warn(f"{msg_id}: in flight (a dispatcher took it): not deleted")
            code = EX_NOINPUT
    return code

"""Operator moves on a spool: `pickupd retry`, `release`, `hold`, `flush` and `delete`.

Each races with running dispatchers: a single rename of the .eml decides who has it. Into
deferred/, the sidecar is written first, so a dispatcher never claims a message without it;
out of deferred/, the .eml moves first, so a claim and a hold cannot both win.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from pickupd import ids
from pickupd.spool.files import atomic_write, fsync_dir
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import KeptTurn, Sidecar, from_timestamp

__all__ = ["delete", "hold", "locate", "make_due", "make_one_due", "make_waiting_due", "requeue"]


def locate(spool: Spool, msg_id: str) -> Path | None:
    """The folder (deferred/, hold/, failed/ or sent/) holding message `msg_id`, if any.
    `msg_id` must be a valid id (it becomes part of a path)."""
    if not ids.is_valid(msg_id):
        return None
    for folder in (spool.deferred, spool.hold, spool.failed, spool.sent):
        if os.path.lexists(folder / f"{msg_id}.eml"):
            return folder
    return None


def requeue(spool: Spool, msg_id: str, source: Path, sidecar: Sidecar, due: float) -> bool:
    """Move a message from failed/ or hold/ into deferred/, due at `due`, with `sidecar`.
    False if its .eml was no longer there (someone else moved it)."""
    eml = source / f"{msg_id}.eml"
    if not os.path.lexists(eml):
        return False
    atomic_write(spool.deferred / f"{msg_id}.json", sidecar.to_json(), mtime=due)
    try:
        os.rename(eml, spool.deferred / f"{msg_id}.eml")
    except FileNotFoundError:
        if not os.path.lexists(spool.deferred / f"{msg_id}.eml"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.deferred / f"{msg_id}.json")
        return False
    fsync_dir(spool.deferred)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(source / f"{msg_id}.json")
    return True


def hold(spool: Spool, msg_id: str, note: Callable[[Sidecar | None], Sidecar]) -> bool:
    """Move a deferred message into hold/ (nothing there is sent), its sidecar passed
    through `note`. False if a dispatcher claimed it first (or it was gone)."""
    try:
        os.rename(spool.deferred / f"{msg_id}.eml", spool.hold / f"{msg_id}.eml")
    except FileNotFoundError:
        return False
    # Read only now: until the rename a dispatcher could still have been updating it.
    sidecar = note(spool.read_sidecar(spool.deferred / f"{msg_id}.json"))
    atomic_write(spool.hold / f"{msg_id}.json", sidecar.to_json())
    fsync_dir(spool.hold)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spool.deferred / f"{msg_id}.json")
    return True


def make_due(spool: Spool, now: float) -> int:
    """Make every deferred message due at `now` (pickupd flush, SIGUSR1); return how many.
    The sidecar's mtime is the due time: it is rewritten with next_attempt = now (its
    rename is also what wakes a running dispatcher's watch on deferred/)."""
    return sum(make_one_due(spool, msg_id, now) for msg_id in spool.ids_in(spool.deferred))


def make_one_due(spool: Spool, msg_id: str, now: float) -> bool:
    """Make one deferred message due at `now` (`pickupd retry ID` of a deferred message);
    False if it was due already or is no longer in deferred/."""
    eml = spool.deferred / f"{msg_id}.eml"
    if not os.path.lexists(eml) or spool.due_time(msg_id, now) <= now:
        return False  # claimed meanwhile, or already due
    sidecar = spool.read_sidecar(spool.deferred / f"{msg_id}.json")
    if sidecar is None:
        return spool.set_due(msg_id, now)
    if not os.path.lexists(eml):
        return False
    atomic_write(
        spool.deferred / f"{msg_id}.json",
        dataclasses.replace(sidecar, next_attempt=from_timestamp(now)).to_json(),
        mtime=now,
    )
    return True


def release_turns(
    spool: Spool, turns: dict[str, tuple[tuple[str, int, int], ...]], now: float
) -> list[str]:
    """The deferred messages of `turns` (id -> the turn's (key, bucket, amount)) no longer
    hold the turn their sidecar keeps (the pause it waited for is gone): each sidecar is
    rewritten without it, due `now`. Returns those still in deferred/ keeping that turn (the
    others were taken meanwhile, or their turn was used or given back by another process:
    not to be given back twice)."""
    done = []
    for msg_id, booked in turns.items():
        sidecar = spool.read_sidecar(spool.deferred / f"{msg_id}.json")
        if sidecar is None or not os.path.lexists(spool.deferred / f"{msg_id}.eml"):
            continue
        if sidecar.turn is None or sidecar.turn.booked != booked:
            continue
        changed = dataclasses.replace(sidecar, turn=None, next_attempt=from_timestamp(now))
        atomic_write(spool.deferred / f"{msg_id}.json", changed.to_json(), mtime=now)
        done.append(msg_id)
    return done


def keep_turn(spool: Spool, msg_id: str, kept: KeptTurn) -> bool:
    """The deferred message `msg_id`, which waited in line, has its turn: its sidecar keeps
    it, due then. False if it is no longer in deferred/ (taken meanwhile)."""
    sidecar = spool.read_sidecar(spool.deferred / f"{msg_id}.json")
    if sidecar is None or not os.path.lexists(spool.deferred / f"{msg_id}.eml"):
        return False
    if sidecar.turn is not None:
        return False  # it keeps a turn already (another process's): one is enough
    changed = dataclasses.replace(sidecar, turn=kept, next_attempt=from_timestamp(kept.due))
    atomic_write(spool.deferred / f"{msg_id}.json", changed.to_json(), mtime=kept.due)
    return True


def make_waiting_due(spool: Spool, msg_ids: list[str], now: float) -> list[str]:
    """Make these deferred messages due at `now` if they are due later (a suspended relay
    answers again, or one of them is to be its next probe); return those so moved. Only the
    sidecar's mtime changes (the one truth): each keeps the next_attempt it was given.
    """
    made = []
    for msg_id in msg_ids:
        eml = spool.deferred / f"{msg_id}.eml"
        if (
            os.path.lexists(eml)  # else taken meanwhile
            and spool.due_time(msg_id, now) > now
            and spool.set_due(msg_id, now)
        ):
            made.append(msg_id)
    return made


def delete(spool: Spool, msg_id: str, folder: Path) -> bool:
    """Remove a message and its sidecar from `folder`. False if its .eml was gone (a
    dispatcher claimed it: it is in flight)."""
    try:
        os.unlink(folder / f"{msg_id}.eml")
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / f"{msg_id}.json")
    return True

"""The folder counts that the status line and the metrics show, kept off the event loop.

A census lists every folder (and reads one sidecar for the oldest deferred message's age):
with a million messages waiting that is about a second of CPU. So the service renews it in a
thread, at most every EVERY seconds, and after a slow one it waits a hundred times as long
as it took: its cost stays near 1% of a core whatever the spool holds. A scrape of the
metrics (in the endpoint's own thread) counts afresh while counting is cheap. `pickupd
queue` always counts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from pickupd import ids
from pickupd.spool.folders import (
    Spool,
    claim_id,
    entries,
    is_drop,
    is_folder,
    message_id,
    mtime,
)
from pickupd.spool.sidecar import to_timestamp

__all__ = ["CHEAP", "EVERY", "FOLDERS", "CensusCache", "FolderCount", "take"]

# The folders a census counts, in the order people read them.
FOLDERS = ("pickup", "active", "deferred", "hold", "failed", "sent")

EVERY = 5.0
# A census that took less than this may be taken again on demand (a scrape).
CHEAP = 0.02
_COST_SHARE = 100  # after a census, wait this many times as long as it took


class CensusCache:
    """The latest census of a spool, renewed by `run()` (a task of the service)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.latest: dict[str, FolderCount] | None = None
        self.took = 0.0  # seconds the last census took

    def _take(self) -> dict[str, FolderCount]:
        started = time.monotonic()
        census = take(self._spool, time.time(), ages=("deferred",))
        self.took = time.monotonic() - started
        self.latest = census
        return census

    def current(self) -> dict[str, FolderCount]:
        """For a thread other than the loop's: a census taken now while that is cheap, else
        the latest one."""
        latest = self.latest
        if latest is None or self.took < CHEAP:
            return self._take()
        return latest

    async def renewed(self) -> dict[str, FolderCount]:
        """A census taken now, in a thread (a reload's status line wants a fresh one)."""
        return await asyncio.to_thread(self._take)

    async def run(self) -> None:
        """Until cancelled: a census in a thread, then a pause that grows with its cost."""
        while True:
            await self.renewed()
            await asyncio.sleep(max(EVERY, self.took * _COST_SHARE))


@dataclass(frozen=True, slots=True)
class FolderCount:
    """What a spool folder holds: how many messages, and the age of the oldest (None when
    the census was taken without ages, or the folder is empty)."""

    count: int
    oldest_age: float | None = None


def take(spool: Spool, now: float, ages: Collection[str] = ()) -> dict[str, FolderCount]:
    """How many messages each folder holds, by one rule for everyone (`pickupd queue`, the
    metrics gauge, the systemd status line): in pickup/, the files of new/ and the .eml
    files (any case) of pickup/ itself; in active/, the claims; elsewhere, `<id>.eml`.
    Names starting with a dot are never messages, and pickup/tmp/ holds none yet.

    For the folders named in `ages`, also the oldest message's age: from its file's mtime
    in pickup/ and active/ (a stat per file), from the first_seen of the oldest id's
    sidecar elsewhere (ids sort by time: one sidecar read)."""
    census: dict[str, FolderCount] = {}
    for name in FOLDERS:
        if name in ("pickup", "active"):
            found: Iterator[os.DirEntry[str]]
            if name == "pickup":
                new = (
                    e
                    for e in entries(spool.new)
                    if is_drop(e.name, maildir=True) and not is_folder(e)
                )
                direct = (
                    e
                    for e in entries(spool.pickup)
                    if is_drop(e.name, maildir=False) and not is_folder(e)
                )
                found = itertools.chain(new, direct)
            else:
                found = (e for e in entries(spool.active) if claim_id(e.name))
            if name not in ages:
                census[name] = FolderCount(sum(1 for _ in found))
                continue
            times = [t for t in map(mtime, found) if t is not None]
            oldest = now - min(times) if times else None
            census[name] = FolderCount(len(times), oldest)
            continue
        folder = spool.root / name
        msg_ids = [i for i in (message_id(e.name) for e in entries(folder)) if i]
        oldest = None
        if name in ages and msg_ids:
            oldest = _oldest_seen(spool, folder, sorted(msg_ids, key=ids.sort_key), now)
        census[name] = FolderCount(len(msg_ids), oldest)
    return census


def _oldest_seen(spool: Spool, folder: Path, msg_ids: list[str], now: float) -> float | None:
    for msg_id in msg_ids[:10]:  # the first with a readable sidecar
        sidecar = spool.read_sidecar(folder / f"{msg_id}.json")
        if sidecar is not None:
            with contextlib.suppress(ValueError):
                return max(0.0, now - to_timestamp(sidecar.first_seen))
    return None

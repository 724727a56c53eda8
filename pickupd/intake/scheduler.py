"""deferred/ as the intake sees it: the due time of each message of this process's share
(duetimes.py), renewed by a full scan (in a thread) at start, after a flush or a reload,
and at an interval that grows with the folder; and the feeder that hands each message to
the intake's queue of due mail when its time comes. A deferral costs nothing per message
waiting: no file is read until it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

from pickupd import log as logs
from pickupd.intake.duetimes import RESOLUTION, DueTimes
from pickupd.intake.watcher import FileEvent
from pickupd.spool.folders import Candidate, Origin, Spool, message_id

__all__ = ["ARRIVED", "RESCAN_MAX", "Deferred", "rescan_every"]

# A file that arrived in a folder (created there, or renamed into it).
ARRIVED = (FileEvent.CREATED, FileEvent.MOVED)
# The full scan of deferred/ runs every rescan_interval for up to 10,000 messages there, and
# more seldom as the folder grows (it reads every entry), up to this.
RESCAN_MAX = 300.0
_RESCAN_PER = 10_000


def rescan_every(interval: float, waiting: int) -> float:
    """Seconds between full scans of deferred/ with `waiting` messages in it."""
    return max(interval, min(RESCAN_MAX, interval * waiting / _RESCAN_PER))


class Deferred:
    """The due times of this process's share of deferred/, and their feeder."""

    def __init__(
        self,
        spool: Spool,
        mine: Callable[[str], bool],
        interval: Callable[[], float],
        done: Callable[[], None],
        *,
        once: bool,
    ) -> None:
        """`mine`: whether a file is this process's; `interval`: [dispatch] rescan_interval
        in force; `done`: told when the feeder ends."""
        self.spool = spool
        self.mine = mine
        self.interval = interval
        self.done = done
        self.once = once
        # No message is due further ahead than this ([retry] max_age): see _still_due.
        self.horizon = float("inf")
        self.closed = False
        self._own_deferrals: set[str] = set()  # ids we are moving into deferred/ ourselves
        self._due_times = DueTimes()  # what waits in deferred/ (of our share), by due time
        self._scanned_since: DueTimes | None = None  # added while a full scan runs
        self._rescan = True  # a full scan of deferred/ is wanted (at start: yes)
        self._scans = 0
        self._wake = asyncio.Event()
        self._next_due = float("inf")

    @property
    def scans(self) -> int:
        """Full scans of deferred/ done so far (the first comes at start)."""
        return self._scans

    @property
    def waiting(self) -> int:
        """Deferred messages this process knows to be waiting (its share of deferred/)."""
        return len(self._due_times)

    def wake(self) -> None:
        """Scan deferred/ again now (a reload, a flush, a share taken over)."""
        self._rescan = True
        self._wake.set()

    def close(self) -> None:
        """The feeder ends."""
        self.closed = True
        self._wake.set()

    def deferring(self, msg_id: str) -> None:
        """We are about to move `msg_id` into deferred/ ourselves: that is no news for the watch."""
        if self.once:
            return
        if len(self._own_deferrals) > 10_000:
            self._own_deferrals.clear()
        self._own_deferrals.add(msg_id)

    def due_at(self, msg_id: str, due: float) -> None:
        """Message `msg_id` now waits in deferred/ until `due`: take it then."""
        self._due_times.add(msg_id, due)
        if self._scanned_since is not None:
            self._scanned_since.add(msg_id, due)
        if due < self._next_due:
            self._next_due = due
            self._wake.set()

    def hint(self, event_type: FileEvent, name: str) -> None:
        """Something arrived in deferred/: `pickupd retry`, `release` and `flush` (and we
        ourselves, which is no news)."""
        if event_type not in ARRIVED or name.startswith("."):
            return
        msg_id, _, suffix = name.partition(".")
        if message_id(f"{msg_id}.eml") is None or not self.mine(f"{msg_id}.eml"):
            return
        if msg_id in self._own_deferrals:
            if suffix == "eml":  # our sidecar came first; the .eml is the last of our two
                self._own_deferrals.discard(msg_id)
            return
        # An operator's retry, release or flush (another process): its due time is the
        # sidecar's mtime, one stat away. A burst too large for the watch overflows into a
        # rescan.
        self.due_at(msg_id, self.spool.due_time(msg_id, time.time()))

    async def feed(self, put: Callable[[Candidate], Awaitable[bool]]) -> None:
        """Take deferred messages as they come due (their sidecar's mtime is the due time): from
        the due times kept, which a full scan of deferred/ (in a thread) renews at start,
        after a flush or a reload, and every `rescan_every`."""
        try:
            next_scan = 0.0
            while not self.closed:
                self._wake.clear()
                if self._rescan or time.time() >= next_scan:
                    await self._scan()
                    next_scan = time.time() + rescan_every(self.interval(), len(self._due_times))
                if self.once:
                    # Due times are kept in buckets of RESOLUTION and come due when their
                    # bucket has passed: one due as the scan ran (a clamped one is due then)
                    # would wait for a next look that `once` never takes.
                    await asyncio.sleep(RESOLUTION)
                now = time.time()
                for msg_id in self._due_times.pop_due(now):
                    candidate = self._still_due(msg_id, now)
                    if candidate is None:
                        continue
                    if not await put(candidate):
                        return
                if self.once:
                    return
                self._next_due = min(next_scan, self._due_times.next_due() or next_scan)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), max(0.0, self._next_due - time.time())
                    )
        finally:
            self.done()

    async def _scan(self) -> None:
        """The full scan, off the event loop: the due times of our share of deferred/ as the
        folder holds them, plus what was deferred while it ran."""
        self._rescan = False
        self._scanned_since = DueTimes()
        started = time.monotonic()
        try:
            scanned = await asyncio.to_thread(
                DueTimes, self.spool.deferred_times(time.time(), self.horizon, self.mine)
            )
            scanned.merge(self._scanned_since)
            self._due_times = scanned
        finally:
            self._scanned_since = None
        took = time.monotonic() - started
        if not self._scans or took > 1.0:  # the first, and any an operator would notice
            logs.get().info("deferred_scanned", waiting=len(scanned), seconds=round(took, 3))
        self._scans += 1

    def _still_due(self, msg_id: str, now: float) -> Candidate | None:
        """The candidate for `msg_id` if its file is still in deferred/ and due (its sidecar's
        mtime says so; a later one is kept for then). One further ahead than `horizon` cannot
        come from pickupd (a clock jump, an edit): it is taken now, with `clamped_from`."""
        name = f"{msg_id}.eml"
        path = self.spool.deferred / name
        if not os.path.lexists(path):
            return None  # taken by another process, or moved by an operator
        due = self.spool.due_time(msg_id, now)
        if due > now + self.horizon:
            return Candidate(path, name, Origin.DEFERRED, msg_id, due)
        if due > now:
            self._due_times.add(msg_id, due)
            return None
        return Candidate(path, name, Origin.DEFERRED, msg_id)

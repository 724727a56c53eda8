"""Intake: what to work on next. Watcher hints and rescans of pickup/, and the two queues
(new mail, due mail) that the lanes (the service's asyncio tasks, one message each) take
from in turn; deferred/ is scheduler.py's, which fills the queue of due mail.

Events are hints; the directory scan is the truth (as Postfix's pickup). Only a bounded number
of candidates wait in memory: the backlog stays on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from pathlib import Path

from pickupd import log as logs
from pickupd.config.loading import DispatchConfig
from pickupd.intake.entries import Strays, Unmovable, Writers
from pickupd.intake.scheduler import ARRIVED, Deferred
from pickupd.intake.watcher import FileEvent
from pickupd.spool.folders import Candidate, Later, Origin, Spool, is_stray
from pickupd.workers.shares import ONLY, Part, owns

__all__ = ["Intake"]

# How many candidates wait in memory per queue and lane.
_QUEUE_PER_LANE = 4
# Scans of pickup/ start at least this far apart (and 20 times as far as the last one took);
# Maildir drops do not wait for them (their events queue them at once).
_SCAN_GAP = 0.05


def _ignore(name: str) -> None:
    del name


class Intake:
    """Feeds candidates to the lanes until `close()` (or, `once`, until all is taken)."""

    def __init__(
        self, spool: Spool, dispatch: DispatchConfig, *, once: bool, part: Part = ONLY
    ) -> None:
        self.spool = spool
        self.part = part  # only the files this worker process owns (workers/shares.py)
        self.dispatch = dispatch  # swapped on reload
        self.once = once
        self._busy = 0  # candidates being worked on
        self._unmovable = Unmovable()  # logged once, skipped since
        # The main process says which files in pickup/ are not messages; its workers, which
        # see the same folder, do not.
        self._stray = Strays().note if part.index == 0 else _ignore
        self._concurrency = dispatch.concurrency  # fixed for the process
        self._new: deque[Candidate] = deque()
        self._due: deque[Candidate] = deque()
        self._queued: set[Path] = set()
        self._prefer_new = True
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._pickup_wake = asyncio.Event()
        self._writers = Writers(self._pickup_wake.set)
        self._closed = False
        self._feeders_done = 0
        # deferred/: the due times of our share, and the feeder of the due queue.
        self.deferred = Deferred(
            spool, self.mine, lambda: self.dispatch.rescan_interval, self._feeder_done, once=once
        )

    # -- what the dispatcher tells us --------------------------------------------------------

    def recover(self, candidates: list[Candidate]) -> None:
        """Claims left by a process that is gone: due at once."""
        for candidate in candidates:
            if candidate.path not in self._queued:
                self._queued.add(candidate.path)
                self._due.append(candidate)
        self._has_work.set()

    def cover(self, workers: frozenset[int]) -> None:
        """Take these worker processes' shares too (they are down), or no more (back up)."""
        self.part = dataclasses.replace(self.part, covering=workers)
        self.wake()

    def mine(self, name: str) -> bool:
        """Whether this worker process takes the file `name`, by its share as it is now."""
        return owns(self.part, name)

    def wake(self) -> None:
        """Scan both folders again now (a reload, a flush, a share taken over)."""
        self._pickup_wake.set()
        self.deferred.wake()

    def started(self, candidate: Candidate) -> None:
        """A lane has taken `candidate` and works on it."""
        self._busy += 1

    def done(self, candidate: Candidate) -> None:
        """A lane is finished with `candidate` (whatever became of it)."""
        self._busy -= 1
        self._queued.discard(candidate.path)
        self._has_work.set()

    @property
    def in_flight(self) -> int:
        """Candidates the lanes are working on now."""
        return self._busy

    def unmovable(self, path: Path) -> bool:
        """`path` cannot be claimed (not ours to rename): skip it from now on. True the first
        time, so it is logged once."""
        return self._unmovable.add(path)

    def not_a_file(self, path: Path, source: str) -> None:
        """`path` turned out to be a directory when claimed (swapped in after the scan): it was
        put back; skip it from now on and say so once."""
        if self._unmovable.add(path):
            self._stray(f"{source.removeprefix('pickup/')}/")

    def close(self) -> None:
        """Stop feeding: `next()` returns None from now on, and waiting feeders end."""
        self._closed = True
        for event in (self._has_work, self._has_room, self._pickup_wake):
            event.set()
        self.deferred.close()

    # -- watcher hints (called on the loop) ------------------------------------------------

    def hint(self, event_type: FileEvent, path: str) -> None:
        """A watchdog event: enqueue a Maildir file at once, or rescan later."""
        if self._closed:
            return
        if event_type is FileEvent.OVERFLOW:  # events were lost: the scans find what they were
            self.wake()
            return
        candidate_path = Path(path)
        spool = self.spool
        if candidate_path.parent == spool.deferred:
            self.deferred.hint(event_type, candidate_path.name)
        elif candidate_path.parent == spool.new:
            if event_type not in ARRIVED or candidate_path.name.startswith("."):
                return
            if not self.mine(candidate_path.name):
                return
            if len(self._new) >= self._capacity():
                self._pickup_wake.set()  # the feeder rescans once it has room
            elif candidate_path not in self._queued and candidate_path not in self._unmovable:
                self._enqueue(
                    self._new, Candidate(candidate_path, f"new/{candidate_path.name}", Origin.NEW)
                )
        elif candidate_path.parent == spool.pickup and is_stray(candidate_path.name):
            if event_type in ARRIVED:
                self._stray(candidate_path.name)
        elif candidate_path.suffix.lower() == ".eml" and candidate_path.parent == spool.pickup:
            self._writers.event(event_type, candidate_path, self.dispatch.settle)

    # -- the queues ----------------------------------------------------------------------------

    def _capacity(self) -> int:
        return self._concurrency * _QUEUE_PER_LANE

    def _enqueue(self, queue: deque[Candidate], candidate: Candidate) -> None:
        self._queued.add(candidate.path)
        queue.append(candidate)
        self._has_work.set()

    async def _put(self, queue: deque[Candidate], candidate: Candidate) -> bool:
        """Enqueue, waiting for room; False once closed."""
        while len(queue) >= self._capacity():
            self._has_room.clear()
            await self._has_room.wait()
        if self._closed:
            return False
        if candidate.path not in self._queued:
            self._enqueue(queue, candidate)
        return True

    async def next(self) -> Candidate | None:
        """The next candidate, one new and one deferred in turn so neither starves the other;
        None once closed (or, `once`, when everything has been taken and worked on)."""
        while not self._closed:
            first, second = (self._new, self._due) if self._prefer_new else (self._due, self._new)
            queue = first if first else second
            if queue:
                self._prefer_new = queue is not self._new
                self._has_room.set()
                return queue.popleft()
            if self.once and self._feeders_done >= 2 and self._busy == 0:
                self._has_work.set()  # wake the other idle lanes so they see it too
                return None
            self._has_work.clear()
            await self._has_work.wait()
        return None

    # -- the feeders ---------------------------------------------------------------------------

    async def feed_pickup(self) -> None:
        """Scan pickup/ on start, on hints that did not fit the queue, and every rescan_interval."""
        try:
            while not self._closed:
                self._pickup_wake.clear()
                now = time.time()
                started = time.monotonic()
                wake_at = now + self.dispatch.rescan_interval
                for item in self.spool.scan_pickup(
                    now, self.dispatch.settle, self.mine, self._stray
                ):
                    if isinstance(item, Later):
                        wake_at = min(wake_at, item.at + 0.01)
                    elif item.origin is Origin.EML and self._writers.still_open(item.path):
                        continue  # its close event wakes us
                    elif item.path in self._unmovable:
                        continue
                    elif item.path not in self._queued:
                        waited = time.monotonic()
                        if not await self._put(self._new, item):
                            return
                        started += time.monotonic() - waited  # waiting for room is not scanning
                scanning = time.monotonic() - started
                logs.get().debug("pickup_scanned", seconds=round(scanning, 4))
                if self.once:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._pickup_wake.wait(), max(0.0, wake_at - time.time())
                    )
                # Scans of pickup/ take at most a twentieth of the time (and come at most
                # every _SCAN_GAP): a file kept just short of settled, or a writer's stream
                # of events beside a folder of entries, cannot make them back to back.
                rest = max(_SCAN_GAP, 20 * scanning) - (time.monotonic() - started)
                if rest > 0 and not self._closed:
                    await asyncio.sleep(rest)
        finally:
            self._feeder_done()

    async def feed_deferred(self) -> None:
        """Queue each deferred message of ours as it comes due (scheduler.py)."""
        await self.deferred.feed(self._put_due)

    async def _put_due(self, candidate: Candidate) -> bool:
        if candidate.path in self._queued:
            return True  # queued already (recovered, or taken at a rescan)
        return await self._put(self._due, candidate)

    def _feeder_done(self) -> None:
        self._feeders_done += 1
        self._has_work.set()

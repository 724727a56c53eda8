"""Intake: what to work on next. Watcher hints, rescans of pickup/ and deferred/, the
due-deferred scheduler, and the two queues (new mail, due mail) that the lanes (the
service's asyncio tasks, one message each) take from in turn.

Events are hints; the directory scan is the truth (as Postfix's pickup). Only a bounded number
of candidates wait in memory: the backlog stays on disk. Deferred messages are the exception:
their due times are kept (duetimes.py), so a deferral or a waiting backlog costs nothing per
message waiting; the full scan of deferred/ runs in a thread, at start, after a flush, and at
an interval that grows with the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import deque
from pathlib import Path

from pickupd import log as logs
from pickupd.config.loading import DispatchConfig
from pickupd.intake.duetimes import RESOLUTION, DueTimes
from pickupd.intake.entries import Strays, Unmovable, Writers
from pickupd.intake.watcher import FileEvent
from pickupd.spool.folders import Candidate, Later, Spool, is_stray, message_id
from pickupd.workers.shares import ONLY, Part, owns

__all__ = ["RESCAN_MAX", "Intake", "rescan_every"]

# How many candidates wait in memory per queue and lane.
_QUEUE_PER_LANE = 4
# The full scan of deferred/ runs every rescan_interval for up to 10,000 messages there, and
# more seldom as the folder grows (it reads every entry), up to this.
RESCAN_MAX = 300.0
_RESCAN_PER = 10_000
# Scans of pickup/ start at least this far apart (and 20 times as far as the last one took);
# Maildir drops do not wait for them (their events queue them at once).
_SCAN_GAP = 0.05


# A file that arrived in a folder (created there, or renamed into it).
_ARRIVED = (FileEvent.CREATED, FileEvent.MOVED)


def rescan_every(interval: float, waiting: int) -> float:
    """Seconds between full scans of deferred/ with `waiting` messages in it."""
    return max(interval, min(RESCAN_MAX, interval * waiting / _RESCAN_PER))


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
        # No message is due further ahead than this ([retry] max_age): see scan_deferred.
        self.horizon = float("inf")
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
        self._own_deferrals: set[str] = set()  # ids we are moving into deferred/ ourselves
        self._due_times = DueTimes()  # what waits in deferred/ (of our share), by due time
        self._scanned_since: DueTimes | None = None  # added while a full scan runs
        self._rescan = True  # a full scan of deferred/ is wanted (at start: yes)
        self._scans = 0
        self._prefer_new = True
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._pickup_wake = asyncio.Event()
        self._writers = Writers(self._pickup_wake.set)
        self._deferred_wake = asyncio.Event()
        self._closed = False
        self._feeders_done = 0
        self._next_due = float("inf")

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
        self._rescan = True
        self._pickup_wake.set()
        self._deferred_wake.set()

    @property
    def waiting(self) -> int:
        """Deferred messages this process knows to be waiting (its share of deferred/)."""
        return len(self._due_times)

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
            self._deferred_wake.set()

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
        for event in (self._has_work, self._has_room, self._pickup_wake, self._deferred_wake):
            event.set()

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
            self._deferred_hint(event_type, candidate_path.name)
        elif candidate_path.parent == spool.new:
            if event_type not in _ARRIVED or candidate_path.name.startswith("."):
                return
            if not self.mine(candidate_path.name):
                return
            if len(self._new) >= self._capacity():
                self._pickup_wake.set()  # the feeder rescans once it has room
            elif candidate_path not in self._queued and candidate_path not in self._unmovable:
                self._enqueue(
                    self._new, Candidate(candidate_path, f"new/{candidate_path.name}", "new")
                )
        elif candidate_path.parent == spool.pickup and is_stray(candidate_path.name):
            if event_type in _ARRIVED:
                self._stray(candidate_path.name)
        elif candidate_path.suffix.lower() == ".eml" and candidate_path.parent == spool.pickup:
            self._writers.event(event_type, candidate_path, self.dispatch.settle)

    def _deferred_hint(self, event_type: FileEvent, name: str) -> None:
        """Something arrived in deferred/: `pickupd retry`, `release` and `flush` (and we
        ourselves, which is no news)."""
        if event_type not in _ARRIVED or name.startswith("."):
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
                    elif item.origin == "eml" and self._writers.still_open(item.path):
                        continue  # its close event wakes us
                    elif item.path in self._unmovable:
                        continue
                    elif item.path not in self._queued:
                        waited = time.monotonic()
                        if not await self._put(self._new, item):
                            return
                        started += time.monotonic() - waited  # waiting for room is not scanning
                scanning = time.monotonic() - started
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
        """Take deferred messages as they come due (their sidecar's mtime is the due time): from
        the due times kept, which a full scan of deferred/ (in a thread) renews at start,
        after a flush or a reload, and every `rescan_every`."""
        try:
            next_scan = 0.0
            while not self._closed:
                self._deferred_wake.clear()
                if self._rescan or time.time() >= next_scan:
                    await self._scan_deferred()
                    next_scan = time.time() + rescan_every(
                        self.dispatch.rescan_interval, len(self._due_times)
                    )
                if self.once:
                    # Due times are kept in buckets of RESOLUTION and come due when their
                    # bucket has passed: one due as the scan ran (a clamped one is due then)
                    # would wait for a next look that `once` never takes.
                    await asyncio.sleep(RESOLUTION)
                now = time.time()
                for msg_id in self._due_times.pop_due(now):
                    candidate = self._still_due(msg_id, now)
                    if candidate is None or candidate.path in self._queued:
                        continue
                    if not await self._put(self._due, candidate):
                        return
                if self.once:
                    return
                self._next_due = min(next_scan, self._due_times.next_due() or next_scan)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._deferred_wake.wait(), max(0.0, self._next_due - time.time())
                    )
        finally:
            self._feeder_done()

    async def _scan_deferred(self) -> None:
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
            return Candidate(path, name, "deferred", msg_id, due)
        if due > now:
            self._due_times.add(msg_id, due)
            return None
        return Candidate(path, name, "deferred", msg_id)

    def _feeder_done(self) -> None:
        self._feeders_done += 1
        self._has_work.set()

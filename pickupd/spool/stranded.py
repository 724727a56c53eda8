"""Claims that could not be moved to their folder (a full disk, a read-only remount): they
stay in active/ under this process's claim, and the same process tries again, with backoff,
until the spool takes them. Nothing waits for a restart, and nothing is half-moved meanwhile
(atomic writes leave no partial files); mail that needs no new space goes on being relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pickupd.errors import SpoolWriteError
from pickupd.log import Logger

__all__ = ["BACKOFF_MAX", "Stranded"]

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass(slots=True)
class _Entry:
    resume: Callable[[], Awaitable[None]]
    tries: int
    next_try: float


class Stranded:
    """The stranded claims of one dispatcher and the task that retries them."""

    def __init__(self, log: Logger, changed: Callable[[int], None] = lambda count: None) -> None:
        self.log = log
        self._entries: dict[str, _Entry] = {}
        self._wake = asyncio.Event()
        self._changed = changed  # told the count (the metrics gauge)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, error: SpoolWriteError) -> None:
        """A move failed: keep its `resume()` and try again after a backoff. Logged once per
        message (at its first failure)."""
        entry = self._entries.get(error.msg_id)
        if entry is None:
            self.log.error("stranded", id=error.msg_id, error=str(error))
            entry = self._entries[error.msg_id] = _Entry(error.resume, 0, 0.0)
            self._changed(len(self._entries))
        entry.resume = error.resume
        entry.tries += 1
        entry.next_try = time.monotonic() + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (entry.tries - 1))

    def wake(self) -> None:
        """Try every stranded claim now (SIGUSR1, `pickupd flush`)."""
        for entry in self._entries.values():
            entry.next_try = 0.0
        self._wake.set()

    async def run(self, moved: Callable[[], None]) -> None:
        """Retry stranded claims as their backoff ends, until cancelled; `moved()` after any
        of them reached its folder (so the intake looks there)."""
        while True:
            now = time.monotonic()
            soonest = min((e.next_try for e in self._entries.values()), default=now + 3600)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, soonest - now))
            done = 0
            for msg_id, entry in list(self._entries.items()):
                if entry.next_try > time.monotonic():
                    continue
                try:
                    # Its moves where the spool's disk says, what follows them on the loop.
                    await entry.resume()
                except SpoolWriteError as error:
                    self.add(error)
                    continue
                del self._entries[msg_id]
                self.log.info("unstranded", id=msg_id, tries=entry.tries)
                done += 1
            if done:
                self._changed(len(self._entries))
                moved()

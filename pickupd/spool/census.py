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
import time

from pickupd.spool.folders import FolderCount, Spool

__all__ = ["CHEAP", "EVERY", "CensusCache"]

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
        census = self._spool.census(time.time(), ages=("deferred",))
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

"""The deferred messages' due times, kept in memory so that waiting costs nothing.

The full scan of deferred/ is the truth (a file's mtime is its due time); this index is what
the process knows between scans: what the last scan saw, plus what it deferred itself since,
plus what an operator's `retry` or `release` made due (one stat each, from the watch). It
never decides alone: when an entry comes due, the file's mtime is read again before the
message is taken, so a stale entry (deferred again meanwhile, or taken by another process)
costs one stat and nothing else.

Entries are kept in 0.1 s buckets: a heap of bucket keys, and per bucket the message ids
packed into one bytearray (26 bytes an id), so a million waiting messages take about 30 MB.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator

from pickupd import ids

__all__ = ["RESOLUTION", "DueTimes"]

# Width of a bucket, in seconds: an entry comes due at most this late.
RESOLUTION = 0.1
_ID = 26  # the length of a message id (a ULID)


class DueTimes:
    """Message ids by due time (Unix seconds), in RESOLUTION buckets."""

    __slots__ = ("_buckets", "_count", "_heap")

    def __init__(self, entries: Iterable[tuple[str, float]] = ()) -> None:
        self._buckets: dict[int, bytearray] = {}
        self._heap: list[int] = []
        self._count = 0
        for msg_id, due in entries:
            self.add(msg_id, due)

    def __len__(self) -> int:
        return self._count

    def add(self, msg_id: str, due: float) -> None:
        """`msg_id` is due at `due` (a second entry for the same id is harmless: see the
        module docstring)."""
        if len(msg_id) != _ID or not ids.is_valid(msg_id):
            return  # only ids can name files in deferred/
        key = math.ceil(due / RESOLUTION)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = bytearray()
            heapq.heappush(self._heap, key)
        bucket += msg_id.encode("ascii")
        self._count += 1

    def merge(self, other: DueTimes) -> None:
        """Add every entry of `other`."""
        for key, packed in other._buckets.items():
            bucket = self._buckets.get(key)
            if bucket is None:
                self._buckets[key] = bytearray(packed)
                heapq.heappush(self._heap, key)
            else:
                bucket += packed
            self._count += len(packed) // _ID

    def next_due(self) -> float | None:
        """When the earliest entry comes due; None when there is none."""
        return self._heap[0] * RESOLUTION if self._heap else None

    def pop_due(self, now: float) -> Iterator[str]:
        """The ids due by `now`, earliest first, each removed as it is yielded. Entries
        added while this runs are seen too, if they are due."""
        # In whole buckets, so an entry added with a due time after `now` is never popped
        # before its time (no float rounding at the edge).
        last = math.floor(now / RESOLUTION)
        while self._heap and self._heap[0] <= last:
            key = heapq.heappop(self._heap)
            packed = self._buckets.pop(key)
            self._count -= len(packed) // _ID
            for start in range(0, len(packed), _ID):
                yield packed[start : start + _ID].decode("ascii")

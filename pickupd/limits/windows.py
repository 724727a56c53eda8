"""Rolling windows as the ledger keeps them: the arithmetic, with no I/O (the Redis script in
store.py does the same in Lua; tests hold the two to each other).

A limit of `amount` per `window` is kept as counts in buckets of `window / 60` (at least 1 ms),
numbered from the epoch. A turn is booked into the bucket of its time, and turns are booked in
order (a key's `tail`, the last bucket booked, never moves back). Since every booked turn is at
or before the tail, a new turn at bucket b >= tail fits if the `span` buckets ending at b, plus
its own need, stay within `amount`: any window of `window` seconds lies within `span` buckets
(the window plus MARGIN, rounded up, plus one), and a window's last turn was checked when it
was booked. So no window, wherever it starts, ever holds more than `amount`. The price is a
little room: up to one bucket and MARGIN per window.

MARGIN covers what happens between the booking and the server's count: the connection, the
queue in a busy process, a clock a few milliseconds apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

__all__ = ["BUCKETS", "Key", "Window", "earliest", "margin"]

BUCKETS = 60  # a window is this many buckets
MAX_MARGIN = 0.5  # seconds


def margin(window: float) -> float:
    """Seconds added to a window: half a second, a fifth of a short window."""
    return min(MAX_MARGIN, window / 5)


@dataclass(frozen=True, slots=True)
class Window:
    """A limit as buckets: `amount` in any `span` consecutive buckets of `size_ms`."""

    amount: int
    size_ms: int
    span: int

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def of(cls, amount: int, window: float) -> Window:
        size_ms = max(1, int(window * 1000) // BUCKETS)
        span = math.ceil((window + margin(window)) * 1000 / size_ms) + 1
        return cls(amount, size_ms, span)


@dataclass(slots=True)
class Key:
    """One key's state: the counts by bucket (only the last `span` before the tail matter) and
    the tail, the last bucket booked (-1: none)."""

    counts: dict[int, int] = field(default_factory=dict)
    tail: int = -1

    def booked(self, window: Window, bucket: int) -> int:
        """What is booked in the `span` buckets that end at `bucket`."""
        low = bucket - window.span
        return sum(n for b, n in self.counts.items() if low < b <= bucket)

    def book(self, window: Window, bucket: int, need: int, now_ms: int) -> None:
        """Book `need` at `bucket` (>= tail) and forget buckets no window can reach again:
        those a span before now, not before the tail (a turn given back moves the tail back,
        and a window that ends now must still see the buckets before it)."""
        self.counts[bucket] = self.counts.get(bucket, 0) + need
        self.tail = max(self.tail, bucket)
        low = min(self.tail, now_ms // window.size_ms) - window.span
        for b in [b for b in self.counts if b <= low]:
            del self.counts[b]

    def refund(self, bucket: int, amount: int) -> None:
        """Give back what a booked turn did not use (never below zero)."""
        left = self.counts.get(bucket, 0) - amount
        if left > 0:
            self.counts[bucket] = left
            return
        self.counts.pop(bucket, None)
        if bucket == self.tail:
            # The last turn given back (a pause it waited for is gone): the next in order
            # may go where the one before it went, not after a turn nobody holds.
            self.tail = max(self.counts, default=-1)

    def room(self, window: Window, now_ms: int) -> int:
        """What could still go now (for the metrics)."""
        return max(0, window.amount - self.booked(window, max(self.tail, now_ms // window.size_ms)))


def earliest(key: Key, window: Window, need: int, at_ms: int) -> int | None:
    """The first bucket at or after `at_ms` (and the tail) where `need` fits; None if it never
    can (more than the window's amount)."""
    if need > window.amount:
        return None
    bucket = max(at_ms // window.size_ms, key.tail)
    booked = sorted(key.counts.items())
    while True:
        low = bucket - window.span
        inside = [(b, n) for b, n in booked if low < b <= bucket]
        if sum(n for _, n in inside) + need <= window.amount:
            return bucket
        # Not yet: move on to when the oldest booked bucket leaves the window.
        bucket = inside[0][0] + window.span

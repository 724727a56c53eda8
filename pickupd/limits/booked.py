"""What this host booked in the Redis store lately, and what its share starts from when the
store goes away (store.py): a host that spent its share of a window before an outage does not
spend it again during it (for a daily limit, that would block the mailbox a day)."""

from __future__ import annotations

from collections.abc import Sequence

from pickupd.limits.ledger import Need
from pickupd.limits.windows import Window

__all__ = ["Booked"]

Buckets = dict[str, tuple[Window, dict[int, int]]]


class Booked:
    """This host's bookings in the store, per key: only the buckets a window can still reach,
    and the fleet's room the store left after this host's last turn."""

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self._mine: Buckets = {}  # key -> (window, bucket -> amount)
        self._room: dict[str, tuple[int, int]] = {}  # key -> (its last turn's bucket, room)

    def add(self, booked: Sequence[tuple[Need, int, int]], sign: int = 1) -> None:
        """Keep what this host booked in the store (or, `sign` -1, gave back): (need,
        bucket, amount)."""
        for need, bucket, amount in booked:
            window = need.window
            mine = self._mine.setdefault(need.key, (window, {}))[1]
            mine[bucket] = mine.get(bucket, 0) + sign * amount
            if mine[bucket] <= 0:
                del mine[bucket]
            for old in [b for b in mine if b <= bucket - window.span]:
                del mine[old]

    def heard(self, need: Need, bucket: int, left: int) -> None:
        """The store's answer to this host's turn: `left` is the fleet's room after it."""
        self._room[need.key] = (bucket, left)

    def seed(self) -> Buckets:
        """What the share starts from when the store goes away: what this host booked in it,
        and, where the fleet's room (the store's answer to this host's last turn) was less
        than its part of it, as much again as the share exceeds that part: in the window that
        holds the outage each host takes at most 1/hosts of the room that was left."""
        seeded = {}
        for key, (window, buckets) in self._mine.items():
            counts = dict(buckets)
            if key in self._room:
                bucket, left = self._room[key]
                share = max(1, window.amount // self.hosts)
                mine = sum(n for b, n in buckets.items() if b > bucket - window.span)
                part = -(-max(0, left) // self.hosts)  # ceil
                extra = (share - mine) - max(0, min(share - mine, part))
                if extra > 0:
                    counts[bucket] = counts.get(bucket, 0) + extra
            seeded[key] = (window, counts)
        return seeded

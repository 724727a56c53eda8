"""The waiting line of one set of limits in one process: the messages that found no room
within what their class may book ahead, in the order they go: by class, then first in first
out. Pure bookkeeping, no I/O: quota.py asks the ledger for the head's turn.

Why a line and not a turn booked for each message, as before: turns are booked in order (a
key's tail never moves back, windows.py), so a backlog booked far into the future holds every
message dropped after it, a password reset behind a whole newsletter. Now only urgent mail
books as far ahead as it must; normal mail at most half of its shortest window ahead, bulk
mail only for now; the rest waits here, and the head asks when the ledger says room comes.
So an urgent message goes at the first room after at most half a window of normal mail, on
every host that shares the ledger, and normal mail at the first room after bulk mail's.

A long limit (an hour or more: a day's quota) is spent once, not every minute: bulk mail
takes at most nine tenths of it, so a newsletter that could spend a mailbox's day leaves a
tenth of it to the mail that matters.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from pickupd.limits.ledger import Need
from pickupd.limits.needs import Applies
from pickupd.message.priority import MailClass
from pickupd.units import Limit

__all__ = ["BULK_SHARE", "LONG", "NORMAL_AHEAD", "Line", "Member", "line_key", "needs_for", "reach"]

# How far ahead normal mail may book, as a part of the shortest window of its limits.
NORMAL_AHEAD = 0.5
# Bulk mail books only a turn that is (about) now.
BULK_AHEAD = 0.05
# Of a limit this long or longer (seconds), bulk mail takes at most this part.
LONG = 3600.0
BULK_SHARE = 0.9


def reach(klass: MailClass, needs: Sequence[Need]) -> float | None:
    """How far ahead (seconds) a message of `klass` may book under `needs` (None: any)."""
    if klass is MailClass.URGENT or not needs:
        return None
    if klass is MailClass.BULK:
        return BULK_AHEAD
    return NORMAL_AHEAD * min(need.limit.window for need in needs)


def needs_for(klass: MailClass, needs: tuple[Need, ...]) -> tuple[Need, ...]:
    """The needs a message of `klass` books: bulk mail's long limits are its share of them
    (the same ledger keys, a smaller amount)."""
    if klass is not MailClass.BULK:
        return needs
    return tuple(
        Need(need.key, _bulk_share(need.limit), need.amount, need.scope, need.shard)
        if need.limit.window >= LONG and need.limit.amount >= 2
        else need
        for need in needs
    )


def _bulk_share(limit: Limit) -> Limit:
    return Limit(max(1, int(limit.amount * BULK_SHARE)), limit.unit, limit.window)


def line_key(applies: Applies) -> tuple[str, ...]:
    """The line a message waits in: the same limits and pauses."""
    return tuple(need.key for need in applies.needs) + applies.scopes


@dataclass(slots=True)
class Member:
    """A message in a line. `ready`: it is in deferred/ (so its sidecar can be given the turn
    when it comes); a message being claimed or deferred is not."""

    applies: Applies
    klass: MailClass
    seq: int
    ready: bool = False


class Line:
    """The messages waiting under one set of limits, by class then arrival."""

    def __init__(self, applies: Applies, processes: int = 1) -> None:
        self.members: dict[str, Member] = {}
        self._ranks: tuple[list[int], ...] = ([], [], [])  # seqs by class rank, in order
        self._by_seq: dict[int, str] = {}
        self._seq = 0
        self.room_at = 0.0  # when the ledger said the head's room comes (this host's clock)
        self.paused = ""  # what the head waits for, if a pause ("<scope> is paused (why)")
        # Seconds a message takes of the slowest limit at its full rate, times the processes
        # whose lines share it (workers take about as many messages each): the spacing of the
        # expected times.
        self.spacing = processes * max(
            (need.limit.window * need.amount / need.limit.amount for need in applies.needs),
            default=0.0,
        )

    def __len__(self) -> int:
        return len(self.members)

    def add(self, msg_id: str, applies: Applies, klass: MailClass) -> Member:
        """`msg_id` joins at the end of its class (or keeps its place if it is in it)."""
        member = self.members.get(msg_id)
        if member is not None:
            return member
        self._seq += 1
        member = Member(applies, klass, self._seq)
        self.members[msg_id] = member
        self._ranks[klass.rank].append(member.seq)
        self._by_seq[member.seq] = msg_id
        return member

    def remove(self, msg_id: str) -> Member | None:
        member = self.members.pop(msg_id, None)
        if member is not None:
            seqs = self._ranks[member.klass.rank]
            seqs.pop(bisect.bisect_left(seqs, member.seq))
            del self._by_seq[member.seq]
        return member

    def head(self) -> tuple[str, Member] | None:
        """The message that goes next."""
        for seqs in self._ranks:
            if seqs:
                msg_id = self._by_seq[seqs[0]]
                return msg_id, self.members[msg_id]
        return None

    def waits_ahead_of(self, klass: MailClass) -> bool:
        """Whether a message of `klass` arriving now would wait behind one of this line
        (one of its own class or higher waits already: first in, first out)."""
        return any(self._ranks[rank] for rank in range(klass.rank + 1))

    def position(self, member: Member) -> int:
        """How many messages go before `member`."""
        rank = member.klass.rank
        before = sum(len(self._ranks[r]) for r in range(rank))
        return before + bisect.bisect_left(self._ranks[rank], member.seq)

    def expected(self, member: Member, now: float) -> float:
        """When `member` should go, if this process had the whole limit and no message of a
        higher class came: from the head's room, one spacing per message before it."""
        return max(now, self.room_at) + self.position(member) * self.spacing

    def counts(self) -> dict[MailClass, int]:
        return {klass: len(self._ranks[klass.rank]) for klass in MailClass}

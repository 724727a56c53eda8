"""This process's waiting lines (lines.py) and their pumps: a message that found no room near
enough for its class joins its line, and the line's head asks the ledger when the ledger says
room comes (every ASK_AGAIN at least). The turn it gets goes to the message through
`on_turn`, which writes it into the message's sidecar, so whichever process takes the message
from deferred/ sends on it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pickupd import log as logs
from pickupd.limits.ledger import Ledger, Turn
from pickupd.limits.lines import Line, Member, line_key, needs_for, reach
from pickupd.limits.needs import Applies
from pickupd.limits.replies import SPENT
from pickupd.message.priority import MailClass
from pickupd.spool.sidecar import KeptTurn, from_timestamp

__all__ = ["ASK_AGAIN", "Lines", "Parked", "kept_as", "paused_detail"]

# A line's head asks the ledger at least this often while it waits (a pause an operator
# removed, room another host gave back), and waits this long at most for its message to
# reach deferred/ before it is dropped from the line (its process could not move it there).
ASK_AGAIN = 10.0

LineKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Parked:
    """Where a message waits in its line: until `at` (this host's clock, an estimate), for the
    reason `detail`."""

    at: float
    detail: str


class Lines:
    """The waiting lines of one process, by set of limits, each with its pump."""

    def __init__(
        self, ledger: Ledger, processes: int, release: Callable[[Turn], Awaitable[None]]
    ) -> None:
        """`processes`: this host's dispatcher processes (each line's estimates share the room
        among them); `release`: gives back a turn its message will not use."""
        self.ledger = ledger
        self.processes = processes
        self._release = release
        self._lines: dict[LineKey, Line] = {}
        self._parked: dict[str, LineKey] = {}  # message id -> its line
        self._pumps: dict[LineKey, asyncio.Task[None]] = {}
        self._wakes: dict[LineKey, asyncio.Event] = {}
        # Told when a line's head got its turn: (id, due, the turn for its sidecar) -> whether
        # the message was still waiting in deferred/ to take it (the dispatcher sets it).
        self.on_turn: Callable[[str, float, KeptTurn], Awaitable[bool]] = _nobody

    def waiting(self, msg_id: str, klass: MailClass) -> Parked | None:
        """Where a message already in a line waits (it woke before the head reached it: an
        expected time is an estimate); None if it is in none."""
        key = self._parked.get(msg_id)
        if key is None:
            return None
        line = self._lines[key]
        line.members[msg_id].ready = False
        self._ensure_pump(key, line)
        return self._place(line, msg_id, klass)

    def ahead_of(self, applies: Applies, klass: MailClass) -> bool:
        """Do messages of this class or a higher one wait in the line of these limits?"""
        line = self._lines.get(line_key(applies))
        return line is not None and line.waits_ahead_of(klass)

    def park(self, msg_id: str, applies: Applies, klass: MailClass, turn: Turn | None) -> Parked:
        """Into the line of its limits (`turn`: the ledger's `full` answer, or None when
        others of its class wait already)."""
        key = line_key(applies)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = Line(applies, self.processes)
        if turn is not None:
            _heard(line, turn)
        line.add(msg_id, applies, klass)
        self._parked[msg_id] = key
        head = line.head()
        if not self._ensure_pump(key, line) and head is not None and head[0] == msg_id:
            self._wakes[key].set()  # a new head, of a higher class: it asks now
        return self._place(line, msg_id, klass)

    def handed(self, applies: Applies, klass: MailClass, turn: Turn | None) -> str:
        """Why a message this process does not line up waits (its own process will)."""
        line = self._lines.get(line_key(applies))
        why = (line.paused if line is not None else "") or applies.describe()
        if turn is not None and turn.paused is not None:
            why = paused_detail(turn)
        return f"waiting in line ({klass.value}): {why} (handed to its own process)"

    def leave(self, msg_id: str) -> None:
        """The message goes on a turn another process's line gave it."""
        key = self._parked.pop(msg_id, None)
        if key is not None and key in self._lines:
            self._lines[key].remove(msg_id)

    def parked(self, msg_id: str) -> None:
        """`msg_id` is in deferred/ now, ready to be given its turn when it comes."""
        key = self._parked.get(msg_id)
        if key is not None:
            self._lines[key].members[msg_id].ready = True
            self._wakes[key].set()

    def by_class(self) -> dict[MailClass, int]:
        """Messages in this process's lines, by class (for the metrics)."""
        total = dict.fromkeys(MailClass, 0)
        for line in self._lines.values():
            for klass, count in line.counts().items():
                total[klass] += count
        return total

    async def close(self) -> None:
        """Stop asking for the lines' turns (their messages wait in deferred/ until due)."""
        for task in list(self._pumps.values()):
            task.cancel()
        for task in list(self._pumps.values()):
            with contextlib.suppress(BaseException):
                await task

    def _place(self, line: Line, msg_id: str, klass: MailClass) -> Parked:
        member = line.members[msg_id]
        # A day at most: one further ahead wakes then and is told its place again.
        now = time.time()
        at = min(line.expected(member, now), now + SPENT)
        why = line.paused or member.applies.describe()
        return Parked(at, f"waiting in line ({klass.value}): {why}")

    def _ensure_pump(self, key: LineKey, line: Line) -> bool:
        """Start the line's pump if it is not running; True if it was started."""
        if key in self._pumps:
            return False
        self._lines[key] = line
        wake = self._wakes[key] = asyncio.Event()
        self._pumps[key] = asyncio.get_running_loop().create_task(self._pump(key, line, wake))
        return True

    async def _pump(self, key: LineKey, line: Line, wake: asyncio.Event) -> None:
        """Ask the ledger for the head's turn when room comes; give it to the head."""
        try:
            while (head := line.head()) is not None:
                try:
                    await self._serve(line, head, wake)
                except Exception:
                    # A bug must not strand a line: its messages would wait for ever.
                    logs.get().exception("internal_error", detail="a limit's waiting line")
                    await asyncio.sleep(ASK_AGAIN)
        finally:
            if self._pumps.get(key) is asyncio.current_task():
                del self._pumps[key]
                del self._wakes[key]
                if not line.members:
                    self._lines.pop(key, None)

    async def _serve(self, line: Line, head: tuple[str, Member], wake: asyncio.Event) -> None:
        """One round for the line's head: wait for it to be in deferred/, or for room, or
        give it its turn."""
        msg_id, member = head
        wake.clear()
        if not member.ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), ASK_AGAIN)
            if not member.ready and line.head() == head:
                line.remove(msg_id)  # never reached deferred/: it is not waiting
                self._parked.pop(msg_id, None)
            return
        needs, klass = member.applies.needs, member.klass
        turn = await self.ledger.reserve(
            needs_for(klass, needs), member.applies.scopes, reach(klass, needs)
        )
        if line.head() != head:
            await self._release(turn)  # it left meanwhile (claimed again, a new head)
            return
        if turn.full:
            pause = min(max(turn.at - turn.now, 0.01), ASK_AGAIN)
            _heard(line, turn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), pause)
            return
        line.remove(msg_id)
        self._parked.pop(msg_id, None)
        if turn.never is not None:
            await self.on_turn(msg_id, time.time(), KeptTurn(time.time(), ()))
            return  # taken now, it is refused then
        due = time.time() + max(0.0, turn.at - turn.now)
        # Its sidecar keeps the turn (one truth for whichever process takes it); if the
        # message left deferred/ meanwhile, or keeps another's turn, it is given back.
        if not await self.on_turn(msg_id, due, kept_as(turn, due)):
            await self._release(turn)


def kept_as(turn: Turn, due: float) -> KeptTurn:
    """A turn as the message's sidecar keeps it."""
    booked = tuple((need.key, bucket, need.amount) for need, bucket in turn.booked)
    return KeptTurn(due, booked, turn.paused)


def paused_detail(turn: Turn) -> str:
    """What a turn that waits for a pause waits for, as the log and the queue say it."""
    return f"{turn.paused} is paused ({turn.why}) until {from_timestamp(turn.at)}"


def _heard(line: Line, turn: Turn) -> None:
    """What the ledger said of the room for the line's head (a `full` turn)."""
    line.room_at = time.time() + turn.at - turn.now
    line.paused = "" if turn.paused is None else paused_detail(turn)


async def _nobody(msg_id: str, due: float, kept: KeptTurn) -> bool:
    return False

"""The dispatcher's side of the ledger: a turn before each transaction, the books settled after
it, and the provider's reply turned into a pause for its scope (replies.py).

A message over a limit is not an attempt and not an error: its turn is booked (in order, so a
burst of a thousand at 30 a minute is spread over 33 minutes in one pass) and it waits in
deferred/ until then. When it comes back it goes on the turn it holds, without asking again.
The turn is kept in the process's memory and in the message's sidecar, so whichever process
takes the message when it is due (another worker: a worker's share follows the file's name,
which changes when it is deferred; or after a restart) sends it on that turn. One kept for
limits that a reload changed is not used: a new one is booked, and the old stays counted,
which errs on the side of the limit.
"""

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
from pickupd.limits.replies import PAUSE_FIRST, PAUSE_MAX, SPENT, TENANT, Kind, Rule, classify
from pickupd.limits.windows import margin
from pickupd.message.priority import MailClass
from pickupd.outcome import Delivery, Reason, RecipientResult, Refusal
from pickupd.spool.sidecar import KeptTurn, from_timestamp

__all__ = ["EARLY", "Go", "Pause", "Quota", "Wait"]

# Turns this close to now are taken at once (a due message must not bounce for a rounding).
EARLY = 0.05
# A line's head asks the ledger at least this often while it waits (a pause an operator
# removed, room another host gave back), and waits this long at most for its message to
# reach deferred/ before it is dropped from the line (its process could not move it there).
ASK_AGAIN = 10.0


@dataclass(frozen=True, slots=True)
class Go:
    """Send now, on this turn (None: no counted limit applies)."""

    turn: Turn | None


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: wait in deferred/ until `at` (this host's clock), for the reason `detail`,
    with the turn booked for then (`kept`, for the sidecar; None: no turn is held)."""

    at: float
    detail: str
    kept: KeptTurn | None = None
    parked: bool = False  # in a waiting line here: say quota.parked() once it is deferred
    handed: bool = False  # for the process that takes it from deferred/ to line up


@dataclass(frozen=True, slots=True)
class Pause:
    """What a reply did to its scope, for the log and the outcome."""

    rule: Rule
    reply: RecipientResult
    scope: str
    until: float  # this host's clock
    new: bool = True  # False: the scope was paused as long already (by another message)


class Quota:
    """Turns from the ledger for the messages of one process."""

    def __init__(self, ledger: Ledger, processes: int = 1) -> None:
        """`processes`: this host's dispatcher processes (workers), each with its lines."""
        self.ledger = ledger
        self.processes = processes
        self._held: dict[str, tuple[Turn, float]] = {}  # message id -> its turn, due (local)
        self._lengths: dict[str, float] = {}  # scope -> its last throttling pause
        # scope -> the messages holding a turn booked after its pause (see recheck)
        self._after_pause: dict[str, set[str]] = {}
        self._lines: dict[tuple[str, ...], Line] = {}  # the waiting lines (lines.py)
        self._parked: dict[str, tuple[str, ...]] = {}  # message id -> its line
        self._pumps: dict[tuple[str, ...], asyncio.Task[None]] = {}
        self._wakes: dict[tuple[str, ...], asyncio.Event] = {}
        # Told when a line's head got its turn: (id, due, the turn for its sidecar) -> whether
        # the message was still waiting in deferred/ to take it (the dispatcher sets it).
        self.on_turn: Callable[[str, float, KeptTurn], Awaitable[bool]] = _nobody

    async def turn(
        self,
        msg_id: str,
        applies: Applies,
        recipients: int,
        kept: KeptTurn | None = None,
        klass: MailClass = MailClass.NORMAL,
        park: bool = True,
    ) -> Go | Wait | Refusal:
        """May the message go now? A Refusal when it never can under its limits. `kept`: the
        turn its sidecar holds (booked by whichever process deferred it). `klass`: how far
        ahead it may book (lines.py); one that finds no room that near waits in a line here
        (its turn, when it comes, goes into its sidecar). Only the process that takes the
        message from deferred/ lines it up (`park`): another hands it over, due now, so that
        no message waits in two lines and takes two turns."""
        if applies.per_message is not None and recipients > applies.per_message[0].amount:
            limit, where = applies.per_message
            return Refusal(
                Reason.TOO_MANY_RECIPIENTS,
                f"{recipients} recipients, over {where} = {limit}: pickupd does not split a"
                f" message; send it in parts of at most {limit.amount} recipients",
            )
        # The turn its sidecar keeps is the one it may use: a turn held here may have been
        # used or given back by another process since (the sidecar is rewritten then).
        self._held.pop(msg_id, None)
        held = None
        if kept is not None:
            held = _adopt(kept, applies)
            paused = held[0].paused if held is not None else None
            if held is not None and paused is not None:
                if held[1] > time.time() + await self.ledger.paused_for(paused) + 1.0:
                    # The pause it waited for is gone, and the process that held it could
                    # not give it back (it stopped): given back here, booked anew below.
                    await self.release(held[0])
                    held = None
                else:
                    self._after_pause.setdefault(paused, set()).add(msg_id)
        if held is not None:
            turn, due = held
            now = time.time()
            if now > due + _slack(turn):
                # Taken too late for the window's margin to cover what follows the turn (a
                # busy host): given back, and booked anew for now.
                await self.release(turn)
                held = None
            elif now >= due - EARLY:
                self._unpark(msg_id)  # (another process's line gave it this turn)
                return Go(turn)
        if held is not None:
            turn, due = held
            self._held[msg_id] = held
            return Wait(due, self._detail(turn, applies), _kept_as(turn, due))
        if not applies.needs and not applies.scopes:
            return Go(None)
        key = line_key(applies)
        line = self._lines.get(key)
        if msg_id in self._parked:
            # Woke before its line's head reached it (an expected time is an estimate).
            assert line is not None
            line.members[msg_id].ready = False
            self._ensure_pump(key, line)
            return self._park_wait(line, msg_id, klass)
        if line is not None and line.waits_ahead_of(klass):
            return self._park(key, msg_id, applies, klass, None, park)
        turn = await self.ledger.reserve(
            needs_for(klass, applies.needs), applies.scopes, reach(klass, applies.needs)
        )
        if turn.full:
            return self._park(key, msg_id, applies, klass, turn, park)
        if turn.paused is not None:
            self._after_pause.setdefault(turn.paused, set()).add(msg_id)
        if turn.never is not None:
            need = turn.never
            return Refusal(
                Reason.TOO_MANY_RECIPIENTS,
                f"{need.amount} {need.limit.unit}, more than {need.scope} = {need.limit}"
                " can ever take",
            )
        if turn.at <= turn.now + EARLY:
            return Go(turn if turn.booked else None)
        due = time.time() + (turn.at - turn.now)
        self._held[msg_id] = (turn, due)
        return Wait(due, self._detail(turn, applies), _kept_as(turn, due))

    def _park(
        self,
        key: tuple[str, ...],
        msg_id: str,
        applies: Applies,
        klass: MailClass,
        turn: Turn | None,
        park: bool,
    ) -> Wait:
        """No room near enough for its class (`turn`: as the ledger said; None: others of
        its class wait already): into the line, or (not `park`) to the process whose it is."""
        line = self._lines.get(key)
        if not park:
            why = (line.paused if line is not None else "") or applies.describe()
            if turn is not None and turn.paused is not None:
                why = _paused_detail(turn)
            detail = f"waiting in line ({klass.value}): {why} (handed to its own process)"
            return Wait(time.time(), detail, handed=True)
        if line is None:
            line = self._lines[key] = Line(applies, self.processes)
        if turn is not None:
            _heard(line, turn)
        line.add(msg_id, applies, klass)
        self._parked[msg_id] = key
        head = line.head()
        if not self._ensure_pump(key, line) and head is not None and head[0] == msg_id:
            self._wakes[key].set()  # a new head, of a higher class: it asks now
        return self._park_wait(line, msg_id, klass)

    def _ensure_pump(self, key: tuple[str, ...], line: Line) -> bool:
        """Start the line's pump if it is not running; True if it was started."""
        if key in self._pumps:
            return False
        self._lines[key] = line
        wake = self._wakes[key] = asyncio.Event()
        self._pumps[key] = asyncio.get_running_loop().create_task(self._pump(key, line, wake))
        return True

    def _park_wait(self, line: Line, msg_id: str, klass: MailClass) -> Wait:
        member = line.members[msg_id]
        # A day at most: one further ahead wakes then and is told its place again.
        now = time.time()
        at = min(line.expected(member, now), now + SPENT)
        why = line.paused or member.applies.describe()
        return Wait(at, f"waiting in line ({klass.value}): {why}", parked=True)

    def _unpark(self, msg_id: str) -> None:
        key = self._parked.pop(msg_id, None)
        if key is not None and key in self._lines:
            self._lines[key].remove(msg_id)

    def parked(self, msg_id: str) -> None:
        """`msg_id` is in deferred/ now, ready to be given its turn when it comes."""
        key = self._parked.get(msg_id)
        if key is not None:
            self._lines[key].members[msg_id].ready = True
            self._wakes[key].set()

    def waiting_by_class(self) -> dict[MailClass, int]:
        """Messages in this process's lines, by class (for the metrics)."""
        total = dict.fromkeys(MailClass, 0)
        for line in self._lines.values():
            for klass, count in line.counts().items():
                total[klass] += count
        return total

    async def _pump(self, key: tuple[str, ...], line: Line, wake: asyncio.Event) -> None:
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
            await self.release(turn)  # it left meanwhile (claimed again, a new head)
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
        if not await self.on_turn(msg_id, due, _kept_as(turn, due)):
            await self.release(turn)

    async def close(self) -> None:
        """Stop asking for the lines' turns (their messages wait in deferred/ until due)."""
        for task in list(self._pumps.values()):
            task.cancel()
        for task in list(self._pumps.values()):
            with contextlib.suppress(BaseException):
                await task

    async def recheck(self) -> list[tuple[str, Turn]]:
        """The messages whose turn was booked after a pause that is gone (removed from the
        store) or shorter now, with those turns: no longer held here; the caller clears them
        from the sidecars, then gives them back (release). One question to the ledger per
        paused scope (the service asks every PAUSE_RECHECK)."""
        freed: list[tuple[str, Turn]] = []
        for scope, waiting in list(self._after_pause.items()):
            waiting &= self._held.keys()
            if not waiting:
                del self._after_pause[scope]
                continue
            ends = time.time() + await self.ledger.paused_for(scope)
            for msg_id in list(waiting):
                turn, due = self._held[msg_id]
                if due > ends + 1.0:
                    del self._held[msg_id]
                    waiting.discard(msg_id)
                    freed.append((msg_id, turn))
        return freed

    async def release(self, turn: Turn) -> None:
        """Give back all of a turn that will not be used (its message books anew)."""
        recipients = max(
            (need.amount for need, _ in turn.booked if need.limit.unit == "recipients"),
            default=0,
        )
        await self.give_back(turn, recipients)

    def prune(self, now: float) -> None:
        """Forget turns an hour past due (their message was removed or taken elsewhere)."""
        for msg_id, (_, due) in list(self._held.items()):
            if due < now - 3600:
                del self._held[msg_id]

    async def give_back(self, turn: Turn | None, recipients: int) -> None:
        """A turn not used at all (no transaction was made): all of it back."""
        if turn is not None and turn.booked:
            await self.ledger.refund(turn, recipients, True)

    async def settle(self, turn: Turn | None, delivery: Delivery, applies: Applies) -> Pause | None:
        """After the transaction: give back what the server did not take, and pause the
        scope a reply asks to pause."""
        if turn is not None and turn.booked:
            unused = len(delivery.deferred) + len(delivery.rejected)
            if unused or not delivery.sent:
                await self.ledger.refund(turn, unused, not delivery.sent)
        found = classify(delivery)
        if found is None:
            if delivery.sent:
                for scope in applies.scopes:
                    self._lengths.pop(scope, None)
            return None
        rule, reply = found
        scope = applies.mailbox if rule.scope == "mailbox" else applies.account
        if rule.kind is Kind.OAUTH2:
            return Pause(rule, reply, scope, time.time())
        if rule.kind is Kind.SPENT:
            length = SPENT
        elif rule.kind is Kind.TENANT:
            length = TENANT
        else:
            last = self._lengths.get(scope, 0.0)
            length = min(PAUSE_MAX, last * 2 if last else PAUSE_FIRST)
            self._lengths[scope] = length
        left = await self.ledger.pause(scope, length, f"{rule.says}: {reply.text}")
        return Pause(rule, reply, scope, time.time() + left, new=left - length < 1.0)

    def _detail(self, turn: Turn, applies: Applies) -> str:
        if turn.paused is not None:
            return f"waiting: {_paused_detail(turn)}"
        return f"waiting its turn: {applies.describe()}"


def _heard(line: Line, turn: Turn) -> None:
    """What the ledger said of the room for the line's head (a `full` turn)."""
    line.room_at = time.time() + turn.at - turn.now
    line.paused = "" if turn.paused is None else _paused_detail(turn)


def _paused_detail(turn: Turn) -> str:
    return f"{turn.paused} is paused ({turn.why}) until {from_timestamp(turn.at)}"


def _slack(turn: Turn) -> float:
    """How late a turn may be taken: half the margin of its shortest window (windows.py)."""
    return min((margin(need.limit.window) / 2 for need, _ in turn.booked), default=float("inf"))


async def _nobody(msg_id: str, due: float, kept: KeptTurn) -> bool:
    return False


def _kept_as(turn: Turn, due: float) -> KeptTurn:
    booked = tuple((need.key, bucket, need.amount) for need, bucket in turn.booked)
    return KeptTurn(due, booked, turn.paused)


def _adopt(kept: KeptTurn, applies: Applies) -> tuple[Turn, float] | None:
    """The turn a sidecar keeps, if it is for the limits that apply now (a reload may have
    changed them: then it is booked anew, and the old one stays counted, on the limit's side)."""
    needs = {need.key: need for need in applies.needs}
    if {key for key, _, _ in kept.booked} != set(needs) or any(
        needs[key].amount != amount for key, _, amount in kept.booked
    ):
        return None
    now = time.time()
    booked = tuple((needs[key], bucket) for key, bucket, _ in kept.booked)
    return Turn(kept.due, now, booked, paused=kept.paused), kept.due

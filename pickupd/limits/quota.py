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

import time
from dataclasses import dataclass

from pickupd.limits.ledger import Ledger, Turn
from pickupd.limits.lines import needs_for, reach
from pickupd.limits.needs import Applies
from pickupd.limits.replies import PAUSE_FIRST, PAUSE_MAX, SPENT, TENANT, Kind, Rule, classify
from pickupd.limits.waiting import Lines, kept_as, paused_detail
from pickupd.limits.windows import margin
from pickupd.message.priority import MailClass
from pickupd.outcome import Delivery, Reason, RecipientResult, Refusal
from pickupd.spool.sidecar import KeptTurn

__all__ = ["EARLY", "Go", "Pause", "Quota", "Wait"]

# Turns this close to now are taken at once (a due message must not bounce for a rounding).
EARLY = 0.05


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
    parked: bool = False  # in a waiting line here: say quota.lines.parked() once it is deferred
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
        # The messages that found no room near enough for their class (waiting.py).
        self.lines = Lines(ledger, processes, self.release)

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
        if kept is not None:
            decided = await self._kept(msg_id, kept, applies)
            if decided is not None:
                return decided
        if not applies.needs and not applies.scopes:
            return Go(None)
        place = self.lines.waiting(msg_id, klass)
        if place is not None:
            return Wait(place.at, place.detail, parked=True)
        if self.lines.ahead_of(applies, klass):
            return self._park(msg_id, applies, klass, None, park)
        turn = await self.ledger.reserve(
            needs_for(klass, applies.needs), applies.scopes, reach(klass, applies.needs)
        )
        if turn.full:
            return self._park(msg_id, applies, klass, turn, park)
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
        return Wait(due, self._detail(turn, applies), kept_as(turn, due))

    async def _kept(self, msg_id: str, kept: KeptTurn, applies: Applies) -> Go | Wait | None:
        """The turn its sidecar keeps: go on it, or wait for it; None when it is not usable
        (other limits apply now, its pause is gone, or it was taken too late): book anew."""
        held = _adopt(kept, applies)
        if held is None:
            return None
        turn, due = held
        if turn.paused is not None:
            if due > time.time() + await self.ledger.paused_for(turn.paused) + 1.0:
                # The pause it waited for is gone, and the process that held it could not
                # give it back (it stopped): given back here, booked anew.
                await self.release(turn)
                return None
            self._after_pause.setdefault(turn.paused, set()).add(msg_id)
        now = time.time()
        if now > due + _slack(turn):
            # Taken too late for the window's margin to cover what follows the turn (a busy
            # host): given back, and booked anew for now.
            await self.release(turn)
            return None
        if now >= due - EARLY:
            self.lines.leave(msg_id)  # (another process's line gave it this turn)
            return Go(turn)
        self._held[msg_id] = held
        return Wait(due, self._detail(turn, applies), kept_as(turn, due))

    def _park(
        self, msg_id: str, applies: Applies, klass: MailClass, turn: Turn | None, park: bool
    ) -> Wait:
        """No room near enough for its class (`turn`: as the ledger said; None: others of
        its class wait already): into the line, or (not `park`) to the process whose it is."""
        if not park:
            return Wait(time.time(), self.lines.handed(applies, klass, turn), handed=True)
        place = self.lines.park(msg_id, applies, klass, turn)
        return Wait(place.at, place.detail, parked=True)

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
            return f"waiting: {paused_detail(turn)}"
        return f"waiting its turn: {applies.describe()}"


def _slack(turn: Turn) -> float:
    """How late a turn may be taken: half the margin of its shortest window (windows.py)."""
    return min((margin(need.limit.window) / 2 for need, _ in turn.booked), default=float("inf"))


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

"""Provider limits: token buckets per relay and per credentials, and slowing down on throttling.

A message over a limit is not an attempt and not an error: it is given a turn (a time slot)
and waits in deferred/ until then. Slots are reserved, so a burst of a thousand messages at
30/min is spread over 33 minutes in one pass instead of being re-tried by all at every refill.
A bucket is kept as GCRA (the "virtual scheduling" form of a token bucket): one float per key.

When a relay answers 4xx with a throttling text (SES: "454 Throttling failure: Maximum sending
rate exceeded", Microsoft 365 and Gmail: "4.7.x ... try again later"), the whole relay pauses,
10 s at first, doubling up to 5 minutes, reset by the next message it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from pickupd.auth.logins import XOAuth2
from pickupd.config.loading import Credentials, RelayConfig, SenderRule
from pickupd.outcome import Delivery, RecipientResult
from pickupd.units import Rate

__all__ = ["PAUSE_FIRST", "PAUSE_MAX", "Limiter", "buckets", "is_throttling", "limits"]

PAUSE_FIRST = 10.0
PAUSE_MAX = 300.0
# Slots this close to now are taken at once (a due message must not bounce for a rounding).
_EARLY = 0.05
# Replies that say "you are sending too fast", as opposed to "try later, I am broken".
_THROTTLING = re.compile(
    r"throttl|rate[ -]?limit|too many (messages|mails|connections|recipients)|sending rate"
    r"|slow down|\b4\.7\.(28|500)\b",
    re.IGNORECASE,
)


def is_throttling(code: int | None, text: str) -> bool:
    """True for a transient reply that asks us to send more slowly."""
    return code is not None and 400 <= code < 500 and bool(_THROTTLING.search(text))


@dataclass(slots=True)
class _Pause:
    until: float = 0.0
    length: float = 0.0


class Limiter:
    """Hands out send slots. Keys are whatever identifies a bucket (relay, credentials)."""

    def __init__(self) -> None:
        self._tat: dict[tuple[Hashable, Rate], float] = {}  # theoretical arrival time
        self._pauses: dict[str, _Pause] = {}
        self._slots: dict[str, float] = {}  # message id -> its reserved slot

    def slot(
        self,
        msg_id: str,
        relay: str,
        buckets: Sequence[tuple[Hashable, Rate]],
        now: float,
    ) -> float:
        """When message `msg_id` may go to `relay`: `now` or earlier means at once. A later
        time is reserved for it, and the same message asking again gets the same slot."""
        pause = self._pauses.get(relay)
        paused_until = pause.until if pause else 0.0
        reserved = self._slots.get(msg_id)
        if reserved is not None:
            at = max(reserved, paused_until)
            if at <= now + _EARLY:
                del self._slots[msg_id]
                return now
            self._slots[msg_id] = at
            return at
        at = max(now, paused_until)
        for key in buckets:
            interval = key[1].per / key[1].count
            tolerance = key[1].per - interval  # a full bucket lets `count` go at once
            at = max(at, self._tat.get(key, now) - tolerance)
        for key in buckets:
            interval = key[1].per / key[1].count
            self._tat[key] = max(self._tat.get(key, now), at) + interval
        if at <= now + _EARLY:
            return now
        self._slots[msg_id] = at
        return at

    def forget(self, msg_id: str) -> None:
        """A message that will not come back for its slot (deleted, failed, stopped)."""
        self._slots.pop(msg_id, None)

    def throttled(self, relay: str, now: float) -> float:
        """The relay asked us to slow down: pause it; return until when."""
        pause = self._pauses.setdefault(relay, _Pause())
        pause.length = min(PAUSE_MAX, pause.length * 2 if pause.length else PAUSE_FIRST)
        pause.until = max(pause.until, now + pause.length)
        return pause.until

    def hold(self, relay: str, until: float) -> None:
        """Another worker process was asked to slow down: pause here too, until `until`."""
        pause = self._pauses.setdefault(relay, _Pause())
        pause.until = max(pause.until, until)

    def pace(
        self, relay: str, delivery: Delivery, now: float
    ) -> tuple[RecipientResult, float] | None:
        """Learn from one attempt: a throttling reply pauses the relay (returned with the
        pause's end, for the log); an accepted message ends a pause."""
        throttling = next((r for r in delivery.deferred if is_throttling(r.code, r.text)), None)
        if throttling is not None:
            return throttling, self.throttled(relay, now)
        if delivery.sent:
            self.accepted(relay)
        return None

    def accepted(self, relay: str) -> None:
        """The relay took a message: whatever pause it asked for is over."""
        self._pauses.pop(relay, None)

    def prune(self, now: float) -> None:
        """Drop buckets that are full again (so a long run does not grow the tables)."""
        for key, tat in list(self._tat.items()):
            if tat <= now:
                del self._tat[key]
        for msg_id, at in list(self._slots.items()):
            if at < now - 3600:
                del self._slots[msg_id]


def buckets(
    relay: RelayConfig, rule: SenderRule, login: Credentials | XOAuth2 | None
) -> list[tuple[tuple[str, ...], Rate]]:
    """The token buckets a message draws on: its relay's, and its credentials' (a sender
    entry's `rate` is per mailbox: Microsoft 365 counts 30 a minute per mailbox)."""
    found: list[tuple[tuple[str, ...], Rate]] = []
    if relay.rate is not None:
        found.append((("relay", relay.name), relay.rate))
    if rule.rate is not None:
        user = login.username if login else f"sender {rule.pattern}"
        found.append((("credentials", relay.name, user), rule.rate))
    return found


def limits(relay: RelayConfig, rule: SenderRule) -> str:
    """The limits a waiting message is under, as the config names them."""
    parts = []
    if relay.rate is not None:
        parts.append(f"relays.{relay.name}.rate = {relay.rate}")
    if rule.rate is not None:
        parts.append(f'senders."{rule.pattern}".rate = {rule.rate}')
    return ", ".join(parts) or f"relay {relay.name} asked us to slow down"

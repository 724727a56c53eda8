"""A dead relay is probed, not hammered (Postfix's "delivery temporarily suspended").

After `suspend_after` connection failures in a row (refused, timed out, a TLS handshake that
fails, a 421 greeting), the relay is suspended in this process: its mail waits in deferred/
without a connection attempt each and without counting an attempt. One message at a time
goes out as a probe, every `probe_interval`: one waiting message is due then (the "armed"
one), the others wait longer; the first probe that reaches the server ends the suspension,
and the mail that waited is made due at once. Other relays are untouched; a
login that fails (auth, token) is the login's problem, not the relay's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pickupd.outcome import Delivery, SessionFault

__all__ = ["HOLD_PROBES", "Admission", "Change", "Suspensions", "Turned", "is_dead_relay"]

# Mail that waits for a suspended relay is due again after this many probe intervals at
# most (sooner if a probe succeeds): a restart meanwhile never strands it for long.
HOLD_PROBES = 10


# The faults that mean the relay could not be reached at all.
_DEAD = frozenset({SessionFault.CONNECT, SessionFault.TIMEOUT, SessionFault.TLS})


def is_dead_relay(delivery: Delivery) -> bool:
    """True when the relay could not be reached at all (no session, or a 421 greeting)."""
    if delivery.sent or delivery.rejected:
        return False
    kind = delivery.session_error
    return kind in _DEAD or (kind is SessionFault.PROTOCOL and delivery.code == 421)


@dataclass(frozen=True, slots=True)
class Admission:
    """What a message for a relay may do now: `go` (a normal send, or the probe), or wait
    until `until` because the relay is suspended (`detail` says why)."""

    go: bool
    probe: bool = False
    until: float = 0.0
    detail: str = ""


class Turned(enum.Enum):
    """Which way a relay's state turned."""

    SUSPENDED = "suspended"
    RESUMED = "resumed"


@dataclass(frozen=True, slots=True)
class Change:
    """What an attempt changed: `kind` the way the relay turned (None: neither way); on
    resume, the ids that waited (make them due now); `rearm`: a waiting id to make due at a
    time, to be the next probe."""

    kind: Turned | None = None
    waited: tuple[str, ...] = ()
    rearm: tuple[str, float] | None = None


@dataclass(slots=True)
class _Relay:
    failures: int = 0
    last_error: str = ""
    suspended: bool = False
    probing: bool = False
    armed: bool = False  # a waiting message is due at next_probe, to be the probe
    next_probe: float = 0.0
    waiting: list[str] = field(default_factory=list)  # ids deferred while suspended
    failed: list[str] = field(default_factory=list)  # ids of the failures before it


_GO = Admission(go=True)
_NONE = Change()


class Suspensions:
    """The relays this process holds suspended, and the mail waiting for them."""

    def __init__(self) -> None:
        self._relays: dict[str, _Relay] = {}

    def suspended(self) -> list[str]:
        """The names of the relays suspended now."""
        return sorted(name for name, state in self._relays.items() if state.suspended)

    def admit(self, relay: str, now: float, probe_interval: float) -> Admission:
        """May a message for `relay` be sent now?"""
        state = self._relays.get(relay)
        if state is None or not state.suspended:
            return _GO
        if not state.probing and now >= state.next_probe:
            state.probing = True
            state.armed = False
            return Admission(go=True, probe=True)
        until = now + probe_interval * HOLD_PROBES
        if not state.armed and not state.probing:
            state.armed = True  # this one comes back for the next probe
            until = state.next_probe
        detail = f"relay_suspended: {relay} is not answering; last error: {state.last_error}"
        return Admission(go=False, until=until, detail=detail)

    def suspend(self, relay: str, now: float, probe_interval: float) -> None:
        """Another process of the service found `relay` dead: hold it suspended here too."""
        state = self._relays.setdefault(relay, _Relay())
        if not state.suspended:
            state.suspended, state.next_probe = True, now + probe_interval
            state.waiting.extend(state.failed)
            state.failed.clear()

    def resume(self, relay: str) -> tuple[str, ...]:
        """Another process's probe got through to `relay`: it is back here too; the ids
        that waited here (make them due now)."""
        state = self._relays.get(relay)
        if state is None:
            return ()
        state.failures = 0
        state.failed.clear()
        if not state.suspended:
            return ()
        state.suspended = state.armed = False
        waited, state.waiting = state.waiting, []
        return tuple(waited)

    def waiting(self, relay: str, msg_id: str) -> None:
        """`msg_id` was deferred for the suspended `relay`: make it due when it returns."""
        state = self._relays.get(relay)
        if state is not None and state.suspended:
            state.waiting.append(msg_id)

    def observe(
        self,
        relay: str,
        delivery: Delivery,
        now: float,
        msg_id: str = "",
        *,
        suspend_after: int,
        probe_interval: float,
        probe: bool,
    ) -> Change:
        """Count the outcome of an attempt on `relay` for `msg_id` (`probe`: it was the
        probe). A message deferred because the relay was down is handed back on resume
        with those that waited, so no mail of the outage waits for its retry schedule."""
        state = self._relays.setdefault(relay, _Relay())
        if probe:
            state.probing = False
        if not is_dead_relay(delivery):
            state.failures = 0
            state.failed.clear()
            if not state.suspended:
                return _NONE
            state.suspended = state.armed = False
            waited, state.waiting = state.waiting, []
            return Change(Turned.RESUMED, tuple(waited))
        state.failures += 1
        state.last_error = delivery.text
        if msg_id:
            (state.waiting if state.suspended else state.failed).append(msg_id)
        if state.suspended:
            if probe:  # failed: the next probe is one of the waiting messages, then
                state.next_probe = now + probe_interval
                if state.waiting and not state.armed:
                    state.armed = True
                    return Change(rearm=(state.waiting.pop(0), state.next_probe))
            return _NONE
        if suspend_after and state.failures >= suspend_after:
            state.suspended = True
            state.next_probe = now + probe_interval
            state.waiting.extend(state.failed)
            state.failed.clear()
            return Change(Turned.SUSPENDED)
        return _NONE

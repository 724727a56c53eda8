"""A dead relay is probed, not hammered (Postfix's "delivery temporarily suspended").

After `suspend_after` connection failures in a row (refused, timed out, a TLS handshake that
fails, a 421 greeting), the relay is suspended in this process: its mail waits in deferred/
without a connection attempt each and without counting an attempt. One message at a time
goes out as a probe, every `probe_interval`; the first one that reaches the server ends the
suspension, and the mail that waited is made due at once. Other relays are untouched; a
login that fails (auth, token) is the login's problem, not the relay's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pickupd.outcome import Delivery

__all__ = ["HOLD_PROBES", "Admission", "Suspensions", "is_dead_relay"]

# Mail that waits for a suspended relay is due again after this many probe intervals at
# most (sooner if a probe succeeds): a restart meanwhile never strands it for long.
HOLD_PROBES = 10


def is_dead_relay(delivery: Delivery) -> bool:
    """True when the relay could not be reached at all (no session, or a 421 greeting)."""
    if delivery.sent or delivery.rejected:
        return False
    kind = delivery.session_error
    return kind in ("connect", "timeout", "tls") or (kind == "protocol" and delivery.code == 421)


@dataclass(frozen=True, slots=True)
class Admission:
    """What a message for a relay may do now: `go` (a normal send, or the probe), or wait
    until `until` because the relay is suspended (`detail` says why)."""

    go: bool
    probe: bool = False
    until: float = 0.0
    detail: str = ""


@dataclass(slots=True)
class _Relay:
    failures: int = 0
    last_error: str = ""
    suspended: bool = False
    probing: bool = False
    next_probe: float = 0.0
    waiting: list[str] = field(default_factory=list)  # ids deferred while suspended


_GO = Admission(go=True)


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
            return Admission(go=True, probe=True)
        until = now + probe_interval * HOLD_PROBES
        detail = f"relay_suspended: {relay} is not answering; last error: {state.last_error}"
        return Admission(go=False, until=until, detail=detail)

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
        *,
        suspend_after: int,
        probe_interval: float,
        probe: bool,
    ) -> tuple[str, list[str]] | None:
        """Count the outcome of an attempt on `relay`. Returns ("suspended", []) when this
        failure suspends it, ("resumed", ids of the mail that waited) when this success ends
        a suspension, else None."""
        state = self._relays.setdefault(relay, _Relay())
        if probe:
            state.probing = False
        if not is_dead_relay(delivery):
            state.failures = 0
            if not state.suspended:
                return None
            state.suspended = False
            waited, state.waiting = state.waiting, []
            return "resumed", waited
        state.failures += 1
        state.last_error = delivery.text
        if state.suspended:
            state.next_probe = now + probe_interval
            return None
        if suspend_after and state.failures >= suspend_after:
            state.suspended = True
            state.next_probe = now + probe_interval
            return "suspended", []
        return None

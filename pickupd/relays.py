"""What a relay's answers do beyond one message: a relay that does not answer is suspended
(its mail waits in deferred/, a probe now and then) and resumed (its mail goes), here and in
every process of the service (`announce`, `state`); a provider's reply that pauses a scope
(limits/replies.py) is logged and counted, and the message kept until the pause ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pickupd.config.loading import Config, RelayConfig
from pickupd.intake.queues import Intake
from pickupd.limits import replies
from pickupd.limits.ledger import Ledger
from pickupd.limits.quota import Pause
from pickupd.limits.replies import Kind
from pickupd.log import Logger
from pickupd.outcome import Delivery
from pickupd.record.recorder import Meter
from pickupd.smtp.suspension import Suspensions, Turned
from pickupd.spool import moves
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import from_timestamp

__all__ = ["Relays"]


class Relays:
    """The relays' states as this process knows them, and what follows from a change."""

    def __init__(
        self, spool: Spool, intake: Intake, metrics: Meter | None, log: Callable[[], Logger]
    ) -> None:
        """`log`: the logger in force (a reload swaps it)."""
        self.spool = spool
        self.intake = intake
        self.metrics = metrics
        self._log = log
        self.suspensions = Suspensions()
        self._background: set[asyncio.Task[None]] = set()
        # Told a relay's change of state (suspended, resumed) seen here: the service passes
        # it to its other processes (workers/protocol.RelayState).
        self.announce: Callable[[str, bool], None] = lambda relay, suspended: None

    @property
    def log(self) -> Logger:
        return self._log()

    def paused(
        self, relay: RelayConfig, delivery: Delivery, pause: Pause
    ) -> tuple[Delivery, float | None]:
        """Log what a provider's reply did to its scope (limits/replies.py); a spent quota
        or the tenant's rate keeps the message waiting until the pause ends, even on 5xx."""
        rule, reply = pause.rule, pause.reply
        fields = {"relay": relay.name, "scope": pause.scope, "code": reply.code}
        if rule.kind is Kind.OAUTH2:
            self.log.error("oauth2_required", **fields, detail=f"{rule.says}: {reply.text}")
            return replies.explained(delivery, rule.says), None
        if rule.kind in (Kind.THROTTLED, Kind.CONNECTIONS):
            self._throttled(relay.name, pause.scope, reply.code, reply.text, pause.until)
            return delivery, None
        until = from_timestamp(pause.until)
        if self.metrics is not None:
            kind = "spent" if rule.kind is Kind.SPENT else "limited"
            self.metrics.paused(pause.scope, pause.until, kind)
        if pause.new:
            event = "quota_spent" if rule.kind is Kind.SPENT else "tenant_limited"
            self.log.error(event, **fields, detail=f"{rule.says}: {reply.text}", paused_until=until)
        return replies.as_deferred(delivery, rule.says), pause.until

    async def retry_after(self, delivery: Delivery, scope: str, ledger: Ledger) -> float:
        """The relay said how long to wait (Graph's Retry-After): `scope` pauses that long
        for every process and host of the ledger. Returns when the pause ends."""
        until = time.time() + await ledger.pause(scope, delivery.retry_after, delivery.text)
        self._throttled(delivery.relay, scope, delivery.code, delivery.text, until)
        return until

    def _throttled(self, relay: str, scope: str, code: int, text: str, until: float) -> None:
        if self.metrics is not None:
            self.metrics.paused(scope, until, "throttled")
        at = from_timestamp(until)
        fields = {"relay": relay, "scope": scope, "code": code}
        self.log.warning("relay_throttled", **fields, detail=text, paused_until=at)

    def observe(self, relay: RelayConfig, delivery: Delivery, msg_id: str, *, probe: bool) -> None:
        """Count an attempt towards the relay's suspension; log and act on a change."""
        change = self.suspensions.observe(
            relay.name,
            delivery,
            time.time(),
            msg_id,
            suspend_after=relay.suspend_after,
            probe_interval=relay.probe_interval,
            probe=probe,
        )
        if change.rearm is not None:
            msg_id, at = change.rearm
            self.make_due([msg_id], at)
        if change.kind is None:
            return
        suspended = change.kind is Turned.SUSPENDED
        if self.metrics is not None:
            self.metrics.suspended(relay.name, suspended)
        self.announce(relay.name, suspended)
        if suspended:
            self.log.error(
                "relay_suspended",
                relay=relay.name,
                failures=relay.suspend_after,
                detail=delivery.text,
                probe_every=relay.probe_interval,
            )
            return
        self.log.info("relay_resumed", relay=relay.name, waiting=len(change.waited))
        self.make_due(list(change.waited), None)

    def state(self, relay: str, suspended: bool, config: Config, tell: bool = False) -> None:
        """Another process of the service found `relay` dead, or answering again: so it is
        here too (its waiting mail goes now); `tell`: and pass it on to the others."""
        if tell:
            self.announce(relay, suspended)
        if relay not in config.relays:
            return
        if suspended:
            self.suspensions.suspend(relay, time.time(), config.relays[relay].probe_interval)
        elif waited := self.suspensions.resume(relay):
            self.make_due(list(waited), None)

    def make_due(self, msg_ids: list[str], at: float | None) -> None:
        """Mail that waited goes at `at` (None: now): a suspended relay is back (or one of
        them is to be its next probe), or a pause it waited for is gone. The utimes run in a
        thread."""

        async def due_now() -> None:
            when = time.time() if at is None else at
            made = await asyncio.to_thread(moves.make_waiting_due, self.spool, msg_ids, when)
            for msg_id in made:
                self.intake.deferred.due_at(msg_id, when)

        task = asyncio.get_running_loop().create_task(due_now())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

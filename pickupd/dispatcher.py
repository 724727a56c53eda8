"""One message through one attempt: claim -> read -> examine -> relay -> record.

    spool.claim -> message.parse -> policy.check -> limits -> smtp.send -> recorder

Finding work is intake.py's job, running the service service.py's, and turning an outcome
into a folder, a sidecar and a log line recorder.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pickupd import policy
from pickupd.auth import logins
from pickupd.config.loading import Config, RelayConfig, SenderRule
from pickupd.errors import SpoolWriteError
from pickupd.intake import Intake
from pickupd.limits import buckets
from pickupd.log import Logger
from pickupd.message import envelope
from pickupd.outcome import Delivery, Reason, Refusal
from pickupd.recorder import Meter, Recorder
from pickupd.smtp import transaction
from pickupd.smtp.pool import Pool
from pickupd.spool import moves
from pickupd.spool.files import printable
from pickupd.spool.folders import Candidate, Claimed, Spool, TooLarge, Unsafe
from pickupd.spool.sidecar import from_timestamp
from pickupd.spool.stranded import Stranded
from pickupd.suspension import Suspensions

__all__ = ["LARGE_AT_ONCE", "LARGE_MESSAGE", "Dispatcher", "Examined", "examine"]

# Messages larger than this are relayed LARGE_AT_ONCE at a time, to bound memory.
LARGE_MESSAGE = 1024 * 1024
LARGE_AT_ONCE = 2


@dataclass(frozen=True, slots=True)
class Examined:
    """A claimed message read and checked: its bytes, its envelope if it parsed, and the
    sender's rule, or the reason it may not be sent."""

    data: bytes
    envelope: envelope.Envelope | None
    decision: SenderRule | Refusal


class Dispatcher:
    """Carries one claimed message at a time through one attempt (many lanes call it)."""

    def __init__(
        self,
        *,
        spool: Spool,
        intake: Intake,
        pool: Pool,
        limiter: buckets.Limiter,
        recorder: Recorder,
        stranded: Stranded,
        metrics: Meter | None,
        paused: Callable[[str, float], None],
        large_at_once: int,
    ) -> None:
        """`paused(relay, until)`: a relay asked us to slow down (the service spreads it)."""
        self.spool = spool
        self.intake = intake
        self.pool = pool
        self.limiter = limiter
        self.recorder = recorder
        self.stranded = stranded
        self.metrics = metrics
        self._paused = paused
        self._large = asyncio.Semaphore(large_at_once)
        self.suspensions = Suspensions()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def log(self) -> Logger:
        return self.recorder.log  # swapped on reload

    async def process(self, candidate: Candidate, config: Config) -> None:
        """Claim `candidate` and make one attempt under `config` (the config in force now)."""
        try:
            claimed = self.spool.claim(candidate)
        except OSError as exc:
            # Not ours to move (a directory we may not rename, a file on a read-only mount):
            # say so once, leave it where it is, and keep going.
            if self.intake.unmovable(candidate.path):
                self.log.error(
                    "unmovable", source=printable(candidate.source), error=exc.strerror or str(exc)
                )
            return
        if claimed is None:
            return  # another dispatcher took it first
        if candidate.clamped_from is not None:
            self.log.warning(
                "due_clamped",
                id=claimed.id,
                due=from_timestamp(candidate.clamped_from),
                detail="due further ahead than retry.max_age allows: taken now",
            )
        self.recorder.stats.claimed += 1
        try:
            await self._deliver(claimed, config)
        except asyncio.CancelledError:
            # Shutdown ran out of time: put it back, due now, so it is sent next time (if the
            # spool cannot take it, the next start recovers it from active/).
            with contextlib.suppress(SpoolWriteError):
                self.recorder.put_back(claimed, time.time())
            raise
        except SpoolWriteError as error:
            self.stranded.add(error)  # the same process tries again: see spool/stranded.py
        except Exception:
            # A bug must not strand the message in active/: log it and put it back to be
            # tried again in a minute.
            self.log.exception("internal_error", id=claimed.id, source=claimed.source)
            try:
                self.recorder.put_back(claimed, time.time() + 60)
            except SpoolWriteError as error:
                self.stranded.add(error)

    async def _deliver(self, claimed: Claimed, config: Config) -> None:
        try:
            large = os.stat(claimed.path, follow_symlinks=False).st_size > LARGE_MESSAGE
        except OSError:
            large = False  # the read says what is wrong with it
        if not large:
            await self._attempt(claimed, config)
            return
        # A message is copied a few times on its way to the socket: at 25 MiB, a handful of
        # them at once would take a gigabyte. Large ones go a few at a time.
        async with self._large:
            await self._attempt(claimed, config)

    async def _attempt(self, claimed: Claimed, config: Config) -> None:
        examined = await examine(self.spool, claimed, config)
        parsed, decision = examined.envelope, examined.decision
        self.log.info(
            "claimed",
            id=claimed.id,
            source=claimed.source,
            sender=parsed.sender if parsed else None,
            recipients=list(parsed.recipients) if parsed else [],
            relay=None if isinstance(decision, Refusal) else decision.relay,
            attempt=(claimed.sidecar.attempts if claimed.sidecar else 0) + 1,
            code=None,
        )
        if isinstance(decision, Refusal):
            self.recorder.fail(claimed, parsed, decision)
            return
        assert parsed is not None and parsed.sender is not None  # policy.check saw to that
        relay_config = config.relays[decision.relay]
        login = logins.bind(decision.credentials or relay_config.credentials, parsed.sender)
        now = time.time()
        limits = buckets.buckets(relay_config, decision, login)
        slot = self.limiter.slot(claimed.id, relay_config.name, limits, now)
        if slot > now:
            # Over a provider limit: not an attempt, not an error; it waits its turn.
            detail = f"waiting its turn: {buckets.limits(relay_config, decision)}"
            self.recorder.waiting(claimed, parsed, slot, detail)
            self.intake.due_at(claimed.id, slot)
            return
        admission = self.suspensions.admit(relay_config.name, now, relay_config.probe_interval)
        if not admission.go:
            # The relay is not answering: no connection attempt, not an attempt either.
            self.suspensions.waiting(relay_config.name, claimed.id)
            self.recorder.waiting(claimed, parsed, admission.until, admission.detail)
            self.intake.due_at(claimed.id, admission.until)
            return
        started = time.monotonic()
        delivery = await transaction.send(
            self.pool,
            relay_config,
            login,
            parsed.sender,
            parsed.recipients,
            parsed.data,
            parsed.dsn,
        )
        if self.metrics is not None:
            self.metrics.send_seconds(relay_config.name, time.monotonic() - started)
            if delivery.session_error:
                self.metrics.connection_error(relay_config.name, delivery.session_error)
        self._observe(relay_config, delivery, claimed.id, probe=admission.probe)
        throttled = self.limiter.pace(relay_config.name, delivery, time.time())
        if throttled is not None:
            reply, until = throttled
            self._paused(relay_config.name, until)
            self.log.warning(
                "relay_throttled",
                relay=relay_config.name,
                code=reply.code,
                detail=reply.text,
                paused_until=from_timestamp(until),
            )
        due = self.recorder.record(claimed, parsed, delivery, examined.data, config)
        if due is not None:
            self.intake.due_at(claimed.id, due)

    def _observe(self, relay: RelayConfig, delivery: Delivery, msg_id: str, *, probe: bool) -> None:
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
            self._make_due([msg_id], at)
        if change.kind is None:
            return
        if self.metrics is not None:
            self.metrics.suspended(relay.name, change.kind == "suspended")
        if change.kind == "suspended":
            self.log.error(
                "relay_suspended",
                relay=relay.name,
                failures=relay.suspend_after,
                detail=delivery.text,
                probe_every=relay.probe_interval,
            )
            return
        self.log.info("relay_resumed", relay=relay.name, waiting=len(change.waited))
        self._make_due(list(change.waited), None)

    def _make_due(self, msg_ids: list[str], at: float | None) -> None:
        """Mail that waited for a suspended relay goes at `at` (None: now): the relay is back,
        or one of them is to be the next probe. The utimes run in a thread."""

        async def due_now() -> None:
            when = time.time() if at is None else at
            made = await asyncio.to_thread(moves.make_waiting_due, self.spool, msg_ids, when)
            for msg_id in made:
                self.intake.due_at(msg_id, when)

        task = asyncio.get_running_loop().create_task(due_now())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def examine(spool: Spool, claimed: Claimed, config: Config) -> Examined:
    """Read, parse and check a claimed message."""
    data = spool.read(claimed, config.policy.max_message_size)
    for _ in range(50):  # a Maildir writer between link() and unlink(): up to 1 s
        if not (isinstance(data, Unsafe) and data.linked):
            break
        await asyncio.sleep(0.02)
        data = spool.read(claimed, config.policy.max_message_size)
    if isinstance(data, Unsafe):
        return Examined(b"", None, Refusal(Reason.UNSAFE_FILE, f"{claimed.source} {data.detail}"))
    if isinstance(data, TooLarge):
        limit = config.policy.max_message_size
        detail = f"{data.size} bytes, larger than max_message_size = {limit}"
        return Examined(b"", None, Refusal(Reason.TOO_LARGE, detail))
    parsed = envelope.parse(
        data,
        max_header_size=config.policy.max_header_size,
        local_domain=config.policy.local_domain,
    )
    if isinstance(parsed, Refusal):
        return Examined(data, None, parsed)
    if claimed.sidecar is not None and claimed.sidecar.recipients:
        # Recipients already delivered (or failed) are not sent to again.
        parsed = dataclasses.replace(parsed, recipients=claimed.sidecar.recipients)
    return Examined(data, parsed, policy.check(parsed, config, len(data)))

"""One message through one attempt: claim -> read -> examine -> relay -> record.

    spool.claim -> message.parse -> policy.check -> limits.quota -> smtp.send -> recorder

Finding work is intake/'s job, running the service service.py's, and turning an outcome
into a folder, a sidecar and a log line record/'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
import time
from dataclasses import dataclass

from pickupd import policy
from pickupd.auth import logins
from pickupd.auth.owners import describe_uid
from pickupd.config.loading import Config, SenderRule
from pickupd.errors import NotAFile, SpoolWriteError
from pickupd.intake.queues import Intake
from pickupd.limits import needs
from pickupd.limits.ledger import Turn
from pickupd.limits.quota import Quota, Wait
from pickupd.log import Logger
from pickupd.message import envelope
from pickupd.message.priority import MailClass
from pickupd.outcome import Reason, Refusal, SessionFault
from pickupd.record.recorder import Meter, Recorder
from pickupd.relays import Relays
from pickupd.smtp.pool import Pool
from pickupd.spool import moves
from pickupd.spool.disk import Disk
from pickupd.spool.files import TooLarge, Unsafe, printable
from pickupd.spool.folders import Candidate, Claimed, Spool
from pickupd.spool.sidecar import KeptTurn, Sidecar, from_timestamp, to_timestamp
from pickupd.spool.stranded import Stranded
from pickupd.transport import Transports

__all__ = ["LARGE_AT_ONCE", "LARGE_MESSAGE", "Dispatcher"]

# The domain of a Message-ID pickupd adds for a sender without one (a domain literal).
_HOST = socket.gethostname() or "localhost"
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
    owner: int | None = None  # the writer's uid (from the sidecar once recorded there)


class Dispatcher:
    """Carries one claimed message at a time through one attempt (many lanes call it)."""

    def __init__(
        self,
        *,
        spool: Spool,
        intake: Intake,
        pool: Pool,
        quota: Quota,
        recorder: Recorder,
        stranded: Stranded,
        metrics: Meter | None,
        large_at_once: int,
        disk: Disk,
    ) -> None:
        self.spool = spool
        self.disk = disk
        self.intake = intake
        self.pool = pool
        self.quota = quota
        self.recorder = recorder
        self.stranded = stranded
        self.metrics = metrics
        self._large = asyncio.Semaphore(large_at_once)
        self.transports = Transports(pool, quota.processes, metrics)
        self.relays = Relays(spool, intake, metrics, lambda: self.log)
        self._parsed: dict[str, envelope.Envelope] = {}  # the claims in flight, once read
        quota.lines.on_turn = functools.partial(_turn_came, spool, intake)

    @property
    def log(self) -> Logger:
        return self.recorder.log  # swapped on reload

    async def process(self, candidate: Candidate, config: Config) -> None:
        """Claim `candidate` and make one attempt under `config` (the config in force now)."""
        try:
            claimed = await self.disk.run(self.spool.claim, candidate)
        except NotAFile:
            self.intake.not_a_file(candidate.path, candidate.source)  # said once, left there
            return
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
        due: float | None = None
        try:
            due = await self._deliver(claimed, config)
        except asyncio.CancelledError:
            # Shutdown ran out of time: put it back, due now, so it is sent next time (if the
            # spool cannot take it, the next start recovers it from active/).
            with contextlib.suppress(SpoolWriteError):
                self.recorder.put_back(claimed, time.time(), self._sidecar(claimed))
            raise
        except SpoolWriteError as error:
            self.stranded.add(error)  # the same process tries again: see spool/stranded.py
        except Exception as exc:
            # A bug must not strand the message in active/, nor be tried again and again: it
            # counts as an attempt (the retry schedule spaces them, max_age ends them).
            self.log.exception("internal_error", id=claimed.id, source=claimed.source)
            detail = f"{type(exc).__name__}: {exc}"
            try:
                due = await self.recorder.crashed(
                    claimed, self._parsed.get(claimed.id), detail, config
                )
            except SpoolWriteError as error:
                self.stranded.add(error)
        finally:
            self._parsed.pop(claimed.id, None)
        if due is not None:
            # The one place an attempt tells the intake: when its message is due again.
            self.intake.deferred.due_at(claimed.id, due)

    def _sidecar(self, claimed: Claimed) -> Sidecar | None:
        """What a put-back records: the sidecar of the message as read this attempt (its
        writer, its sender), so a later attempt never takes them from elsewhere."""
        parsed = self._parsed.get(claimed.id)
        return None if parsed is None else self.recorder.base(claimed, parsed)

    async def _deliver(self, claimed: Claimed, config: Config) -> float | None:
        """One attempt; the time the message is due again in deferred/ (None: it is not
        there, or another process takes it)."""
        try:
            large = (await self.disk.run(os.lstat, claimed.path)).st_size > LARGE_MESSAGE
        except OSError:
            large = False  # the read says what is wrong with it
        if not large:
            return await self._attempt(claimed, config)
        # A message is copied a few times on its way to the socket: at 25 MiB, a handful of
        # them at once would take a gigabyte. Large ones go a few at a time.
        async with self._large:
            return await self._attempt(claimed, config)

    async def _attempt(self, claimed: Claimed, config: Config) -> float | None:
        """Read and judge the message, then relay what the policy allows."""
        examined = await examine(self.spool, claimed, config, self.disk)
        parsed, decision = examined.envelope, examined.decision
        if parsed is not None:
            self._parsed[claimed.id] = parsed  # for a put-back or an internal error
        self.log.info(
            "claimed",
            id=claimed.id,
            source=claimed.source,
            owner=None if claimed.owner is None else describe_uid(claimed.owner),
            sender=parsed.sender if parsed else None,
            recipients=list(parsed.recipients) if parsed else [],
            relay=None if isinstance(decision, Refusal) else decision.relay,
            attempt=(claimed.sidecar.attempts if claimed.sidecar else 0) + 1,
            code=None,
        )
        if isinstance(decision, Refusal):
            await self.recorder.fail(claimed, parsed, decision)
            return None
        assert parsed is not None and parsed.sender is not None  # policy.check saw to that
        return await self._relay(claimed, parsed, decision, examined.data, config)

    async def _relay(
        self,
        claimed: Claimed,
        parsed: envelope.Envelope,
        decision: SenderRule,
        data: bytes,
        config: Config,
    ) -> float | None:
        """The message's turn under its limits, the relay (unless it is suspended), and
        what its answer makes of the message."""
        assert parsed.sender is not None
        relay_config = config.relays[decision.relay]
        login = logins.bind(decision.credentials or relay_config.credentials, parsed.sender)
        applies = needs.applies(relay_config, decision, login, len(parsed.recipients))
        kept = claimed.sidecar.turn if claimed.sidecar is not None else None
        klass = policy.mail_class(parsed, decision, config, claimed.owner)
        mine = self.intake.mine(f"{claimed.id}.eml")  # it lines up where it is taken
        verdict = await self.quota.turn(
            claimed.id, applies, len(parsed.recipients), kept, klass, park=mine
        )
        if isinstance(verdict, Refusal):
            await self.recorder.fail(claimed, parsed, verdict)
            return None
        if isinstance(verdict, Wait):
            return await self._waits(claimed, parsed, verdict, klass)
        turn, count = verdict.turn, len(parsed.recipients)
        if turn is not None and self.metrics is not None:
            for (need, _), room in zip(turn.booked, turn.room, strict=False):
                self.metrics.room(need.key, room, need.limit.amount)
        now = time.time()
        admission = self.relays.suspensions.admit(
            relay_config.name, now, relay_config.probe_interval
        )
        if not admission.go:
            # The relay is not answering: no connection attempt, not an attempt either.
            self.relays.suspensions.waiting(relay_config.name, claimed.id)
            return await self._wait(claimed, parsed, turn, admission.until, admission.detail)
        delivery = await self.transports.send(relay_config, login, parsed, applies)
        if isinstance(delivery, Refusal):  # Graph cannot carry it as it is
            await self.quota.give_back(turn, count)
            await self.recorder.fail(claimed, parsed, delivery)
            return None
        if delivery.retry_after:
            # Not an attempt: the mailbox pauses as the relay asked, and the message waits.
            until = await self.relays.retry_after(delivery, applies.mailbox, self.quota.ledger)
            return await self._wait(claimed, parsed, turn, until, f"waiting: {delivery.text}")
        if delivery.session_error is SessionFault.CONNECTIONS:
            # The mailbox's connections are all open elsewhere: not an attempt; soon again.
            detail = f"waiting for a connection: {delivery.text}"
            return await self._wait(claimed, parsed, turn, time.time() + 1.0, detail)
        self.relays.observe(relay_config, delivery, claimed.id, probe=admission.probe)
        pause = await self.quota.settle(turn, delivery, applies)
        not_before = None
        if pause is not None:
            delivery, not_before = self.relays.paused(relay_config, delivery, pause)
        return await self.recorder.record(claimed, parsed, delivery, data, config, not_before)

    async def _wait(
        self,
        claimed: Claimed,
        parsed: envelope.Envelope,
        turn: Turn | None,
        until: float,
        detail: str,
    ) -> float:
        """Not an attempt: the turn it had is given back, and it waits in deferred/ until
        `until` (returned: when it is due)."""
        await self.quota.give_back(turn, len(parsed.recipients))
        await self.recorder.waiting(claimed, parsed, until, detail)
        return until

    async def _waits(
        self, claimed: Claimed, parsed: envelope.Envelope, verdict: Wait, klass: MailClass
    ) -> float | None:
        """Over a provider limit, or its scope is paused: not an attempt, not an error."""
        await self.recorder.waiting(
            claimed, parsed, verdict.at, verdict.detail, verdict.kept, klass.value
        )
        if verdict.parked:
            self.quota.lines.parked(claimed.id)
        # Handed to the process whose share it is: that one's watch sees it arrive.
        return None if verdict.handed else verdict.at

    def tidy(self, worker: int) -> None:
        """Every second: forget turns long past due; the lines' counts to the metrics."""
        self.quota.prune(time.time())
        if self.metrics is not None:
            lines = self.quota.lines.by_class()
            urgent, normal, bulk = (lines[klass] for klass in MailClass)
            self.metrics.waiting(worker, urgent, normal, bulk)

    def take_over(self, claims: list[Candidate]) -> None:
        """Claims whose lease expired (their process is gone): ours to send now."""
        for candidate in claims:
            self.log.warning("lease_expired", id=candidate.id, claim=candidate.source)
        self.intake.recover(claims)

    async def lift_pauses(self) -> None:
        """Mail whose turn waits for a pause removed from the ledger (or shortened) goes: its
        sidecar loses the kept turn and is due now (in a thread), then the turn is given back
        (in that order: a turn a sidecar keeps was never given back)."""
        freed = dict(await self.quota.recheck())
        if not freed:
            return
        now = time.time()
        kept = {
            msg_id: tuple((need.key, bucket, need.amount) for need, bucket in turn.booked)
            for msg_id, turn in freed.items()
        }
        moved = await asyncio.to_thread(moves.release_turns, self.spool, kept, now)
        for msg_id in moved:
            await self.quota.release(freed[msg_id])
            self.intake.deferred.due_at(msg_id, now)
        self.log.info("pause_lifted", waiting=len(moved))


async def _turn_came(spool: Spool, intake: Intake, msg_id: str, due: float, kept: KeptTurn) -> bool:
    """A message that waited in line has its turn: its sidecar keeps it, due then."""
    if not await asyncio.to_thread(moves.keep_turn, spool, msg_id, kept):
        return False
    intake.deferred.due_at(msg_id, due)
    return True


async def examine(
    spool: Spool, claimed: Claimed, config: Config, disk: Disk | None = None
) -> Examined:
    """Read, parse and check a claimed message (the read where `disk` says)."""
    limit = config.policy.max_message_size
    data = await disk.run(spool.read, claimed, limit) if disk else spool.read(claimed, limit)
    for _ in range(50):  # a Maildir writer between link() and unlink(): up to 1 s
        if not (isinstance(data, Unsafe) and data.linked):
            break
        await asyncio.sleep(0.02)
        data = await disk.run(spool.read, claimed, limit) if disk else spool.read(claimed, limit)
    if isinstance(data, Unsafe):
        return Examined(b"", None, Refusal(Reason.UNSAFE_FILE, f"{claimed.source} {data.detail}"))
    if isinstance(data, TooLarge):
        limit = config.policy.max_message_size
        detail = f"{data.size} bytes, larger than max_message_size = {limit}"
        return Examined(b"", None, Refusal(Reason.TOO_LARGE, detail))
    # The writer is what the claim recorded (the sidecar's, else the file's owner then).
    return _checked(data.data, claimed.owner, claimed, config)


def _checked(data: bytes, owner: int | None, claimed: Claimed, config: Config) -> Examined:
    first_seen = claimed.claimed_at
    if claimed.sidecar is not None:
        with contextlib.suppress(ValueError):
            first_seen = to_timestamp(claimed.sidecar.first_seen)
    parsed = envelope.parse(
        data,
        max_header_size=config.policy.max_header_size,
        local_domain=config.policy.local_domain,
        complete=envelope.Completion(first_seen, claimed.id, _HOST),
    )
    if isinstance(parsed, Refusal):
        return Examined(data, None, parsed, owner)
    if claimed.sidecar is not None and claimed.sidecar.recipients:
        # Recipients already delivered (or failed) are not sent to again.
        parsed = dataclasses.replace(parsed, recipients=claimed.sidecar.recipients)
    return Examined(data, parsed, policy.check(parsed, config, len(data), owner), owner)

"""The loop: workers take candidates from the intake and carry each through one attempt,
then the drain and the reload.

One message flows through one call per step:
    spool.claim -> envelope.parse -> policy.check -> relay.send -> recorder (folder, log)
Finding work is intake.py's job, recording outcomes recorder.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from pickupd import log as logs
from pickupd import policy
from pickupd.auth import logins
from pickupd.config.loading import Config, SenderRule, keep_fixed, load
from pickupd.errors import ConfigError, SpoolWriteError
from pickupd.feedback import Feedback
from pickupd.hosting.systemd import Notifier
from pickupd.intake import Intake
from pickupd.limits import buckets
from pickupd.message import envelope
from pickupd.outcome import Reason, Refusal
from pickupd.recorder import Meter, Recorder, Stats
from pickupd.smtp import transaction
from pickupd.smtp.pool import Pool
from pickupd.spool import moves, recovery
from pickupd.spool.files import printable
from pickupd.spool.folders import Candidate, Claimed, Spool, TooLarge, Unsafe
from pickupd.spool.sidecar import Sidecar, from_timestamp
from pickupd.spool.stranded import Stranded
from pickupd.watcher import Watcher
from pickupd.workers import shares, uplink
from pickupd.workers.shares import ONLY, Part
from pickupd.workers.supervisor import Supervisor

if TYPE_CHECKING:
    from pickupd.hosting.metrics import Metrics

__all__ = ["GRACE", "Dispatcher", "Stats", "examine"]

# On SIGTERM, in-flight sends get this long to finish before they are put back.
GRACE = 30.0
# Messages larger than this are relayed LARGE_AT_ONCE at a time, to bound memory.
LARGE_MESSAGE = 1024 * 1024
LARGE_AT_ONCE = 2
# The main process says it is ready when its workers are, or after this long.
WORKERS_START = 30.0


class Dispatcher:
    """Takes messages from the spool and relays them until stopped (or, `once`, until idle)."""

    def __init__(
        self, config: Config, *, once: bool = False, part: Part = ONLY, main: bool = True
    ) -> None:
        """`part`: which of the service's worker processes this is (workers/shares.py); `main`: the
        process that supervises the others and speaks for the service (metrics, systemd)."""
        self.file_config = config  # as the file says; `config` is this worker's portion of it
        self.config = shares.portion(config, part)
        self.once = once
        self.part = part
        self.spool = Spool(config.spool.path)
        self.pool = Pool()
        self.limiter = buckets.Limiter()
        self.log = logs.get()
        self.notifier = None if once or not main else Notifier.from_env()
        self.intake = Intake(self.spool, self.config.dispatch, once=once, part=part)
        self.intake.horizon = config.retry.max_age
        self.feedback = Feedback(config.notify, self.spool, self.log)
        self.metrics: Meter | None = None
        self._served: Metrics | None = None  # the endpoint, in the main process
        self.supervisor: Supervisor | None = None
        self._forwarder: uplink.Forwarder | None = None
        notify = self.feedback.notify
        if not main:
            fd = int(os.environ.get(shares.PIPE, "-1"))
            self._forwarder = uplink.Forwarder(
                fd, lambda: list(dataclasses.astuple(self.stats)), bool(config.metrics.listen)
            )
            self.metrics = self._forwarder
            notify = self._forwarder.notify
        elif config.metrics.listen and not once:
            # Imported only when enabled: prometheus-client costs ~3 MiB of memory.
            from pickupd.hosting.metrics import Metrics

            self.metrics = self._served = Metrics(self.spool)
        if main and part.total > 1:
            self.supervisor = Supervisor(
                str(config.path),
                part.total,
                once=once,
                log=self.log,
                report=self._reported,
                cover=self.intake.cover,
            )
        self.recorder = Recorder(self.spool, self.log, self.metrics, self.intake.deferring, notify)
        self.stats = self.recorder.stats
        self.stranded = Stranded(self.log, self._stranded_changed)
        self._background: set[asyncio.Task[None]] = set()
        self._large = asyncio.Semaphore(part.share(LARGE_AT_ONCE))
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False

    # -- public -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new messages; in-flight sends get GRACE seconds. Safe to call twice
        (the second time, in-flight sends are put back at once)."""
        self._stop.set()
        if self.supervisor is not None:
            self.supervisor.signal(signal.SIGTERM)

    def reload(self) -> None:
        """Read the config file again (SIGHUP). A valid one is used from the next attempt on,
        in-flight sends go on with the old one; an invalid one is logged and ignored."""
        if self.notifier:
            self.notifier.reloading()
        if self.supervisor is not None:
            self.supervisor.signal(signal.SIGHUP)
        try:
            new = load(self.config.path)
            new, unchanged = keep_fixed(self.file_config, new)
            shares.splits(new, self.part.total)
        except ConfigError as exc:
            self.log.error("reload_failed", config=str(self.config.path), problems=exc.problems)
            if self.notifier:
                self.notifier.ready(self.status_line())
            return
        self.file_config = new
        self.config = shares.portion(new, self.part)
        self.intake.dispatch = self.config.dispatch
        self.intake.horizon = new.retry.max_age
        self.feedback.config = new.notify
        logs.configure(new.log.level, new.log.format)
        self.log = self.recorder.log = self.feedback.log = self.stranded.log = logs.get()
        if unchanged:
            self.log.warning("reload_needs_restart", keys=unchanged)
        self.log.info(
            "reloaded",
            config=str(new.path),
            relays=sorted(new.relays),
            senders=len(new.senders),
        )
        self.intake.wake()
        if self.notifier:
            self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """One line for `systemctl status`: this run's outcomes and what the spool holds."""
        census = self.spool.census(time.time())
        stats = self.service_stats()
        return (
            f"sent {stats.sent}, deferred {stats.deferred}, failed {stats.failed} since start;"
            f" queue: pickup {census['pickup'].count}, deferred {census['deferred'].count},"
            f" hold {census['hold'].count}, failed {census['failed'].count}"
        )

    def service_stats(self) -> Stats:
        """This run's counts, the other workers' included."""
        if self.supervisor is None:
            return self.stats
        own = dataclasses.astuple(self.stats)
        return Stats(*(a + b for a, b in zip(own, self.supervisor.stats(), strict=True)))

    def flush(self) -> None:
        """Make every deferred message due now (SIGUSR1, as `pickupd flush`)."""
        if self._stopping:
            return

        async def flush() -> None:
            count = await asyncio.to_thread(moves.make_due, self.spool, time.time())
            self.log.info("flushed", messages=count)
            self._wake_all()
            if self.supervisor is not None:  # the workers look again once all is due
                self.supervisor.tell(["flush"])

        task = asyncio.get_running_loop().create_task(flush())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_ready(self) -> None:
        """Return once the dispatcher is watching the pickup folder."""
        await self._ready.wait()

    async def run(self) -> Stats:
        """Recover, take what is waiting, then react to new files until `stop()`."""
        started = time.monotonic()
        self.spool.ensure()
        self.spool.lock()
        watcher = None
        # The workers start first: they are up (~0.3 s of Python start) by the time the main
        # process has recovered and scanned.
        supervising = None
        if self.supervisor is not None:
            supervising = asyncio.get_running_loop().create_task(self.supervisor.run())
        try:
            if self._served is not None and self.config.metrics.listen:
                self._served.start(self.config.metrics.listen)
            if self._forwarder is None:
                recovered = self._clean_and_recover()
            else:
                uplink.watch_lifeline(asyncio.get_running_loop(), self._told, self.stop)
                # A worker started again takes back its dead predecessor's claims; at the
                # service's start the main process has done it for all.
                restarted = bool(os.environ.get(shares.RESTARTED))
                recovered = recovery.stale_claims(self.spool) if restarted else []
            for candidate in recovered:
                self.log.info("recovered", id=candidate.id)
            self.intake.recover(recovered)
            if not self.once:
                folders = [self.spool.pickup, self.spool.new, self.spool.deferred]
                watcher = Watcher(folders, self.intake.hint)
                watcher.start(asyncio.get_running_loop())
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._worker())
                    for _ in range(self.config.dispatch.concurrency)
                ]
                helpers = [
                    group.create_task(self.intake.feed_pickup()),
                    group.create_task(self.intake.feed_deferred()),
                    group.create_task(self._reap_sessions()),
                    group.create_task(self.stranded.run(self.intake.wake)),
                    group.create_task(
                        recovery.keep_leases(
                            self.spool, lambda: self.config.spool.claim_lease, self._take_over
                        )
                    ),
                ]
                if self.supervisor is not None and supervising is not None:
                    group.create_task(_until_done(supervising))
                    # The service is ready when all its workers watch the spool.
                    if not await self.supervisor.wait_ready(WORKERS_START):
                        self.log.error("workers_not_ready", seconds=WORKERS_START)
                if self.notifier:
                    helpers.append(group.create_task(self.notifier.heartbeat(self.status_line)))
                group.create_task(self._supervise(tasks, helpers))
                self._ready.set()
                if self._forwarder is not None:
                    self._forwarder.ready()
                self.log.info(
                    "ready" if self._forwarder is None else "worker_ready",
                    spool=str(self.spool.root),
                    once=self.once,
                    concurrency=self.config.dispatch.concurrency,
                    workers=self.part.total,
                    relays=sorted(self.config.relays),
                )
        finally:
            if supervising is not None and not supervising.done():
                supervising.cancel()  # only when run() itself failed: the workers are killed
                with contextlib.suppress(asyncio.CancelledError):
                    await supervising
            if watcher is not None:
                watcher.stop()
            await self.feedback.close(timeout=5.0)
            await self.pool.close_all()
            self.spool.unlock()
            if self.notifier:
                self.notifier.close()
            if self._served is not None:
                self._served.stop()
            if self._forwarder is not None:
                self._forwarder.flush(final=True)
        stats = self.service_stats()
        self.log.info(
            "stopped" if self._forwarder is None else "worker_stopped",
            seconds=round(time.monotonic() - started, 3),
            **dataclasses.asdict(stats),
        )
        return stats

    # -- around the work ---------------------------------------------------------------------------

    def _clean_and_recover(self) -> list[Candidate]:
        """At start (the main process): clean what crashes leave, and take back claims."""
        removed = recovery.clean_tmp(self.spool, time.time())
        if removed:
            self.log.info("tmp_cleaned", removed=removed)
        leftovers = recovery.clean_leftovers(self.spool, time.time())
        if any(leftovers.values()):
            self.log.info("leftovers_cleaned", **leftovers)
        recovered = recovery.stale_claims(self.spool)
        recovered += recovery.expired(self.spool, time.time(), self.config.spool.claim_lease)
        return recovered

    def _stranded_changed(self, count: int) -> None:
        if self.supervisor is not None:
            count += self.supervisor.stranded()
        if self.metrics is not None:
            self.metrics.stranded(count)

    def _reported(self, event: list[Any]) -> None:
        """An event a worker process sent up (uplink.Forwarder)."""
        kind = event[0]
        if kind == "n":
            with contextlib.suppress(ValueError):
                self.feedback.notify(event[1], Sidecar.from_json(event[2].encode()))
        elif kind == "s":  # a worker's count of stranded claims changed
            self._stranded_changed(len(self.stranded))
        elif kind == "p":
            self._told(event)
            if self.supervisor is not None:
                self.supervisor.tell(event)
        elif self.metrics is not None:
            if kind == "o":
                self.metrics.outcome(event[1], event[2], event[3])
            elif kind == "t":
                self.metrics.send_seconds(event[1], float(event[2]))
            elif kind == "e":
                self.metrics.connection_error(event[1], event[2])

    def _told(self, event: list[Any]) -> None:
        """What the main process passes on to every worker: a relay's pause, a flush."""
        if event[0] == "p":
            self.limiter.hold(str(event[1]), float(event[2]))
        elif event[0] == "flush":
            self._wake_all()

    def _wake_all(self) -> None:
        self.intake.wake()
        self.stranded.wake()

    def _take_over(self, claims: list[Candidate]) -> None:
        for candidate in claims:
            self.log.warning("lease_expired", id=candidate.id, claim=candidate.source)
        self.intake.recover(claims)

    async def _reap_sessions(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            timeouts = {name: r.idle_timeout for name, r in self.config.relays.items()}
            await self.pool.close_idle(timeouts)
            self.limiter.prune(time.time())

    async def _supervise(
        self, tasks: list[asyncio.Task[None]], helpers: list[asyncio.Task[Any]]
    ) -> None:
        """Wait for stop (or, once, for the work to end), then drain in two stages."""
        stop = asyncio.ensure_future(self._stop.wait())
        all_workers = asyncio.ensure_future(asyncio.wait(tasks))
        await asyncio.wait([stop, all_workers], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        self.intake.close()
        for task in helpers:
            task.cancel()
        if self.notifier:
            self.notifier.stopping()
        if not all_workers.done():
            self.log.info("stopping", in_flight=self.intake.busy, grace=GRACE)
            self._stop.clear()
            second = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait(
                [all_workers, second], timeout=GRACE, return_when=asyncio.FIRST_COMPLETED
            )
            second.cancel()
            for task in tasks:
                task.cancel()
        stop.cancel()
        all_workers.cancel()

    # -- the work ----------------------------------------------------------------------------------

    async def _worker(self) -> None:
        intake = self.intake
        while (candidate := await intake.next()) is not None:
            intake.busy += 1
            try:
                await self._process(candidate)
            except Exception:
                # One bad file must never stop the daemon (claiming failed: nothing to put
                # back; the file stays where it was and the next scan sees it again).
                self.log.exception("internal_error", source=candidate.source)
            finally:
                intake.busy -= 1
                intake.done(candidate)

    async def _process(self, candidate: Candidate) -> None:
        try:
            claimed = self.spool.claim(candidate)
        except OSError as exc:
            # Not ours to move (a directory we may not rename, a file on a read-only mount):
            # say so once, leave it where it is, and keep going.
            unmovable = self.intake.unmovable
            if candidate.path not in unmovable:
                if len(unmovable) > 10_000:
                    unmovable.clear()
                unmovable.add(candidate.path)
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
        self.stats.claimed += 1
        try:
            await self._deliver(claimed)
        except asyncio.CancelledError:
            # Shutdown ran out of time: put it back, due now, so it is sent next time (if the
            # spool cannot take it, the next start recovers it from active/).
            with contextlib.suppress(SpoolWriteError):
                self.recorder.put_back(claimed, time.time())
            raise
        except SpoolWriteError as error:
            self.stranded.add(error)  # the same process tries again: see stranded.py
        except Exception:
            # A bug must not strand the message in active/: log it and put it back to be
            # tried again in a minute.
            self.log.exception("internal_error", id=claimed.id, source=claimed.source)
            try:
                self.recorder.put_back(claimed, time.time() + 60)
            except SpoolWriteError as error:
                self.stranded.add(error)

    async def _deliver(self, claimed: Claimed) -> None:
        try:
            large = os.stat(claimed.path, follow_symlinks=False).st_size > LARGE_MESSAGE
        except OSError:
            large = False  # the read below says what is wrong with it
        if not large:
            await self._attempt(claimed)
            return
        # A message is copied a few times on its way to the socket: at 25 MiB, a handful of
        # them at once would take a gigabyte. Large ones go a few at a time.
        async with self._large:
            await self._attempt(claimed)

    async def _attempt(self, claimed: Claimed) -> None:
        config = self.config  # the config in force for this whole attempt, recording included
        data, parsed, decision = await examine(self.spool, claimed, config)
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
            self.intake.due_at(slot)
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
        throttled = self.limiter.pace(relay_config.name, delivery, time.time())
        if throttled is not None:
            reply, until = throttled
            # A pause holds for the whole service: every worker process keeps it.
            if self._forwarder is not None:
                self._forwarder.paused(relay_config.name, until)
            elif self.supervisor is not None:
                self.supervisor.tell(["p", relay_config.name, until])
            self.log.warning(
                "relay_throttled",
                relay=relay_config.name,
                code=reply.code,
                detail=reply.text,
                paused_until=from_timestamp(until),
            )
        due = self.recorder.record(claimed, parsed, delivery, data, config)
        if due is not None:
            self.intake.due_at(due)


async def _until_done(task: asyncio.Task[None]) -> None:
    await task


async def examine(
    spool: Spool, claimed: Claimed, config: Config
) -> tuple[bytes, envelope.Envelope | None, SenderRule | Refusal]:
    """Read, parse and check a claimed message: the bytes, the envelope if it parsed, and
    the sender's rule or the reason it may not be sent."""
    data = spool.read(claimed, config.policy.max_message_size)
    for _ in range(50):  # a Maildir writer between link() and unlink(): up to 1 s
        if not (isinstance(data, Unsafe) and data.linked):
            break
        await asyncio.sleep(0.02)
        data = spool.read(claimed, config.policy.max_message_size)
    if isinstance(data, Unsafe):
        return b"", None, Refusal(Reason.UNSAFE_FILE, f"{claimed.source} {data.detail}")
    if isinstance(data, TooLarge):
        limit = config.policy.max_message_size
        detail = f"{data.size} bytes, larger than max_message_size = {limit}"
        return b"", None, Refusal(Reason.TOO_LARGE, detail)
    parsed = envelope.parse(
        data,
        max_header_size=config.policy.max_header_size,
        local_domain=config.policy.local_domain,
    )
    if isinstance(parsed, Refusal):
        return data, None, parsed
    if claimed.sidecar is not None and claimed.sidecar.recipients:
        # Recipients already delivered (or failed) are not sent to again.
        parsed = dataclasses.replace(parsed, recipients=claimed.sidecar.recipients)
    return data, parsed, policy.check(parsed, config, len(data))

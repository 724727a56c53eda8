"""The running service: wiring, start and stop, reload, flush, status, and what the worker
processes report.

It builds the parts (spool, intake, pool, ledger, recorder, feedback, metrics, supervisor),
recovers what an earlier run left, starts the watcher, the feeders and `concurrency` lanes
(asyncio tasks, each carrying one message at a time through dispatcher.py), and drains them
in two stages on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pickupd import log as logs
from pickupd.auth.keepalive import keep_alive
from pickupd.config.loading import Config, keep_fixed, load
from pickupd.dispatcher import LARGE_AT_ONCE, Dispatcher
from pickupd.errors import ConfigError
from pickupd.hosting.systemd import Notifier
from pickupd.intake.queues import Intake
from pickupd.intake.watcher import Watcher
from pickupd.limits import ledger
from pickupd.limits.quota import Quota
from pickupd.outcome import Stats
from pickupd.record.notify import Feedback
from pickupd.record.recorder import Meter, Recorder
from pickupd.smtp.pool import Pool
from pickupd.spool import moves, recovery
from pickupd.spool.census import CensusCache, FolderCount
from pickupd.spool.disk import Disk
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import Sidecar
from pickupd.spool.stranded import Stranded
from pickupd.workers import protocol, shares, uplink
from pickupd.workers.shares import ONLY, Part
from pickupd.workers.supervisor import Supervisor

if TYPE_CHECKING:
    from pickupd.hosting.metrics import Metrics

__all__ = ["GRACE", "WORKERS_START", "Service"]

# On SIGTERM, in-flight sends get this long to finish before they are put back.
GRACE = 30.0
# How often the quota asks the ledger whether the pauses its held turns wait for are still
# there (one question per paused scope).
PAUSE_RECHECK = 10.0
# The main process says it is ready when its workers are, or after this long.
WORKERS_START = 30.0


class Service:
    """Takes messages from the spool and relays them until stopped (or, `once`, until idle)."""

    def __init__(
        self, config: Config, *, once: bool = False, part: Part = ONLY, main: bool = True
    ) -> None:
        """`part`: which of the service's worker processes this is (workers/shares.py);
        `main`: the process that supervises the others and speaks for the service (metrics,
        systemd)."""
        self.file_config = config  # as the file says; `config` is this worker's portion of it
        self.config = shares.portion(config, part)
        self.once = once
        self.part = part
        self.spool = Spool(config.spool.path)
        self.log = logs.get()
        self.ledger = ledger.open_ledger(
            config.limits,
            config.spool.path,
            lambda: self.log,
            lambda up: self.metrics.store_up(up) if self.metrics else None,
        )
        self.pool = Pool(ledger=self.ledger)
        self.quota = Quota(self.ledger, part.total)
        self.notifier = None if once or not main else Notifier.from_env()
        self.census = CensusCache(self.spool)  # for the status line and the metrics
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
            self._forwarder = uplink.Forwarder(fd, lambda: self.stats, bool(config.metrics.listen))
            self.metrics = self._forwarder
            notify = self._forwarder.notify
        elif config.metrics.listen and not once:
            # Imported only when enabled: prometheus-client costs ~3 MiB of memory.
            from pickupd.hosting.metrics import Metrics

            store = config.limits.store is not None
            tokens = lambda: self.file_config.refresh_sources()  # noqa: E731 (reloads)
            self.metrics = self._served = Metrics(self.spool, self.census.current, store, tokens)
        if main and part.total > 1:
            self.supervisor = Supervisor(
                str(config.path),
                part.total,
                once=once,
                log=self.log,
                report=self._reported,
                cover=self.intake.cover,
            )
        self.disk = Disk(config.spool.io, config.spool.path)
        self.recorder = Recorder(
            self.spool, self.log, self.metrics, self.intake.deferring, notify, self.disk
        )
        self.stats = self.recorder.stats
        self.stranded = Stranded(self.log, self._stranded_changed)
        self.dispatcher = Dispatcher(
            spool=self.spool,
            intake=self.intake,
            pool=self.pool,
            quota=self.quota,
            recorder=self.recorder,
            stranded=self.stranded,
            metrics=self.metrics,
            large_at_once=part.share(LARGE_AT_ONCE),
            disk=self.disk,
        )
        if self.supervisor is not None:  # what the main process sees, every worker knows
            self.dispatcher.announce = self.supervisor.relay_state
        self._background: set[asyncio.Task[None]] = set()
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
            where = {"config": str(self.config.path), "worker": self.part.index}
            self.log.error("reload_failed", problems=exc.problems, **where)
            self._ready_again()
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
        where = {"config": str(new.path), "worker": self.part.index}
        self.log.info("reloaded", relays=sorted(new.relays), senders=len(new.senders), **where)
        self.intake.wake()
        self._ready_again()

    def _ready_again(self) -> None:
        """After a reload: READY=1 with a status line counted afresh (in a thread)."""
        if self.notifier is not None:
            self._spawn(_ready_after_count(self.notifier, self.census, self.status_line))

    def status_line(self) -> str:
        """One line for `systemctl status` (never a count taken here, on the loop)."""
        return status_line(self.service_stats(), self.census.latest)

    def service_stats(self) -> Stats:
        """This run's counts, the other workers' included."""
        return self.stats if self.supervisor is None else self.stats + self.supervisor.stats()

    def flush(self) -> None:
        """Make every deferred message due now (SIGUSR1, as `pickupd flush`)."""
        if self._stopping:
            return

        async def flush() -> None:
            count = await asyncio.to_thread(moves.make_due, self.spool, time.time())
            self.log.info("flushed", messages=count)
            self._wake_all()
            if self.supervisor is not None:  # the workers look again once all is due
                self.supervisor.tell(protocol.Flush())

        self._spawn(flush())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
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
                self._served.start(self.config.metrics)
            if self._forwarder is None:
                recovered = recovery.at_start(self.spool, self.config.spool.claim_lease, self.log)
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
            lease = lambda: self.config.spool.claim_lease  # noqa: E731 (a reload may change it)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._lane()) for _ in range(self.config.dispatch.concurrency)
                ]
                helpers = [
                    group.create_task(self.intake.feed_pickup()),
                    group.create_task(self.intake.feed_deferred()),
                    group.create_task(self._reap_sessions()),
                    group.create_task(self.stranded.run(self.intake.wake)),
                    group.create_task(self.dispatcher.transports.graph.warm(self.config)),
                    group.create_task(
                        recovery.keep_leases(self.spool, lease, self.dispatcher.take_over)
                    ),
                ]
                if self.supervisor is not None and supervising is not None:
                    group.create_task(_until_done(supervising))
                    # The service is ready when all its workers watch the spool.
                    if not await self.supervisor.wait_ready(WORKERS_START):
                        self.log.error("workers_not_ready", seconds=WORKERS_START)
                if self.notifier or self._served:
                    helpers.append(group.create_task(self.census.run()))
                if self.part.index == 0 and not self.once:
                    sources = lambda: self.file_config.refresh_sources()  # noqa: E731 (reloads)
                    helpers.append(group.create_task(keep_alive(self.pool.tokens, sources)))
                if self.notifier:
                    await self.census.renewed()  # READY=1 says what the spool holds
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
                    io="threads" if self.disk.threads else "loop",
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
            await self.quota.close()
            await self.ledger.close()
            self.disk.close()
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

    def _stranded_changed(self, count: int) -> None:
        if self.supervisor is not None:
            count += self.supervisor.stranded()
        if self.metrics is not None:
            self.metrics.stranded(count)

    def _reported(self, event: protocol.Up) -> None:
        """An event a worker process sent up (workers/uplink.py)."""
        if isinstance(event, protocol.Suspended):  # one process's relay state is every one's
            self.dispatcher.relay_state(event.relay, event.on, self.config, tell=True)
        match event:
            case protocol.Feedback(kind, sidecar):
                with contextlib.suppress(ValueError):
                    self.feedback.notify(kind, Sidecar.from_json(sidecar.encode()))
            case protocol.Stranded():  # a worker's count of stranded claims changed
                self._stranded_changed(len(self.stranded))
            case _ if self._served is not None:
                self._served.apply(event)

    def _told(self, message: protocol.Down) -> None:
        """What the main process passes on to every worker: a flush, a relay's state."""
        match message:
            case protocol.Flush():
                self._wake_all()
            case protocol.RelayState(relay, suspended):
                self.dispatcher.relay_state(relay, suspended, self.config)

    def _wake_all(self) -> None:
        self.intake.wake()
        self.stranded.wake()

    async def _reap_sessions(self) -> None:
        recheck = time.monotonic() + PAUSE_RECHECK
        while True:
            await asyncio.sleep(1.0)
            timeouts = {name: r.idle_timeout for name, r in self.config.relays.items()}
            await self.pool.close_idle(timeouts)
            self.dispatcher.tidy(self.part.index)
            if time.monotonic() >= recheck:
                recheck = time.monotonic() + PAUSE_RECHECK
                await self.dispatcher.lift_pauses()

    async def _supervise(
        self, lanes: list[asyncio.Task[None]], helpers: list[asyncio.Task[Any]]
    ) -> None:
        """Wait for stop (or, once, for the work to end), then drain."""
        stop = asyncio.ensure_future(self._stop.wait())
        all_lanes = asyncio.ensure_future(asyncio.wait(lanes))
        await asyncio.wait([stop, all_lanes], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        self._stopping = True
        self.intake.close()
        for task in helpers:
            task.cancel()
        if self.notifier:
            self.notifier.stopping()
        if not all_lanes.done():
            self.log.info("stopping", in_flight=self.intake.in_flight, grace=GRACE)
            self._stop.clear()
            await _drain(lanes, all_lanes, self._stop)
        all_lanes.cancel()

    # -- the lanes ---------------------------------------------------------------------------------

    async def _lane(self) -> None:
        """One asyncio task taking candidates from the intake, one message at a time."""
        intake = self.intake
        while (candidate := await intake.next()) is not None:
            intake.started(candidate)
            try:
                await self.dispatcher.process(candidate, self.config)
            except Exception:
                # One bad file must never stop the daemon (claiming failed: nothing to put
                # back; the file stays where it was and the next scan sees it again).
                self.log.exception("internal_error", source=candidate.source)
            finally:
                intake.done(candidate)


def status_line(stats: Stats, census: dict[str, FolderCount] | None) -> str:
    """This run's outcomes and what the spool held at the latest census (spool/census.py)."""
    line = f"sent {stats.sent}, deferred {stats.deferred}, failed {stats.failed} since start"
    if census is None:
        return f"{line}; queue: not counted yet"
    return (
        f"{line}; queue: pickup {census['pickup'].count}, deferred {census['deferred'].count},"
        f" hold {census['hold'].count}, failed {census['failed'].count}"
    )


async def _ready_after_count(
    notifier: Notifier, census: CensusCache, status: Callable[[], str]
) -> None:
    with contextlib.suppress(OSError):
        await census.renewed()
    notifier.ready(status())


async def _until_done(task: asyncio.Task[None]) -> None:
    await task


async def _drain(
    lanes: list[asyncio.Task[None]], all_lanes: asyncio.Future[Any], stop: asyncio.Event
) -> None:
    """The second stage of a stop: in-flight sends get GRACE seconds, or until a second stop
    signal; then the lanes are cancelled (each puts its message back)."""
    second = asyncio.ensure_future(stop.wait())
    await asyncio.wait([all_lanes, second], timeout=GRACE, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    for task in lanes:
        task.cancel()

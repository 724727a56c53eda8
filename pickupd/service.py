"""The running service: its parts, start and stop, reload, flush, status.

It builds the parts (spool, intake, pool, ledger, recorder, feedback, dispatcher), recovers
what an earlier run left, starts the watcher, the feeders and the lanes (lanes.py: asyncio
tasks, each carrying one message at a time through dispatcher.py), and drains them on stop.
What differs between the main process and a worker (the supervisor, the metrics endpoint,
systemd, the uplink) is its role's (roles.py): the service holds no flag of which one it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from pickupd import log as logs
from pickupd.config.loading import Config, keep_fixed, load
from pickupd.dispatcher import LARGE_AT_ONCE, Dispatcher
from pickupd.errors import ConfigError
from pickupd.intake.queues import Intake
from pickupd.intake.watcher import Watcher
from pickupd.lanes import GRACE, Lanes
from pickupd.limits import ledger
from pickupd.limits.quota import Quota
from pickupd.log import Logger
from pickupd.outcome import Stats
from pickupd.record.notify import Feedback
from pickupd.record.recorder import Recorder
from pickupd.roles import Main, Role
from pickupd.smtp.pool import Pool
from pickupd.spool import moves, recovery
from pickupd.spool.census import CensusCache, FolderCount
from pickupd.spool.disk import Disk
from pickupd.spool.folders import Spool
from pickupd.spool.stranded import Stranded
from pickupd.workers import shares
from pickupd.workers.shares import ONLY, Part

__all__ = ["GRACE", "Service", "Settings"]

# How often the quota asks the ledger whether the pauses its held turns wait for are still
# there (one question per paused scope).
PAUSE_RECHECK = 10.0


@dataclass(frozen=True, slots=True)
class Settings:
    """What a reload swaps, whole: the config as the file says, this process's portion of
    it, and the logger they configure."""

    file: Config
    share: Config
    log: Logger


class Service:
    """Takes messages from the spool and relays them until stopped (or, `once`, until idle)."""

    def __init__(
        self, config: Config, *, once: bool = False, part: Part = ONLY, role: Role | None = None
    ) -> None:
        """`part`: which of the service's worker processes this is (workers/shares.py);
        `role`: what this process does besides the work (roles.py; the main process's by
        default)."""
        self.settings = Settings(config, shares.portion(config, part), logs.get())
        self.once = once
        self.part = part
        self.role = role if role is not None else Main()
        self.spool = Spool(config.spool.path)
        self.ledger = ledger.open_ledger(
            config.limits,
            config.spool.path,
            lambda: self.log,
            lambda up: self.metrics.store_up(up) if self.metrics else None,
        )
        self.pool = Pool(ledger=self.ledger)
        self.quota = Quota(self.ledger, part.total)
        self.census = CensusCache(self.spool)  # for the status line and the metrics
        self.intake = Intake(self.spool, self.config.dispatch, once=once, part=part)
        self.feedback = Feedback(config.notify, self.spool, self.log)
        self.role.attach(self)
        self.metrics = self.role.meter()
        self.disk = Disk(config.spool.io, config.spool.path)
        self.recorder = Recorder(
            self.spool,
            self.log,
            self.metrics,
            self.intake.deferred.deferring,
            self.role.notify(self),
            self.disk,
        )
        self.stats = self.recorder.stats
        self.stranded = Stranded(self.log, self.stranded_changed)
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
        self._apply(self.settings)
        self._background: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False

    @property
    def file_config(self) -> Config:
        """The config as the file says."""
        return self.settings.file

    @property
    def config(self) -> Config:
        """This process's portion of it (workers/shares.py)."""
        return self.settings.share

    @property
    def log(self) -> Logger:
        return self.settings.log

    def _apply(self, settings: Settings) -> None:
        """Put `settings` in force in every part that keeps some of them: at start and at
        each reload, the one list, so that no part keeps an old logger or config."""
        self.settings = settings
        self.intake.dispatch = settings.share.dispatch
        self.intake.deferred.horizon = settings.file.retry.max_age
        self.feedback.config = settings.file.notify
        self.recorder.log = self.feedback.log = self.stranded.log = settings.log
        self.role.apply(settings)

    # -- public -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new messages; in-flight sends get GRACE seconds. Safe to call twice
        (the second time, in-flight sends are put back at once)."""
        self._stop.set()
        self.role.stop()

    def reload(self) -> None:
        """Read the config file again (SIGHUP). A valid one is used from the next attempt on,
        in-flight sends go on with the old one; an invalid one is logged and ignored."""
        self.role.reloading()
        try:
            new = load(self.config.path)
            new, unchanged = keep_fixed(self.file_config, new)
            shares.splits(new, self.part.total)
        except ConfigError as exc:
            where = {"config": str(self.config.path), "worker": self.part.index}
            self.log.error("reload_failed", problems=exc.problems, **where)
            self.role.reloaded(self)
            return
        logs.configure(new.log.level, new.log.format)
        self._apply(Settings(new, shares.portion(new, self.part), logs.get()))
        if unchanged:
            self.log.warning("reload_needs_restart", keys=unchanged)
        where = {"config": str(new.path), "worker": self.part.index}
        self.log.info("reloaded", relays=sorted(new.relays), senders=len(new.senders), **where)
        self.intake.wake()
        self.role.reloaded(self)

    def status_line(self) -> str:
        """One line for `systemctl status` (never a count taken here, on the loop)."""
        return status_line(self.service_stats(), self.census.latest)

    def service_stats(self) -> Stats:
        """This run's counts, the other workers' included (the main process's role)."""
        return self.role.stats(self.stats)

    def flush(self) -> None:
        """Make every deferred message due now (SIGUSR1, as `pickupd flush`)."""
        if self._stopping:
            return

        async def flush() -> None:
            count = await asyncio.to_thread(moves.make_due, self.spool, time.time())
            self.log.info("flushed", messages=count)
            self.wake_all()
            self.role.flushed()

        self.spawn(flush())

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the lanes (kept until done)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def wake_all(self) -> None:
        """Look at both folders and the stranded claims again now."""
        self.intake.wake()
        self.stranded.wake()

    def stranded_changed(self, count: int) -> None:
        """This process's count of stranded claims is `count` now."""
        if self.metrics is not None:
            self.metrics.stranded(self.role.stranded(count))

    async def wait_ready(self) -> None:
        """Return once the dispatcher is watching the pickup folder."""
        await self._ready.wait()

    async def run(self) -> Stats:
        """Recover, take what is waiting, then react to new files until `stop()`."""
        started = time.monotonic()
        self.spool.ensure()
        self.spool.lock()
        watcher = None
        try:
            self.role.start(self)
            recovered = self.role.recover(self)
            for candidate in recovered:
                self.log.info("recovered", id=candidate.id)
            self.intake.recover(recovered)
            if not self.once:
                folders = [self.spool.pickup, self.spool.new, self.spool.deferred]
                watcher = Watcher(folders, self.intake.hint)
                watcher.start(asyncio.get_running_loop())
            async with asyncio.TaskGroup() as group:
                lanes = Lanes(self.intake, self.dispatcher, lambda: self.config, lambda: self.log)
                lanes.start(group, self.config.dispatch.concurrency)
                helpers = [group.create_task(work) for work in self._helpers()]
                helpers += await self.role.ready(self, group)
                group.create_task(self._supervise(lanes, helpers))
                self._ready.set()
                self.log.info(
                    self.role.ready_event,
                    spool=str(self.spool.root),
                    once=self.once,
                    concurrency=self.config.dispatch.concurrency,
                    workers=self.part.total,
                    relays=sorted(self.config.relays),
                    io="threads" if self.disk.threads else "loop",
                )
        finally:
            if watcher is not None:
                watcher.stop()
            await self._close()
            await self.role.end(self.stats)
        stats = self.service_stats()
        seconds = round(time.monotonic() - started, 3)
        self.log.info(self.role.stopped_event, seconds=seconds, **dataclasses.asdict(stats))
        return stats

    # -- around the work ---------------------------------------------------------------------------

    def _helpers(self) -> list[Coroutine[Any, Any, None]]:
        """What every process runs beside its lanes until the drain."""
        lease = lambda: self.config.spool.claim_lease  # noqa: E731 (a reload may change it)
        return [
            self.intake.feed_pickup(),
            self.intake.feed_deferred(),
            self._reap_sessions(),
            self.stranded.run(self.intake.wake),
            self.dispatcher.transports.graph.warm(self.config),
            recovery.keep_leases(self.spool, lease, self.dispatcher.take_over),
        ]

    async def _close(self) -> None:
        """Let go of every part, whatever became of the run."""
        await self.feedback.close(timeout=5.0)
        await self.pool.close_all()
        await self.quota.lines.close()
        await self.ledger.close()
        self.disk.close()
        self.spool.unlock()

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

    async def _supervise(self, lanes: Lanes, helpers: list[asyncio.Task[Any]]) -> None:
        """Wait for stop (or, once, for the work to end), then drain."""
        await lanes.until(self._stop)
        self._stopping = True
        self.intake.close()
        for task in helpers:
            task.cancel()
        self.role.stopping()
        self._stop.clear()
        await lanes.drain(self._stop)


def status_line(stats: Stats, census: dict[str, FolderCount] | None) -> str:
    """This run's outcomes and what the spool held at the latest census (spool/census.py)."""
    line = f"sent {stats.sent}, deferred {stats.deferred}, failed {stats.failed} since start"
    if census is None:
        return f"{line}; queue: not counted yet"
    return (
        f"{line}; queue: pickup {census['pickup'].count}, deferred {census['deferred'].count},"
        f" hold {census['hold'].count}, failed {census['failed'].count}"
    )

"""What a process of the service does besides the work every process does (service.py): the
main process speaks for the service, a worker process for itself to the main one.

- `Main`: the process systemd (or a shell) started. It recovers every claim a run left at
  start, supervises the worker processes (workers/supervisor.py) and hears what they report,
  serves the metrics endpoint, tells systemd READY/STATUS/RELOADING/STOPPING, keeps stored
  refresh tokens alive, and its counts are the service's (its own plus its workers').
- `Worker`: started by the main process for its share of the spool (workers/shares.py). It
  reports its counts, metrics and failure reports up the pipe (workers/uplink.py), follows
  what the main process passes down (a flush, a relay's state), and ends with it.

The service asks its role at each of these points; it holds no flag of which one it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pickupd.auth.keepalive import keep_alive
from pickupd.hosting.systemd import Notifier
from pickupd.outcome import Outcome, Stats
from pickupd.record.recorder import Meter
from pickupd.spool import recovery
from pickupd.spool.folders import Candidate
from pickupd.spool.sidecar import Sidecar
from pickupd.workers import protocol, shares, uplink
from pickupd.workers.supervisor import Supervisor

# A failure report's way out: its kind (Outcome.FAILED, DEFERRED) and the message's sidecar.
Notify = Callable[[Outcome, Sidecar], None]

if TYPE_CHECKING:
    from pickupd.hosting.metrics import Metrics
    from pickupd.service import Service, Settings

__all__ = ["WORKERS_START", "Main", "Role", "Worker"]

# The main process says it is ready when its workers are, or after this long.
WORKERS_START = 30.0


class Role:
    """The hooks the service calls; a role does nothing at those it has no part in."""

    ready_event = "ready"
    stopped_event = "stopped"

    def meter(self) -> Meter | None:
        """Where the recorder and the dispatcher report what they count (None: nowhere)."""
        return None

    def notify(self, service: Service) -> Notify:
        """Where a failure report (`[notify]`: FAILED, DEFERRED) goes."""
        return service.feedback.notify

    def attach(self, service: Service) -> None:
        """Wire what needs the service's parts (called once they are built)."""

    def start(self, service: Service) -> None:
        """At the start of run(), before anything is recovered."""

    def recover(self, service: Service) -> list[Candidate]:
        """The claims this process takes back at start."""
        return []

    async def ready(self, service: Service, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        """Once the lanes run: start what this role adds (its helpers, cancelled at stop)."""
        return []

    def stop(self) -> None:
        """A stop was asked (SIGTERM)."""

    def reloading(self) -> None:
        """A reload starts (SIGHUP)."""

    def reloaded(self, service: Service) -> None:
        """A reload is over (applied or refused)."""

    def apply(self, settings: Settings) -> None:
        """The settings in force now (at start, and after each reload)."""

    def flushed(self) -> None:
        """Every deferred message was made due (SIGUSR1)."""

    def stopping(self) -> None:
        """The drain starts."""

    def stats(self, own: Stats) -> Stats:
        """The counts this process gives as the service's."""
        return own

    def stranded(self, own: int) -> int:
        """The stranded claims this process gives as the service's."""
        return own

    async def end(self, stats: Stats) -> None:
        """run() is over (or failed): let go of what this role holds."""


class Main(Role):
    """The main process (see the module docstring)."""

    def __init__(self) -> None:
        self.notifier: Notifier | None = None
        self.served: Metrics | None = None  # the endpoint
        self.supervisor: Supervisor | None = None
        self._supervising: asyncio.Task[None] | None = None

    def meter(self) -> Meter | None:
        return self.served

    def attach(self, service: Service) -> None:
        self.notifier = None if service.once else Notifier.from_env()
        if service.file_config.metrics.listen and not service.once:
            # Imported only when enabled: prometheus-client costs ~3 MiB of memory.
            from pickupd.hosting.metrics import Metrics

            store = service.file_config.limits.store is not None
            tokens = lambda: service.file_config.refresh_sources()  # noqa: E731 (reloads)
            census = service.census.current
            self.served = Metrics(service.spool, census, store, tokens)
        if service.part.total > 1:
            self.supervisor = Supervisor(
                str(service.file_config.path),
                service.part.total,
                once=service.once,
                log=service.log,
                report=lambda event: self._reported(service, event),
                cover=service.intake.cover,
            )

    def start(self, service: Service) -> None:
        # The workers start first: they are up (~0.3 s of Python start) by the time the main
        # process has recovered and scanned.
        if self.supervisor is not None:
            loop = asyncio.get_running_loop()
            self._supervising = loop.create_task(self.supervisor.run())
            # What the main process sees of a relay, every worker knows.
            service.dispatcher.relays.announce = self.supervisor.relay_state
        if self.served is not None:
            self.served.start(service.config.metrics)

    def recover(self, service: Service) -> list[Candidate]:
        return recovery.at_start(service.spool, service.config.spool.claim_lease, service.log)

    async def ready(self, service: Service, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        helpers = []
        if self.supervisor is not None and self._supervising is not None:
            group.create_task(_until_done(self._supervising))
            # The service is ready when all its workers watch the spool.
            if not await self.supervisor.wait_ready(WORKERS_START):
                service.log.error("workers_not_ready", seconds=WORKERS_START)
        if self.notifier or self.served:
            helpers.append(group.create_task(service.census.run()))
        if not service.once:
            sources = lambda: service.file_config.refresh_sources()  # noqa: E731 (reloads)
            helpers.append(group.create_task(keep_alive(service.pool.tokens, sources)))
        if self.notifier:
            await service.census.renewed()  # READY=1 says what the spool holds
            helpers.append(group.create_task(self.notifier.heartbeat(service.status_line)))
        return helpers

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.signal(signal.SIGTERM)

    def reloading(self) -> None:
        if self.notifier:
            self.notifier.reloading()
        if self.supervisor is not None:
            self.supervisor.signal(signal.SIGHUP)

    def reloaded(self, service: Service) -> None:
        """READY=1 again, with a status line counted afresh (in a thread)."""
        if self.notifier is not None:
            service.spawn(_ready_after_count(self.notifier, service))

    def apply(self, settings: Settings) -> None:
        if self.supervisor is not None:
            self.supervisor.log = settings.log

    def flushed(self) -> None:
        if self.supervisor is not None:  # the workers look again once all is due
            self.supervisor.tell(protocol.Flush())

    def stopping(self) -> None:
        if self.notifier:
            self.notifier.stopping()

    def stats(self, own: Stats) -> Stats:
        return own if self.supervisor is None else own + self.supervisor.stats()

    def stranded(self, own: int) -> int:
        return own if self.supervisor is None else own + self.supervisor.stranded()

    async def end(self, stats: Stats) -> None:
        if self._supervising is not None and not self._supervising.done():
            self._supervising.cancel()  # only when run() itself failed: the workers are killed
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervising
        if self.notifier:
            self.notifier.close()
        if self.served is not None:
            self.served.stop()

    def _reported(self, service: Service, event: protocol.Up) -> None:
        """An event a worker process sent up (workers/uplink.py)."""
        if isinstance(event, protocol.Suspended):  # one process's relay state is every one's
            service.dispatcher.relays.state(event.relay, event.on, service.config, tell=True)
        match event:
            case protocol.Feedback(kind, sidecar):
                with contextlib.suppress(ValueError):
                    service.feedback.notify(Outcome(kind), Sidecar.from_json(sidecar.encode()))
            case protocol.Stranded():  # a worker's count of stranded claims changed
                service.stranded_changed(len(service.stranded))
            case _ if self.served is not None:
                self.served.apply(event)


class Worker(Role):
    """A worker process (see the module docstring)."""

    ready_event = "worker_ready"
    stopped_event = "worker_stopped"

    def __init__(self) -> None:
        self.forwarder: uplink.Forwarder | None = None

    def attach(self, service: Service) -> None:
        fd = int(os.environ.get(shares.PIPE, "-1"))
        metrics = bool(service.file_config.metrics.listen)
        self.forwarder = uplink.Forwarder(fd, lambda: service.stats, metrics)

    def meter(self) -> Meter | None:
        return self.forwarder

    def notify(self, service: Service) -> Notify:
        assert self.forwarder is not None, "attached first"
        return self.forwarder.notify

    def recover(self, service: Service) -> list[Candidate]:
        loop = asyncio.get_running_loop()
        uplink.watch_lifeline(loop, lambda message: self._told(service, message), service.stop)
        # A worker started again takes back its dead predecessor's claims; at the service's
        # start the main process has done it for all.
        restarted = bool(os.environ.get(shares.RESTARTED))
        return recovery.stale_claims(service.spool) if restarted else []

    async def ready(self, service: Service, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        if self.forwarder is not None:
            self.forwarder.ready()
        return []

    async def end(self, stats: Stats) -> None:
        if self.forwarder is not None:
            self.forwarder.flush(final=True)

    def _told(self, service: Service, message: protocol.Down) -> None:
        """What the main process passes on to every worker: a flush, a relay's state."""
        match message:
            case protocol.Flush():
                service.wake_all()
            case protocol.RelayState(relay, suspended):
                service.dispatcher.relays.state(relay, suspended, service.config)


async def _until_done(task: asyncio.Task[None]) -> None:
    await task


async def _ready_after_count(notifier: Notifier, service: Service) -> None:
    with contextlib.suppress(OSError):
        await service.census.renewed()
    notifier.ready(service.status_line())

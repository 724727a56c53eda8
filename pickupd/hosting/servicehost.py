"""Host the dispatcher for a service manager that calls start and stop from its own threads.

Portable on purpose: the Windows service (cli/service.py) is a thin shell around this, and the
tests drive the same lifecycle on Linux with a recording reporter. The dispatcher runs in its
own thread with its own event loop; `stop()` asks it to drain (`Service.stop`, thread-safe)
and reports STOP_PENDING with a wait hint until it has, well within the manager's timeout.
The host is given a factory of the service (cli/service.py passes pickupd.service.Service),
so this module depends on no step of the pipeline.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable
from typing import Protocol

from pickupd import log as logs
from pickupd.config.loading import Config

__all__ = ["Hosted", "ServiceHost", "State", "StatusReporter"]


class State(enum.Enum):
    """The states a service manager is told about (Windows' SERVICE_* names)."""

    START_PENDING = "start_pending"
    RUNNING = "running"
    STOP_PENDING = "stop_pending"
    STOPPED = "stopped"


class StatusReporter(Protocol):
    """Tells the service manager where we are; `wait_hint` is seconds until the next word."""

    def __call__(self, state: State, wait_hint: float) -> None: ...


# The manager hears from us at least this often while we start or stop.
_CHECKPOINT = 1.0


class Hosted(Protocol):
    """What a host runs: the service (pickupd.service.Service)."""

    async def run(self) -> object: ...
    async def wait_ready(self) -> None: ...
    def stop(self) -> None: ...


class ServiceHost:
    """One dispatcher, started and stopped on request; reports every state change."""

    def __init__(
        self,
        config: Config,
        report: StatusReporter,
        factory: Callable[[Config], Hosted],
        grace: float,
    ) -> None:
        """`factory`: the service for a config; `grace`: how long its drain may take."""
        self.config = config
        self.report = report
        self.factory = factory
        self.grace = grace
        self.service: Hosted | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> bool:
        """Start the dispatcher; True once it is watching the spool (RUNNING reported)."""
        self.report(State.START_PENDING, _CHECKPOINT * 3)
        logs.configure(self.config.log.level, self.config.log.format)
        self._thread = threading.Thread(target=self._run, name="pickupd-dispatcher", daemon=True)
        self._thread.start()
        if not self._wait(self._ready, timeout, State.START_PENDING) or self.error is not None:
            self.report(State.STOPPED, 0)
            return False
        self.report(State.RUNNING, 0)
        return True

    def stop(self) -> None:
        """Drain in-flight sends (up to the grace), put the rest back, report STOPPED."""
        self.report(State.STOP_PENDING, self.grace + 5)
        loop, service = self._loop, self.service
        if loop is not None and service is not None and not self._done.is_set():
            loop.call_soon_threadsafe(service.stop)
        self._wait(self._done, self.grace + 10, State.STOP_PENDING)
        if self._thread is not None:
            self._thread.join(5)
        self.report(State.STOPPED, 0)

    def wait(self) -> None:
        """Block until the dispatcher has ended (for a service's main thread)."""
        self._done.wait()

    def _wait(self, event: threading.Event, timeout: float, state: State) -> bool:
        """Wait for `event`, telling the manager we are alive every checkpoint."""
        waited = 0.0
        while not event.wait(_CHECKPOINT):
            waited += _CHECKPOINT
            if waited >= timeout or self._done.is_set():
                return event.is_set()
            self.report(state, max(_CHECKPOINT * 3, timeout - waited))
        return True

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the manager as a failed start or stop
            self.error = exc
            logs.get().exception("service_error")
        finally:
            loop.close()
            self._ready.set()
            self._done.set()

    async def _serve(self) -> None:
        service = self.factory(self.config)
        self.service = service
        ready = asyncio.ensure_future(service.wait_ready())
        ready.add_done_callback(lambda _: self._ready.set())
        try:
            await service.run()
        finally:
            ready.cancel()

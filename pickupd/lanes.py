"""The lanes of one process: `[dispatch] concurrency` asyncio tasks, each carrying one
candidate at a time from the intake through the dispatcher; and their drain at a stop, in two
stages: in-flight sends get GRACE seconds (or until a second stop), then the lanes are
cancelled and each puts its message back (dispatcher.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pickupd.config.loading import Config
from pickupd.dispatcher import Dispatcher
from pickupd.intake.queues import Intake
from pickupd.log import Logger

__all__ = ["GRACE", "Lanes"]

# On SIGTERM, in-flight sends get this long to finish before they are put back.
GRACE = 30.0


class Lanes:
    """The lanes, started in a task group and drained at a stop."""

    def __init__(
        self,
        intake: Intake,
        dispatcher: Dispatcher,
        config: Callable[[], Config],
        log: Callable[[], Logger],
    ) -> None:
        """`config`, `log`: the ones in force (a reload swaps them)."""
        self.intake = intake
        self.dispatcher = dispatcher
        self._config = config
        self._log = log
        self._tasks: list[asyncio.Task[None]] = []
        self._all: asyncio.Future[Any] | None = None

    def start(self, group: asyncio.TaskGroup, count: int) -> None:
        self._tasks = [group.create_task(self._lane()) for _ in range(count)]
        self._all = asyncio.ensure_future(asyncio.wait(self._tasks))

    async def until(self, stop: asyncio.Event) -> None:
        """Return at `stop`, or when every lane has ended (`run --once`: the work is done)."""
        assert self._all is not None
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopped, self._all], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()

    async def drain(self, stop: asyncio.Event) -> None:
        """The sends in flight get GRACE seconds, or until `stop` is set again; then the
        lanes are cancelled."""
        assert self._all is not None
        if not self._all.done():
            self._log().info("stopping", in_flight=self.intake.in_flight, grace=GRACE)
            second = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                [self._all, second], timeout=GRACE, return_when=asyncio.FIRST_COMPLETED
            )
            second.cancel()
            for task in self._tasks:
                task.cancel()
        self._all.cancel()

    async def _lane(self) -> None:
        """One lane: the intake's next candidate, one attempt, until the intake closes."""
        intake = self.intake
        while (candidate := await intake.next()) is not None:
            intake.started(candidate)
            try:
                await self.dispatcher.process(candidate, self._config())
            except Exception:
                # One bad file must never stop the daemon (claiming failed: nothing to put
                # back; the file stays where it was and the next scan sees it again).
                self._log().exception("internal_error", source=candidate.source)
            finally:
                intake.done(candidate)

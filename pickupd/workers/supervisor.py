"""The main process's side of the worker processes: it starts workers 1..N-1, starts again
one that dies (covering its share meanwhile), passes signals and pauses on, and feeds what
they report (uplink.Forwarder, in protocol.py's messages) into its own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pickupd.errors import ProtocolError
from pickupd.outcome import Stats
from pickupd.workers import protocol
from pickupd.workers.shares import ENV, PARENT, PIPE, RESTARTED, Part

if TYPE_CHECKING:
    from pickupd.log import Logger

__all__ = ["RESTART_MAX", "Supervisor"]

# A worker that keeps dying is started again after this long at most.
RESTART_MAX = 30.0


@dataclass(slots=True)
class _Worker:
    part: Part
    process: asyncio.subprocess.Process | None = None
    stats: Stats = dataclasses.field(default_factory=Stats)
    stranded: int = 0
    starts: int = 0
    ready: bool = False
    pending: list[int] = dataclasses.field(default_factory=list)  # signals before it was ready


class Supervisor:
    """Starts workers 1..N-1, starts again one that dies, forwards signals, and feeds what
    they report into `report` (the main dispatcher's counters)."""

    def __init__(
        self,
        config_path: str,
        total: int,
        *,
        once: bool,
        log: Logger,
        report: Callable[[protocol.Up], None],
        cover: Callable[[frozenset[int]], None],
    ) -> None:
        self.log = log
        self._cover = cover  # the main process takes these workers' shares meanwhile
        self._covered: frozenset[int] = frozenset()
        self._config_path = config_path
        self._once = once
        self._report = report
        self._workers = [_Worker(Part(index, total)) for index in range(1, total)]
        self._stopping = False
        self._retired = Stats()  # the counts of workers that have exited
        self._all_ready = asyncio.Event()

    def stats(self) -> Stats:
        """The counts of all workers (the main process's not included)."""
        total = self._retired
        for worker in self._workers:
            total = total + worker.stats
        return total

    def stranded(self) -> int:
        return sum(worker.stranded for worker in self._workers)

    def signal(self, signum: int) -> None:
        """Pass a signal on to every running worker. A worker still starting gets SIGHUP and
        SIGUSR1 once it is ready (before, they would end it); SIGTERM at once."""
        stop = signum in (signal.SIGTERM, signal.SIGINT)
        if stop:
            self._stopping = True
            self._all_ready.set()  # nothing waits for workers any more
        for worker in self._workers:
            if worker.ready or stop:
                self._send(worker, signum)
            elif signum not in worker.pending:
                worker.pending.append(signum)

    async def wait_ready(self, timeout: float) -> bool:
        """Until every worker has said it is ready (or `timeout`: then the main process takes
        the shares of those that are not); whether they all did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_ready.wait(), timeout)
        if not self._stopping:
            self._cover_only({w.part.index for w in self._workers if not w.ready})
        return self._all_ready.is_set()

    def _cover_only(self, down: set[int]) -> None:
        """The main process covers exactly the workers in `down`."""
        covered = frozenset(down)
        if covered == self._covered or self._stopping:
            return
        for index in sorted(covered - self._covered):
            self.log.warning("worker_share_covered", worker=index)
        for index in sorted(self._covered - covered):
            self.log.info("worker_share_returned", worker=index)
        self._covered = covered
        self._cover(covered)

    def relay_state(self, relay: str, suspended: bool) -> None:
        """Tell every worker that `relay` is dead (or answering again)."""
        self.tell(protocol.RelayState(relay, suspended))

    def tell(self, message: protocol.Down) -> None:
        """Send `message` to every running worker (a relay's pause, a flush)."""
        line = protocol.encode_down(message)
        for worker in self._workers:
            process = worker.process
            if process is not None and process.stdin is not None and process.returncode is None:
                with contextlib.suppress(OSError, RuntimeError):
                    process.stdin.write(line)

    @staticmethod
    def _send(worker: _Worker, signum: int) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    def _became_ready(self, worker: _Worker) -> None:
        worker.ready = True
        self._cover_only(set(self._covered) - {worker.part.index})
        pending, worker.pending = worker.pending, []
        for signum in pending:
            self._send(worker, signum)
        if all(w.ready for w in self._workers):
            self._all_ready.set()

    async def run(self) -> None:
        """Until stopped (or, once, until every worker is done): keep the workers running."""
        if not self._workers:
            self._all_ready.set()
        async with asyncio.TaskGroup() as group:
            for worker in self._workers:
                group.create_task(self._keep(worker))

    async def _keep(self, worker: _Worker) -> None:
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                code = await self._run_one(worker)
            except OSError as exc:  # could not start it at all (out of memory, say)
                self.log.error("worker_start_failed", worker=worker.part.index, error=str(exc))
                code = -1
            if self._stopping or (self._once and code == 0):
                return
            if time.monotonic() - started > 60:
                delay = 1.0
            self.log.error(
                "worker_died",
                worker=worker.part.index,
                exit_code=code,
                restart_in=delay,
            )
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)

    async def _run_one(self, worker: _Worker) -> int:
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env[ENV] = f"{worker.part.index}/{worker.part.total}"
        env[PIPE] = str(write_end)
        env[PARENT] = str(os.getpid())
        if worker.starts:
            env[RESTARTED] = "1"
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)  # systemd talks to the main process only
        # -I (isolated): neither the working directory nor the user's site-packages nor
        # PYTHON* variables come first on sys.path: a pickupd/ folder where the service was
        # started must not replace the package in its workers.
        args = [sys.executable, "-I", "-m", "pickupd", "run", "-c", self._config_path]
        if self._once:
            args.append("--once")
        try:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, env=env, pass_fds=(write_end,)
            )
        finally:
            os.close(write_end)
        worker.process = process
        worker.starts += 1
        worker.ready = False
        if self._stopping:  # a stop that came while it was starting
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await self._read(worker, read_end)
            code = await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        worker.ready = False
        if not self._stopping and not (self._once and code == 0):
            # Its mail must not wait for it: the main process takes its share until it is back.
            self._cover_only({*self._covered, worker.part.index})
        self._retired = self._retired + worker.stats
        worker.stats = Stats()
        if worker.stranded:
            worker.stranded = 0
            self._report(protocol.Stranded(0))  # the main process counts stranded() anew
        return code

    async def _read(self, worker: _Worker, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while line := await reader.readline():
                try:
                    batch = protocol.decode_batch(line)
                except ProtocolError as exc:
                    self.log.error(
                        "worker_message_invalid", worker=worker.part.index, error=str(exc)
                    )
                    continue
                worker.stats = batch.stats
                for event in batch.events:
                    if isinstance(event, protocol.Ready):
                        self._became_ready(worker)
                        continue
                    if isinstance(event, protocol.Stranded):
                        worker.stranded = event.count
                    self._report(event)
        finally:
            transport.close()

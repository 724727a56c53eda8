"""More than one core: `[dispatch] workers = N` dispatcher processes on one spool.

The main process (`pickupd run`) is worker 0 and the supervisor of workers 1..N-1, which are
`pickupd run` processes of their own, started with PICKUPD_WORKER="k/N". Each takes its part of
the work and nothing else: a file whose name hashes to k (`owns`), so no two processes race
for the same claim, and each claims under its own owner token, as several hosts sharing one
spool do (recovery.py). A worker that dies is started again; at start it takes back the claims
of dead processes of this host (their lock files are free), its own predecessor's included.

What must hold for the service as a whole is split, never multiplied (`portion`): each worker
gets its share of `concurrency`, of every relay's `max_connections` and of every `rate`, so the
shares add up to the configured limit. `count` caps N where a limit is too small to split.

Whole-service duties stay with the main process: signals (forwarded), systemd notify, the
metrics endpoint, [notify] hooks and reports. Workers send their outcomes, metric events and
feedback events up a pipe (`Forwarder`), a batch every FLUSH_EVERY seconds; the main process
feeds them into its own counters (`Supervisor`). A worker stops when the main process goes
away (its stdin reaches end of file).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .log import Logger
    from .sidecar import Sidecar

__all__ = [
    "ENV",
    "MAX_AUTO",
    "ONLY",
    "RESTARTED",
    "Forwarder",
    "Part",
    "Supervisor",
    "count",
    "owns",
    "portion",
    "splits",
]

ENV = "PICKUPD_WORKER"
RESTARTED = "PICKUPD_WORKER_RESTARTED"  # set for a worker started again after one died
# `workers = 0` (the default) is one per core, at most this many: past a few processes the
# spool's directory operations, not the CPU, set the pace, and each process costs memory.
MAX_AUTO = 4
FLUSH_EVERY = 0.2
_PR_SET_PDEATHSIG = 1
# A worker that keeps dying is started again after this long at most.
RESTART_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Part:
    """Worker `index` of `total`; the main process also takes the share of each worker in
    `covering` (one that is down) until it is back."""

    index: int = 0
    total: int = 1
    covering: frozenset[int] = frozenset()

    @classmethod
    def from_env(cls) -> Part | None:
        """The part this process plays when the main process started it, else None."""
        value = os.environ.get(ENV)
        if not value:
            return None
        index, _, total = value.partition("/")
        return cls(int(index), int(total))

    def share(self, amount: int) -> int:
        """This worker's share of `amount`: the shares of all workers add up to `amount`."""
        return max(1, amount // self.total + (1 if self.index < amount % self.total else 0))


# The whole service in one process.
ONLY = Part()


def owns(part: Part, name: str) -> bool:
    """Whether the file `name` (in pickup/ or deferred/) is this worker's to take."""
    if part.total == 1:
        return True
    if name.endswith(".json"):  # a sidecar goes with its message
        name = name[:-5] + ".eml"
    share = zlib.crc32(name.encode("utf-8", "surrogateescape")) % part.total
    return share == part.index or share in part.covering


def count(config: Config, cores: int | None) -> tuple[int, str | None]:
    """How many workers to run, and why fewer than asked (None if as asked)."""
    asked = config.dispatch.workers or min(cores or 1, MAX_AUTO)
    if asked == 1:
        return 1, None
    if os.name != "posix":
        return 1, "workers run on POSIX systems only"
    smallest: list[tuple[int, str]] = [(config.dispatch.concurrency, "dispatch.concurrency")]
    for relay in config.relays.values():
        smallest.append((relay.max_connections, f"relays.{relay.name}.max_connections"))
        if relay.rate is not None:
            smallest.append((relay.rate.count, f"relays.{relay.name}.rate"))
    for rule in config.senders:
        if rule.rate is not None:
            smallest.append((rule.rate.count, f'senders."{rule.pattern}".rate'))
    least, key = min(smallest)
    if least < asked:
        return least, f"{key} = {least} cannot be split among {asked} processes"
    return asked, None


def splits(config: Config, total: int) -> None:
    """ConfigError unless every limit of `config` can be shared out among the `total` running
    workers (a reload cannot change their number: a limit lowered below it needs a restart)."""
    fits, why = count(dataclasses.replace(config, dispatch=dataclasses.replace(
        config.dispatch, workers=total)), None)  # fmt: skip
    if fits < total:
        raise ConfigError(
            [f"{config.path}: {why}: restart pickupd to run {fits} worker(s), or raise it"]
        )


def portion(config: Config, part: Part) -> Config:
    """`config` as worker `part` applies it: its share of every limit of the service."""
    if part.total == 1:
        return config
    relays = {
        name: dataclasses.replace(
            relay,
            max_connections=part.share(relay.max_connections),
            rate=_rate_share(relay.rate, part),
        )
        for name, relay in config.relays.items()
    }
    senders = tuple(
        dataclasses.replace(rule, rate=_rate_share(rule.rate, part)) for rule in config.senders
    )
    dispatch = dataclasses.replace(
        config.dispatch, concurrency=part.share(config.dispatch.concurrency)
    )
    return dataclasses.replace(config, dispatch=dispatch, relays=relays, senders=senders)


def _rate_share(rate: Any, part: Part) -> Any:
    return None if rate is None else dataclasses.replace(rate, count=part.share(rate.count))


# ---- a worker's side ---------------------------------------------------------------------------


class Forwarder:
    """A worker's metrics and feedback, sent up to the main process in batches."""

    def __init__(self, fd: int, stats: Callable[[], list[int]], metrics: bool) -> None:
        self._fd = fd
        # Never blocks the loop: what the pipe cannot take now waits here, in order.
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
        self._unsent = bytearray()
        self._stats = stats
        self._metrics = metrics  # forward metric events only where the main process serves them
        self._events: list[list[Any]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._broken = False

    def outcome(self, outcome: str, reason: str | None, relay: str | None) -> None:
        self._add(["o", outcome, reason, relay] if self._metrics else None)

    def send_seconds(self, relay: str, seconds: float) -> None:
        if self._metrics:
            self._add(["t", relay, seconds])

    def stranded(self, count: int) -> None:
        self._add(["s", count])

    def connection_error(self, relay: str, kind: str) -> None:
        if self._metrics:
            self._add(["e", relay, kind])

    def paused(self, relay: str, until: float) -> None:
        """This worker was asked to slow down: the main process pauses every worker."""
        self._events.append(["p", relay, until])
        self.flush()

    def ready(self) -> None:
        """Tell the main process this worker is watching and takes signals."""
        self._events.append(["r"])
        self.flush()

    def notify(self, event: str, sidecar: Sidecar) -> None:
        """feedback.Feedback.notify's stand-in: the main process runs hooks and reports."""
        self._add(["n", event, sidecar.to_json().decode()])

    def _add(self, event: list[Any] | None) -> None:
        if event is not None:
            self._events.append(event)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)

    def flush(self, *, final: bool = False) -> None:
        """Send what is pending now; `final` (at exit): all of it, waiting if need be."""
        self._flush = None
        if final:
            with contextlib.suppress(OSError):
                os.set_blocking(self._fd, True)
        line = json.dumps({"stats": self._stats(), "events": self._events}) + "\n"
        self._events = []
        if self._broken:
            return
        self._unsent += line.encode()
        try:
            while self._unsent:
                del self._unsent[: os.write(self._fd, self._unsent)]
        except BlockingIOError:
            # The main process is busy: the rest goes with the next flush, soon.
            self._flush = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
        except OSError:
            self._broken = True  # the main process is gone; the lifeline stops us


def die_with_parent(parent: int) -> None:
    """Linux: end this worker with SIGKILL when the main process dies, as if the service as
    a whole had been killed (its claims are then recovered at the next start). Elsewhere
    the lifeline's end of file stops it, gracefully."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def watch_lifeline(
    loop: asyncio.AbstractEventLoop,
    told: Callable[[list[Any]], None],
    stop: Callable[[], None],
) -> None:
    """Pass each line the main process writes to stdin to `told` (on the loop), and call
    `stop` once stdin closes: the main process is gone."""

    def wait() -> None:
        with contextlib.suppress(OSError, RuntimeError), open(0, "rb", closefd=False) as lines:
            for line in lines:
                with contextlib.suppress(ValueError):
                    loop.call_soon_threadsafe(told, json.loads(line))
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping anyway
            loop.call_soon_threadsafe(stop)

    threading.Thread(target=wait, name="pickupd-lifeline", daemon=True).start()


# ---- the main process's side -------------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    part: Part
    process: asyncio.subprocess.Process | None = None
    stats: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0, 0])
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
        report: Callable[[list[Any]], None],
        cover: Callable[[frozenset[int]], None],
    ) -> None:
        self.log = log
        self._cover = cover  # the main process takes these workers' shares meanwhile
        self._covered: frozenset[int] = frozenset()
        self._config_path = config_path
        self._once = once
        self._report = report
        self._workers = [_Worker(Part(index, total)) for index in range(1, total)]
        self._stopping = 0
        self._retired = [0, 0, 0, 0]  # the counts of workers that have exited
        self._all_ready = asyncio.Event()

    def stats(self) -> list[int]:
        """claimed, sent, deferred, failed of all workers (the main process's not included)."""
        total = list(self._retired)
        for worker in self._workers:
            total = [a + b for a, b in zip(total, worker.stats, strict=True)]
        return total

    def stranded(self) -> int:
        return sum(worker.stranded for worker in self._workers)

    def signal(self, signum: int) -> None:
        """Pass a signal on to every running worker. A worker still starting gets SIGHUP and
        SIGUSR1 once it is ready (before, they would end it); SIGTERM at once."""
        stop = signum in (signal.SIGTERM, signal.SIGINT)
        if stop:
            self._stopping += 1
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
            self._recover_shares({w.part.index for w in self._workers if not w.ready})
        return self._all_ready.is_set()

    def _recover_shares(self, down: set[int]) -> None:
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

    def tell(self, event: list[Any]) -> None:
        """Send `event` to every running worker (a relay's pause)."""
        line = (json.dumps(event) + "\n").encode()
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
        self._recover_shares(set(self._covered) - {worker.part.index})
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
        env["PICKUPD_WORKER_FD"] = str(write_end)
        env["PICKUPD_WORKER_PARENT"] = str(os.getpid())
        if worker.starts:
            env[RESTARTED] = "1"
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)  # systemd talks to the main process only
        args = [sys.executable, "-m", "pickupd", "run", "-c", self._config_path]
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
            self._recover_shares({*self._covered, worker.part.index})
        self._retired = [a + b for a, b in zip(self._retired, worker.stats, strict=True)]
        worker.stats = [0, 0, 0, 0]
        if worker.stranded:
            worker.stranded = 0
            self._report(["s", self.stranded()])
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
                    batch = json.loads(line)
                    stats, events = batch["stats"], batch["events"]
                except (ValueError, KeyError, TypeError):
                    self.log.error("worker_message_invalid", worker=worker.part.index)
                    continue
                worker.stats = [int(n) for n in stats]
                for event in events:
                    if event[0] == "r":
                        self._became_ready(worker)
                        continue
                    if event[0] == "s":
                        worker.stranded = int(event[1])
                        event = ["s", self.stranded()]
                    self._report(event)
        finally:
            transport.close()

"""A worker process's link to the main process: its counts, metric events and [notify]
events go up a pipe in batches (`Forwarder`); what the main process tells every worker (a
relay's pause, a flush) comes down its stdin, whose end of file means the main process is
gone (`watch_lifeline`); on Linux the worker dies with it (`die_with_parent`). The messages
themselves are protocol.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pickupd.errors import ProtocolError
from pickupd.outcome import Outcome, Stats
from pickupd.workers import protocol

if TYPE_CHECKING:
    from pickupd.spool.sidecar import Sidecar

__all__ = ["FLUSH_EVERY", "Forwarder", "die_with_parent", "watch_lifeline"]

# A worker's counts and events reach the main process this soon.
FLUSH_EVERY = 0.2
_PR_SET_PDEATHSIG = 1


class Forwarder:
    """A worker's metrics and feedback, sent up to the main process in batches."""

    def __init__(self, fd: int, stats: Callable[[], Stats], metrics: bool) -> None:
        self._fd = fd
        # Never blocks the loop: what the pipe cannot take now waits here, in order.
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
        self._unsent = bytearray()
        self._stats = stats
        self._metrics = metrics  # forward metric events only where the main process serves them
        self._events: list[protocol.Up] = []
        self._rooms: dict[str, int] = {}  # the last room sent per limit
        self._lines = (0, 0, 0)  # the last counts of the lines sent
        self._flush: asyncio.TimerHandle | None = None
        self._broken = False

    def outcome(self, outcome: str, reason: str | None, relay: str | None) -> None:
        self._add(protocol.Outcome(outcome, reason, relay) if self._metrics else None)

    def send_seconds(self, relay: str, seconds: float) -> None:
        if self._metrics:
            self._add(protocol.SendTime(relay, seconds))

    def stranded(self, count: int) -> None:
        self._add(protocol.Stranded(count))

    def connection_error(self, relay: str, kind: str) -> None:
        if self._metrics:
            self._add(protocol.SessionFailed(relay, kind))

    def suspended(self, relay: str, on: bool) -> None:
        # Always: the main process tells every process (metrics or not).
        self._add(protocol.Suspended(relay, on))

    def room(self, limit: str, room: int, size: int = 0) -> None:
        if self._metrics and self._rooms.get(limit) != room:
            self._rooms[limit] = room
            self._add(protocol.Room(limit, room, size))

    def store_up(self, up: bool) -> None:
        self._add(protocol.StoreUp(up) if self._metrics else None)

    def paused(self, scope: str, until: float, kind: str) -> None:
        self._add(protocol.Paused(scope, until, kind) if self._metrics else None)

    def waiting(self, worker: int, urgent: int, normal: int, bulk: int) -> None:
        if self._metrics and self._lines != (urgent, normal, bulk):
            self._lines = (urgent, normal, bulk)
            self._add(protocol.Waiting(worker, urgent, normal, bulk))

    def graph_reply(self, relay: str, status: int) -> None:
        self._add(protocol.GraphReply(relay, status) if self._metrics else None)

    def ready(self) -> None:
        """Tell the main process this worker is watching and takes signals."""
        self._events.append(protocol.Ready())
        self.flush()

    def notify(self, event: Outcome, sidecar: Sidecar) -> None:
        """feedback.Feedback.notify's stand-in: the main process runs hooks and reports."""
        self._add(protocol.Feedback(event.value, sidecar.to_json().decode()))

    def _add(self, event: protocol.Up | None) -> None:
        if event is not None:
            self._events.append(event)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)

    def flush(self, *, final: bool = False) -> None:
        """Send what is pending now; `final` (at exit): all of it, waiting if need be."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if final:
            with contextlib.suppress(OSError):
                os.set_blocking(self._fd, True)
        line = protocol.encode_batch(protocol.Batch(self._stats(), tuple(self._events)))
        self._events = []
        if self._broken:
            return
        self._unsent += line
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
    told: Callable[[protocol.Down], None],
    stop: Callable[[], None],
) -> None:
    """Pass each line the main process writes to stdin to `told` (on the loop), and call
    `stop` once stdin closes: the main process is gone."""

    def wait() -> None:
        with contextlib.suppress(OSError, RuntimeError), open(0, "rb", closefd=False) as lines:
            for line in lines:
                with contextlib.suppress(ProtocolError):
                    loop.call_soon_threadsafe(told, protocol.decode_down(line))
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping anyway
            loop.call_soon_threadsafe(stop)

    threading.Thread(target=wait, name="pickupd-lifeline", daemon=True).start()

"""The entries of the pickup folder that are not (yet) messages to take: direct .eml files
their writers still hold open (taken once closed and settled), names that will never be
taken (said once each), and entries that cannot be claimed (said once, skipped since).
Bounded memory, whatever a writer leaves in the folder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from pickupd import log as logs
from pickupd.intake.watcher import FileEvent
from pickupd.spool.files import printable

__all__ = ["WRITER_PATIENCE", "Strays", "Unmovable", "Writers"]

# A direct .eml still open by its writer after this long is taken anyway (missed event).
WRITER_PATIENCE = 300.0
# Names of ignored files in pickup/ logged (once each) at most per process.
_STRAYS_LOGGED = 1000
_UNMOVABLE_KEPT = 10_000  # entries of pickup/ that cannot be claimed, kept (and logged) at most


class Strays:
    """Files in pickup/ that will never be taken, said once per name (a bounded memory: a
    folder full of them is logged up to the bound, then counted by `pickupd queue`)."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def note(self, name: str) -> None:
        """`name` (relative to pickup/; a directory's ends in /) is never taken: say so once."""
        if name in self._said or len(self._said) >= _STRAYS_LOGGED:
            return
        self._said.add(name)
        if name.endswith("/"):
            detail = "a directory: pickupd takes files only, and leaves it where it is"
        else:
            detail = (
                "not a message: pickupd takes pickup/*.eml and pickup/new/*;"
                " rename it to end in .eml (write it elsewhere first, then move it in)"
            )
        logs.get().warning("ignored_file", file=f"pickup/{printable(name)}", detail=detail)


class Writers:
    """Direct .eml files their writers hold open: such a file is taken once its writer has
    closed it (inotify tells us on Linux) and it has been unchanged for `settle`. One timer
    at a time looks again after that: a writer's events are many."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._open: dict[Path, tuple[int, float]] = {}  # path -> (opens, since)
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None

    def event(self, kind: FileEvent, path: Path, settle: float) -> None:
        if kind is FileEvent.OPENED:
            count, since = self._open.get(path, (0, time.monotonic()))
            self._open[path] = (count + 1, since)
            return
        if kind in (FileEvent.CLOSED, FileEvent.CLOSED_NO_WRITE):
            count, since = self._open.pop(path, (1, 0.0))
            if count > 1:
                self._open[path] = (count - 1, since)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(settle + 0.01, self._settled)

    def _settled(self) -> None:
        self._timer = None
        self._wake()

    def still_open(self, path: Path) -> bool:
        """True while a writer holds `path` open (bounded: a missed close event must not hold
        a message back for more than WRITER_PATIENCE)."""
        count, since = self._open.get(path, (0, 0.0))
        if count and time.monotonic() - since > WRITER_PATIENCE:
            del self._open[path]
            return False
        return count > 0


class Unmovable:
    """Entries of pickup/ that cannot be claimed, said once and skipped since; past
    _UNMOVABLE_KEPT, the rest cost a failed rename at each rescan but never a log line."""

    def __init__(self) -> None:
        self._kept: set[Path] = set()
        self._full = False

    def __contains__(self, path: Path) -> bool:
        return path in self._kept

    def add(self, path: Path) -> bool:
        """Keep `path`; True the first time (to be logged)."""
        if path in self._kept:
            return False
        if len(self._kept) < _UNMOVABLE_KEPT:
            self._kept.add(path)
            return True
        if not self._full:
            self._full = True
            logs.get().error(
                "unmovable_many",
                count=len(self._kept),
                detail="more entries of pickup/ cannot be moved: the rest are not logged",
            )
        return False

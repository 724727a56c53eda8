"""File events -> hints on the event loop. Events are hints; the directory scan is the truth.

On Linux, inotify is read on the event loop itself: a burst of drops is one read of many
events, with no thread in between (watchdog hands each event through three threads and a
wake-up of the loop: half of what a warm backlog cost beyond a cold one, and ~0.3 ms of
latency per drop). Elsewhere (macOS, Windows) watchdog does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pickupd.errors import WatchError

__all__ = ["FileEvent", "Watcher"]

# <sys/inotify.h>
_IN_OPEN = 0x20
_IN_CLOSE_WRITE = 0x08
_IN_CLOSE_NOWRITE = 0x10
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_ISDIR = 0x40000000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_ARRIVALS = _IN_CREATE | _IN_MOVED_TO


class FileEvent(enum.Enum):
    """What a hint says happened to a path (watchdog's names, which inotify's map to)."""

    CREATED = "created"
    MOVED = "moved"
    OPENED = "opened"
    CLOSED = "closed"
    CLOSED_NO_WRITE = "closed_no_write"
    MODIFIED = "modified"
    OVERFLOW = "overflow"  # events were lost: the folder is to be scanned


# What each inotify event means to Intake.hint, most telling first.
_KINDS = (
    (_IN_MOVED_TO, FileEvent.MOVED),
    (_IN_CREATE, FileEvent.CREATED),
    (_IN_CLOSE_WRITE, FileEvent.CLOSED),
    (_IN_CLOSE_NOWRITE, FileEvent.CLOSED_NO_WRITE),
    (_IN_OPEN, FileEvent.OPENED),
)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL padded


class _Inotify:
    """Linux: inotify, read on the event loop."""

    def __init__(self, folders: list[Path], hint: Callable[[FileEvent, str], None]) -> None:
        self._hint = hint
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise WatchError(ctypes.get_errno(), "inotify_init1")
        self._fd = fd
        self._folders: dict[int, str] = {}
        try:
            for index, folder in enumerate(folders):
                # The first folder (pickup/) takes direct .eml files: their writer's open and
                # close matter there. Elsewhere only arrivals do.
                mask = _ARRIVALS | _IN_ONLYDIR
                if index == 0:
                    mask |= _IN_OPEN | _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE
                wd = libc.inotify_add_watch(fd, os.fsencode(folder), mask)
                if wd < 0:
                    raise WatchError(ctypes.get_errno(), "inotify_add_watch", str(folder))
                self._folders[wd] = str(folder)
        except BaseException:
            os.close(fd)
            raise
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._read)

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.remove_reader(self._fd)
            self._loop = None
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        hint, folders = self._hint, self._folders
        offset, end = 0, len(data)
        while offset < end:
            wd, mask, _, length = _HEADER.unpack_from(data, offset)
            name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
            offset += 16 + length
            if mask & _IN_Q_OVERFLOW:
                # The kernel's queue overflowed: events were lost, so look at every folder.
                for folder in folders.values():
                    hint(FileEvent.OVERFLOW, folder)
                continue
            where = folders.get(wd)
            if where is None or mask & _IN_ISDIR or not name:
                continue
            kind = next((kind for bit, kind in _KINDS if mask & bit), None)
            if kind is not None:
                hint(kind, f"{where}/{os.fsdecode(name)}")


class Watcher:
    """Watches pickup/, pickup/new/ and deferred/ (not recursively) and calls
    `hint(event_type, path)` on the event loop."""

    def __init__(
        self,
        folders: list[Path],
        hint: Callable[[FileEvent, str], None],
        *,
        native: bool = sys.platform.startswith("linux"),
    ) -> None:
        self._folders = folders
        self._hint = hint
        self._native = native  # inotify on the loop; else watchdog
        self._observer: Any = None  # watchdog's BaseObserver
        self._inotify: _Inotify | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._native:
            self._inotify = _Inotify(self._folders, self._hint)
            self._inotify.start(loop)
            return
        observer = _watchdog(loop, self._folders, self._hint)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


def _watchdog(
    loop: asyncio.AbstractEventLoop, folders: list[Path], hint: Callable[[FileEvent, str], None]
) -> Any:
    """watchdog's observer of `folders`, not started. Imported here: where inotify serves,
    watchdog's 5 MiB are not paid in every process."""
    from watchdog.events import (
        FileClosedEvent,
        FileClosedNoWriteEvent,
        FileCreatedEvent,
        FileMovedEvent,
        FileOpenedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        """Runs on the observer's thread: it decides nothing, it hands paths to the loop."""

        def on_any_event(self, event: FileSystemEvent) -> None:
            try:
                kind = FileEvent(event.event_type)
            except ValueError:  # deleted, and any kind watchdog adds: nothing to act on
                return
            if event.is_directory:
                return
            path = event.dest_path if kind is FileEvent.MOVED else event.src_path
            with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                loop.call_soon_threadsafe(hint, kind, str(path))

    # Only what the dispatcher acts on: a file arriving, and a direct .eml being opened or
    # closed (so a busy writer's stream of modify events never reaches Python).
    wanted = [
        FileCreatedEvent,
        FileMovedEvent,
        FileOpenedEvent,
        FileClosedEvent,
        FileClosedNoWriteEvent,
    ]
    observer = Observer()
    handler = Handler()
    for folder in folders:
        observer.schedule(handler, str(folder), recursive=False, event_filter=wanted)
    return observer

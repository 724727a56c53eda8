"""watchdog -> hints on the event loop. Events are hints; the directory scan is the truth."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

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
from watchdog.observers.api import BaseObserver

if sys.platform.startswith("linux"):
    # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and every
    # later event waits behind it. Each claim renames a file out of new/, so with the delay a
    # drop right after a claim was seen up to 500 ms late. We never need the pairing: an
    # unpaired move into new/ arrives as a created event, which is what we act on.
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    InotifyMoveEventGrouper.delay = 0.0

# Only what the dispatcher acts on: a file arriving, and a direct .eml being opened or closed
# (so a busy writer's stream of modify events never reaches Python).
_EVENTS = [
    FileCreatedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
]

__all__ = ["Watcher"]


class _Handler(FileSystemEventHandler):
    """Runs on the observer's thread: it decides nothing, it only hands paths to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hint: Callable[[str, str], None]) -> None:
        self._loop = loop
        self._hint = hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type == "deleted":
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        with contextlib.suppress(RuntimeError):  # the loop closed while we were shutting down
            self._loop.call_soon_threadsafe(self._hint, event.event_type, str(path))


class Watcher:
    """Watches pickup/ and pickup/new/ (not recursively) and calls `hint(event_type, path)`."""

    def __init__(self, folders: list[Path], hint: Callable[[str, str], None]) -> None:
        self._folders = folders
        self._hint = hint
        self._observer: BaseObserver | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        handler = _Handler(loop, self._hint)
        for folder in self._folders:
            observer.schedule(handler, str(folder), recursive=False, event_filter=_EVENTS)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

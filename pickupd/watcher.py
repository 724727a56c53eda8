"""watchdog -> hints on the event loop. Events are hints; the directory scan is the truth."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

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
            observer.schedule(handler, str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

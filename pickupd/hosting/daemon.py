"""`pickupd run --daemon`: classic detach with python-daemon and a locked pidfile.

For hosts without systemd. The pidfile is locked (flock) *before* detaching, so a second
instance is refused on the terminal it was started from; the locked descriptor is carried
into the daemon, which writes its own pid there and removes the file when it exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import IO

from pickupd.errors import DaemonError

__all__ = ["detached"]


class _PidFile:
    """A pidfile whose lock is held from before the fork until the daemon exits."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()  # the daemon runs in /
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            raise DaemonError(
                str(self.path), f"pickupd is already running as pid {holder}"
            ) from None

    def __enter__(self) -> _PidFile:
        # Called by DaemonContext after the fork: this is the daemon's pid.
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(self.fd)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def detached(pidfile: Path, log_file: Path | None) -> contextlib.AbstractContextManager[object]:
    """A context that, entered, detaches this process (double fork, setsid, chdir /, umask
    027, stdio to `log_file` or /dev/null) holding `pidfile`. Raise DaemonError (one line)
    if another process holds it, or if the pidfile or log file cannot be opened."""
    import daemon  # python-daemon: POSIX only

    try:
        lock = _PidFile(pidfile)
    except OSError as exc:
        raise DaemonError(str(pidfile), str(exc.strerror or exc)) from None
    log: IO[bytes] | None = None
    if log_file is not None:
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            lock.__exit__(None, None, None)
            raise DaemonError(str(log_file), str(exc.strerror or exc)) from None
        log = os.fdopen(fd, "ab", buffering=0)
    # SIGTERM is not in the map: the dispatcher handles it (a graceful drain), not a
    # SystemExit raised by python-daemon in the middle of a send.
    signal_map = {signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGTSTP: None}
    context: contextlib.AbstractContextManager[object] = daemon.DaemonContext(
        working_directory="/",
        umask=0o027,
        pidfile=lock,
        files_preserve=[lock.fd],
        stdout=log,
        stderr=log,
        signal_map=signal_map,
    )
    return context

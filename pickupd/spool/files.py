"""File primitives for a spool shared with possibly hostile writers: synced atomic writes,
reads that never follow a link or block on a fifo, lock files, Maildir names.

Nothing here knows the spool's folders; spool.py decides what moves where.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pickupd.errors import NotRegular

__all__ = [
    "BINARY",
    "PRIVATE",
    "SAFE",
    "Read",
    "TooLarge",
    "Unsafe",
    "atomic_write",
    "file_kind",
    "fsync_dir",
    "maildir_name",
    "printable",
    "read_fd",
    "read_limited",
    "try_lock",
    "write_synced",
    "write_then_rename",
]

# Hostile-input flags: never follow a link, never block on a planted FIFO. Windows has
# neither (and no fork to leak descriptors into): there the flags are 0 and the fstat check
# on the open descriptor still refuses what is not a regular file.
SAFE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
PRIVATE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
BINARY = getattr(os, "O_BINARY", 0)


@dataclass(frozen=True, slots=True)
class Read:
    """A claimed message's bytes (its writer was read at the claim: Claimed.owner)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The claimed file is larger than the limit it was read with."""

    size: int


@dataclass(frozen=True, slots=True)
class Unsafe:
    """The claimed file is not something we will read (symlink, fifo, hard link, ...)."""

    detail: str
    # A hard link may be the Maildir writer between its link() and unlink(): worth a re-read.
    linked: bool = False


def atomic_write(path: Path, data: bytes, *, mtime: float | None = None) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one: temp, fsync,
    rename, fsync the directory. `mtime`: the new file's (a due time), set before the rename.
    The temp's name is the writing thread's own: two writers of one sidecar at once (a
    waiting line giving a turn in a thread while the loop records an attempt) never share
    one temp file, so neither rename fails; the last rename wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write_then_rename(tmp, path, data, mtime=mtime)


def write_then_rename(
    tmp: Path,
    target: Path,
    data: bytes,
    flags: int = os.O_TRUNC,
    mode: int = 0o600,
    *,
    unlistable: bool = False,
    mtime: float | None = None,
) -> None:
    """Write `data` to `tmp` (created with `flags` and `mode`), fsync it, rename it to
    `target` and fsync the target's folder. On any failure `tmp` is removed: a full disk
    never leaves half a file behind. `unlistable`: the folder may be one the caller may
    write but not open (a drop folder, 1730), so its fsync is left to pickupd's claim."""
    try:
        write_synced(tmp, data, flags, mode)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime), follow_symlinks=False)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if unlistable:
        with contextlib.suppress(PermissionError):
            fsync_dir(target.parent)
    else:
        fsync_dir(target.parent)


def write_synced(path: Path, data: bytes, flags: int, mode: int) -> None:
    """Create (or with O_TRUNC, overwrite) `path` holding `data`, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags | PRIVATE | BINARY, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; Windows cannot open a directory, nor needs to)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | PRIVATE)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file without waiting; False if someone holds it."""
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


_drops = itertools.count()


def maildir_name() -> str:
    """A Maildir file name unique across hosts, processes and calls: time, pid, counter, host."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
    unique = f"M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_drops)}R{os.urandom(4).hex()}"
    return f"{int(now)}.{unique}.{host}"


def printable(name: str) -> str:
    """A file name fit for a sidecar and a log line: undecodable bytes and control characters
    (a newline in a name is legal) become '?'. Names are shown, never used as paths."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join("?" if not char.isprintable() else char for char in text)


def read_limited(path: Path, limit: int) -> bytes:
    """Read at most `limit` bytes of a regular file, never following a symlink."""
    fd = os.open(path, os.O_RDONLY | SAFE | BINARY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(str(path))
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int) -> bytes:
    chunks = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"

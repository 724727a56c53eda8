"""Where the spool's blocking work runs: on the event loop for a local disk, in threads for a
network file system.

On a local disk a claim, a read or a rename takes microseconds, and a thread hop would cost
more than the call (about 10% of a message's CPU). On NFS the same call can take seconds when
the server is slow, and on the loop that would stall every session and the watchdog ping: so
there (`[spool] io = "auto"` finds the spool's file system in /proc/self/mountinfo), or when
`io = "threads"`, each call runs in a small pool of threads of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

__all__ = ["NETWORK", "THREADS", "Disk", "IoMode", "filesystem"]

T = TypeVar("T")
IoMode = Literal["auto", "loop", "threads"]
THREADS = 8
NETWORK = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "afs", "9p",
     "ocfs2", "gfs2", "beegfs", "virtiofs"}
)  # fmt: skip


def filesystem(path: Path) -> str | None:
    """The type of the file system `path` is on (Linux), or None where it cannot be told."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(path.resolve()), "", None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[fields.index("-") + 1]
    return kind


class Disk:
    """Runs the spool's blocking calls where they belong (see the module docstring)."""

    def __init__(self, mode: IoMode, root: Path) -> None:
        kind = filesystem(root) if mode == "auto" else None
        self.threads = mode == "threads" or (
            kind is not None and (kind in NETWORK or kind.startswith("fuse"))
        )
        self.kind = kind
        # Imported here: the sendmail shim reads the spool's names from this package, and a
        # web app may run it for every mail (asyncio alone is a fifth of its start).
        from concurrent.futures import ThreadPoolExecutor

        self._pool = (
            ThreadPoolExecutor(THREADS, thread_name_prefix="pickupd-disk") if self.threads else None
        )

    async def run(self, call: Callable[..., T], *args: object) -> T:
        """`call(*args)`, in a thread when the spool is slow to answer."""
        if self._pool is None:
            return call(*args)
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

"""What a dispatcher takes back, and what it cleans, on a spool it may share: claims of its
own host's dead processes (their lock file is free), claims of any host whose lease expired,
and what crashes and full disks leave behind.

Claim leases are for a spool shared by several hosts (NFS): the claims in active/ of one
process are held while it renews its lease, the mtime of its lock file (`active/.owner.<token>`,
its own), every `claim_lease / 4`; the claims of a process whose lock file has not been touched
for `claim_lease` (or is gone) belong to a process that is gone, on whatever host, and any
dispatcher may take them over, with one rename, as claims are always taken. The claimed files
themselves decide nothing: they are their writers' inodes, and a writer who kept one open could
set its mtime. On one host the owner's lock says at once whether it is alive; a lock held on
another host may not show through NFS, hence the lease. What the shared file system must
provide: atomic rename within a folder, and mtimes that follow the hosts' clocks, which must
agree within a small part of claim_lease (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from pickupd import ids
from pickupd.log import Logger
from pickupd.spool.files import PRIVATE, try_lock
from pickupd.spool.folders import (
    LEFTOVER_AGE,
    TMP_MAX_AGE,
    Candidate,
    Origin,
    Spool,
    claim_id,
    entries,
    lock_path,
    older,
    unlink,
)

__all__ = [
    "at_start",
    "clean_leftovers",
    "clean_tmp",
    "expired",
    "keep_leases",
    "owner_alive",
    "renew",
    "stale_claims",
]


def stale_claims(spool: Spool) -> list[Candidate]:
    """Claims in active/ left by a process of this host that is gone (its lock is free)."""
    found: list[Candidate] = []
    names = [e.name for e in entries(spool.active)]
    owners_alive: dict[str, bool] = {}
    for name in names:
        msg_id, dot, owner = name.partition(".")
        # Only our host's claims: a lock held on another host may not show here (NFS).
        if not dot or not ids.is_valid(msg_id) or owner.rpartition("-")[0] != spool._host:
            continue
        if owner not in owners_alive:
            owners_alive[owner] = owner == spool.owner or owner_alive(spool, owner)
        if not owners_alive[owner]:
            found.append(Candidate(spool.active / name, name, Origin.RECOVERED, msg_id))
    return found


def owner_alive(spool: Spool, owner: str) -> bool:
    path = lock_path(spool, owner)
    try:
        fd = os.open(path, os.O_RDWR | PRIVATE)
    except FileNotFoundError:
        return False
    try:
        if not try_lock(fd):
            return True
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def clean_leftovers(spool: Spool, now: float) -> dict[str, int]:
    """What crashes and full disks leave behind, removed at start: sidecars in deferred/
    whose message is nowhere (not in deferred/, not claimed in active/; older than an
    hour, so an operator's requeue, which writes the sidecar first, is never cut short),
    lock files of this host's processes that are gone, and temp files of atomic writes
    older than an hour. Returns how many of each."""
    removed = {"sidecars": 0, "locks": 0, "temps": 0}
    claimed = {claim_id(e.name) for e in entries(spool.active)}
    for entry in entries(spool.deferred):
        name = entry.name
        msg_id = name[:-5] if name.endswith(".json") else ""
        if (
            ids.is_valid(msg_id)
            and msg_id not in claimed
            and not os.path.lexists(spool.deferred / f"{msg_id}.eml")
            and older(entry, now, LEFTOVER_AGE)
            and unlink(entry.path)
        ):
            removed["sidecars"] += 1
    for entry in entries(spool.active):
        owner = entry.name.removeprefix(".owner.")
        if (
            entry.name.startswith(".owner.")
            and owner != spool.owner
            and owner.rpartition("-")[0] == spool._host
            and not owner_alive(spool, owner)  # unlinks the lock file it finds free
        ):
            removed["locks"] += 1
    for folder in (spool.deferred, spool.failed, spool.hold, spool.sent):
        for entry in entries(folder):
            if (
                entry.name.startswith(".")
                and entry.name.endswith(".tmp")
                and older(entry, now, LEFTOVER_AGE)
                and unlink(entry.path)
            ):
                removed["temps"] += 1
    return removed


def clean_tmp(spool: Spool, now: float) -> int:
    """Remove Maildir tmp/ files older than 36 hours; return how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(spool.tmp) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if now - st.st_mtime > TMP_MAX_AGE and not stat.S_ISDIR(st.st_mode):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def renew(spool: Spool, now: float) -> None:
    """Touch our lock file: we are alive, and working on every claim of ours (one utime a
    process, whatever it holds)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(spool.lock_path, (now, now), follow_symlinks=False)


def expired(spool: Spool, now: float, lease: float) -> list[Candidate]:
    """Claims of other owners whose lock file was not renewed for `lease` seconds, or is
    gone: theirs no longer."""
    found = []
    renewed: dict[str, float] = {}  # owner token -> its lock file's mtime (0: none)
    for entry in entries(spool.active):
        msg_id, dot, owner = entry.name.partition(".")
        if not dot or owner == spool.owner or not ids.is_valid(msg_id):
            continue
        if owner not in renewed:
            try:
                renewed[owner] = os.stat(lock_path(spool, owner), follow_symlinks=False).st_mtime
            except FileNotFoundError:
                renewed[owner] = 0.0
        if now - renewed[owner] > lease:
            found.append(Candidate(Path(entry.path), entry.name, Origin.RECOVERED, msg_id))
    return found


async def keep_leases(
    spool: Spool, lease: Callable[[], float], take: Callable[[list[Candidate]], None]
) -> None:
    """Until cancelled: renew our claims every quarter of the lease (`lease()`, which a
    reload may change), and hand claims whose lease expired to `take`."""
    while True:
        await asyncio.sleep(min(lease() / 4, 60.0))
        now = time.time()
        await asyncio.to_thread(renew, spool, now)
        taken = await asyncio.to_thread(expired, spool, now, lease())
        if taken:
            take(taken)


def at_start(spool: Spool, claim_lease: float, log: Logger) -> list[Candidate]:
    """At the service's start (the main process): clean what crashes leave, and take back
    the claims of dead processes of this host and expired leases of any host."""
    removed = clean_tmp(spool, time.time())
    if removed:
        log.info("tmp_cleaned", removed=removed)
    leftovers = clean_leftovers(spool, time.time())
    if any(leftovers.values()):
        log.info("leftovers_cleaned", **leftovers)
    return stale_claims(spool) + expired(spool, time.time(), claim_lease)

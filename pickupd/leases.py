"""Claim leases, for a spool shared by several hosts (NFS): a claim in active/ is held by its
owner only while the owner renews it (touches the file) every `claim_lease / 4`; a claim whose
file has not been touched for `claim_lease` belongs to a process that is gone, on whatever
host, and any dispatcher may take it over, with one rename, as claims are always taken.

On one host the owner's lock file says at once whether it is alive (spool.stale_claims); a
lock held on another host may not show through NFS, hence the lease. What the shared file
system must provide: atomic rename within a folder, and mtimes that follow the hosts' clocks,
which must agree within a small part of claim_lease (NTP).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import ids
from .spool import Candidate, Spool

__all__ = ["expired", "renew"]


def renew(spool: Spool, now: float) -> int:
    """Touch every claim of ours (and our lock file): we are alive and working on them."""
    renewed = 0
    suffix = f".{spool.owner}"
    for entry in os.scandir(spool.active):
        if entry.name.endswith(suffix):
            with contextlib.suppress(FileNotFoundError):
                os.utime(entry.path, (now, now), follow_symlinks=False)
                renewed += 1
    return renewed


def expired(spool: Spool, now: float, lease: float) -> list[Candidate]:
    """Claims of other owners not renewed for `lease` seconds: theirs no longer."""
    found = []
    for entry in os.scandir(spool.active):
        msg_id, dot, owner = entry.name.partition(".")
        if not dot or owner == spool.owner or not ids.is_valid(msg_id):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if age > lease:
            found.append(Candidate(Path(entry.path), entry.name, "recovered", msg_id))
    return found

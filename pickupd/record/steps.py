"""How an outcome is carried out: a list of steps, each a move in the spool and what follows
it (a log line, counts, hooks). The moves run where the spool's disk says (spool/disk.py: in
a thread on a network file system), what follows them on the loop.

When a move fails (a full disk), `SpoolWriteError` carries a `resume()` that runs the rest,
from that move on, as `run` does (the moves where the disk says, what follows them on the
loop, whichever runner began): the dispatcher keeps the message and calls it again later
(spool/stranded.py), so nothing is logged twice or lost, and the message never leaves
active/ half-moved. A claim that another process took over meanwhile is said once
(`claim_lost`) and not retried.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from pickupd.errors import SpoolWriteError
from pickupd.log import Logger
from pickupd.spool.disk import Disk
from pickupd.spool.folders import Claimed

__all__ = ["Step", "Steps"]

# A move in the spool, and what follows it once it is done.
Step = tuple[Callable[[], None], Callable[[], None]]


class Steps:
    """Runs an outcome's steps for one claimed message."""

    def __init__(self, disk: Disk | None, log: Callable[[], Logger]) -> None:
        """`disk`: where the moves run (None: here, at once); `log`: the logger in force."""
        self.disk = disk
        self._log = log

    async def run(self, claimed: Claimed, steps: list[Step]) -> None:
        """Each move where the disk says, then what follows it; SpoolWriteError (resumable)
        if a move fails."""
        for index, (move, after) in enumerate(steps):
            try:
                await self.disk.run(move) if self.disk else move()
            except OSError as exc:
                self._stopped(claimed, steps[index:], exc)
                return
            after()

    def run_now(self, claimed: Claimed, steps: list[Step]) -> None:
        """Each move, then what follows it, here and now (where nothing can be awaited: a
        lane cancelled at shutdown)."""
        for index, (move, after) in enumerate(steps):
            try:
                move()
            except OSError as exc:
                self._stopped(claimed, steps[index:], exc)
                return
            after()

    def _stopped(self, claimed: Claimed, rest: list[Step], exc: OSError) -> None:
        """A move failed: SpoolWriteError, whose resume() runs `rest` (the failed move on);
        nothing to resume if the claim was taken over."""
        if not self._lost(claimed, exc):
            resume = functools.partial(self.run, claimed, rest)
            raise SpoolWriteError(claimed.id, resume, exc) from exc

    def _lost(self, claimed: Claimed, exc: OSError) -> bool:
        """Our claim is no longer in active/: another process took it over (its lease had
        expired while we held it), and records it. Said once; nothing to retry."""
        if not isinstance(exc, FileNotFoundError) or os.path.lexists(claimed.path):
            return False
        self._log().error(
            "claim_lost",
            id=claimed.id,
            detail="its claim was taken over by another process (lease expired): it records it",
        )
        return True

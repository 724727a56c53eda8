"""More than one core: `[dispatch] workers = N` dispatcher processes on one spool, and how
they share it out.

The main process (`pickupd run`) is worker 0 and the supervisor of workers 1..N-1
(supervisor.py), which are `pickupd run` processes of their own, started with
PICKUPD_WORKER="k/N" and linked to it by a pipe each way (uplink.py). Each takes its part of
the work and nothing else: a file whose name hashes to k (`owns`), so no two processes race
for the same claim, and each claims under its own owner token, as several hosts sharing one
spool do (recovery.py).

What must hold for the service as a whole is split, never multiplied (`portion`): each worker
gets its share of `concurrency` and of every relay's `max_connections`, so the shares add up
to the configured limit. `count` caps N where a limit is too small to split. Provider limits
are not split: every worker books its turns in the spool's one ledger (limits/ledger.py).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pickupd.errors import ConfigError

if TYPE_CHECKING:
    from pickupd.config.loading import Config

__all__ = [
    "ENV",
    "MAX_AUTO",
    "ONLY",
    "PARENT",
    "PIPE",
    "RESTARTED",
    "Part",
    "count",
    "owns",
    "portion",
    "splits",
]

ENV = "PICKUPD_WORKER"
RESTARTED = "PICKUPD_WORKER_RESTARTED"  # set for a worker started again after one died
PIPE = "PICKUPD_WORKER_FD"  # the descriptor of the pipe up to the main process
PARENT = "PICKUPD_WORKER_PARENT"  # the main process's pid
# `workers = 0` (the default) is one per core, at most this many: past a few processes the
# spool's directory operations, not the CPU, set the pace, and each process costs memory.
MAX_AUTO = 4


@dataclass(frozen=True, slots=True)
class Part:
    """Worker `index` of `total`; the main process also takes the share of each worker in
    `covering` (one that is down) until it is back."""

    index: int = 0
    total: int = 1
    covering: frozenset[int] = frozenset()

    @classmethod
    def from_env(cls) -> Part | None:
        """The part this process plays when the main process started it, else None."""
        value = os.environ.get(ENV)
        if not value:
            return None
        index, _, total = value.partition("/")
        return cls(int(index), int(total))

    def share(self, amount: int) -> int:
        """This worker's share of `amount`: the shares of all workers add up to `amount`."""
        return max(1, amount // self.total + (1 if self.index < amount % self.total else 0))


# The whole service in one process.
ONLY = Part()


def owns(part: Part, name: str) -> bool:
    """Whether the file `name` (in pickup/ or deferred/) is this worker's to take."""
    if part.total == 1:
        return True
    if name.endswith(".json"):  # a sidecar goes with its message
        name = name[:-5] + ".eml"
    share = zlib.crc32(name.encode("utf-8", "surrogateescape")) % part.total
    return share == part.index or share in part.covering


def count(config: Config, cores: int | None) -> tuple[int, str | None]:
    """How many workers to run, and why fewer than asked (None if as asked)."""
    asked = config.dispatch.workers or min(cores or 1, MAX_AUTO)
    if asked == 1:
        return 1, None
    if os.name != "posix":
        return 1, "workers run on POSIX systems only"
    smallest: list[tuple[int, str]] = [(config.dispatch.concurrency, "dispatch.concurrency")]
    for relay in config.relays.values():
        smallest.append((relay.max_connections, f"relays.{relay.name}.max_connections"))
    least, key = min(smallest)
    if least < asked:
        return least, f"{key} = {least} cannot be split among {asked} processes"
    return asked, None


def splits(config: Config, total: int) -> None:
    """ConfigError unless every limit of `config` can be shared out among the `total` running
    workers (a reload cannot change their number: a limit lowered below it needs a restart)."""
    fits, why = count(dataclasses.replace(config, dispatch=dataclasses.replace(
        config.dispatch, workers=total)), None)  # fmt: skip
    if fits < total:
        raise ConfigError(
            [f"{config.path}: {why}: restart pickupd to run {fits} worker(s), or raise it"]
        )


def portion(config: Config, part: Part) -> Config:
    """`config` as worker `part` applies it: its share of every limit of the service."""
    if part.total == 1:
        return config
    relays = {
        name: dataclasses.replace(relay, max_connections=part.share(relay.max_connections))
        for name, relay in config.relays.items()
    }
    dispatch = dataclasses.replace(
        config.dispatch, concurrency=part.share(config.dispatch.concurrency)
    )
    return dataclasses.replace(config, dispatch=dispatch, relays=relays)

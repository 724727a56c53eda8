"""The quota ledger: before a transaction, its turn is booked against every limit that applies
(all or nothing); afterwards what the server did not take is given back.

Two ledgers keep the same books (windows.py): `SpoolLedger`, a file in the spool that every
process on the spool shares (the workers of one host), and `RedisLedger` (store.py), which a
fleet shares. Both also keep the pauses providers ask for (a throttled relay, a mailbox whose
daily quota is spent) and the leases on connections, so a pause or a lease holds for every
process that uses the same ledger, and across a restart.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pickupd.config.limits import LimitsConfig
from pickupd.limits.replies import PAUSE_MAX, SPENT, TENANT
from pickupd.limits.windows import Key, Window, earliest
from pickupd.log import Logger
from pickupd.units import Limit

try:
    import fcntl
except ImportError:  # Windows: one process per spool there
    fcntl = None  # type: ignore[assignment]

__all__ = ["FILE", "LONGEST_PAUSE", "Ledger", "Need", "SpoolLedger", "Turn", "open_ledger"]

FILE = "ledger.json"
# The longest pause pickupd sets (a spent daily quota): one read from a store that is longer
# was not written by pickupd, and holds mail no longer than this.
LONGEST_PAUSE = max(SPENT, TENANT, PAUSE_MAX)


@dataclass(frozen=True, slots=True)
class Need:
    """What one message takes of one limit: `amount` (1 message, or its recipients) under
    `key`, the ledger's name for the scope and the limit. `shard` keeps the keys of one
    relay together (a Redis Cluster hash tag); `scope` is how the config names it."""

    key: str
    limit: Limit
    amount: int
    scope: str
    shard: str

    @property
    def window(self) -> Window:
        return Window.of(self.limit.amount, self.limit.window)


@dataclass(frozen=True, slots=True)
class Turn:
    """A booked turn: the message may go at `at` (the ledger's clock, seconds), booked in
    `booked` (need, bucket). `never` is a need that no window can ever take; `paused` the
    scope whose pause it waits for; `room` what each need's limit has left after it."""

    at: float
    now: float
    booked: tuple[tuple[Need, int], ...] = ()
    never: Need | None = None
    paused: str | None = None  # the scope whose pause it waits for, and why
    why: str = ""
    room: tuple[int, ...] = ()
    # Nothing booked: the first room is further ahead than the message's class may book
    # (`at` is when that room is, as an estimate).
    full: bool = False


class Ledger(abc.ABC):
    """What the dispatcher asks of a ledger. Times are the ledger's clock, in seconds."""

    name = "ledger"

    @abc.abstractmethod
    async def reserve(
        self, needs: Sequence[Need], scopes: Sequence[str], ahead: float | None = None
    ) -> Turn:
        """A turn for a message under `needs`, held by the pauses of `scopes`, at most
        `ahead` seconds from now (None: however far; else a Turn that is `full`)."""

    @abc.abstractmethod
    async def refund(self, turn: Turn, recipients: int, message: bool) -> None:
        """Give back `recipients` unused recipients of `turn`, and its message if `message`."""

    @abc.abstractmethod
    async def pause(self, scope: str, seconds: float, why: str) -> float:
        """Pause `scope` (an account, a mailbox) for `seconds` from now (or longer, if it is
        paused longer already), because `why`; return how long it is paused from now (in
        seconds: the same on every clock)."""

    @abc.abstractmethod
    async def paused_for(self, scope: str) -> float:
        """How long `scope` stays paused from now (0: not paused): a held turn booked after a
        pause that has gone (an operator removed it) need not wait for it."""

    @abc.abstractmethod
    async def lease(self, key: str, most: int, holder: str, ttl: float) -> bool:
        """One of `most` connections under `key` for `holder`, for `ttl` seconds, renewed by
        asking again; False while all are held."""

    @abc.abstractmethod
    async def release(self, key: str, holder: str) -> None:
        """Give back the connection `holder` holds under `key`."""

    async def close(self) -> None:  # noqa: B027 (most ledgers hold nothing open)
        """Let go of what the ledger holds open."""


def refunds(turn: Turn, recipients: int, message: bool) -> list[tuple[Need, int, int]]:
    """(need, bucket, amount) to give back for a turn that used less than it booked."""
    back = []
    for need, bucket in turn.booked:
        if need.limit.unit == "recipients" and recipients:
            back.append((need, bucket, min(recipients, need.amount)))
        elif need.limit.unit == "messages" and message:
            back.append((need, bucket, need.amount))
    return back


@dataclass(slots=True)
class Books:
    """The ledger's state as the spool file holds it."""

    keys: dict[str, Key] = field(default_factory=dict)
    pauses: dict[str, tuple[float, str]] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)  # when a key's turns are all past

    @classmethod
    def load(cls, raw: bytes) -> Books:
        try:
            doc = json.loads(raw) if raw.strip() else {}
            keys = {
                name: Key({int(b): int(n) for b, n in k["c"].items()}, int(k["t"]))
                for name, k in doc.get("keys", {}).items()
            }
            expires = {name: float(at) for name, at in doc.get("expires", {}).items()}
            pauses = {scope: (float(p[0]), str(p[1])) for scope, p in doc.get("pauses", {}).items()}
            return cls(keys, pauses, dict(doc.get("leases", {})), expires)
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls()  # a torn or foreign file: start again (the windows err on room)

    def dump(self) -> bytes:
        keys = {name: {"t": k.tail, "c": k.counts} for name, k in self.keys.items() if k.counts}
        expires = {name: at for name, at in self.expires.items() if name in keys}
        doc = {"keys": keys, "pauses": self.pauses, "leases": self.leases, "expires": expires}
        return json.dumps(doc).encode()

    def forget_old(self, now: float) -> None:
        self.pauses = {scope: p for scope, p in self.pauses.items() if p[0] > now}
        for name, held in list(self.leases.items()):
            held = {holder: end for holder, end in held.items() if end > now}
            if held:
                self.leases[name] = held
            else:
                del self.leases[name]
        for name, at in list(self.expires.items()):
            if at < now:
                del self.expires[name]
                self.keys.pop(name, None)


def book(
    books: Books,
    needs: Sequence[Need],
    scopes: Sequence[str],
    now: float,
    scale: int = 1,
    ahead: float | None = None,
) -> Turn:
    """Book a turn in `books` at `now` or later, at most `ahead` seconds later (the
    arithmetic both ledgers share; `scale` divides every amount: a host's share when the
    fleet's store is down)."""
    at_ms, paused, why = int(now * 1000), None, ""
    for scope in scopes:
        until, says = books.pauses.get(scope, (0.0, ""))
        if int(until * 1000) > at_ms:
            at_ms, paused, why = int(until * 1000), scope, says
    found: list[tuple[Need, Window, Key, int]] = []
    for need in needs:
        window = Window.of(max(1, need.limit.amount // scale), need.limit.window)
        key = books.keys.setdefault(need.key, Key())
        bucket = earliest(key, window, need.amount, at_ms)
        if bucket is None:
            return Turn(at=now, now=now, never=need)
        found.append((need, window, key, bucket))
    # Each key fits at its earliest bucket and at any later time (windows.py): so all fit at
    # the latest of them.
    at_ms = max([at_ms] + [bucket * window.size_ms for _, window, _, bucket in found])
    if ahead is not None and at_ms > int((now + ahead) * 1000):
        return Turn(at_ms / 1000, now, paused=paused, why=why, full=True)
    booked = []
    for need, window, key, _ in found:
        bucket = at_ms // window.size_ms
        key.book(window, bucket, need.amount, int(now * 1000))
        books.expires[need.key] = (key.tail + window.span + 1) * window.size_ms / 1000
        booked.append((need, bucket))
    room = tuple(key.room(window, int(now * 1000)) for _, window, key, _ in found)
    at = now if at_ms <= int(now * 1000) else at_ms / 1000
    return Turn(at, now, tuple(booked), paused=paused, why=why, room=room)


class SpoolLedger(Ledger):
    """The ledger as a file in the spool, locked for each change: every process on this spool
    shares it (the workers of one host, and hosts on one spool where its locks hold).
    Each call takes tens of microseconds: it runs on the event loop."""

    name = "spool"

    def __init__(self, path: Path, scale: int = 1) -> None:
        self.path = path
        self.scale = scale
        self._fd: int | None = None
        self._seen: tuple[tuple[int, int], Books] | None = None  # the file's stamp, as read
        self._mine: tuple[bytes, Books] | None = None  # what this process wrote last

    @contextlib.contextmanager
    def _books(self) -> Iterator[Books]:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fd = self._fd
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0) if size else b""
            # The file as this process last wrote it (the one process of a service, mostly):
            # the books it holds are the ones in memory, no need to parse them again.
            mine, self._mine = self._mine, None
            books = mine[1] if mine is not None and mine[0] == raw else Books.load(raw)
            yield books
            books.forget_old(time.time())
            data = books.dump()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            self._mine = (data, books)
        finally:
            if fcntl is not None:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def seed(self, booked: Mapping[str, tuple[Window, Mapping[int, int]]]) -> None:
        """Count what was booked elsewhere (key -> its window, bucket -> amount) in these
        books too, each bucket at least that much (so seeding twice counts once)."""
        if not booked:
            return
        with self._books() as books:
            for name, (window, buckets) in booked.items():
                key = books.keys.setdefault(name, Key())
                for bucket, amount in buckets.items():
                    key.counts[bucket] = max(key.counts.get(bucket, 0), amount)
                    key.tail = max(key.tail, bucket)
                expires = (key.tail + window.span + 1) * window.size_ms / 1000
                books.expires[name] = max(books.expires.get(name, 0.0), expires)

    def book(
        self, needs: Sequence[Need], scopes: Sequence[str], now: float, ahead: float | None = None
    ) -> Turn:
        if not needs:
            return book(self._read(), needs, scopes, now, self.scale, ahead)
        with self._books() as books:
            return book(books, needs, scopes, now, self.scale, ahead)

    def _read(self) -> Books:
        """The books, for a look at the pauses only: read again only when the file changed
        (most messages are under no counted limit, and a stat is all they cost)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        st = os.fstat(self._fd)
        stamp = (st.st_mtime_ns, st.st_size)
        if self._seen is None or self._seen[0] != stamp:
            if fcntl is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_SH)
            try:
                st = os.fstat(self._fd)
                stamp = (st.st_mtime_ns, st.st_size)
                self._seen = (stamp, Books.load(os.pread(self._fd, st.st_size, 0)))
            finally:
                if fcntl is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)
        return self._seen[1]

    async def reserve(
        self, needs: Sequence[Need], scopes: Sequence[str], ahead: float | None = None
    ) -> Turn:
        return self.book(needs, scopes, time.time(), ahead)

    async def refund(self, turn: Turn, recipients: int, message: bool) -> None:
        back = refunds(turn, recipients, message)
        if back:
            with self._books() as books:
                for need, bucket, amount in back:
                    books.keys.setdefault(need.key, Key()).refund(bucket, amount)

    async def pause(self, scope: str, seconds: float, why: str) -> float:
        now = time.time()
        with self._books() as books:
            held = books.pauses.get(scope)
            if held is None or held[0] < now + seconds:
                books.pauses[scope] = held = (now + seconds, why)
            return held[0] - now

    async def paused_for(self, scope: str) -> float:
        held = self._read().pauses.get(scope)
        return 0.0 if held is None else min(max(0.0, held[0] - time.time()), LONGEST_PAUSE)

    async def lease(self, key: str, most: int, holder: str, ttl: float) -> bool:
        now = time.time()
        with self._books() as books:
            held = {h: end for h, end in books.leases.get(key, {}).items() if end > now}
            if holder not in held and len(held) >= most:
                return False
            held[holder] = now + ttl
            books.leases[key] = held
            return True

    async def release(self, key: str, holder: str) -> None:
        with self._books() as books:
            books.leases.get(key, {}).pop(holder, None)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_ledger(
    config: LimitsConfig, spool: Path, log: Callable[[], Logger], up: Callable[[bool], None]
) -> Ledger:
    """The ledger `[limits]` names: the fleet's store, or the spool's file. `log`: the logger
    in force; `up(bool)`: the store answers, or not (for the metrics)."""
    if config.store is None:
        return SpoolLedger(spool / FILE)
    from pickupd.limits.store import RedisLedger  # imports redis-py

    return RedisLedger(config, spool, log, up)

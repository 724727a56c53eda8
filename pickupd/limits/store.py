"""The ledger in Redis, shared by every pickupd process and host that names the same store.

Why redis-py's asyncio client and our own Lua, not the `limits` library: a turn must be booked
against several limits at once, all or nothing, possibly in the future (a burst spread over
its window), and in one round trip; `limits` checks one key at a time, only for now, and keeps
the clock of each client. The script does the arithmetic of windows.py on the server, with
the server's clock (TIME), so a fleet has one clock.

Keys: `pickupd:{<relay host>}:<scope>/<unit>/<window>`, a hash of bucket -> count plus the
tail (`t`) and the sum of the buckets kept (`s`: while it leaves room, a turn needs no bucket
read); pauses `pickupd:{<relay host>}:pause:<scope>`; connection leases a sorted set.
The hash tag keeps the keys of one message in one Redis Cluster slot; every key expires by
itself once no window can reach it. This module (and redis-py) is imported only when a store
is configured.

A turn the store does not answer within `[limits] wait` (100 ms) is booked on the host's
share of every limit (`[limits] hosts`), in a file beside the spool's ledger, and added to the
store later. After three late answers in a row, or at once when the store refuses us or
cannot be reached, the store is down: every turn goes on the share, and the store is tried
again with backoff; what was booked meanwhile is added to it when it is back. So relaying
neither stops nor exceeds the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import redis
import redis.asyncio
import redis.exceptions

from pickupd.config.limits import LimitsConfig, shown_url
from pickupd.errors import SessionError
from pickupd.limits.batches import Batches
from pickupd.limits.booked import Booked
from pickupd.limits.ledger import LONGEST_PAUSE, Ledger, Need, SpoolLedger, Turn, refunds
from pickupd.limits.scripts import ADD, LEASE, PAUSE, PAUSED, REFUND, RESERVE
from pickupd.log import Logger

__all__ = ["BACKOFF_MAX", "FALLBACK", "RedisLedger", "probe"]

T = TypeVar("T")
FALLBACK = "ledger.fallback.json"
BACKOFF_FIRST = 0.5
SLOW_STRIKES = 3
BACKOFF_MAX = 30.0


def _pack(args: tuple[Any, ...]) -> list[bytes]:
    """A command in RESP, packed by hiredis in C: redis-py's asyncio client packs in Python,
    half of its cost of a turn (bench/ledger.py)."""
    if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": two words on the wire
        args = (*args[0].split(), *args[1:])
    return [hiredis.pack_command(args)]


class _Packed(redis.asyncio.Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


class _PackedSSL(redis.asyncio.SSLConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


def _key(shard: str, name: str) -> str:
    return f"pickupd:{{{shard}}}:{name}"


class RedisLedger(Ledger):
    """The ledger in Redis, with a host's share in the spool while Redis is away."""

    name = "redis"

    def __init__(
        self,
        config: LimitsConfig,
        spool: Path,
        log: Callable[[], Logger],
        up: Callable[[bool], None],
    ) -> None:
        """`log`: the logger in force (swapped on reload); `up(bool)`: the store's gauge."""
        assert config.store is not None
        self.config = config
        self.url = shown_url(config.store)
        self.redis = _client(config)
        self._refund = self.redis.register_script(REFUND)
        self._add = self.redis.register_script(ADD)
        self._pause = self.redis.register_script(PAUSE)
        self._paused_for = self.redis.register_script(PAUSED)
        self._lease = self.redis.register_script(LEASE)
        self.fallback = SpoolLedger(spool / FALLBACK, scale=config.hosts)
        self._log = log
        self._up = up
        self._down: str | None = None  # why the store is away, while it is
        self._spent: list[tuple[Need, int, int]] = []  # booked on the fallback meanwhile
        # What this host booked in the store lately: its share while the store is away
        # starts from it.
        self._booked = Booked(config.hosts)
        self._seeded = False
        self._paused: list[tuple[str, float, str]] = []  # pauses set meanwhile (local clock)
        self._retry: asyncio.Task[None] | None = None
        self._late = 0  # late answers in a row
        self._catching_up: asyncio.Task[None] | None = None
        self.round_trips = 0  # to the store (for the log)
        self._turns = Batches(self.redis, RESERVE, self._call)

    @property
    def down(self) -> bool:
        return self._down is not None

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T | None:
        """One round trip, or None: the caller then uses the host's share. A store that
        refuses or is unreachable is down at once; one that is slow, after SLOW_STRIKES
        late answers in a row (one late answer is as often a busy event loop here)."""
        if self._down is not None:
            return None
        self.round_trips += 1
        try:
            async with asyncio.timeout(self.config.wait):  # no task of its own, as wait_for
                got = await work()
        except TimeoutError:
            self._late += 1
            if self._late >= SLOW_STRIKES:
                self._went_down(f"no answer within {self.config.wait * 1000:.0f} ms")
            return None
        except Exception as exc:  # redis errors, OSError, ssl errors: all mean "not now"
            self._went_down(_why(exc))
            return None
        self._late = 0
        if self._spent and self._catching_up is None:
            # Turns booked on the share while the store was late: add them to it.
            self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())
        return got

    async def _catch_up(self) -> None:
        try:
            await asyncio.wait_for(self._replay(), max(self.config.wait * 10, 2.0))
        except Exception:  # kept: the next success or the reconnect tries again
            pass
        finally:
            self._catching_up = None

    def _went_down(self, why: str) -> None:
        if self._down is not None:
            return
        self._down = why
        self._up(False)
        self._log().error(
            "limit_store_down",
            store=self.url,
            detail=why,
            share=f"1/{self.config.hosts} of each limit until it is back",
        )
        self._retry = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay, since = BACKOFF_FIRST, time.monotonic()
        while True:
            await asyncio.sleep(delay)
            try:
                # Connections from before the outage are dead even if the server is back.
                await self.redis.connection_pool.disconnect()
                await asyncio.wait_for(self.redis.ping(), max(self.config.wait, 1.0))
                await asyncio.wait_for(self._replay(), max(self.config.wait * 10, 2.0))
            except Exception as exc:
                self._down = _why(exc)
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            self._down = None
            self._up(True)
            self._log().info(
                "limit_store_up", store=self.url, down_seconds=round(time.monotonic() - since, 1)
            )
            return

    async def _replay(self) -> None:
        """What this host booked and paused while the store was away, added to it."""
        spent, self._spent = self._spent, []
        try:
            if spent:
                keys = [_key(need.shard, need.key) for need, _, _ in spent]
                args: list[int] = []
                for need, bucket, amount in spent:
                    window = need.window
                    args += [bucket, amount, (bucket + window.span + 1) * window.size_ms]
                await self._add(keys=keys, args=args)
            for scope, until, why in self._paused:  # ends on this host's clock
                left = until - time.time()
                if left > 0:
                    shard = _shard([scope])
                    await self._pause(
                        keys=[_key(shard, f"pause:{scope}")], args=[int(left * 1000), why]
                    )
            self._paused = []
        except BaseException:
            self._spent = spent + self._spent
            raise

    async def reserve(
        self, needs: Sequence[Need], scopes: Sequence[str], ahead: float | None = None
    ) -> Turn:
        shard = needs[0].shard if needs else _shard(scopes)
        keys = [_key(n.shard, n.key) for n in needs]
        keys += [_key(shard, f"pause:{scope}") for scope in scopes]
        args: list[Any] = [len(needs), len(scopes)]
        for need in needs:
            window = need.window
            args += [window.amount, window.size_ms, window.span, need.amount]
        args.append(int(LONGEST_PAUSE * 1000))
        args.append(-1 if ahead is None else int(ahead * 1000))
        got = None if self._down is not None else await self._turns.run(keys, args)
        if got is None:
            if not self._seeded:
                # The share counts what this host booked in the store in the windows that are
                # still open: a host that spent its share before the outage does not spend
                # it again during it (for a daily limit, that would block the mailbox a day).
                self.fallback.seed(self._booked.seed())
                self._seeded = True
            turn = self.fallback.book(needs, scopes, time.time(), ahead)
            if turn.never is None:
                self._spent += [(need, bucket, need.amount) for need, bucket in turn.booked]
            return turn
        self._seeded = False
        at, now, never, paused = (int(x) for x in got[:4])
        why = got[4].decode() if isinstance(got[4], bytes) else str(got[4])
        scope = scopes[paused - 1] if paused else None
        if never:  # -1: nothing booked, the room is further than the class may book
            full, over = never < 0, None if never < 0 else needs[never - 1]
            return Turn(at / 1000, now / 1000, never=over, paused=scope, why=why, full=full)
        rest = [int(x) for x in got[5:]]
        booked = tuple((need, rest[2 * i]) for i, need in enumerate(needs))
        self._booked.add([(need, bucket, need.amount) for need, bucket in booked])
        room = tuple(rest[2 * i + 1] for i in range(len(needs)))
        for (need, bucket), left in zip(booked, room, strict=True):
            self._booked.heard(need, bucket, left)
        return Turn(at / 1000, now / 1000, booked, paused=scope, why=why, room=room)

    async def refund(self, turn: Turn, recipients: int, message: bool) -> None:
        back = refunds(turn, recipients, message)
        if not back:
            return
        keys = [_key(need.shard, need.key) for need, _, _ in back]
        args = [x for _, bucket, amount in back for x in (bucket, amount)]
        if await self._call(lambda: self._refund(keys=keys, args=args)) is None:
            await self.fallback.refund(turn, recipients, message)
        else:
            self._booked.add(back, -1)

    async def pause(self, scope: str, seconds: float, why: str) -> float:
        key = _key(_shard([scope]), f"pause:{scope}")
        got = await self._call(lambda: self._pause(keys=[key], args=[int(seconds * 1000), why]))
        if got is None:
            self._paused.append((scope, time.time() + seconds, why))
            return await self.fallback.pause(scope, seconds, why)
        held, server_now = int(got[0]), int(got[1])
        return (held - server_now) / 1000

    async def paused_for(self, scope: str) -> float:
        key = _key(_shard([scope]), f"pause:{scope}")
        got = await self._call(
            lambda: self._paused_for(keys=[key], args=[int(LONGEST_PAUSE * 1000)])
        )
        if got is None:
            return await self.fallback.paused_for(scope)
        return int(got) / 1000

    async def lease(self, key: str, most: int, holder: str, ttl: float) -> bool:
        name = _key(_shard([key]), key)
        got = await self._call(
            lambda: self._lease(keys=[name], args=[most, holder, int(ttl * 1000)])
        )
        if got is None:
            share = max(1, most // self.config.hosts)
            return await self.fallback.lease(key, share, holder, ttl)
        return bool(int(got))

    async def release(self, key: str, holder: str) -> None:
        name = _key(_shard([key]), key)
        if await self._call(lambda: self.redis.zrem(name, holder)) is None:
            await self.fallback.release(key, holder)

    async def close(self) -> None:
        self._log().info(
            "limit_store_closed", round_trips=self.round_trips, turns=self._turns.turns
        )
        self._turns.cancel()
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(BaseException):
                await self._retry
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 2.0)
        await self.fallback.close()


_SHARD = re.compile(r"^(?:account|mailbox):(\[[^\]]*\]|[^:/]+)")


def _client(config: LimitsConfig) -> redis.asyncio.Redis:
    """The store's client as `[limits]` describes it (TLS verified, the password apart)."""
    assert config.store is not None
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": max(config.wait, 1.0),
        "socket_timeout": max(config.wait * 10, 1.0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
        "client_name": f"pickupd-{socket.gethostname()}-{os.getpid()}",
    }
    if config.password is not None:
        kwargs["password"] = config.password.reveal()
    if config.store.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if config.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(config.ca_file)
    secure = config.store.startswith("rediss://")
    kwargs["connection_class"] = _PackedSSL if secure else _Packed
    return redis.asyncio.Redis.from_url(config.store, **kwargs)


async def probe(config: LimitsConfig) -> str:
    """`pickupd check --connect` on the store: log in, and load the scripts the ledger runs
    (an ACL that forbids one shows here, not at the first turn). What it proved, or
    SessionError saying what failed."""
    client = _client(config)
    try:
        await client.ping()
        version = (await client.info("server")).get("redis_version", "?")
        for script in (RESERVE, REFUND, ADD, PAUSE, PAUSED, LEASE):
            await client.script_load(script)
    except (redis.RedisError, OSError) as exc:
        raise SessionError(_why(exc)) from None
    finally:
        await client.aclose()
    tls = ", TLS verified" if (config.store or "").startswith("rediss://") else ""
    return f"ok: Redis {version}{tls}, logged in, the ledger's scripts loaded"


def _shard(names: Sequence[str]) -> str:
    """The relay host in "account:<host>[:<user>]" or "mailbox:<host>:<user>[/...]"."""
    for name in names:
        match = _SHARD.match(name)
        if match:
            return match.group(1)
    return "pickupd"


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.exceptions.AuthenticationError) or "NOAUTH" in text:
        return f"the store refused our password ({text}): check [limits] password_file"
    return text

"""The turns asked of the Redis store, sent together: while one pipeline is on its way, the
turns asked for meanwhile queue up and go together in the next (a round trip costs the client
about 100 us of CPU; a turn in a pipeline about 15, bench/ledger.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
import redis.exceptions

__all__ = ["Batches"]

Call = Callable[[Callable[[], Awaitable[list[Any]]]], Awaitable[list[Any] | None]]


class Batches:
    """One script's calls, pipelined: `run(keys, args)` is its answer, or None when the
    store did not answer (`call` says: it runs one round trip, or None when the store is
    away)."""

    def __init__(self, client: redis.asyncio.Redis, script: str, call: Call) -> None:
        self.client = client
        self.script = script
        self._call = call
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._sha: str | None = None
        self.turns = 0  # the calls asked for (for the log)

    async def run(self, keys: list[str], args: list[Any]) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, done))
        self.turns += 1
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())
        return await done

    def cancel(self) -> None:
        if self._sender is not None:
            self._sender.cancel()

    async def _send(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                got = await self._call(lambda b=batch: self._pipeline(b))  # type: ignore[misc]
                for i, (_, _, done) in enumerate(batch):
                    if not done.done():
                        done.set_result(None if got is None else got[i])
        finally:
            self._sender = None
            for _, _, done in self._queue:  # the store went down meanwhile
                if not done.done():
                    done.set_result(None)
            self._queue = []

    async def _pipeline(self, batch: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        if self._sha is None:
            self._sha = await self.client.script_load(self.script)
        out: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for _ in range(2):  # once more after NOSCRIPT: a restarted Redis forgot the script
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, args, _ = batch[i]
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            again = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError):
                    again.append(i)
                elif isinstance(result, Exception):
                    raise result
                else:
                    out[i] = result
            if not again:
                return out
            todo, self._sha = again, await self.client.script_load(self.script)
        raise redis.exceptions.NoScriptError("the script was not kept")

"""Stored refresh tokens kept alive: each is used at least every `keepalive` (its login's
`refresh_token_keepalive`), mail or not, because an idle one dies (Microsoft's after 90 days
without use, AADSTS700082) and then only a person signing in again brings it back.

The main process does it for the service; its record (auth/health.py) tells the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from pickupd.auth.logins import RefreshTokenSource
from pickupd.auth.tokencache import Tokens

__all__ = ["keep_alive"]

# Looked at this often at most (a keepalive of days needs no finer look).
_LOOK_EVERY = 3600.0


async def keep_alive(tokens: Tokens, sources: Callable[[], Iterable[RefreshTokenSource]]) -> None:
    """Until cancelled: use each of `sources()` (asked anew each round: a reload may change
    them) whose token has been idle for its keepalive."""
    while True:
        found = list(dict.fromkeys(sources()))
        for source in found:
            await tokens.keep_alive(source)
        shortest = min((source.keepalive for source in found), default=_LOOK_EVERY)
        await asyncio.sleep(min(_LOOK_EVERY, shortest / 10))

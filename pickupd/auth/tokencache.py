"""OAuth2 access tokens for the pool: cached per token source and mailbox, refreshed ahead of
their expiry without holding up sends, one request at a time per source and mailbox.

A token is used until shortly before it expires and never after: within the last
`min(60 s, a tenth of its life)` it is not presented at all. Within the last `min(300 s, half
of its life)` it is still used, and a refresh starts in the background. Workers that need the
same token at once share one request (providers rotate refresh tokens: two refreshes with the
same one fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pickupd import log as logs
from pickupd.auth.health import read_health
from pickupd.auth.logins import CommandSource, GoogleSource, RefreshTokenSource, TokenSource
from pickupd.auth.sources import Fetcher, Token
from pickupd.errors import TokenError

__all__ = ["TokenError", "Tokens", "per_mailbox"]

_AHEAD = 300.0  # refresh in the background this long before expiry (at most half the life)
_FLOOR = 60.0  # never present a token with less than this left (at most a tenth of its life)

_Key = tuple[TokenSource, str]


def _key(source: TokenSource, user: str) -> _Key:
    return source, user if per_mailbox(source) else ""


def per_mailbox(source: TokenSource) -> bool:
    """Whether a source's token depends on the mailbox (a Google subject, a command told
    $PICKUPD_MAILBOX) or serves every mailbox (Microsoft app-only, a refresh-token grant)."""
    return isinstance(source, GoogleSource | CommandSource)


class Tokens:
    """The tokens of one process (the daemon, or one `check --connect`)."""

    def __init__(self, fetcher: Fetcher | None = None) -> None:
        self._fetcher = fetcher or Fetcher()
        self._tokens: dict[_Key, Token] = {}
        self._inflight: dict[_Key, asyncio.Task[Token]] = {}

    async def get(self, source: TokenSource, user: str) -> Token:
        """A token fit to present now for `user`; TokenError if none can be had."""
        key = _key(source, user)
        token = self._tokens.get(key)
        now = time.time()
        if token is not None and token.expires_at - now > _margin(token, _FLOOR, 10):
            if token.expires_at - now <= _margin(token, _AHEAD, 2):
                self._start(key, user, background=True)
            return token
        return await asyncio.shield(self._start(key, user, background=False))

    async def keep_alive(self, source: RefreshTokenSource) -> bool:
        """Use the refresh token now if it has not worked for `source.keepalive` (an idle
        one dies), or never has as far as its record knows (so a new one is tried at once);
        True if it was used. A failure is logged, as any refresh's."""
        worked = read_health(source.refresh_token_file).worked
        if worked is not None and time.time() - worked < source.keepalive:
            return False
        with contextlib.suppress(TokenError):
            await asyncio.shield(self._start(_key(source, ""), "", background=False))
        return True

    def invalidate(self, source: TokenSource, user: str, token: Token) -> None:
        """The relay refused `token`: never present it again, and fetch afresh next time."""
        key = _key(source, user)
        if self._tokens.get(key) is token:
            del self._tokens[key]
        self._fetcher.forget(source)

    def _start(self, key: _Key, user: str, *, background: bool) -> asyncio.Task[Token]:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key, user))
            self._inflight[key] = task
        if background:
            # A failed refresh ahead of time costs nothing yet: the old token still serves
            # (the failure is logged); whoever needs a new one awaits the task and sees it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task

    async def _fetch(self, key: _Key, user: str) -> Token:
        source = key[0]
        log = logs.get()
        try:
            token = await asyncio.to_thread(self._fetcher.fetch, source, user)
        except TokenError as exc:
            log.warning("token_failed", user=user, detail=str(exc))
            if exc.refused_now and isinstance(source, RefreshTokenSource):
                log.error(
                    "refresh_token_refused",
                    file=str(source.refresh_token_file),
                    detail=str(exc),
                    action="the grant is gone (revoked, or unused too long): a person must"
                    " sign in again and write the new refresh token to this file; pickupd"
                    " uses it at its next try, no restart needed",
                )
            raise
        except Exception as exc:
            # A bug in a library or in us: logged with its traceback, and a TokenError for
            # whoever waits, so a background refresh never fails without a word.
            log.exception("token_failed", user=user, detail=f"{type(exc).__name__}: {exc}")
            raise TokenError(source.describe(), f"unexpected error: {exc}") from exc
        finally:
            self._inflight.pop(key, None)
        self._tokens[key] = token
        log.info(
            "token_acquired",
            source=source.describe(),
            user=user,
            expires_in=round(token.expires_at - time.time()),
        )
        return token


def _margin(token: Token, most: float, fraction: int) -> float:
    return min(most, (token.expires_at - token.fetched_at) / fraction)

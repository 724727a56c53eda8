"""SMTP sessions kept open between messages, keyed by relay *and* login.

A session is logged in as someone: one authenticated for one sender's credentials never
carries mail for other credentials (Postfix disables its cache for that reason; we key it).
An OAuth2 login is keyed by its token source and mailbox, not by the token: a refreshed token
does not close the sessions that logged in with the one before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from pickupd.auth.logins import Credentials, XOAuth2
from pickupd.auth.tokencache import Tokens
from pickupd.config.loading import RelayConfig
from pickupd.config.routing import MAX_SESSION_AGE
from pickupd.errors import AuthNotOffered, ConnectionsBusy, StartTLSNotOffered, TLSHandshakeFailed
from pickupd.limits.ledger import Ledger

__all__ = ["LEASE_TTL", "MAX_SESSION_AGE", "Pool", "Session", "SessionKey"]

# A connection lease (a mailbox's "3 connections", limits/ledger.py) lasts this long past its
# last renewal, so a host that dies frees its leases within a minute or two; a session renews
# its lease when it is taken from the pool and the lease is a third of this old.
LEASE_TTL = 60.0

# How long a closing session may take to say goodbye before it is cut.
QUIT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What a session is bound to. Any change in the config gives a new key (and new sessions)."""

    relay: str
    host: str
    port: int
    security: str
    ca_file: Path | None
    login: Credentials | XOAuth2 | None

    @classmethod
    def of(cls, relay: RelayConfig, login: Credentials | XOAuth2 | None) -> SessionKey:
        return cls(relay.name, relay.host, relay.port, relay.security, relay.ca_file, login)


@dataclass(slots=True, eq=False)
class Session:
    """One open, greeted (and if need be authenticated) SMTP connection."""

    key: SessionKey
    smtp: aiosmtplib.SMTP
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages: int = 0
    clean: bool = True  # no transaction left open on it
    leases: tuple[str, ...] = ()  # the connection leases it holds (ledger keys)
    holder: str = ""
    leased_at: float = 0.0

    def fresh(self, relay: RelayConfig, now: float) -> bool:
        return (
            self.smtp.is_connected
            and self.messages < relay.max_messages_per_connection
            and now - self.opened_at < MAX_SESSION_AGE
        )


class Pool:
    """At most `max_connections` sessions per relay, shared by all workers of a dispatcher."""

    def __init__(self, tokens: Tokens | None = None, ledger: Ledger | None = None) -> None:
        self.tokens = tokens or Tokens()
        self.ledger = ledger  # for connection leases
        self.closing: list[Callable[[], Awaitable[None]]] = []
        self._serial = itertools.count(1)
        self._idle: dict[SessionKey, list[Session]] = {}
        self._open: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._tls: dict[Path | None, ssl.SSLContext] = {}
        self._quitting: set[asyncio.Task[None]] = set()
        self._hostname = socket.gethostname()

    async def acquire(
        self,
        relay: RelayConfig,
        login: Credentials | XOAuth2 | None,
        leases: Sequence[tuple[str, int, str]] = (),
    ) -> Session:
        """An idle session for this relay and login, or a new one once there is room (and,
        for a mailbox with a connections limit, a lease on one of its connections: `leases`
        holds (ledger key, most, where the config sets it)).

        Raises whatever connecting, TLS or AUTH raises (aiosmtplib errors, OSError, ssl
        errors), and ConnectionsBusy when no lease came within the relay's timeout.
        """
        key = SessionKey.of(relay, login)
        session: Session | None = None
        async with self._changed:
            while session is None:
                now = time.monotonic()
                idle = self._idle.get(key, [])
                while idle and session is None:
                    candidate = idle.pop()
                    if candidate.fresh(relay, now):
                        session = candidate
                    else:
                        self._close_locked(candidate)
                if session is not None:
                    break
                if self._open.get(relay.name, 0) < relay.max_connections:
                    self._open[relay.name] = self._open.get(relay.name, 0) + 1
                    break
                # Room is taken by idle sessions of other credentials: retire one of them.
                victim = self._idle_victim(relay.name, key)
                if victim is not None:
                    self._close_locked(victim)
                    continue
                await self._changed.wait()
        if session is not None:
            if session.leases and time.monotonic() - session.leased_at > LEASE_TTL / 3:
                await self._renew(session, leases)
            return session
        holder = f"{self._hostname}/{os.getpid()}/{next(self._serial)}"
        try:
            held = await self.lease(relay, leases, holder)
            try:
                session = Session(key, await self.connect(relay, login))
            except BaseException:
                await self.unlease(held, holder)
                raise
            session.leases, session.holder, session.leased_at = held, holder, time.monotonic()
            return session
        except BaseException:
            async with self._changed:
                self._open[relay.name] -= 1
                self._changed.notify_all()
            raise

    async def lease(
        self, relay: RelayConfig, leases: Sequence[tuple[str, int, str]], holder: str
    ) -> tuple[str, ...]:
        """Take one connection of every connections limit, waiting up to the relay's timeout
        for them all (never holding some while waiting for others)."""
        if not leases or self.ledger is None:
            return ()
        deadline = time.monotonic() + relay.timeout
        while True:
            held: list[str] = []
            for key, most, _ in leases:
                if not await self.ledger.lease(key, most, holder, LEASE_TTL):
                    break
                held.append(key)
            else:
                return tuple(held)
            await self.unlease(tuple(held), holder)
            if time.monotonic() >= deadline:
                _, most, where = leases[len(held)]
                raise ConnectionsBusy(
                    f"all {most} connections of {where} are open (on this host or others)"
                    f" for over {relay.timeout:g} s"
                )
            await asyncio.sleep(0.2)

    async def _renew(self, session: Session, leases: Sequence[tuple[str, int, str]]) -> None:
        assert self.ledger is not None
        most = {key: n for key, n, _ in leases}
        for key in session.leases:
            await self.ledger.lease(key, most.get(key, 1), session.holder, LEASE_TTL)
        session.leased_at = time.monotonic()

    async def unlease(self, held: tuple[str, ...], holder: str) -> None:
        if self.ledger is not None:
            for key in held:
                await self.ledger.release(key, holder)

    async def release(self, session: Session, *, reusable: bool, abort: bool = False) -> None:
        """Give a session back: kept for the next message, or closed (with QUIT, unless
        `abort`: then the connection is dropped at once)."""
        if abort:
            session.smtp.close()
        async with self._changed:
            session.last_used = time.monotonic()
            if reusable and session.smtp.is_connected:
                self._idle.setdefault(session.key, []).append(session)
            else:
                self._close_locked(session)
            self._changed.notify_all()

    async def close_idle(self, idle_timeout: dict[str, float]) -> None:
        """Close sessions idle for longer than their relay's `idle_timeout` (by relay name;
        sessions of relays no longer configured close at once)."""
        now = time.monotonic()
        async with self._changed:
            for key, sessions in list(self._idle.items()):
                limit = idle_timeout.get(key.relay, 0.0)
                for session in [s for s in sessions if now - s.last_used >= limit]:
                    sessions.remove(session)
                    self._close_locked(session)
                if not sessions:
                    del self._idle[key]
            self._changed.notify_all()

    async def close_all(self) -> None:
        """Close every idle session (politely, with QUIT, bounded in time), and what else
        registered in `closing` (the Graph transport's HTTP clients)."""
        for close in self.closing:
            await close()
        async with self._changed:
            for sessions in self._idle.values():
                for session in sessions:
                    self._close_locked(session)
            self._idle.clear()
        if self._quitting:
            await asyncio.wait(list(self._quitting), timeout=QUIT_TIMEOUT + 1)

    def _idle_victim(self, relay: str, keep: SessionKey) -> Session | None:
        for key, sessions in self._idle.items():
            if key.relay == relay and key != keep and sessions:
                return sessions.pop(0)
        return None

    def _close_locked(self, session: Session) -> None:
        """Close a session: politely (QUIT, in the background) if it is still up, so servers
        do not log a lost connection; its slot is free once it is really closed."""
        if not session.smtp.is_connected:
            session.smtp.close()
            self._open[session.key.relay] -= 1
            if session.leases:
                self._spawn(self.unlease(session.leases, session.holder))
            return
        self._spawn(self._quit(session))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def _quit(self, session: Session) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.smtp.quit(), timeout=QUIT_TIMEOUT)
        session.smtp.close()
        await self.unlease(session.leases, session.holder)
        async with self._changed:
            self._open[session.key.relay] -= 1
            self._changed.notify_all()

    def _tls_context(self, ca_file: Path | None) -> ssl.SSLContext:
        # Building a context loads the system store: tens of milliseconds, so once per file.
        if ca_file not in self._tls:
            self._tls[ca_file] = ssl.create_default_context(
                cafile=str(ca_file) if ca_file else None
            )
        return self._tls[ca_file]

    async def connect(
        self, relay: RelayConfig, login: Credentials | XOAuth2 | None
    ) -> aiosmtplib.SMTP:
        """A new session: connected, TLS as configured, greeted, logged in (not pooled; the
        pool's own sessions come from `acquire`, `check --connect` uses this directly)."""
        tls = relay.security != "none"
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            use_tls=relay.security == "tls",
            start_tls=False,  # done below, where "not offered" is an error of its own
            tls_context=self._tls_context(relay.ca_file) if tls else None,
            timeout=relay.timeout,
            local_hostname=self._hostname,
        )
        await smtp.connect()
        try:
            await _greet(smtp)
            if relay.security == "starttls":
                # Required: a server that does not offer it never sees the mail in clear.
                if not smtp.supports_extension("starttls"):
                    raise StartTLSNotOffered()
                try:
                    await smtp.starttls()
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                    raise TLSHandshakeFailed(exc) from exc
                await _greet(smtp)  # RFC 3207: what was offered before TLS no longer counts
            if isinstance(login, XOAuth2):
                await self._xoauth2(smtp, login)
            elif login is not None:
                if not smtp.supported_auth_methods:
                    raise AuthNotOffered(" ".join(smtp.server_auth_methods))
                await smtp.login(login.username, login.password.reveal())
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def _xoauth2(self, smtp: aiosmtplib.SMTP, login: XOAuth2) -> None:
        """AUTH XOAUTH2 as the mailbox. A token the server refuses as expired or revoked
        (535, 5.7.3, 4.7.x) is dropped and the login tried once more with a fresh one."""
        if "xoauth2" not in smtp.server_auth_methods:
            raise AuthNotOffered(" ".join(smtp.server_auth_methods))
        token = await self.tokens.get(login.source, login.username)
        try:
            await smtp.auth_xoauth2(login.username, token.value.reveal())
        except aiosmtplib.SMTPAuthenticationError as exc:
            if not _token_refused(exc):
                raise
            self.tokens.invalidate(login.source, login.username, token)
            fresh = await self.tokens.get(login.source, login.username)
            await smtp.auth_xoauth2(login.username, fresh.value.reveal())


def _token_refused(exc: aiosmtplib.SMTPResponseException) -> bool:
    """An AUTH reply that says the token is no good (rather than, say, a locked mailbox)."""
    text = exc.message
    return exc.code == 535 or "5.7.3" in text or (400 <= exc.code < 500 and "4.7." in text)


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (HELO if refused): aiosmtplib greets lazily, and we need the extensions (SIZE,
    8BITMIME, AUTH) before MAIL."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()

"""One message through Microsoft Graph's `sendMail`: the token, the request, the answer.

`POST {graph_url}/v1.0/users/{mailbox}/sendMail` with `Content-Type: text/plain` and the
base64 of the message (message.py); the mailbox is the login's (the envelope sender's, when
the relay's OAuth2 login names none); the app-only token is msal's, for the scope
`{graph_url}/.default`, through the token cache every login uses.

Why aiohttp: an asyncio HTTP client whose connection pool keeps connections open and reuses
them (one TLS handshake for a run of messages, not one each), with HTTP proxies, on asyncio's
own TLS transport and with a C parser for the answers: 0.14 ms of CPU a request, where
httpcore (httpx's transport, on anyio's TLS stream) took 0.34 and httpx 0.55 (bench/graph.py,
a bare client against the same endpoint). The proxy is the one the standard variables name
(HTTPS_PROXY, NO_PROXY), as urllib reads them (aiohttp's own `trust_env` would read ~/.netrc
as well).

A mailbox takes at most its "connections" limit of requests at once (Graph's 4 per app and
mailbox): this process's part of it in a semaphore, and a lease in the ledger for the
service and the fleet, as SMTP sessions hold theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pickupd.auth.logins import Credentials, MicrosoftSource, OAuth2Login, XOAuth2
from pickupd.config.loading import Config
from pickupd.config.routing import RelayConfig
from pickupd.errors import SessionError
from pickupd.graph import replies
from pickupd.graph.message import for_graph
from pickupd.outcome import Delivery, Refusal, SessionFault, session_failed
from pickupd.smtp.pool import LEASE_TTL, Pool

if TYPE_CHECKING:
    import aiohttp

__all__ = ["Graph"]


class Graph:
    """The Graph relays' HTTP clients (one per relay, its connections kept) and their sends."""

    def __init__(self, pool: Pool, processes: int = 1) -> None:
        """`pool`: for its token cache and its leases; `processes`: the service's
        dispatcher processes, which share each mailbox's requests."""
        self.pool = pool
        self.processes = processes
        # One HTTP client per relay (its connections serve every mailbox of the relay), and
        # the proxy its requests go through.
        self._clients: dict[str, tuple[aiohttp.ClientSession, str | None]] = {}
        self._slots: dict[tuple[str, str], asyncio.Semaphore] = {}
        # A mailbox's lanes not in use: each holds its leases (its part of the mailbox's
        # "4 connections") while it is used now and then, as a pooled SMTP session does.
        self._lanes: dict[tuple[str, str], list[_Lane]] = {}
        self._holder = 0
        # Told each HTTP status Graph answers (relay, status): the metrics.
        self.replied: Callable[[str, int], None] = lambda relay, status: None

    def _client(self, relay: RelayConfig) -> tuple[aiohttp.ClientSession, str | None]:
        client = self._clients.get(relay.name)
        if client is None:
            # Imported with the first Graph relay: a service that relays over SMTP alone
            # does not pay its memory (about 7 MiB a process).
            import aiohttp

            cafile = None if relay.ca_file is None else str(relay.ca_file)
            context = ssl.create_default_context(cafile=cafile)  # verified, always
            connector = aiohttp.TCPConnector(
                ssl=context,
                limit=relay.max_connections,
                keepalive_timeout=relay.idle_timeout,
            )
            limit = relay.timeout
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(connect=limit, sock_read=limit),
                # Graph's answers are small JSON: nothing to gain from compression.
                skip_auto_headers=("Accept-Encoding",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            client = self._clients[relay.name] = (session, _proxy(relay.graph_url))
        return client

    async def send(
        self,
        relay: RelayConfig,
        login: Credentials | XOAuth2 | None,
        recipients: Sequence[str],
        data: bytes,
        leases: Sequence[tuple[str, int, str]] = (),
    ) -> Delivery | Refusal:
        """Send `data` to `recipients` through Graph as the login's mailbox."""
        if not isinstance(login, XOAuth2) or not isinstance(login.source, MicrosoftSource):
            text = 'a Graph relay needs auth = "oauth2" with a Microsoft app registration'
            return _failed(relay.name, recipients, text, SessionFault.AUTH)
        body = for_graph(data, recipients)
        if isinstance(body, Refusal):
            return body
        mailbox = login.username
        source = _scoped(relay, login.source)
        url = f"{relay.graph_url}/v1.0/users/{urllib.parse.quote(mailbox, safe='@')}/sendMail"
        most = min((n for _, n, _ in leases), default=relay.max_connections)
        size = max(1, min(most // self.processes, relay.max_connections))
        key = (relay.name, mailbox.lower())
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(size)
        async with slot:
            try:
                lane = await self._lane(key, relay, leases)
            except SessionError as exc:
                return _failed(relay.name, recipients, str(exc), exc.kind)
            try:
                client, proxy = self._client(relay)
                delivery = await self._post(
                    client, proxy, relay, source, mailbox, url, body, recipients
                )
            finally:
                lane.last_used = time.monotonic()
                self._lanes.setdefault(key, []).append(lane)
        # Answers come in waves (the requests went out together): let the messages waiting
        # for this slot send before this one is recorded, or each request of the next wave
        # would wait for the recording of the whole wave before it.
        await asyncio.sleep(0)
        return delivery

    async def warm(self, config: Config) -> None:
        """Make each Graph relay's client and get its app token now, so that the first
        message does not wait for them (and a login that cannot get one says so at the
        start). A failure is logged by the token cache and tried again when a message needs
        the token."""
        for graph in config.relays.values():
            if graph.transport == "graph":
                self._client(graph)  # aiohttp's import too: not on the first message's way
        found: dict[MicrosoftSource, None] = {}
        for rule in config.senders:
            relay = config.relays.get(rule.relay)
            login = rule.credentials or (relay.credentials if relay else None)
            if relay is None or relay.transport != "graph" or not isinstance(login, OAuth2Login):
                continue
            if isinstance(login.source, MicrosoftSource):
                found[_scoped(relay, login.source)] = None
        for source in found:
            with contextlib.suppress(SessionError):
                await self.pool.tokens.get(source, "")

    async def _lane(
        self, key: tuple[str, str], relay: RelayConfig, leases: Sequence[tuple[str, int, str]]
    ) -> _Lane:
        """A free lane of the mailbox, its leases held (taken, or renewed when a third of
        their life is gone); lanes idle past the relay's idle_timeout give theirs back."""
        free, now = self._lanes.setdefault(key, []), time.monotonic()
        for stale in [lane for lane in free if now - lane.last_used > relay.idle_timeout]:
            free.remove(stale)
            await self.pool.unlease(stale.held, stale.holder)
        if free:
            lane = free.pop()
        else:
            self._holder += 1
            lane = _Lane(f"graph-{os.getpid()}-{self._holder}")
        if not lane.held or now - lane.leased_at > LEASE_TTL / 3:
            lane.held = await self.pool.lease(relay, leases, lane.holder)
            lane.leased_at = now
        return lane

    async def _post(
        self,
        client: aiohttp.ClientSession,
        proxy: str | None,
        relay: RelayConfig,
        source: MicrosoftSource,
        mailbox: str,
        url: str,
        body: bytes,
        recipients: Sequence[str],
    ) -> Delivery:
        import aiohttp  # loaded by _client already

        for tries_left in (1, 0):
            try:
                token = await self.pool.tokens.get(source, mailbox)
            except SessionError as exc:
                return _failed(relay.name, recipients, str(exc), exc.kind)
            headers = {
                "Authorization": "Bearer " + token.value.reveal(),
                "Content-Type": "text/plain",
            }
            try:
                async with client.post(
                    url, data=body, headers=headers, proxy=proxy, allow_redirects=False
                ) as response:
                    content = await response.read()
            except (TimeoutError, aiohttp.ServerTimeoutError):
                text = f"Graph did not answer within {relay.timeout:g} s"
                return _failed(relay.name, recipients, text, SessionFault.TIMEOUT)
            except aiohttp.ClientConnectorError as exc:
                return _failed(
                    relay.name, recipients, f"cannot connect: {exc}", SessionFault.CONNECT
                )
            except (aiohttp.ClientError, OSError) as exc:
                text = f"the connection broke: {type(exc).__name__} {exc}"
                return _failed(relay.name, recipients, text, SessionFault.PROTOCOL)
            self.replied(relay.name, response.status)
            if response.status == 401 and tries_left:
                # Revoked or expired early: drop it, and once more with a fresh one.
                self.pool.tokens.invalidate(source, mailbox, token)
                continue
            answer = {k.lower(): v for k, v in response.headers.items()}
            return replies.delivery(relay.name, recipients, response.status, content, answer)
        raise AssertionError("unreachable: the second try returns")

    async def close(self) -> None:
        """Close every client's connections, and give back every lane's leases."""
        for lanes in self._lanes.values():
            for lane in lanes:
                await self.pool.unlease(lane.held, lane.holder)
        self._lanes.clear()
        for client, _ in self._clients.values():
            await client.close()
        self._clients.clear()


def _scoped(relay: RelayConfig, source: MicrosoftSource) -> MicrosoftSource:
    """The app's token source for Graph: the scope `{graph_url}/.default`."""
    return dataclasses.replace(source, scope=f"{relay.graph_url}/.default")


def _proxy(url: str) -> str | None:
    """The HTTP proxy the environment names for `url` (HTTPS_PROXY, NO_PROXY), if any."""
    proxy = urllib.request.getproxies().get("https")
    host = urllib.parse.urlsplit(url).hostname or ""
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy


@dataclass(slots=True)
class _Lane:
    """One of a mailbox's request slots in this process: the leases it holds."""

    holder: str
    held: tuple[str, ...] = ()
    leased_at: float = 0.0
    last_used: float = 0.0


def _failed(relay: str, recipients: Sequence[str], text: str, kind: SessionFault) -> Delivery:
    return session_failed(relay, recipients, 0, text, kind)

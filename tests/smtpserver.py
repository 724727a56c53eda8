"""A real SMTP server (aiosmtpd) for the test suite, with scriptable faults.

The server runs on its own asyncio loop in a background thread, bound to 127.0.0.1 on a
port chosen by the kernel. Tests drive it from the test thread: they read what it received
(``received``, ``commands``, ``auth_attempts``, ``sessions``) and script faults by setting
attributes (``fail_mail``, ``fail_rcpt``, ``fail_data``, ``fail_next``, ``drop_after_data``,
``stall``, ``reply_421_at``) at any time. Every accessor is thread-safe.

Fault semantics:

* ``fail_mail`` / ``fail_data`` / ``fail_rcpt[addr]``: a full reply line sent instead of the
  normal reply (to MAIL, to the end of DATA, to RCPT for that recipient, case-insensitive).
  A 2xx line is accepted normally but answered with that line; anything else refuses.
* ``fail_next``: 0 means the scripted faults apply every time. N > 0 means only the next N
  faults fired by ``fail_mail``, ``fail_data``, ``drop_after_data``, ``drop_at`` or
  ``reply_421_at``
  apply; each one counts down and when the count reaches 0 those four are cleared.
  ``fail_rcpt`` and ``stall`` are never counted.
* ``drop_after_data``: the connection is aborted after the final dot, before any reply;
  the message is not recorded.
* ``stall``: ``"EHLO"``, ``"MAIL"``, ``"RCPT"`` or ``"DATA"`` (the DATA command itself: no
  354) is never answered; ``"DOT"`` reads the whole message and never answers the final
  dot (nothing recorded). The connection stays open until the client leaves or the server
  stops.
* ``drop_at``: ``"RSET"``, ``"MAIL"``, ``"RCPT"`` or ``"DATA"`` gets no answer: the connection
  is aborted (counted by ``fail_next`` too).
* ``reply_421_at``: ``"RSET"``, ``"MAIL"``, ``"RCPT"`` or ``"DATA"`` is answered with 421 and the
  connection is closed.
* ``slow_dot``: seconds the final dot waits for its (normal) reply; the message is recorded
  when the reply goes (never counted by ``fail_next``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
import ssl
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["Received", "SmtpServer", "TestCA"]

HOST = "127.0.0.1"
SECURITY_MODES = ("none", "starttls", "tls")
STALL_POINTS = ("EHLO", "MAIL", "RCPT", "DATA", "DOT")
REPLY_421_POINTS = ("RSET", "MAIL", "RCPT", "DATA")
# Commands a STARTTLS-only server accepts before TLS (RFC 3207 section 4, as in aiosmtpd).
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
REPLY_421 = "421 4.3.2 Service shutting down, closing transmission channel"
STOP_TIMEOUT = 3.0  # for the loop-side shutdown; stop() as a whole stays under 5 s


@dataclass
class Received:
    """One message the server accepted (the final reply to DATA was 2xx)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    username: str | None
    tls: bool
    session: int
    rcpt_options: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)  # when the server accepted it

    def summary(self) -> str:
        return (
            f"<session {self.session}: from {self.mail_from!r} to {self.rcpt_tos!r}, "
            f"{len(self.data)} bytes, options {self.mail_options!r}>"
        )


class TestCA:
    """A throwaway CA (trustme) with a server certificate for localhost and 127.0.0.1."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._ca = trustme.CA()
        self._cert = self._ca.issue_cert("localhost", "127.0.0.1")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.ca_file: str = str(path / "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self, cert: str = "good", tls_max: str | None = None) -> ssl.SSLContext:
        """A server context with the good certificate, or a faulty one: "wrong_host" (for
        another name), "expired", or "untrusted" (from a CA the client does not know);
        `tls_max = "1.1"` offers nothing newer than TLS 1.1."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if cert == "good":
            leaf = self._cert
        elif cert == "wrong_host":
            leaf = self._ca.issue_cert("mail.wrong.example")
        elif cert == "expired":
            past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
            leaf = self._ca.issue_cert(
                "localhost", "127.0.0.1", not_before=past, not_after=past + datetime.timedelta(1)
            )
        elif cert == "untrusted":
            leaf = trustme.CA().issue_cert("localhost", "127.0.0.1")
        else:
            raise ValueError(f"no such certificate variant: {cert}")
        leaf.configure_cert(ctx)
        if tls_max == "1.1":
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():  # deprecated, and that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        return ctx

    def server_files(self, directory: Path) -> tuple[Path, Path]:
        """The good server certificate (chain) and its key as PEM files, for servers that
        read files (redis-server)."""
        cert, key = directory / "server.pem", directory / "server.key"
        self._cert.cert_chain_pems[0].write_to_path(str(cert))
        self._cert.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)


class _Session(Session):
    # aiosmtpd sets the deprecated login_data property on every AUTH, logging a warning each
    # time; a plain attribute keeps the test logs quiet.
    login_data: Any = None


class _Connection(SMTP):
    """aiosmtpd's SMTP protocol, one instance per TCP connection, with command hooks."""

    def __init__(self, owner: SmtpServer, number: int, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self.owner = owner
        self.number = number
        self.auth_username: str | None = None
        self._greeted = False
        # Set after construction: aiosmtpd warns about auth_required without TLS, which is
        # exactly what the plain-text server with require_auth wants.
        self._auth_required = owner.require_auth
        self._smtp_methods = {
            verb: self._wrap(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _wrap(
        self, verb: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def command(arg: str | None) -> None:
            await self.owner._dispatch(self, verb, arg, method)

        # Keep aiosmtpd's HELP working (it reads __smtp_syntax__ from the method).
        command.__dict__.update(getattr(method, "__func__", method).__dict__)
        return command

    def _getparams(self, params: Any) -> Any:
        # aiosmtpd knows no DSN parameters; a server offering DSN takes them (they stay in
        # mail_options / rcpt_options for the test to read).
        found = super()._getparams(params)
        if found is not None and self.owner.dsn:
            for keyword in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                found.pop(keyword, None)
        return found

    async def push(self, status: Any) -> None:
        owner = self.owner
        if not self._greeted:  # the first line is the greeting
            self._greeted = True
            if owner.greeting == "never":
                await owner._stall_forever()
            if owner.greeting == "421":
                await super().push("421 4.3.2 Too busy, try again later")
                if self.transport is not None:
                    self.transport.close()
                return
        if not owner.trickle:
            await super().push(status)
            return
        data = status.encode() if isinstance(status, str) else bytes(status)
        for byte in data + b"\r\n":  # a slow, fragmenting peer: one byte per write
            self._writer.write(bytes([byte]))
            await self._writer.drain()
            await asyncio.sleep(0.0005)

    def _create_session(self) -> Session:
        return _Session(self.loop)

    @property
    def is_tls(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            elif transport is not None:
                transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._forget(self)
        super().connection_lost(error)


class _Handler:
    """aiosmtpd handler hooks; all state lives on the owning SmtpServer."""

    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self._owner.users is None and self._owner.oauth is None:
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if self._owner.dsn:
            responses = [*responses[:-1], "250-DSN", responses[-1]]
        if not self._owner.offer_8bitmime:
            responses = [r for r in responses if r[4:].upper() != "8BITMIME"]
        if self._owner.pipelining:  # aiosmtpd reads pipelined commands; it just never says so
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def auth_XOAUTH2(self, server: _Connection, args: list[str]) -> AuthResult:
        """SASL XOAUTH2: `user=<mailbox>^Aauth=Bearer <token>^A^A`, the token checked by
        `SmtpServer.oauth(token, mailbox)` (Microsoft's reply when it is refused)."""
        owner = self._owner
        try:
            raw = base64.b64decode(args[1], validate=True).decode() if len(args) > 1 else ""
        except (ValueError, UnicodeDecodeError):
            raw = ""
        fields = dict(part.split("=", 1) for part in raw.split("\x01") if "=" in part)
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        ok = owner.oauth is not None and bool(token) and owner.oauth(token, user)
        with owner._lock:
            owner._auth_attempts.append((user, ok))
        if not ok:
            return AuthResult(
                success=False, handled=False, message="535 5.7.3 Authentication unsuccessful"
            )
        server.auth_username = user
        return AuthResult(success=True, auth_data=user)

    async def handle_MAIL(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = self._owner._fire("fail_mail")
        if reply is not None and not reply.startswith("2"):
            return str(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(reply or "250 2.1.0 OK")

    async def handle_RCPT(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._owner._rcpt_fault(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        owner = self._owner
        if owner._stall_point() == "DOT":
            await owner._stall_forever()
        if owner._fire("drop_after_data"):
            server.abort()
            await owner._stall_forever()  # cancelled by connection_lost; nothing is sent
        reply = owner._fire("fail_data")
        if reply is not None and not reply.startswith("2"):
            return str(reply)
        if owner.slow_dot:
            await asyncio.sleep(owner.slow_dot)  # a slow relay: accepted, later
        number = owner._record(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
                username=server.auth_username,
                tls=server.is_tls,
                session=server.number,
            )
        )
        return str(reply or f"250 2.0.0 OK: queued as {number}")


class SmtpServer:
    """A real SMTP server on 127.0.0.1 with scriptable faults (see the module docstring)."""

    host: str = HOST

    def __init__(
        self,
        *,
        security: str = "none",
        ca: TestCA | None = None,
        users: dict[str, str] | None = None,
        require_auth: bool = False,
        offer_starttls: bool = True,
        size_limit: int | None = None,
        smtputf8: bool = True,
        oauth: Callable[[str, str], bool] | None = None,
        dsn: bool = False,
        greeting: str | None = None,
        trickle: bool = False,
        offer_8bitmime: bool = True,
        cert: str = "good",
        tls_max: str | None = None,
        pipelining: bool = True,
    ) -> None:
        if security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {SECURITY_MODES}, not {security!r}")
        if security != "none" and ca is None:
            raise ValueError(f"security={security!r} needs a TestCA (ca=...)")
        if security == "starttls" and not offer_starttls:
            raise ValueError("security='starttls' always offers STARTTLS")
        self.security = security
        self.ca = ca
        self.users = dict(users) if users is not None else None
        # AUTH XOAUTH2: (token, mailbox) -> whether it may log in (a TokenServer's valid()).
        self.oauth: Callable[[str, str], bool] | None = oauth
        self.dsn = dsn  # offer DSN (RFC 3461) and take its parameters
        self.greeting = greeting  # None: 220; "never": no greeting at all; "421": busy
        self.trickle = trickle  # every reply written a byte at a time
        self.offer_8bitmime = offer_8bitmime
        self.pipelining = pipelining  # offer PIPELINING (RFC 2920), as real servers do
        self.cert = cert  # see TestCA.server_context
        self.tls_max = tls_max
        self.require_auth = require_auth
        # With security="none", STARTTLS is offered (optional) only if a CA is given too.
        self.offer_starttls = offer_starttls
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.port: int = 0

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._received: list[Received] = []
        self._commands: list[str] = []
        self._auth_attempts: list[tuple[str, bool]] = []
        self._sessions = 0
        self._next_number = 0  # connection numbers never repeat, even across reset()
        self._clear_faults()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()  # touched on the loop thread only
        self.peak_connections = 0  # the most connections open at once
        self.mail_with_more: list[bool] = []  # per MAIL: did more commands come with it?
        self._starttls_ctx: ssl.SSLContext | None = None

    def _clear_faults(self) -> None:
        self.fail_mail: str | None = None
        self.fail_rcpt: dict[str, str] = {}
        self.fail_data: str | None = None
        self.fail_next: int = 0
        self.drop_after_data: bool = False
        self.stall: str | None = None
        self.reply_421_at: str | None = None
        self.drop_at: str | None = None
        self.slow_dot: float = 0.0

    # -- test-thread API -------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def commands(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    @property
    def auth_attempts(self) -> list[tuple[str, bool]]:
        with self._lock:
            return list(self._auth_attempts)

    @property
    def sessions(self) -> int:
        with self._lock:
            return self._sessions

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``count`` messages were received; AssertionError if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = ", ".join(r.summary() for r in self._received) or "nothing"
                    raise AssertionError(
                        f"expected {count} message(s) within {timeout}s, "
                        f"got {len(self._received)}: {got}"
                    )
                self._changed.wait(remaining)
            return list(self._received)

    def drop_connections(self) -> None:
        """Abort every open connection, as a server that times out idle clients does."""
        loop = self._loop
        assert loop is not None, "server not started"
        done = threading.Event()

        def abort_all() -> None:
            for conn in list(self._live):
                conn.abort()
            done.set()

        loop.call_soon_threadsafe(abort_all)
        assert done.wait(5), "server loop did not answer"

    def reset(self) -> None:
        """Forget received messages, commands, auth attempts, the session count and faults."""
        with self._lock:
            self._received.clear()
            self._commands.clear()
            self._auth_attempts.clear()
            self._sessions = 0
            self._clear_faults()

    def start(self) -> SmtpServer:
        if self._loop is not None:
            raise RuntimeError("server already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, name=f"smtpserver-{id(self):x}", daemon=True
        )
        self._thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(self._serve(), loop)
            self.port = future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving, abort open connections (ending any stall); bounded, idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout=STOP_TIMEOUT + 0.5)
            except Exception:
                future.cancel()
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=1.0)

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SmtpServer {self.security} {self.host}:{self.port}>"

    # -- loop thread -----------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=0.5))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        implicit_ctx: ssl.SSLContext | None = None
        if self.security == "tls":
            assert self.ca is not None
            implicit_ctx = self.ca.server_context(self.cert, self.tls_max)
        elif self.ca is not None and (self.security == "starttls" or self.offer_starttls):
            self._starttls_ctx = self.ca.server_context(self.cert, self.tls_max)
        self._server = await loop.create_server(self._new_connection, HOST, 0, ssl=implicit_ctx)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _new_connection(self) -> _Connection:
        with self._lock:
            self._sessions += 1
            self._next_number += 1
            number = self._next_number
        conn = _Connection(
            self,
            number,
            hostname="localhost",
            ident="pickupd-test-smtpd",
            data_size_limit=self.size_limit,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            tls_context=self._starttls_ctx,
            require_starttls=False,  # enforced in _dispatch so refused commands are recorded
            auth_require_tls=self.security == "starttls",
            authenticator=self._authenticate,
            auth_exclude_mechanism=[] if self.oauth else ["XOAUTH2"],
            loop=asyncio.get_running_loop(),
        )
        self._live.add(conn)
        self.peak_connections = max(self.peak_connections, len(self._live))
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._live.discard(conn)

    async def _shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.close()
        for conn in list(self._live):
            conn.abort()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT / 2)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=STOP_TIMEOUT / 2)

    async def _dispatch(
        self,
        conn: _Connection,
        verb: str,
        arg: str | None,
        method: Callable[[str | None], Awaitable[None]],
    ) -> None:
        with self._lock:
            self._commands.append(verb)
            if verb == "MAIL":
                # Pipelined: RCPT and DATA came with MAIL and wait in the reader already.
                reader = getattr(conn, "_reader", None)
                self.mail_with_more.append(bool(getattr(reader, "_buffer", b"")))
        if self.security == "starttls" and not conn.is_tls and verb not in ALLOWED_BEFORE_STARTTLS:
            await conn.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        if verb == self._stall_point():
            await self._stall_forever()
        if verb in REPLY_421_POINTS and self._fire(
            "reply_421_at", lambda at: str(at).upper() == verb
        ):
            await conn.push(REPLY_421)
            if conn.transport is not None:
                conn.transport.close()
            return
        if verb in REPLY_421_POINTS and self._fire("drop_at", lambda at: str(at).upper() == verb):
            conn.abort()  # a connection the server closed without a word
            return
        if verb == "AUTH" and self.users is None and self.oauth is None:
            await conn.push("502 5.5.1 AUTH not supported")
            return
        await method(arg)

    def _authenticate(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: LoginPassword,
    ) -> AuthResult:
        username = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.users is not None and self.users.get(username) == password
        with self._lock:
            self._auth_attempts.append((username, ok))
        if not ok:
            return AuthResult(success=False, handled=False)  # -> 535 5.7.8
        server.auth_username = username
        return AuthResult(success=True, auth_data=auth_data)

    def _record(self, received: Received) -> int:
        with self._changed:
            self._received.append(received)
            self._changed.notify_all()
            return len(self._received)

    def _stall_point(self) -> str | None:
        stall = self.stall
        return stall.upper() if stall else None

    async def _stall_forever(self) -> None:
        """Never return: wait until the connection's task is cancelled (client gone/stop)."""
        await asyncio.get_running_loop().create_future()

    def _fire(self, name: str, applies: Callable[[Any], bool] = bool) -> Any:
        """Return the fault ``name`` if it applies now, consuming one ``fail_next`` count."""
        with self._lock:
            value = getattr(self, name)
            if not value or not applies(value):
                return None
            if self.fail_next > 0:
                self.fail_next -= 1
                if self.fail_next == 0:
                    self.fail_mail = None
                    self.fail_data = None
                    self.drop_after_data = False
                    self.reply_421_at = None
                    self.drop_at = None
            return value

    def _rcpt_fault(self, address: str) -> str | None:
        wanted = address.lower()
        for rcpt, reply in list(self.fail_rcpt.items()):
            if rcpt.lower() == wanted:
                return reply
        return None

"""One SMTP transaction for one message -> a `Delivery` (who was sent, deferred, rejected)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

import aiosmtplib

from .config import Credentials, RelayConfig
from .credentials import XOAuth2
from .envelope import NO_DSN, Dsn
from .errors import SessionError
from .outcome import Delivery, RecipientResult
from .pool import Pool, Session

__all__ = ["describe_error", "send"]

_SESSION_ERRORS = (aiosmtplib.SMTPException, SessionError, OSError, asyncio.TimeoutError)
# A session idle in the pool this long is probed with RSET before it carries a message.
PROBE_AFTER = 1.0


def describe_error(exc: BaseException) -> tuple[int, str, str]:
    """(SMTP code or 0, one line for an operator, kind) for an error that ended a session.
    The kind (a metrics label) comes from the exception's type, never from its text."""
    if isinstance(exc, SessionError):
        return 0, str(exc), exc.kind
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return exc.code, f"authentication failed: {exc.code} {exc.message}", "auth"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code, f"{exc.code} {exc.message}", "protocol"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return 0, f"TLS certificate verification failed: {exc.verify_message}", "tls"
    if isinstance(exc, ssl.SSLError):
        return 0, f"TLS error: {exc.reason or exc}", "tls"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError):
        return 0, f"timed out: {exc}" if str(exc) else "timed out", "timeout"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        # The session was up: the server (or the network) dropped it.
        return 0, f"connection lost: {exc}" if str(exc) else "connection lost", "connect"
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLError):
            return describe_error(cause)
        return 0, f"cannot connect: {cause}", "connect"
    return 0, str(exc) or type(exc).__name__, "protocol"


def _all(recipients: Sequence[str], code: int, text: str) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(r, code, text) for r in recipients)


def _session_failed(relay: str, recipients: Sequence[str], exc: BaseException) -> Delivery:
    """The session broke before anything was handed over: every recipient waits for a retry."""
    code, text, kind = describe_error(exc)
    return Delivery(
        relay, deferred=_all(recipients, code, text), code=code, text=text, session_error=kind
    )


async def send(
    pool: Pool,
    relay: RelayConfig,
    login: Credentials | XOAuth2 | None,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    dsn: Dsn = NO_DSN,
) -> Delivery:
    """Relay `data` from `sender` to `recipients` over a pooled session (with the `dsn`
    requests where the server offers DSN).

    A reused session is reset with RSET when its last transaction did not complete, or when
    it has sat in the pool for PROBE_AFTER (then RSET also proves it is alive, as Postfix
    probes its connection cache). Straight after a completed transaction the server has
    already reset (RFC 5321 4.1.1.4), so the round trip is skipped: 10% of the CPU a message
    costs. A reused session found dead, at RSET or at MAIL, is replaced once before the
    message counts as deferred: servers close idle connections without telling us.
    """
    for tries_left in (1, 0):
        try:
            session = await pool.acquire(relay, login)
        except _SESSION_ERRORS as exc:
            return _session_failed(relay.name, recipients, exc)
        reused = session.messages > 0
        if reused and (not session.clean or time.monotonic() - session.last_used >= PROBE_AFTER):
            try:
                await session.smtp.rset()
                session.clean = True
            except _SESSION_ERRORS as exc:
                await pool.release(session, reusable=False)
                if tries_left:
                    continue
                return _session_failed(relay.name, recipients, exc)
        reusable = cancelled = False
        try:
            session.clean = False
            delivery = await _transaction(session, relay, sender, recipients, data, dsn)
            reusable = not delivery.unknown and delivery.code != 421
            session.clean = bool(delivery.sent) and not delivery.unknown
            return delivery
        except _StaleSession:
            if tries_left:
                continue
            raise AssertionError("a new session cannot be stale") from None
        except asyncio.CancelledError:
            # Shutdown cut the transaction short (mid-DATA, say): the server owes us a reply
            # it may never send, so no QUIT waits for it; the connection is dropped.
            cancelled = True
            raise
        finally:
            session.messages += 1
            await pool.release(session, reusable=reusable, abort=cancelled)
    raise AssertionError("unreachable")


class _StaleSession(Exception):
    """A reused session turned out closed at MAIL, before anything was handed over."""


async def _transaction(
    session: Session,
    relay: RelayConfig,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    dsn: Dsn,
) -> Delivery:
    smtp = session.smtp
    ext = smtp.esmtp_extensions
    name = relay.name
    limit = _size_limit(ext.get("size", ""))
    if limit and len(data) > limit:
        text = f"{len(data)} bytes, larger than the server's SIZE limit of {limit}"
        # Our own decision, from the SIZE the server advertised: no reply code to report.
        return Delivery(name, rejected=_all(recipients, 0, text), text=text, too_large=True)

    options = [f"SIZE={len(data)}"] if "size" in ext else []
    offers_dsn = "dsn" in ext  # else the requests are dropped, as RFC 3461 4.1 says
    if offers_dsn:
        options.extend(dsn.mail)
    encoding = "ascii"
    if not data.isascii():
        if "8bitmime" in ext:
            options.append("BODY=8BITMIME")
        if "smtputf8" in ext:
            options.append("SMTPUTF8")
            encoding = "utf-8"
    if not (sender.isascii() and all(r.isascii() for r in recipients)):
        if "smtputf8" not in ext:
            text = "an address is not ASCII and the server does not offer SMTPUTF8"
            return Delivery(name, rejected=_all(recipients, 0, text), text=text)
        if "SMTPUTF8" not in options:
            options.append("SMTPUTF8")
        encoding = "utf-8"

    try:
        await _command(smtp, b"MAIL FROM:", sender, encoding, options, (250,))
    except aiosmtplib.SMTPResponseException as exc:
        text = f"MAIL FROM: {exc.code} {exc.message}"
        if exc.code >= 500:
            return Delivery(
                name, rejected=_all(recipients, exc.code, text), code=exc.code, text=text
            )
        return Delivery(name, deferred=_all(recipients, exc.code, text), code=exc.code, text=text)
    except _SESSION_ERRORS as exc:
        if session.messages and isinstance(exc, ConnectionError):
            raise _StaleSession from exc
        return _session_failed(name, recipients, exc)

    accepted: list[str] = []
    deferred: list[RecipientResult] = []
    rejected: list[RecipientResult] = []
    for index, recipient in enumerate(recipients):
        try:
            wanted = dsn.for_recipient(recipient) if offers_dsn else ()
            await _command(smtp, b"RCPT TO:", recipient, encoding, wanted, (250, 251))
            accepted.append(recipient)
        except aiosmtplib.SMTPResponseException as exc:
            result = RecipientResult(recipient, exc.code, f"RCPT TO: {exc.code} {exc.message}")
            (rejected if exc.code >= 500 else deferred).append(result)
            if exc.code == 421:  # the server is closing: the rest must wait too
                deferred.extend(_all(recipients[index + 1 :], 421, result.text))
                return Delivery(
                    name,
                    deferred=tuple(deferred),
                    rejected=tuple(rejected),
                    code=421,
                    text=result.text,
                )
        except _SESSION_ERRORS as exc:
            code, text, kind = describe_error(exc)
            deferred.extend(_all(recipients[index:], code, text))
            return Delivery(
                name,
                deferred=tuple(deferred),
                rejected=tuple(rejected),
                code=code,
                text=text,
                session_error=kind,
            )

    if not accepted:
        last = (rejected or deferred)[-1]
        return Delivery(
            name, deferred=tuple(deferred), rejected=tuple(rejected), code=last.code, text=last.text
        )

    try:
        reply = await _data(smtp, data, relay.timeout)
    except aiosmtplib.SMTPResponseException as exc:
        text = f"DATA: {exc.code} {exc.message}"
        bucket = rejected if exc.code >= 500 else deferred
        bucket.extend(_all(accepted, exc.code, text))
        return Delivery(
            name, deferred=tuple(deferred), rejected=tuple(rejected), code=exc.code, text=text
        )
    except _SESSION_ERRORS as exc:
        # Lost once the message was on its way: the server may have queued it. A duplicate
        # beats a loss: defer.
        code, text, kind = describe_error(exc)
        text = f"outcome unknown: the session ended after DATA, before the server's reply ({text})"
        deferred.extend(_all(accepted, code, text))
        return Delivery(
            name,
            deferred=tuple(deferred),
            rejected=tuple(rejected),
            code=code,
            text=text,
            unknown=True,
            session_error=kind,
        )
    return Delivery(
        name,
        sent=tuple(accepted),
        deferred=tuple(deferred),
        rejected=tuple(rejected),
        code=reply.code,
        text=reply.message,
    )


async def _data(smtp: aiosmtplib.SMTP, data: bytes, timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA, the message, and the reply, as aiosmtplib's `data()` does, without its two
    regular-expression passes over the message (1.6 ms of CPU for 100 KB, half of what a
    large message costs us): envelope.parse has already made every line end CRLF, so the
    dot-stuffing is one `replace` in C (RFC 5321 4.5.2)."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        # No await between the write and read_response(), which marks a reply as expected
        # before it yields: the reply cannot arrive unlooked-for.
        protocol.write(stuffed + b".\r\n")
        reply = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


async def _command(
    smtp: aiosmtplib.SMTP,
    verb: bytes,
    address: str,
    encoding: str,
    options: Sequence[str],
    ok: tuple[int, ...],
) -> None:
    """MAIL FROM / RCPT TO with an address envelope.py has already parsed strictly.

    aiosmtplib's mail()/rcpt() would parse it again with email.utils (7% of the CPU spent on
    a message), and a second, more lenient parser is exactly what we do not want deciding
    what goes on the wire.
    """
    if any(char in address for char in "\r\n\0"):
        raise ValueError("an address with CR, LF or NUL must never reach the wire")
    command, _, argument = verb.partition(b" ")
    response = await smtp.execute_command(
        command,
        argument + b"<" + address.encode(encoding) + b">",
        *(option.encode("ascii") for option in options),
    )
    if response.code not in ok:
        raise aiosmtplib.SMTPResponseException(response.code, response.message)


def _size_limit(value: str) -> int:
    try:
        return int(value.split()[0]) if value.strip() else 0
    except ValueError:
        return 0

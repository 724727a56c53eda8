"""One SMTP transaction for one message -> a `Delivery` (who was sent, deferred, rejected)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from typing import Any

import aiosmtplib

from pickupd.auth.logins import Credentials, XOAuth2
from pickupd.config.loading import RelayConfig
from pickupd.errors import AddressError, SessionError, StaleSession
from pickupd.message.envelope import NO_DSN, Dsn
from pickupd.outcome import Delivery, RecipientResult, SessionFault, every, session_failed
from pickupd.smtp.pool import Pool, Session
from pickupd.smtp.wire import Wire

__all__ = ["describe_error", "send"]

_SESSION_ERRORS = (aiosmtplib.SMTPException, SessionError, OSError, asyncio.TimeoutError)
# A session idle in the pool this long is probed with RSET before it carries a message.
PROBE_AFTER = 1.0


def describe_error(exc: BaseException) -> tuple[int, str, SessionFault]:
    """(SMTP code or 0, one line for an operator, kind) for an error that ended a session.
    The kind (a metrics label) comes from the exception's type, never from its text."""
    if isinstance(exc, SessionError):
        return 0, str(exc), exc.kind
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return exc.code, f"authentication failed: {exc.code} {exc.message}", SessionFault.AUTH
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code, f"{exc.code} {exc.message}", SessionFault.PROTOCOL
    if isinstance(exc, ssl.SSLCertVerificationError):
        return 0, f"TLS certificate verification failed: {exc.verify_message}", SessionFault.TLS
    if isinstance(exc, ssl.SSLError):
        return 0, f"TLS error: {exc.reason or exc}", SessionFault.TLS
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError):
        return 0, f"timed out: {exc}" if str(exc) else "timed out", SessionFault.TIMEOUT
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        # The session was up: the server (or the network) dropped it.
        return 0, f"connection lost: {exc}" if str(exc) else "connection lost", SessionFault.CONNECT
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLError):
            return describe_error(cause)
        return 0, f"cannot connect: {cause}", SessionFault.CONNECT
    return 0, str(exc) or type(exc).__name__, SessionFault.PROTOCOL


def _session_failed(relay: str, recipients: Sequence[str], exc: BaseException) -> Delivery:
    """The session broke before anything was handed over: every recipient waits for a retry."""
    return session_failed(relay, recipients, *describe_error(exc))


async def send(
    pool: Pool,
    relay: RelayConfig,
    login: Credentials | XOAuth2 | None,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    dsn: Dsn = NO_DSN,
    leases: Sequence[tuple[str, int, str]] = (),
) -> Delivery:
    """Relay `data` from `sender` to `recipients` over a pooled session (with the `dsn`
    requests where the server offers DSN; `leases`: the mailbox's connections limits).

    A reused session is reset with RSET when its last transaction did not complete, or when
    it has sat in the pool for PROBE_AFTER (then RSET also proves it is alive, as Postfix
    probes its connection cache). Straight after a completed transaction the server has
    already reset (RFC 5321 4.1.1.4), so the round trip is skipped: 10% of the CPU a message
    costs. A reused session found dead, at RSET or at MAIL, is replaced once before the
    message counts as deferred: servers close idle connections without telling us.
    """
    for tries_left in (1, 0):
        try:
            session = await pool.acquire(relay, login, leases)
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
        except StaleSession:
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
        return Delivery(name, rejected=every(recipients, 0, text), text=text, too_large=True)

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
            return Delivery(name, rejected=every(recipients, 0, text), text=text)
        if "SMTPUTF8" not in options:
            options.append("SMTPUTF8")
        encoding = "utf-8"

    lines = [_line(b"MAIL FROM:", sender, encoding, options)]
    for recipient in recipients:
        wanted = dsn.for_recipient(recipient) if offers_dsn else ()
        lines.append(_line(b"RCPT TO:", recipient, encoding, wanted))
    tally = _Tally(name, recipients)
    try:
        wire = Wire(smtp)
    except aiosmtplib.SMTPServerDisconnected as exc:
        if session.messages:
            raise StaleSession from exc
        return _session_failed(name, recipients, exc)
    try:
        return await _exchange(
            session, wire, tally, lines, data, relay.timeout, "pipelining" in ext
        )
    finally:
        if not wire.detach():
            wire.close()


async def _exchange(
    session: Session,
    wire: Wire,
    tally: _Tally,
    lines: list[bytes],
    data: bytes,
    timeout: float,
    pipelining: bool,
) -> Delivery:
    """The envelope (pipelined where the server offers it), then the message."""
    if pipelining:
        early = await _pipelined(session, wire, tally, lines, timeout)
    else:
        early = await _one_by_one(session, wire, tally, lines, timeout)
    if early is not None:
        return early
    if not tally.accepted:
        return tally.nobody()
    start = tally.data_reply
    if start is None:
        try:
            wire.write(b"DATA\r\n")
            start = await wire.reply(timeout)
        except _SESSION_ERRORS as exc:
            return tally.lost_before_data(exc)
    if start.code != 354:
        return tally.data_refused(start.code, f"DATA: {start.code} {start.message}")
    try:
        reply = await _data(wire, data, timeout)
    except _SESSION_ERRORS as exc:
        # Lost once the message was on its way: the server may have queued it. A duplicate
        # beats a loss: defer.
        return tally.unknown(exc)
    if reply.code != 250:
        return tally.data_refused(reply.code, f"DATA: {reply.code} {reply.message}")
    return tally.sent(reply)


class _Tally:
    """What the replies to MAIL, RCPT and DATA say, as they come, one by one or pipelined."""

    def __init__(self, relay: str, recipients: Sequence[str]) -> None:
        self.relay = relay
        self.recipients = recipients
        self.accepted: list[str] = []
        self.deferred: list[RecipientResult] = []
        self.rejected: list[RecipientResult] = []
        self.data_reply: aiosmtplib.SMTPResponse | None = None  # when DATA went pipelined

    def mail(self, reply: aiosmtplib.SMTPResponse) -> Delivery | None:
        """The reply to MAIL FROM: a Delivery if it ends the transaction."""
        if reply.code == 250:
            return None
        text = f"MAIL FROM: {reply.code} {reply.message}"
        everyone = every(self.recipients, reply.code, text)
        if reply.code >= 500:
            return Delivery(self.relay, rejected=everyone, code=reply.code, text=text)
        return Delivery(self.relay, deferred=everyone, code=reply.code, text=text)

    def rcpt(self, index: int, reply: aiosmtplib.SMTPResponse) -> Delivery | None:
        """The reply to the RCPT TO of recipient `index`: a Delivery if it ends the
        transaction (421: the server is closing, the rest must wait too)."""
        recipient = self.recipients[index]
        if reply.code in (250, 251):
            self.accepted.append(recipient)
            return None
        result = RecipientResult(recipient, reply.code, f"RCPT TO: {reply.code} {reply.message}")
        (self.rejected if reply.code >= 500 else self.deferred).append(result)
        if reply.code != 421:
            return None
        self.accepted.clear()  # nothing goes on a session that is closing
        self.deferred.extend(every(self.recipients[index + 1 :], 421, result.text))
        return self._end(421, result.text)

    def broken(self, index: int, exc: BaseException) -> Delivery:
        """The session broke before the reply to RCPT TO of recipient `index`."""
        code, text, kind = describe_error(exc)
        self.deferred.extend(every(self.recipients[index:], code, text))
        return self._end(code, text, session_error=kind)

    def nobody(self) -> Delivery:
        """No recipient was accepted."""
        last = (self.rejected or self.deferred)[-1]
        return self._end(last.code, last.text)

    def lost_before_data(self, exc: BaseException) -> Delivery:
        code, text, kind = describe_error(exc)
        self.deferred.extend(every(self.accepted, code, text))
        return self._end(code, text, session_error=kind)

    def data_refused(self, code: int, text: str) -> Delivery:
        (self.rejected if code >= 500 else self.deferred).extend(every(self.accepted, code, text))
        return self._end(code, text)

    def unknown(self, exc: BaseException) -> Delivery:
        code, text, kind = describe_error(exc)
        text = f"outcome unknown: the session ended after DATA, before the server's reply ({text})"
        self.deferred.extend(every(self.accepted, code, text))
        return self._end(code, text, unknown=True, session_error=kind)

    def sent(self, reply: aiosmtplib.SMTPResponse) -> Delivery:
        return Delivery(
            self.relay,
            sent=tuple(self.accepted),
            deferred=tuple(self.deferred),
            rejected=tuple(self.rejected),
            code=reply.code,
            text=reply.message,
        )

    def _end(self, code: int, text: str, **more: Any) -> Delivery:
        return Delivery(
            self.relay,
            deferred=tuple(self.deferred),
            rejected=tuple(self.rejected),
            code=code,
            text=text,
            **more,
        )


async def _one_by_one(
    session: Session, wire: Wire, tally: _Tally, lines: list[bytes], timeout: float
) -> Delivery | None:
    """MAIL, then each RCPT, each waiting for its reply (a server without PIPELINING)."""
    try:
        wire.write(lines[0])
        early = tally.mail(await wire.reply(timeout))
    except _SESSION_ERRORS as exc:
        if session.messages and isinstance(exc, ConnectionError):
            raise StaleSession from exc
        return _session_failed(tally.relay, tally.recipients, exc)
    if early is not None:
        return early
    for index, line in enumerate(lines[1:]):
        try:
            wire.write(line)
            early = tally.rcpt(index, await wire.reply(timeout))
        except _SESSION_ERRORS as exc:
            return tally.broken(index, exc)
        if early is not None:
            return early
    return None


async def _pipelined(
    session: Session, wire: Wire, tally: _Tally, lines: list[bytes], timeout: float
) -> Delivery | None:
    """MAIL, every RCPT and DATA in one write, then their replies in order (RFC 2920): one
    round trip instead of two and more. The reply to DATA is kept in the tally for the
    caller; a 354 after every recipient was refused is closed with an empty message's dot,
    as RFC 2920 3.1 tells (the server refuses a message with no recipients)."""
    count = len(lines) + 1
    replies: list[aiosmtplib.SMTPResponse] = []
    broke: BaseException | None = None
    try:
        wire.write(b"".join(lines) + b"DATA\r\n")
        while len(replies) < count:
            replies.append(await wire.reply(timeout))
    except _SESSION_ERRORS as exc:
        if not replies:
            if session.messages and isinstance(exc, ConnectionError):
                raise StaleSession from exc
            return _session_failed(tally.relay, tally.recipients, exc)
        broke = exc  # what did come in is taken; the rest waits: nothing was handed over
    rcpt_replies = replies[1 : len(lines)]
    early = tally.mail(replies[0])
    for index, reply in enumerate(rcpt_replies):
        early = early or tally.rcpt(index, reply)
    if broke is not None:
        if early is not None:
            return early
        if len(rcpt_replies) < len(lines) - 1:
            return tally.broken(len(rcpt_replies), broke)
        return tally.lost_before_data(broke)
    data_reply = replies[-1]
    if data_reply.code == 354 and (early is not None or not tally.accepted):
        # Nothing to send, but the server waits for a message: an empty one it will refuse.
        try:
            wire.write(b".\r\n")
            await wire.reply(timeout)
        except _SESSION_ERRORS:
            wire.close()
    if early is not None:
        return early
    tally.data_reply = data_reply
    return None


async def _data(wire: Wire, data: bytes, timeout: float) -> aiosmtplib.SMTPResponse:
    """The message after a 354, and the server's reply. Unlike aiosmtplib's `data()`, no
    regular-expression passes over the message (1.6 ms of CPU for 100 KB, half of what a
    large message cost us): envelope.parse has already made every line end CRLF, so the
    dot-stuffing is one `replace` in C (RFC 5321 4.5.2), and the message goes in one write."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    wire.write(stuffed + b".\r\n")
    return await wire.reply(timeout)


def _line(verb: bytes, address: str, encoding: str, options: Sequence[str]) -> bytes:
    """MAIL FROM / RCPT TO with an address envelope.py has already parsed strictly.

    aiosmtplib's mail()/rcpt() would parse it again with email.utils (7% of the CPU spent on
    a message), and a second, more lenient parser is exactly what we do not want deciding
    what goes on the wire.
    """
    if any(char in address for char in "\r\n\0"):
        raise AddressError("an address with CR, LF or NUL must never reach the wire")
    words = [verb + b"<" + address.encode(encoding) + b">"]
    words.extend(option.encode("ascii") for option in options)
    return b" ".join(words) + b"\r\n"


def _size_limit(value: str) -> int:
    try:
        return int(value.split()[0]) if value.strip() else 0
    except ValueError:
        return 0

"""The connection during one transaction: our commands out, the server's replies in, with
PIPELINING (RFC 2920) in mind.

aiosmtplib sets the session up (connect, TLS, EHLO, AUTH) and takes it back after (RSET,
QUIT), but its protocol expects one reply per read: replies to pipelined commands that come
in one after the other, before the task waiting for the first has run, would be dropped. So
for the transaction the connection's protocol is this one, which keeps every byte and parses
every reply, and hands the connection back as it found it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import aiosmtplib

__all__ = ["Wire"]

# A reply longer than this is not SMTP (RFC 5321 4.5.3.1.5 allows 512 bytes a line).
MAX_REPLY = 64 * 1024


class Wire(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol on `smtp`'s connection until `detach()`."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        protocol = smtp.protocol
        # uvloop's transports are asyncio transports in all but their class.
        transport = cast(asyncio.Transport | None, protocol and protocol.transport)
        if protocol is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._smtp = smtp
        self._previous = protocol
        self._transport = transport
        self._buffer = bytearray()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        transport.set_protocol(self)

    def detach(self) -> bool:
        """Give the connection back to aiosmtplib; False if it is no longer fit for another
        transaction (lost, or the server said more than it was asked)."""
        clean = self._lost is None and not self._buffer and not self._replies
        if self._lost is None:
            self._transport.set_protocol(self._previous)
        return clean

    def write(self, data: bytes) -> None:
        if self._lost is not None or self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def reply(self, timeout: float) -> aiosmtplib.SMTPResponse:
        """The next reply, waiting at most `timeout` seconds for it."""
        loop = asyncio.get_running_loop()
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            self._waiter = loop.create_future()
            timer = loop.call_later(timeout, self._time_out, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()

    def close(self) -> None:
        """Drop the connection (a reply we gave up on would pair with the next command)."""
        self._smtp.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            reply = self._parse()
            if reply is None:
                break
            self._replies.append(reply)
        if len(self._buffer) > MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
        elif self._replies:
            self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._previous.connection_lost(exc)  # aiosmtplib learns it too

    # -- inside --------------------------------------------------------------------------------

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """One complete reply off the front of the buffer, or None."""
        buffer = self._buffer
        lines: list[bytes] = []
        offset = 0
        while True:
            end = buffer.find(b"\n", offset)
            if end == -1:
                return None
            line = bytes(buffer[offset : end + 1])
            offset = end + 1
            lines.append(line)
            if line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            self._fail(aiosmtplib.SMTPResponseException(-1, f"Malformed reply: {lines[-1]!r}"))
            return None
        del buffer[:offset]
        text = b"\n".join(line[4:].strip(b" \t\r\n") for line in lines)
        return aiosmtplib.SMTPResponse(code, text.decode("utf-8", "surrogateescape"))

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))

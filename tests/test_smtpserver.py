"""Tests of the test SMTP server itself (tests/smtpserver.py), driven by real clients.

aiosmtplib plays the client; where the exact bytes on the wire matter (no 354, a 421 followed
by a close) a raw asyncio stream does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import aiosmtplib
import pytest
from smtpserver import SmtpServer, TestCA

T = TypeVar("T")
Factory = Callable[..., SmtpServer]

SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
MESSAGE = b"From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def connected(server: SmtpServer, **kwargs: Any) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected aiosmtplib client for ``server`` (no automatic STARTTLS unless asked).

    On exit it QUITs like ``async with SMTP()`` and then waits until the socket is really
    closed: closing TLS takes a round trip, and asyncio.run() would otherwise leave the
    client's socket to the garbage collector (a ResourceWarning under ``-W error``).
    """
    kwargs.setdefault("start_tls", False)
    kwargs.setdefault("timeout", 5)
    smtp = aiosmtplib.SMTP(
        hostname=server.host, port=server.port, local_hostname="client.test", **kwargs
    )
    sock = None
    try:
        async with smtp:
            sock = smtp.get_transport_info("socket")
            yield smtp
    finally:
        deadline = time.monotonic() + 2
        while sock is not None and sock.fileno() != -1 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)


async def send(server: SmtpServer, message: bytes = MESSAGE, **kwargs: Any) -> None:
    """One connection, one message (MAIL FROM SENDER, RCPT TO RCPT), QUIT."""
    async with connected(server, **kwargs) as smtp:
        await smtp.sendmail(SENDER, [RCPT], message)


class Raw:
    """A raw SMTP client line by line, for checks aiosmtplib hides."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: SmtpServer) -> Raw:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        raw = cls(reader, writer)
        assert (await raw.reply()).startswith(b"220 ")
        return raw

    async def reply(self, timeout: float = 5) -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    async def cmd(self, line: bytes, timeout: float = 5) -> bytes:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply(timeout)

    async def at_eof(self, timeout: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# -- delivery, TLS and AUTH --------------------------------------------------------------


def test_plain_send_records_envelope_and_raw_bytes(smtp_server: SmtpServer) -> None:
    """A plain send records envelope, options and the exact (dot-unstuffed, 8-bit) bytes."""
    message = (
        b"From: sender@example.org\r\nSubject: caf\xc3\xa9\r\n\r\n"
        b".a line starting with a dot\r\n..two dots\r\nbin\xe9ry 8bit\r\n"
    )

    async def go() -> None:
        async with connected(smtp_server) as smtp:
            await smtp.ehlo()
            assert {"8bitmime", "smtputf8"} <= set(smtp.esmtp_extensions)
            for absent in ("auth", "starttls", "size"):
                assert absent not in smtp.esmtp_extensions
            await smtp.sendmail(
                SENDER,
                ["one@example.net", "j\u00f6rg@b\u00fccher.example"],
                message,
                mail_options=["BODY=8BITMIME", "SMTPUTF8"],
            )

    run(go())
    [got] = smtp_server.wait_for(1)
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["one@example.net", "j\u00f6rg@b\u00fccher.example"]
    assert got.data == message
    assert got.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]
    assert got.username is None
    assert got.tls is False
    assert got.session == 1
    assert smtp_server.sessions == 1
    assert smtp_server.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def test_starttls_required_then_tls_and_auth(smtp_factory: Factory, test_ca: TestCA) -> None:
    """security="starttls": MAIL before STARTTLS gets 530 (and is still recorded), AUTH is
    only offered after TLS, and a message sent after STARTTLS has tls=True."""
    server = smtp_factory(security="starttls", users={"alice": "s3cret"})

    async def go() -> None:
        async with connected(server) as smtp:
            await smtp.ehlo()
            assert "starttls" in smtp.esmtp_extensions
            assert "auth" not in smtp.esmtp_extensions
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail(SENDER)
            assert refused.value.code == 530
            await smtp.starttls(tls_context=test_ca.client_context())
            await smtp.ehlo()
            assert "auth" in smtp.esmtp_extensions
            assert "starttls" not in smtp.esmtp_extensions
            await smtp.login("alice", "s3cret")
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    [got] = server.wait_for(1)
    assert got.tls is True
    assert got.username == "alice"
    assert got.data == MESSAGE
    assert server.commands == [
        "EHLO", "MAIL", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip


def test_implicit_tls(smtp_factory: Factory, test_ca: TestCA) -> None:
    """security="tls": TLS from the first byte, verified against the test CA; tls=True."""
    server = smtp_factory(security="tls")

    async def go() -> None:
        async with connected(server, use_tls=True, tls_context=test_ca.client_context()) as smtp:
            assert smtp.get_transport_info("ssl_object") is not None
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    [got] = server.wait_for(1)
    assert got.tls is True


def test_implicit_tls_refuses_untrusted_client(smtp_factory: Factory, test_ca: TestCA) -> None:
    """The implicit-TLS certificate is not trusted without the test CA (it is a real CA)."""
    server = smtp_factory(security="tls")
    with pytest.raises(aiosmtplib.SMTPConnectError):
        run(send(server, use_tls=True))


@pytest.mark.parametrize("offer", [True, False])
def test_plain_server_with_ca_offers_optional_starttls(
    smtp_factory: Factory, test_ca: TestCA, offer: bool
) -> None:
    """security="none" with a CA offers STARTTLS (optional) unless offer_starttls=False."""
    server = smtp_factory(security="none", ca=test_ca, offer_starttls=offer)

    async def go() -> None:
        async with connected(server, start_tls=None, tls_context=test_ca.client_context()) as smtp:
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    assert server.wait_for(1)[0].tls is offer
    assert ("STARTTLS" in server.commands) is offer


def test_auth_records_username_and_bad_password_gets_535(smtp_factory: Factory) -> None:
    """AUTH PLAIN and LOGIN work in clear on a plain server; the login is recorded on the
    message; a wrong password gets 535; require_auth refuses MAIL before AUTH with 530."""
    server = smtp_factory(users={"alice": "s3cret", "bob": "pw"}, require_auth=True)

    async def go() -> None:
        async with connected(server) as smtp:
            await smtp.ehlo()
            assert set(smtp.server_auth_methods) == {"plain", "login"}
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail(SENDER)
            assert refused.value.code == 530
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await smtp.auth_plain("alice", "wrong")
            assert failed.value.code == 535
            await smtp.auth_plain("alice", "s3cret")
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)
        async with connected(server) as smtp:
            await smtp.ehlo()
            await smtp.auth_login("bob", "pw")
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    first, second = server.wait_for(2)
    assert (first.username, second.username) == ("alice", "bob")
    assert server.auth_attempts == [("alice", False), ("alice", True), ("bob", True)]


def test_no_users_means_no_auth(smtp_server: SmtpServer) -> None:
    """Without users, AUTH is neither advertised nor accepted (502)."""

    async def go() -> None:
        raw = await Raw.connect(smtp_server)
        assert b"AUTH" not in await raw.cmd(b"EHLO client.test")
        assert (await raw.cmd(b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")).startswith(b"502 ")
        await raw.close()

    run(go())
    assert smtp_server.auth_attempts == []


def test_size_limit_advertised_and_enforced(smtp_factory: Factory) -> None:
    """size_limit=n advertises SIZE n; larger messages get 552 at MAIL (SIZE=) or DATA."""
    server = smtp_factory(size_limit=1000)
    big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" + (b"y" * 78 + b"\r\n") * 20

    async def go() -> None:
        async with connected(server) as smtp:
            await smtp.ehlo()
            assert smtp.esmtp_extensions["size"] == "1000"
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as at_mail:
                await smtp.sendmail(SENDER, [RCPT], big)  # aiosmtplib sends SIZE=
            assert at_mail.value.code == 552
            await smtp.mail(SENDER)  # no SIZE= parameter: refused after the data
            await smtp.rcpt(RCPT)
            with pytest.raises(aiosmtplib.SMTPDataError) as at_data:
                await smtp.data(big)
            assert at_data.value.code == 552
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    [got] = server.wait_for(1)
    assert got.mail_options == [f"SIZE={len(MESSAGE)}"]


def test_smtputf8_can_be_disabled(smtp_factory: Factory) -> None:
    """smtputf8=False: SMTPUTF8 is not advertised and MAIL ... SMTPUTF8 is refused."""
    server = smtp_factory(smtputf8=False)

    async def go() -> None:
        raw = await Raw.connect(server)
        ehlo = await raw.cmd(b"EHLO client.test")
        assert b"8BITMIME" in ehlo
        assert b"SMTPUTF8" not in ehlo
        assert (await raw.cmd(b"MAIL FROM:<a@example.org> SMTPUTF8")).startswith(b"501 ")
        await raw.close()

    run(go())


def test_connection_reuse_shares_session(smtp_server: SmtpServer) -> None:
    """Two messages on one connection share `session`; a new connection gets a new one."""

    async def go() -> None:
        async with connected(smtp_server) as smtp:
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)
        await send(smtp_server)

    run(go())
    assert [r.session for r in smtp_server.wait_for(3)] == [1, 1, 2]
    assert smtp_server.sessions == 2


# -- scripted faults ---------------------------------------------------------------------


def test_fail_mail(smtp_server: SmtpServer) -> None:
    """fail_mail answers every MAIL with the scripted line (until cleared)."""
    smtp_server.fail_mail = "451 4.3.0 try later"

    async def go() -> None:
        async with connected(smtp_server) as smtp:
            for _ in range(2):
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await smtp.sendmail(SENDER, [RCPT], MESSAGE)
                assert (refused.value.code, refused.value.message) == (451, "4.3.0 try later")
            smtp_server.fail_mail = None
            await smtp.sendmail(SENDER, [RCPT], MESSAGE)

    run(go())
    assert len(smtp_server.wait_for(1)) == 1


def test_fail_rcpt_is_per_recipient_and_case_insensitive(smtp_server: SmtpServer) -> None:
    """fail_rcpt refuses only the listed recipients (any case); the rest are accepted."""
    smtp_server.fail_rcpt = {"Bad@Example.NET": "550 5.1.1 no such user"}

    async def go() -> None:
        async with connected(smtp_server) as smtp:
            errors, _ = await smtp.sendmail(SENDER, ["bad@example.net", RCPT], MESSAGE)
            assert errors["bad@example.net"].code == 550
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await smtp.sendmail(SENDER, ["BAD@example.net"], MESSAGE)
            assert [e.code for e in refused.value.recipients] == [550]

    run(go())
    [got] = smtp_server.wait_for(1)
    assert got.rcpt_tos == [RCPT]


def test_fail_data(smtp_server: SmtpServer) -> None:
    """fail_data answers the end of DATA with the scripted line and records nothing."""
    smtp_server.fail_data = "554 5.6.0 content rejected"
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        run(send(smtp_server))
    assert refused.value.code == 554
    assert smtp_server.received == []
    assert "DATA" in smtp_server.commands


def test_fail_next_counts_down(smtp_server: SmtpServer) -> None:
    """fail_next=N applies the scripted fault N times (fail_mail, fail_data and, as an
    extension, reply_421_at/drop_after_data), then clears it: the server is normal again."""
    smtp_server.fail_data = "451 4.3.0 later"
    smtp_server.fail_next = 2
    codes = []
    for _ in range(3):
        try:
            run(send(smtp_server))
            codes.append(250)
        except aiosmtplib.SMTPDataError as exc:
            codes.append(exc.code)
    assert codes == [451, 451, 250]
    assert smtp_server.fail_next == 0
    assert smtp_server.fail_data is None
    assert len(smtp_server.received) == 1

    smtp_server.fail_mail = "421 4.7.0 busy"
    smtp_server.fail_next = 1
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        run(send(smtp_server))
    run(send(smtp_server))
    assert len(smtp_server.received) == 2

    smtp_server.reply_421_at = "RCPT"
    smtp_server.fail_next = 1
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        run(send(smtp_server))
    run(send(smtp_server))
    assert len(smtp_server.received) == 3
    assert smtp_server.reply_421_at is None


def test_fail_next_zero_means_always(smtp_server: SmtpServer) -> None:
    """With fail_next=0 (the default) a fault never wears off by itself."""
    smtp_server.fail_data = "452 4.3.1 full"
    for _ in range(3):
        with pytest.raises(aiosmtplib.SMTPDataError):
            run(send(smtp_server))
    assert smtp_server.fail_data == "452 4.3.1 full"


def test_drop_after_data(smtp_server: SmtpServer) -> None:
    """drop_after_data: the client sees a disconnect after sending the data; nothing is
    recorded; with fail_next=1 only the first message is dropped."""
    smtp_server.drop_after_data = True
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        run(send(smtp_server))
    assert smtp_server.received == []
    assert smtp_server.commands[-1] == "DATA"

    smtp_server.fail_next = 1
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        run(send(smtp_server))
    run(send(smtp_server))
    assert [r.session for r in smtp_server.wait_for(1)] == [3]


@pytest.mark.parametrize("point", ["EHLO", "MAIL", "RCPT", "DATA", "DOT"])
def test_stall_times_out_client(smtp_server: SmtpServer, point: str) -> None:
    """stall=<point>: that command (DOT: the end of data) is never answered, so a client
    command with timeout=1 times out; nothing is recorded."""
    smtp_server.stall = point

    async def go() -> None:
        async with connected(smtp_server) as smtp:
            steps: list[Callable[[], Coroutine[Any, Any, Any]]] = [
                lambda: smtp.ehlo(timeout=1),
                lambda: smtp.mail(SENDER, timeout=1),
                lambda: smtp.rcpt(RCPT, timeout=1),
                lambda: smtp.execute_command(b"DATA", timeout=1),
            ]
            if point == "DOT":
                steps[-1] = lambda: smtp.data(MESSAGE, timeout=1)
            stop_at = ["EHLO", "MAIL", "RCPT", "DATA", "DOT"].index(point)
            for step in steps[: min(stop_at, 3)]:
                await step()
            started = time.monotonic()
            with pytest.raises(aiosmtplib.SMTPTimeoutError):
                await steps[min(stop_at, 3)]()
            assert 0.9 < time.monotonic() - started < 3

    run(go())
    assert smtp_server.received == []
    assert smtp_server.commands[-1] == ("DATA" if point == "DOT" else point)


def test_stall_data_sends_no_354(smtp_server: SmtpServer) -> None:
    """stall="DATA" withholds the 354 itself (the data is never invited)."""
    smtp_server.stall = "DATA"

    async def go() -> None:
        raw = await Raw.connect(smtp_server)
        await raw.cmd(b"EHLO client.test")
        assert (await raw.cmd(b"MAIL FROM:<a@example.org>")).startswith(b"250 ")
        assert (await raw.cmd(b"RCPT TO:<b@example.org>")).startswith(b"250 ")
        with pytest.raises(TimeoutError):
            await raw.cmd(b"DATA", timeout=0.3)
        await raw.close()

    run(go())


def test_stop_is_bounded_while_stalled() -> None:
    """stop() ends a stalled session promptly and the stalled client sees a disconnect."""
    server = SmtpServer().start()
    server.stall = "MAIL"

    async def go() -> float:
        async with connected(server, timeout=30) as smtp:
            await smtp.ehlo()
            mail = asyncio.ensure_future(smtp.mail(SENDER))
            while "MAIL" not in server.commands:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.to_thread(server.stop)
            elapsed = time.monotonic() - started
            with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                await asyncio.wait_for(mail, 5)
            return elapsed

    assert run(go()) < 5
    server.stop()  # idempotent


@pytest.mark.parametrize("point", ["MAIL", "RCPT", "DATA"])
def test_reply_421_at_closes_connection(smtp_server: SmtpServer, point: str) -> None:
    """reply_421_at=<command>: that command gets 421 and the server closes the connection."""
    smtp_server.reply_421_at = point
    lines = [b"EHLO client.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>"]
    lines.append(b"DATA")

    async def go() -> None:
        raw = await Raw.connect(smtp_server)
        for line in lines:
            reply = await raw.cmd(line)
            if line.startswith(point.encode()):
                assert reply.startswith(b"421 ")
                assert await raw.at_eof()
                break
            assert reply.startswith(b"250")
        else:
            raise AssertionError("421 never sent")
        await raw.close()
        # aiosmtplib maps it to the command's error and drops the connection too.
        async with connected(smtp_server) as smtp:
            with pytest.raises(
                (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused)
            ):
                await smtp.sendmail(SENDER, [RCPT], MESSAGE)
            assert not smtp.is_connected

    run(go())
    assert smtp_server.received == []
    assert smtp_server.sessions == 2


# -- test-thread API -----------------------------------------------------------------------


def test_wait_for_raises_on_timeout_and_wakes_on_arrival(smtp_server: SmtpServer) -> None:
    """wait_for raises AssertionError after the timeout, naming what did arrive, and
    returns as soon as a message sent from another thread arrives."""
    with pytest.raises(AssertionError, match=r"expected 1 message\(s\) within 0.2s, got 0"):
        smtp_server.wait_for(1, timeout=0.2)

    def send_later() -> None:
        time.sleep(0.1)
        run(send(smtp_server))

    sender = threading.Thread(target=send_later)
    sender.start()
    try:
        assert len(smtp_server.wait_for(1, timeout=5)) == 1
    finally:
        sender.join()
    with pytest.raises(AssertionError, match=r"got 1: <session 1: from 'sender@example\.org'"):
        smtp_server.wait_for(2, timeout=0.1)


def test_reset_clears_everything(smtp_server: SmtpServer) -> None:
    """reset() clears received, commands, auth attempts, the session count and faults;
    connection numbers keep increasing so they stay unique."""
    run(send(smtp_server))
    smtp_server.fail_mail = "451 x"
    smtp_server.fail_rcpt = {RCPT: "550 x"}
    smtp_server.fail_data = "451 x"
    smtp_server.fail_next = 3
    smtp_server.drop_after_data = True
    smtp_server.stall = "EHLO"
    smtp_server.reply_421_at = "MAIL"
    smtp_server.reset()
    assert smtp_server.received == []
    assert smtp_server.commands == []
    assert smtp_server.auth_attempts == []
    assert smtp_server.sessions == 0
    run(send(smtp_server))
    [got] = smtp_server.wait_for(1)
    assert got.session == 2
    assert smtp_server.sessions == 1

"""No line over 998 octets reaches the relay: long header lines are folded, long body lines
re-encoded (RFC 5322 2.1.1); checked on real bytes and through the real daemon."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable

from harness import Daemon, drop_maildir
from smtpserver import SmtpServer

from pickupd.message import envelope
from pickupd.outcome import Reason, Refusal


def longest(data: bytes) -> int:
    return max(len(line.rstrip(b"\r")) for line in data.split(b"\n"))


def parsed(raw: bytes) -> envelope.Envelope:
    result = envelope.parse(raw)
    assert isinstance(result, envelope.Envelope), result
    return result


def test_a_long_header_line_is_folded_and_keeps_its_value() -> None:
    """A 3,000-octet Subject: is folded at whitespace; unfolded, it is the same value."""
    subject = " ".join(["word"] * 600)
    raw = f"From: app@example.com\nTo: a@x.example\nSubject: {subject}\n\nbody\n".encode()
    data = parsed(raw).data
    assert longest(data) <= 998
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    assert str(message["Subject"]).replace("\r\n", "") == subject


def test_a_long_header_line_without_whitespace_is_malformed() -> None:
    """A header line that cannot be folded is refused before sending, the field named."""
    raw = b"From: app@example.com\nTo: a@x.example\nX-Token: " + b"x" * 1200 + b"\n\nbody\n"
    result = envelope.parse(raw)
    assert isinstance(result, Refusal) and result.reason is Reason.MALFORMED
    assert result.detail.startswith("X-Token: header line 3 is longer than 998 octets")


def test_a_long_body_line_is_quoted_printable_with_its_charset() -> None:
    """A single-part UTF-8 text with a 5,000-octet line: quoted-printable, charset kept, the
    decoded text unchanged, every other header as it was."""
    text = ("<p>" + "héllo wörld " * 400 + "</p>\n").encode()
    raw = (
        b"From: app@example.com\nTo: a@x.example\nSubject: html\nMIME-Version: 1.0\n"
        b"Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + text
    )
    data = parsed(raw).data
    assert longest(data) <= 998
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content_charset() == "utf-8" and message["Subject"] == "html"
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.replace(b"\r\n", b"\n") == text


def test_only_the_multipart_part_with_a_long_line_is_reencoded() -> None:
    """In a multipart message, the part with the long line is re-encoded (base64 for a
    non-text part) and the others are left byte for byte; a short message is untouched."""
    blob = b"A" * 2000
    raw = (
        b"From: app@example.com\r\nTo: a@x.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nshort text\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n" + blob + b"\r\n--b1--\r\n"
    )
    data = parsed(raw).data
    assert longest(data) <= 998
    assert b"--b1\r\nContent-Type: text/plain\r\n\r\nshort text\r\n" in data
    message = email.message_from_bytes(data, policy=email.policy.default)
    attachment = next(iter(message.iter_attachments()))
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == blob
    short = b"From: app@example.com\r\nTo: a@x.example\r\n\r\nshort\r\n"
    assert parsed(short).data == short


def test_the_relay_never_sees_a_line_over_998_octets(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Through the real daemon: a message with a 10,000-octet body line arrives with no
    line over 998 octets and the same text once decoded."""
    daemon = make_daemon(smtp_server)
    line = b"x" * 10_000
    drop_maildir(daemon.spool, b"From: app@example.com\nTo: alice@example.net\n\n" + line + b"\n")
    (got,) = smtp_server.wait_for(1)
    assert longest(got.data) <= 998
    message = email.message_from_bytes(got.data, policy=email.policy.default)
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.rstrip(b"\r\n") == line

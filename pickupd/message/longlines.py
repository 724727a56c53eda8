"""No line longer than 998 octets goes on the wire (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6).

Apps write HTML without line breaks; a strict relay refuses such a message for good, after the
whole of it was sent, and a lenient one cuts the line where it likes. So before relaying:

- an over-long header line is folded at its last whitespace before the limit (folding does not
  change the field's value); one that has no whitespace to fold at cannot be sent as it is, and
  the message is refused as malformed, the field named;
- a body part with an over-long line is re-encoded: quoted-printable for text (its charset
  kept), base64 for anything else, with MIME-Version and the part's Content-Transfer-Encoding
  set to match. Other parts, the MIME structure and every header are left as they are.

Only messages that need it are touched (one split of the bytes finds out).
"""

from __future__ import annotations

import base64
import io
import quopri
import re
from typing import TYPE_CHECKING

from pickupd.errors import TooLong

if TYPE_CHECKING:
    from email.message import Message

__all__ = ["LIMIT", "MIME_NESTING_LIMIT", "TooLong", "fit"]

LIMIT = 998  # octets, without the CRLF
# The most multipart containers a message to re-encode may hold (which bounds its depth).
MIME_NESTING_LIMIT = 100
_MULTIPART = re.compile(rb"^content-type:\s*multipart/", re.IGNORECASE | re.MULTILINE)


def fit(head: bytes, body: bytes) -> bytes:
    """`head + body` (CRLF line ends) with no line longer than LIMIT; TooLong if a header
    line cannot be folded."""
    if _too_long(head):
        head = _fold(head)
    if _too_long(body):
        return _encode(head, body)
    return head + body


def _too_long(data: bytes, crlf: bool = True) -> bool:
    """Whether a line of `data` (CRLF line ends, else LF) is longer than LIMIT: one split
    in C (the CR stays on each piece)."""
    return len(data) > LIMIT and max(map(len, data.split(b"\n"))) > LIMIT + crlf


def _fold(head: bytes) -> bytes:
    out = []
    name = ""
    for number, line in enumerate(head.split(b"\r\n"), start=1):
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0][:40].decode("ascii", "replace")
        while len(line) > LIMIT:
            cut = max(line.rfind(b" ", 1, LIMIT), line.rfind(b"\t", 1, LIMIT))
            if cut <= 0 or (len(line) - cut > LIMIT and line.find(b" ", cut + 1) < 0):
                raise TooLong(
                    f"{name}: header line {number} is longer than {LIMIT} octets and has no"
                    " space to fold it at"
                )
            out.append(line[:cut])
            line = line[cut:]  # the continuation starts with the whitespace
        out.append(line)
    return b"\r\n".join(out)


def _encode(head: bytes, body: bytes) -> bytes:
    # The email package parses and writes MIME by recursion: a part nested thousands deep
    # would raise RecursionError, every attempt. Refused up front, as Postfix refuses mail
    # nested deeper than its mime_nesting_limit (100).
    containers = len(_MULTIPART.findall(head)) + len(_MULTIPART.findall(body))
    if containers > MIME_NESTING_LIMIT:
        raise TooLong(
            f"{containers} multipart parts, more than {MIME_NESTING_LIMIT}: a line longer than"
            f" {LIMIT} octets cannot be re-encoded in a structure that deep"
        )
    # The email package is imported only here: most mail never needs it (memory, start-up).
    import email.generator
    import email.parser
    import email.policy

    policy = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
    message = email.parser.BytesParser(policy=policy).parsebytes(head + body)
    for part in message.walk():
        if part.is_multipart() or not _has_long_line(part):
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n"))
            part.set_payload(encoded.decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(raw).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
        if part is message and "Content-Type" not in message:
            charset = "us-ascii" if raw.isascii() else "utf-8"
            message["Content-Type"] = f"text/plain; charset={charset}"
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    out = io.BytesIO()
    generator = email.generator.BytesGenerator(out, mangle_from_=False, policy=policy)
    generator.flatten(message)
    return out.getvalue()


def _has_long_line(part: Message) -> bool:
    """Whether the part's lines, as they would go on the wire, are too long."""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding in ("base64", "quoted-printable"):
        encoded = part.get_payload(decode=False)  # ASCII, if the writer encoded it properly
        raw = encoded.encode("ascii", "replace") if isinstance(encoded, str) else b""
    else:
        decoded = part.get_payload(decode=True)  # 7bit, 8bit, binary: the bytes as they are
        raw = decoded if isinstance(decoded, bytes) else b""
    return _too_long(raw.replace(b"\r\n", b"\n"), crlf=False)

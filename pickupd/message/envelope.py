"""Read a dropped mail file: its envelope (sender, recipients) and the exact bytes to relay.

This is the only header parser of the project. It is strict on purpose: the addresses found
here decide who receives the mail, so a file that could be read two ways is refused as
malformed rather than guessed at (the lenient parsers behind CVE-2023-27043 guessed). The
message is never regenerated: line endings are normalised to CRLF and the envelope-only lines
(Bcc:, a leading X-Sender/X-Receiver block) are cut out, nothing else changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pickupd.errors import AddressError, Malformed, TooLong
from pickupd.message import longlines
from pickupd.message.addresses import is_null, parse_address_list, qualify, unique
from pickupd.message.priority import MARK_FIELDS, MailClass, marked
from pickupd.outcome import Reason, Refusal

__all__ = [
    "NO_DSN",
    "AddressError",
    "Completion",
    "Dsn",
    "Envelope",
    "field_names",
    "header_addresses",
    "header_end",
    "parse",
    "parse_address_list",
    "split",
]


@dataclass(frozen=True, slots=True)
class Dsn:
    """Delivery status notification requests (RFC 3461) that came with an X-Sender /
    X-Receiver envelope (Exchange's Replay format): relayed where the server offers DSN."""

    mail: tuple[str, ...] = ()  # RET=..., ENVID=...
    rcpt: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (recipient lower-cased, NOTIFY/ORCPT)

    def for_recipient(self, recipient: str) -> tuple[str, ...]:
        lowered = recipient.lower()
        return next((params for r, params in self.rcpt if r == lowered), ())


NO_DSN = Dsn()


@dataclass(frozen=True, slots=True)
class Envelope:
    """What one mail file says: envelope addresses, From: addresses and the bytes to send."""

    sender: str | None
    recipients: tuple[str, ...]
    header_from: tuple[str, ...]
    data: bytes
    message_id: str | None
    # Every address a mail client may show as the author: From:, Sender:, Resent-From:,
    # Resent-Sender:, as (field name, address); policy.py checks each against the allow-list.
    authors: tuple[tuple[str, str], ...] = ()
    dsn: Dsn = NO_DSN
    added: tuple[str, ...] = ()  # fields pickupd added (Completion): "Date", "Message-ID"
    marked: MailClass = MailClass.NORMAL  # the class its own fields mark (message/priority.py)


# ---- The message: header fields as bytes, the envelope taken from them.

_EOL = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+(?=:)")
_LABELS = {
    name.lower(): name
    for name in (
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "X-Sender",
        "X-Receiver",
        "Resent-From",
        "Resent-Sender",
    )
}
# Control characters have no place in a header field (RFC 5322 3.2.3: only WSP and printable
# characters; CR and LF only as the line ends the parser has already taken apart). A NUL in
# a Subject: is relayed by some servers and cut by others: refused, never guessed.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(slots=True)
class _Field:
    name: str  # lower case
    lines: list[bytes]  # each with its CRLF (the last may lack it)
    local_domain: str | None = None

    def value(self) -> bytes:
        """The unfolded value: folding CRLFs removed, the WSP after them kept."""
        return b"".join(line.removesuffix(b"\r\n") for line in self.lines)[len(self.name) + 1 :]

    def addresses(self, *, null_ok: bool = False) -> list[str] | None:
        """Its addr-specs; None for `<>` when `null_ok`. Malformed if not UTF-8 or not RFC 5322."""
        label = _LABELS[self.name]
        try:
            value = self.value().decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{label}: invalid UTF-8") from None
        if null_ok and is_null(value):
            return None
        try:
            found, rewritten = qualify(value, self.local_domain)
        except AddressError as error:
            raise Malformed(f"{label}: {error}") from None
        if rewritten is not None:
            # Bare names qualified: the relayed field carries the qualified addresses too
            # (relays refuse an unqualified From:), every other character as it was.
            name = self.lines[0][: len(self.name)]
            self.lines = [name + b":" + rewritten.encode("utf-8") + b"\r\n"]
        return found

    def mailbox(self) -> str | None:
        """The single address of a sender field, None for `<>`."""
        found = self.addresses(null_ok=True)
        if found is not None and len(found) != 1:
            problem = "more than one address" if found else "no address"
            raise Malformed(f"{_LABELS[self.name]}: {problem}")
        return found[0] if found else None


def _split_fields(head: bytes, local_domain: str | None) -> list[_Field]:
    """The header section (CRLF line ends) as fields, each with its continuation lines."""
    fields: list[_Field] = []
    for number, line in enumerate(head.splitlines(keepends=True), start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise Malformed(f"line {number} starts with whitespace")
            fields[-1].lines.append(line)
            continue
        match = _FIELD_NAME.match(line)
        if match is None:
            raise Malformed(f"line {number} is not a header field")
        fields.append(_Field(match.group().decode("ascii").lower(), [line], local_domain))
    for f in fields:
        control = next(filter(None, map(_CONTROL.search, f.lines)), None)
        if control is not None:
            name = f.lines[0][: len(f.name)].decode("ascii")
            raise Malformed(f"{name}: control character {chr(control.group()[0])!r}")
    return fields


# An ESMTP parameter after the address (RFC 5321 4.1.2): keyword[=value].
_ESMTP_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?")
# The ones worth passing on to a relay that offers DSN; BODY, SIZE and the rest we set
# ourselves from the message, and anything else is dropped.
_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")


def _address_and_params(f: _Field) -> tuple[str | None, list[str], dict[str, str]]:
    """X-Sender / X-Receiver as Exchange's Replay folder writes them: an address, then ESMTP
    parameters (`<a@b> NOTIFY=NEVER ORCPT=rfc822;a@b`), maybe folded. Returns the address
    (None for `<>`), the addresses of a plain list, and the parameters by keyword."""
    label = _LABELS[f.name]
    try:
        value = f.value().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Malformed(f"{label}: invalid UTF-8") from None
    if value.startswith("<") and ">" in value:
        address, rest = value[: value.index(">") + 1], value[value.index(">") + 1 :]
        if rest and not rest[:1].isspace():
            raise Malformed(f"{label}: no space after the address")
    else:
        address, rest = value, ""
    params: dict[str, str] = {}
    for token in rest.split():
        if not _ESMTP_PARAM.fullmatch(token):
            raise Malformed(f"{label}: not an ESMTP parameter: {token!r}"[:200])
        keyword, _, argument = token.partition("=")
        params[keyword.upper()] = argument
    if f.name == "x-sender" and is_null(address):
        return None, [], params
    try:
        found, _ = qualify(address, f.local_domain)
    except AddressError as error:
        raise Malformed(f"{label}: {error}") from None
    return (found[0] if len(found) == 1 else None), found, params


def _pickup_envelope(fields: list[_Field]) -> tuple[str | None, list[str], Dsn]:
    """Sender, recipients and DSN requests from the leading X-Sender / X-Receiver fields."""
    senders = [f for f in fields if f.name == "x-sender"]
    # Anything but one sender and some receivers is refused: falling back to To/Cc would
    # relay the X-Receiver lines (Bcc recipients among them) to everyone.
    if len(senders) != 1:
        raise Malformed("more than one X-Sender: header" if senders else "no X-Sender: header")
    if len(fields) == 1:
        raise Malformed("no X-Receiver: header")
    sender, found, params = _address_and_params(senders[0])
    if sender is None and found:
        raise Malformed("X-Sender: more than one address")
    mail = tuple(f"{k}={params[k]}" for k in _DSN_MAIL if params.get(k))
    recipients: list[str] = []
    rcpt: list[tuple[str, tuple[str, ...]]] = []
    for f in fields:
        if f.name == "x-receiver":
            _, found, params = _address_and_params(f)
            if not found:
                raise Malformed("X-Receiver: no address")
            recipients.extend(found)
            wanted = tuple(f"{k}={params[k]}" for k in _DSN_RCPT if params.get(k))
            if wanted:
                rcpt.extend((address.lower(), wanted) for address in found)
    return sender, recipients, Dsn(mail, tuple(rcpt))


def _crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF (lone LF and lone CR included), copying only if need be."""
    if b"\r" not in raw:
        return raw.replace(b"\n", b"\r\n")
    crlf = raw.count(b"\r\n")
    if crlf == raw.count(b"\r") == raw.count(b"\n"):
        return raw
    return _EOL.sub(b"\r\n", raw)


def split(raw: bytes) -> tuple[bytes, bytes]:
    """The header section (ending with its last field's CRLF, if it has one) and the body
    (starting with the empty line), every line ending as CRLF."""
    text = _crlf(raw)
    if text.startswith(b"\r\n"):
        return b"", text
    end = text.find(b"\r\n\r\n")
    if end < 0:
        return text, b""
    return text[: end + 2], text[end + 2 :]


def header_end(head: bytes) -> int:
    """Where the header fields of `head` (CRLF line ends) end: the offset of the first line
    that is neither a field nor a continuation of one (len(head) if every line is)."""
    offset = 0
    for number, line in enumerate(head.splitlines(keepends=True)):
        if not (_FIELD_NAME.match(line) or (number and line[:1] in (b" ", b"\t"))):
            return offset
        offset += len(line)
    return offset


def field_names(head: bytes) -> set[str]:
    """The names (lower case) of the fields of a header section, as the parser reads them;
    lines that are not fields are skipped (parse() refuses them)."""
    names = set()
    for line in head.splitlines():
        match = _FIELD_NAME.match(line)
        if match is not None:
            names.add(match.group().decode("ascii").lower())
    return names


def header_addresses(data: bytes, names: tuple[str, ...]) -> list[str]:
    """The addresses of the fields `names` (lower case) of a message as parse() left it
    (the same parser: Graph, which reads recipients from the header, sees these)."""
    head, _ = split(data)
    found: list[str] = []
    for f in _split_fields(head, None):
        if f.name in names:
            found.extend(f.addresses(null_ok=True) or [])
    return found


@dataclass(frozen=True, slots=True)
class Completion:
    """What a message that lacks `Date:` or `Message-ID:` is given, as Postfix completes
    locally submitted mail (Gmail and others refuse or penalise mail without them). Both are
    the same at every attempt: the date is when the message was first claimed, the id is
    pickupd's own, on the sender's domain (or the host's, for a sender without one)."""

    first_seen: float
    id: str
    host: str

    def fields(self, sender: str | None, present: set[str]) -> tuple[bytes, tuple[str, ...]]:
        """The header lines to add (CRLF) and their names."""
        import email.utils  # only for mail that needs it

        lines, added = b"", []
        if "date" not in present:
            date = email.utils.formatdate(self.first_seen, usegmt=True)
            lines += f"Date: {date}\r\n".encode("ascii")
            added.append("Date")
        if "message-id" not in present:
            domain = (sender or "").rpartition("@")[2]
            if not domain or domain.startswith("["):
                domain = self.host
            lines += f"Message-ID: <{self.id}@{domain}>\r\n".encode()
            added.append("Message-ID")
        return lines, tuple(added)


def parse(
    raw: bytes,
    *,
    max_header_size: int = 65536,
    local_domain: str | None = None,
    complete: Completion | None = None,
) -> Envelope | Refusal:
    """Envelope, or Refusal(Reason.MALFORMED, detail) — the only header parser of the project.
    With `local_domain`, bare local parts ("root") in the envelope and in From/Sender/To/Cc
    are qualified as root@local_domain, in the envelope and in the relayed header fields.
    With `complete`, a missing Date: or Message-ID: is added in front of the header."""
    try:
        return _parse(raw, max_header_size, local_domain, complete)
    except Malformed as error:
        return Refusal(Reason.MALFORMED, str(error))


class _Fields:
    """The header fields after the envelope's, read one by one: what is kept for the relay,
    the authors, the Message-ID, the recipients (of a plain RFC 5322 file) and the marks of
    its class."""

    def __init__(self, recipients: list[str]) -> None:
        self.recipients = recipients
        self.kept: list[_Field] = []  # joined at the end: qualifying a name rewrites a field
        self.single: dict[str, _Field] = {}  # From: and Sender:, which may appear once
        self.message_id: str | None = None
        self.authors: list[tuple[str, str]] = []
        self.marks: list[tuple[str, bytes]] = []

    def take(self, f: _Field, pickup: bool) -> None:
        if f.name != "bcc":  # Bcc: is for the envelope only, in both formats
            self.kept.append(f)
        if f.name in ("from", "sender"):
            if f.name in self.single:
                raise Malformed(f"more than one {_LABELS[f.name]}: header")
            self.single[f.name] = f
        elif f.name in ("to", "cc", "bcc"):
            # Checked in both formats, so a bad To: never reaches the relay's readers.
            found = f.addresses() or []
            if not pickup:
                self.recipients.extend(found)
        elif f.name == "message-id" and self.message_id is None:
            self.message_id = f.value().decode("utf-8", "replace").strip() or None
        elif f.name in ("resent-from", "resent-sender"):
            # One per resent block, so they may repeat; each must parse and is an author.
            found = f.addresses(null_ok=True) or []
            self.authors.extend((_LABELS[f.name], address) for address in found)
        elif f.name in MARK_FIELDS:
            self.marks.append((f.name, f.value()))


def _parse(
    raw: bytes, max_header_size: int, local_domain: str | None, complete: Completion | None
) -> Envelope:
    """parse(), raising Malformed."""
    if not raw or raw.isspace():  # (not strip(): no copy of a large file)
        raise Malformed("empty file")
    # The header section ends at the first empty line; it is measured with CRLF line ends,
    # as it will be sent.
    head, body = split(raw)
    if len(head) > max_header_size:
        raise Malformed(f"header section larger than {max_header_size} bytes")
    fields = _split_fields(head, local_domain)

    # IIS / System.Net.Mail pickup files start with the envelope as X-Sender / X-Receiver lines.
    run = 0
    while run < len(fields) and fields[run].name in ("x-sender", "x-receiver"):
        run += 1
    pickup = run > 0
    sender, recipients, dsn = _pickup_envelope(fields[:run]) if pickup else (None, [], Dsn())

    read = _Fields(recipients)
    for f in fields[run:]:
        read.take(f, pickup)
    kept, authors, message_id = read.kept, read.authors, read.message_id
    from_field, sender_field = read.single.get("from"), read.single.get("sender")
    header_from = tuple(from_field.addresses(null_ok=True) or []) if from_field else ()
    header_sender = sender_field.mailbox() if sender_field else None  # checked in both formats
    authors[:0] = [("From", address) for address in header_from]
    if header_sender is not None:
        authors.insert(len(header_from), ("Sender", header_sender))
    if not pickup:
        if sender_field is not None:
            sender = header_sender
        elif len(header_from) == 1:
            sender = header_from[0]

    head = b"".join(line for f in kept for line in f.lines)
    added: tuple[str, ...] = ()
    if complete is not None:
        lines, added = complete.fields(sender, {f.name for f in fields})
        head = lines + head
        if "Message-ID" in added:
            message_id = lines.rpartition(b"Message-ID: ")[2].strip().decode()
    try:
        data = longlines.fit(head, body)
    except TooLong as error:
        raise Malformed(str(error)) from None
    return Envelope(
        sender,
        tuple(unique(read.recipients)),
        header_from,
        data,
        message_id,
        tuple(authors),
        dsn,
        added,
        marked(read.marks) if read.marks else MailClass.NORMAL,
    )

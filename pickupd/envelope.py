"""Read a dropped mail file: its envelope (sender, recipients) and the exact bytes to relay.

This is the only header parser of the project. It is strict on purpose: the addresses found
here decide who receives the mail, so a file that could be read two ways is refused as
malformed rather than guessed at (the lenient parsers behind CVE-2023-27043 guessed). The
message is never regenerated: line endings are normalised to CRLF and the envelope-only lines
(Bcc:, a leading X-Sender/X-Receiver block) are cut out, nothing else changes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from pickupd.outcome import Reason, Refusal

__all__ = ["AddressError", "Envelope", "field_names", "parse", "parse_address_list", "split"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What one mail file says: envelope addresses, From: addresses and the bytes to send."""

    sender: str | None
    recipients: tuple[str, ...]
    header_from: tuple[str, ...]
    data: bytes
    message_id: str | None


class AddressError(ValueError):
    """An address header value that does not follow the RFC 5322 grammar."""


# ---- Addresses: a tokenizer, then recursive descent over RFC 5322 3.4 (with RFC 6532 UTF-8).

_SPECIALS = frozenset("<>@,;:.\\")
_WORDS = ("atom", "quoted")
# One token at a match. atext takes any non-ASCII character but C1 controls (RFC 6532);
# comments nest, so they are skipped by hand (_skip_comment), not by this expression.
_TOKEN = re.compile(
    r"(?P<space>[ \t]+)"
    r'|(?P<quoted>"(?:[^"\\]|\\.)*")'
    r"|(?P<literal>\[[^\[\]\\\x00-\x08\x0a-\x1f\x7f-\x9f]*\])"
    r"|(?P<atom>[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u00a0-\U0010ffff]+)"
    r"|(?P<special>[<>@,;:.\\])"
)


class _Token(NamedTuple):
    kind: str  # "atom", "quoted", "literal", "end", or the special character itself
    text: str  # as written (a quoted string keeps its quotes and quoted-pairs)
    spaced: bool  # whitespace or a comment came just before it
    end: int = 0  # where it ends in the value (to qualify a bare local part in place)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char != "\t"


def _tokenize(value: str) -> list[_Token]:
    """Split `value` into tokens, dropping whitespace and comments but noting where they were."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise AddressError("CR, LF or NUL in value")
    tokens: list[_Token] = []
    spaced = False
    i = 0
    while i < len(value):
        if value[i] == "(":
            i, spaced = _skip_comment(value, i), True
            continue
        match = _TOKEN.match(value, i)
        if match is None:
            raise _bad_character(value, i)
        i, kind, text = match.end(), match.lastgroup or "", match.group()
        if kind == "space":
            spaced = True
            continue
        tokens.append(_Token(text if kind == "special" else kind, text, spaced, i))
        spaced = False
    tokens.append(_Token("end", "", spaced, len(value)))
    return tokens


def _bad_character(value: str, i: int) -> AddressError:
    """Why no token starts at `i`."""
    char = value[i]
    if char == '"':
        return AddressError("unbalanced quote")
    if char == "[":
        return AddressError("bad domain literal" if "]" in value[i:] else "unbalanced bracket")
    if char in ")]":
        return AddressError("unbalanced parenthesis" if char == ")" else "unbalanced bracket")
    return AddressError(f"control character {char!r}")


def _skip_comment(value: str, i: int) -> int:
    """Index just past the (possibly nested) comment that opens at `i`."""
    depth = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            i += 1
            char = value[i]
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        if _is_control(char):
            raise AddressError(f"control character {char!r}")
        i += 1
    raise AddressError("unbalanced parenthesis")


def _unexpected(token: _Token, default: str, also: str = "") -> AddressError:
    """The error for `token` where it cannot stand; `default` names what is missing there
    (said when the value, an element or the kind `also` ends at `token`)."""
    if token.kind in ("end", ",", ";", also):
        return AddressError(default)
    if token.kind == ">":
        return AddressError("unbalanced angle bracket")
    if token.kind == "literal":
        return AddressError("unexpected domain literal")
    if token.kind in _SPECIALS:
        return AddressError(f"unexpected {token.text!r}")
    return AddressError(default)


# Said where an address has no @: local tools (cron, mailx) write bare names like "root".
_NO_AT = "address without @"
_NO_AT_HINT = f"{_NO_AT} (set [policy] local_domain to qualify bare names like root)"


class _Parser:
    """Recursive descent over the tokens of one header value; methods return addr-specs.

    With `local_domain`, a mailbox that is a bare local part (`root`, `root (Cron Daemon)`,
    `Cron <root>`) is qualified as `root@<local_domain>`, as Postfix's myorigin does; where
    its domain goes in the value is noted in `qualified` (offsets, for rewriting the header).
    """

    def __init__(self, value: str, local_domain: str | None = None) -> None:
        self.tokens = _tokenize(value)
        self.pos = 0
        self.local_domain = local_domain
        self.qualified: list[int] = []

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        self.pos += 1
        return self.tokens[self.pos - 1]

    def addresses(self, close: str) -> list[str]:
        """Comma-separated addresses up to `close` ("end", or ";" ending a group), taken too."""
        found: list[str] = []
        if self.peek().kind == close:  # an empty To: or an empty group
            self.take()
            return found
        while True:
            found.extend(self.address(in_group=close == ";"))
            token = self.take()
            if token.kind == close:
                return found
            if token.kind == "end":
                raise AddressError("group without ';'")
            if token.kind in (*_WORDS, "literal", "<"):
                raise AddressError("missing ',' between addresses")
            if token.kind != ",":
                raise _unexpected(token, f"unexpected {token.text!r}")

    def address(self, *, in_group: bool) -> list[str]:
        """A mailbox, or (outside a group) a group with its mailboxes."""
        start = self.pos
        # A phrase comes first. Only the token after it tells whether it was a display name,
        # a group name or the local part of a bare addr-spec. Dots: RFC 5322 obs-phrase.
        words = 0
        while self.peek().kind in _WORDS or (self.peek().kind == "." and words):
            self.take()
            words += 1
        token = self.peek()
        if token.kind == "<":
            return [self.angle_addr()]
        if token.kind == "@" or (words and self.local_domain and token.kind in ("end", ",", ";")):
            if not words:
                raise AddressError("empty local part")
            self.pos = start
            return [self.addr_spec()]
        if token.kind == ":" and words:
            if in_group:
                raise AddressError("nested group")
            self.take()
            return self.addresses(";")
        raise _unexpected(token, _NO_AT_HINT if words else "empty element in list")

    def angle_addr(self) -> str:
        self.take()  # "<"
        if self.peek().kind == ">":
            raise AddressError("empty <>")
        if self.peek().kind == "@":
            raise AddressError("route in address")
        spec = self.addr_spec()
        if self.take().kind != ">":
            raise AddressError("unbalanced angle bracket")
        return spec

    def addr_spec(self) -> str:
        """local-part "@" domain, as canonical text: no comments, no whitespace."""
        token = self.take()
        if token.kind == "quoted":
            local = token.text
            if local == '""':
                raise AddressError("empty local part")
            # SMTP cannot carry a control character in an address, even a quoted one.
            if any(_is_control(char) or char == "\t" for char in local):
                raise AddressError("control character in local part")
        elif token.kind == "atom":
            local = self.dot_atom(token.text, "bad local part")
        else:
            raise _unexpected(token, "unbalanced angle bracket")
        if self.local_domain and self.peek().kind in (">", "end", ",", ";"):
            self.qualified.append(self.tokens[self.pos - 1].end)
            return f"{local}@{self.local_domain}"
        token = self.take()
        if token.kind in _WORDS:
            raise AddressError("display name without <> around the address")
        if token.kind != "@":  # after a local part, even ">" means the @ is missing
            raise _unexpected(token, _NO_AT_HINT, also=">")
        token = self.take()
        if token.kind == "literal":
            inner = "".join(token.text[1:-1].split())  # FWS may appear inside the brackets
            if not inner:
                raise AddressError("empty domain literal")
            return f"{local}@[{inner}]"
        if token.kind == "atom":
            return f"{local}@{self.dot_atom(token.text, 'bad domain')}"
        if token.kind == ".":
            raise AddressError("bad domain")
        raise _unexpected(token, "empty domain", also=">")

    def dot_atom(self, first: str, problem: str) -> str:
        """The rest of a dot-atom: no CFWS between its parts (that is obsolete syntax)."""
        parts = [first]
        while self.peek().kind == "." and not self.peek().spaced:
            self.take()
            token = self.take()
            if token.kind != "atom" or token.spaced:
                raise AddressError(problem)
            parts.append(token.text)
        if self.peek().kind == ".":
            raise AddressError(problem)
        return ".".join(parts)


# The shape most apps write, `app@example.com` alone: unambiguous, so it needs no tokenizer.
# Anything else (display names, comments, quotes, lists) takes the full parser below.
_BARE_ADDR_SPEC = re.compile(
    r"[ \t]*([A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
    r"@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*)[ \t]*"
)


def parse_address_list(value: str, local_domain: str | None = None) -> list[str]:
    """The addr-specs of an RFC 5322 address-list, groups flattened; AddressError if malformed.
    With `local_domain`, bare local parts are qualified with it."""
    return _qualify(value, local_domain)[0]


def _qualify(value: str, local_domain: str | None) -> tuple[list[str], str | None]:
    """The addr-specs, and the value rewritten with bare local parts qualified (None if it
    had none)."""
    bare = _BARE_ADDR_SPEC.fullmatch(value)
    if bare is not None:
        return [bare.group(1)], None
    parser = _Parser(value, local_domain)
    found = parser.addresses("end")
    if not parser.qualified:
        return found, None
    rewritten = value
    for offset in reversed(parser.qualified):
        rewritten = f"{rewritten[:offset]}@{local_domain}{rewritten[offset:]}"
    return found, rewritten


def _is_null(value: str) -> bool:
    """True if `value` is the null address `<>` (comments and whitespace aside)."""
    if "<" not in value:
        return False
    try:
        return [token.kind for token in _tokenize(value)] == ["<", ">", "end"]
    except AddressError:
        return False


# ---- The message: header fields as bytes, the envelope taken from them.

_EOL = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+(?=:)")
_LABELS = {
    name.lower(): name for name in ("From", "Sender", "To", "Cc", "Bcc", "X-Sender", "X-Receiver")
}


class _Malformed(Exception):
    """Carries the one-line detail of a MALFORMED refusal up to parse()."""


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
            raise _Malformed(f"{label}: invalid UTF-8") from None
        if null_ok and _is_null(value):
            return None
        try:
            found, rewritten = _qualify(value, self.local_domain)
        except AddressError as error:
            raise _Malformed(f"{label}: {error}") from None
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
            raise _Malformed(f"{_LABELS[self.name]}: {problem}")
        return found[0] if found else None


def _split_fields(head: bytes, local_domain: str | None) -> list[_Field]:
    """The header section (CRLF line ends) as fields, each with its continuation lines."""
    fields: list[_Field] = []
    for number, line in enumerate(head.splitlines(keepends=True), start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise _Malformed(f"line {number} starts with whitespace")
            fields[-1].lines.append(line)
            continue
        match = _FIELD_NAME.match(line)
        if match is None:
            raise _Malformed(f"line {number} is not a header field")
        fields.append(_Field(match.group().decode("ascii").lower(), [line], local_domain))
    return fields


def _pickup_envelope(fields: list[_Field]) -> tuple[str | None, list[str]]:
    """Sender and recipients from the leading X-Sender / X-Receiver fields."""
    senders = [f for f in fields if f.name == "x-sender"]
    # Anything but one sender and some receivers is refused: falling back to To/Cc would
    # relay the X-Receiver lines (Bcc recipients among them) to everyone.
    if len(senders) != 1:
        raise _Malformed("more than one X-Sender: header" if senders else "no X-Sender: header")
    if len(fields) == 1:
        raise _Malformed("no X-Receiver: header")
    recipients: list[str] = []
    for f in fields:
        if f.name == "x-receiver":
            found = f.addresses()
            if not found:
                raise _Malformed("X-Receiver: no address")
            recipients.extend(found)
    return senders[0].mailbox(), recipients


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


def field_names(head: bytes) -> set[str]:
    """The names (lower case) of the fields of a header section, as the parser reads them;
    lines that are not fields are skipped (parse() refuses them)."""
    names = set()
    for line in head.splitlines():
        match = _FIELD_NAME.match(line)
        if match is not None:
            names.add(match.group().decode("ascii").lower())
    return names


def parse(
    raw: bytes, *, max_header_size: int = 65536, local_domain: str | None = None
) -> Envelope | Refusal:
    """Envelope, or Refusal(Reason.MALFORMED, detail) — the only header parser of the project.
    With `local_domain`, bare local parts ("root") in the envelope and in From/Sender/To/Cc
    are qualified as root@local_domain, in the envelope and in the relayed header fields."""
    try:
        return _parse(raw, max_header_size, local_domain)
    except _Malformed as error:
        return Refusal(Reason.MALFORMED, str(error))


def _parse(raw: bytes, max_header_size: int, local_domain: str | None) -> Envelope:
    """parse(), raising _Malformed."""
    if not raw or raw.isspace():  # (not strip(): no copy of a large file)
        raise _Malformed("empty file")
    # The header section ends at the first empty line; it is measured with CRLF line ends,
    # as it will be sent.
    head, body = split(raw)
    if len(head) > max_header_size:
        raise _Malformed(f"header section larger than {max_header_size} bytes")
    fields = _split_fields(head, local_domain)

    # IIS / System.Net.Mail pickup files start with the envelope as X-Sender / X-Receiver lines.
    run = 0
    while run < len(fields) and fields[run].name in ("x-sender", "x-receiver"):
        run += 1
    pickup = run > 0
    sender, recipients = _pickup_envelope(fields[:run]) if pickup else (None, [])

    kept: list[_Field] = []  # joined at the end: qualifying a bare name rewrites its field
    single: dict[str, _Field] = {}  # From: and Sender:, which may appear once
    message_id: str | None = None
    for f in fields[run:]:
        if f.name != "bcc":  # Bcc: is for the envelope only, in both formats
            kept.append(f)
        if f.name in ("from", "sender"):
            if f.name in single:
                raise _Malformed(f"more than one {_LABELS[f.name]}: header")
            single[f.name] = f
        elif f.name in ("to", "cc", "bcc"):
            # Checked in both formats, so a bad To: never reaches the relay's readers.
            found = f.addresses() or []
            if not pickup:
                recipients.extend(found)
        elif f.name == "message-id" and message_id is None:
            message_id = f.value().decode("utf-8", "replace").strip() or None

    from_field, sender_field = single.get("from"), single.get("sender")
    header_from = tuple(from_field.addresses(null_ok=True) or []) if from_field else ()
    header_sender = sender_field.mailbox() if sender_field else None  # checked in both formats
    if not pickup:
        if sender_field is not None:
            sender = header_sender
        elif len(header_from) == 1:
            sender = header_from[0]

    seen: set[str] = set()
    unique: list[str] = []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    head = b"".join(line for f in kept for line in f.lines)
    return Envelope(sender, tuple(unique), header_from, head + body, message_id)

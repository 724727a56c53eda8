"""RFC 5322 addresses (with RFC 6532 UTF-8): a tokenizer, then recursive descent over the
address-list grammar of section 3.4. Part of the one header parser (envelope.py uses it).

Strict on purpose: a value that could be read two ways (unbalanced quotes or brackets,
specials outside quotes, CR, LF, NUL) is an `AddressError`, never a guess.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

from pickupd.errors import AddressError

__all__ = ["AddressError", "is_null", "parse_address_list", "qualify", "unique"]


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
            local = canonical_local(token.text)
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
            return f"{local}@{self.dot_atom(token.text, 'bad domain').lower()}"
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


# A dot-atom local part (RFC 6532 atext: any non-ASCII character but C1 controls).
_ATOM_TEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u00a0-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATOM_TEXT}(?:\.{_ATOM_TEXT})*")


def canonical_local(quoted: str) -> str:
    """A quoted local part (quotes included) in its one canonical form (RFC 5321 4.1.2): the
    dot-atom when its content is one (`"alice"` and `"al\\ice"` are `alice`), else the
    quoted string with only `"` and `\\` escaped. Every rule is looked up by this form, so a
    quoted spelling can never reach an entry other than the one its address names."""
    content = re.sub(r"\\(.)", r"\1", quoted[1:-1])
    if not content:
        raise AddressError("empty local part")
    # SMTP cannot carry a control character in an address, even a quoted one.
    if any(_is_control(char) or char == "\t" for char in content):
        raise AddressError("control character in local part")
    if _DOT_ATOM.fullmatch(content):
        return content
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# The shapes most apps write, `app@example.com` and `App Name <app@example.com>` (ASCII atoms
# only): unambiguous, so they need no tokenizer (a third of what parsing a message costs).
# Anything else (quotes, comments, dots in names, lists, non-ASCII) takes the full parser
# below; tests/test_properties.py checks the two agree.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
_BARE_ADDR_SPEC = re.compile(rf"[ \t]*({_ADDR_SPEC})[ \t]*")
_NAME_ADDR = re.compile(rf"[ \t]*(?:{_ATEXT}(?:[ \t]+{_ATEXT})*[ \t]*)?<({_ADDR_SPEC})>[ \t]*")
_NULL = re.compile(r"[ \t]*<[ \t]*>[ \t]*")


def parse_address_list(value: str, local_domain: str | None = None) -> list[str]:
    """The addr-specs of an RFC 5322 address-list, groups flattened; AddressError if malformed.
    With `local_domain`, bare local parts are qualified with it."""
    return qualify(value, local_domain)[0]


def qualify(value: str, local_domain: str | None) -> tuple[list[str], str | None]:
    """The addr-specs, and the value rewritten with bare local parts qualified (None if it
    had none)."""
    simple = _BARE_ADDR_SPEC.fullmatch(value) or _NAME_ADDR.fullmatch(value)
    if simple is not None:
        local, _, domain = simple.group(1).partition("@")
        return [f"{local}@{domain.lower()}"], None
    parser = _Parser(value, local_domain)
    found = parser.addresses("end")
    if not parser.qualified:
        return found, None
    rewritten = value
    for offset in reversed(parser.qualified):
        rewritten = f"{rewritten[:offset]}@{local_domain}{rewritten[offset:]}"
    return found, rewritten


def is_null(value: str) -> bool:
    """True if `value` is the null address `<>` (comments and whitespace aside)."""
    if "<" not in value or ">" not in value:
        return False
    if "(" not in value:  # no comment: only whitespace may surround the <>
        return _NULL.fullmatch(value) is not None
    try:
        return [token.kind for token in _tokenize(value)] == ["<", ">", "end"]
    except AddressError:
        return False


def unique(addresses: list[str]) -> list[str]:
    """Each address once, compared without case (as servers treat the local part), in the
    order given, the first spelling kept."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return list(seen.values())

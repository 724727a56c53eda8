"""Message ids: sortable by time, unique across processes and hosts, safe as file names."""

from __future__ import annotations

import os
import re
import time

__all__ = ["is_valid", "new"]

# Crockford's base32: no I, L, O, U, so an id read aloud or typed by an operator is unambiguous.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def _encode(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, index = divmod(number, 32)
        chars.append(_ALPHABET[index])
    return "".join(reversed(chars))


def new() -> str:
    """A 26-character id: 48 bits of milliseconds then 80 random bits (the ULID layout)."""
    millis = time.time_ns() // 1_000_000
    return _encode(millis, 10) + _encode(int.from_bytes(os.urandom(10), "big"), 16)


def is_valid(text: str) -> bool:
    """True if `text` has the shape of an id (so it is safe to use in a path)."""
    return bool(_VALID.match(text))

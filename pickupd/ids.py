"""Message ids: sortable by time, unique across processes and hosts, safe as file names."""

from __future__ import annotations

import base64
import os
import re
import time

__all__ = ["is_valid", "new"]

# Crockford's base32: no I, L, O, U, so an id read aloud or typed by an operator is unambiguous;
# its alphabet is in ASCII order, so ids sort as their bits do (time first).
_ALPHABET = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)
_VALID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def new() -> str:
    """A 26-character id: 48 bits of milliseconds then 80 random bits (the ULID fields)."""
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)
    # 128 bits are 25.6 base32 digits: the 26th carries the last 3 bits (and 2 zero bits).
    return base64.b32encode(raw)[:26].translate(_FROM_RFC4648).decode("ascii")


def is_valid(text: str) -> bool:
    """True if `text` has the shape of an id (so it is safe to use in a path)."""
    return bool(_VALID.match(text))

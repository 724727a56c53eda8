"""Message ids: sortable by time, unique across processes and hosts, safe as file names.

An id is a ULID (https://github.com/ulid/spec): 48 bits of milliseconds then 80 random bits,
as 26 characters of Crockford's base32, so any ULID library reads its time. pickupd before
0.2 put the two spare bits at the end instead of the front; such ids are still valid, and
`sort_key` orders both kinds by their time.
"""

from __future__ import annotations

import os
import re
import time

__all__ = ["is_valid", "new", "sort_key", "timestamp"]

# Crockford's base32: no I, L, O, U, so an id read aloud or typed by an operator is unambiguous;
# its alphabet is in ASCII order, so ids sort as their bits do (time first).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {char: value for value, char in enumerate(_ALPHABET)}
_VALID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
# Ids of pickupd < 0.2 (spare bits last), from 2004 to 2109: "0" then 4-7 where a ULID of
# the same years has "01" (its first 3 bits of time are zero, the 4th is one until 2527).
_OLD_FORM = re.compile(r"^0[4-7]")


def new() -> str:
    """A new 26-character ULID: 48 bits of milliseconds then 80 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return _encode(value)


def _encode(value: int) -> str:
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


def _decode(text: str) -> int:
    value = 0
    for char in text:
        value = value << 5 | _VALUE[char]
    return value


def _bits(msg_id: str) -> int:
    """The 128 bits of an id, of either form."""
    value = _decode(msg_id)
    return value >> 2 if _OLD_FORM.match(msg_id) else value


def is_valid(text: str) -> bool:
    """True if `text` has the shape of an id (so it is safe to use in a path)."""
    return bool(_VALID.match(text))


def sort_key(msg_id: str) -> str:
    """A key that orders ids by time, whichever form they have (a valid id)."""
    return _encode(_bits(msg_id)) if _OLD_FORM.match(msg_id) else msg_id


def timestamp(msg_id: str) -> float:
    """The time (Unix seconds) a valid id was made."""
    return (_bits(msg_id) >> 80) / 1000.0

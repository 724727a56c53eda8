"""Durations ("250ms", "30s", "5m", "2h", "5d"), sizes ("25MiB"), rates ("30/min") and provider
limits ("10000 recipients/day", "3 connections"): pure parsers.

A limit's window is rolling: "10000 recipients/day" means no 24 hours, wherever they start,
see more than 10,000 recipients. `rate = "30/min"` is the older spelling of "30 messages/min".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pickupd.errors import Invalid

__all__ = [
    "Limit",
    "Rate",
    "format_duration",
    "format_size",
    "from_rate",
    "merged",
    "parse_duration",
    "parse_limit",
    "parse_limits",
    "parse_rate",
    "parse_size",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_BYTES = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(text: str) -> float:
    """Return seconds for a duration string; raise Invalid with the expected form."""
    match = _DURATION.match(text)
    if not match:
        raise Invalid(f'expected a duration like "250ms", "30s", "5m", "2h" or "5d", got "{text}"')
    return float(match.group(1)) * _SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """Render seconds the way a person reads them ("1.5s", "2h", "3d")."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size:
            value = seconds / size
            return (
                f"{value:.0f}{unit}" if value >= 10 or value.is_integer() else f"{value:.1f}{unit}"
            )
    return f"{seconds * 1000:.0f}ms"


def format_size(size: int) -> str:
    """Render bytes as the config writes them: "25MiB", "64KiB", or the plain number."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_size(value: int | str) -> int:
    """Return bytes for an integer or a string like "25MiB"; raise Invalid otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise Invalid(f"expected a positive size, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(match.group(1)) * _BYTES[(match.group(2) or "b").lower()]
            if size > 0:
                return size
    raise Invalid(f'expected a size like 26214400 or "25MiB", got {value!r}')


# The one table of window names (a rate's "30/min", a limit's "/hour"), and how a window of
# that many seconds is shown.
_WINDOWS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_NAMES = {1.0: "s", 60.0: "min", 3600.0: "hour", 86400.0: "day"}
_RATE = re.compile(rf"^\s*(\d+)\s*/\s*({'|'.join(_WINDOWS)})\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` messages every `per` seconds (a token bucket of `count` tokens)."""

    count: int
    per: float

    def __str__(self) -> str:
        unit = _NAMES.get(self.per)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per}s"


def parse_rate(text: str) -> Rate:
    """Return the Rate for "30/min" (also "/s", "/h", "/day"); raise Invalid otherwise."""
    match = _RATE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise Invalid(
            f'expected a rate like "30/min", "5/s", "1000/h" or "10000/day", got "{text}"'
        )
    return Rate(int(match.group(1)), _WINDOWS[match.group(2).lower()])


Unit = Literal["messages", "recipients", "connections", "per_message"]

_LIMIT = re.compile(
    r"^\s*(\d[\d_,]*)\s+(messages?|recipients?|connections?)\s*(?:/\s*(\S+))?\s*$", re.IGNORECASE
)
_FORM = (
    'expected a limit like "30 messages/min", "10000 recipients/day", "3 connections" or'
    ' "500 recipients/message"'
)


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `amount` of `unit` in any `window` seconds (connections: open at once;
    per_message: recipients in one message)."""

    amount: int
    unit: Unit
    window: float = 0.0

    def __str__(self) -> str:
        if self.unit == "connections":
            return f"{self.amount} connections"
        if self.unit == "per_message":
            return f"{self.amount} recipients/message"
        window = _NAMES.get(self.window) or format_duration(self.window)
        return f"{self.amount} {self.unit}/{window}"

    @property
    def counted(self) -> bool:
        """A limit over a rolling window (kept in the ledger)."""
        return self.unit in ("messages", "recipients")

    @property
    def kind(self) -> tuple[str, float]:
        """What a sender's limit overrides in a preset: the same unit over the same window."""
        return self.unit, self.window


def parse_limit(text: str) -> Limit:
    """The Limit a string says; raise Invalid naming the expected form."""
    match = _LIMIT.match(text)
    if not match:
        raise Invalid(f'{_FORM}, got "{text}"')
    amount = int(match.group(1).replace("_", "").replace(",", ""))
    noun, per = match.group(2).lower(), (match.group(3) or "").lower()
    if amount <= 0:
        raise Invalid(f'a limit must be at least 1, got "{text}"')
    if noun.startswith("connection"):
        if per:
            raise Invalid(f'connections are counted open at once, without a window: "{text}"')
        return Limit(amount, "connections")
    if not per:
        raise Invalid(f'{_FORM}: "{text}" has no window ("/min", "/day", "/60s")')
    unit: Unit = "recipients" if noun.startswith("recipient") else "messages"
    if per == "message":
        if unit != "recipients":
            raise Invalid(f'per message, only recipients are counted: "{text}"')
        return Limit(amount, "per_message")
    window = _WINDOWS.get(per)
    if window is None:
        try:
            window = parse_duration(per)
        except Invalid:
            raise Invalid(f'{_FORM}: unknown window "/{per}" in "{text}"') from None
    if window <= 0:
        raise Invalid(f'a window must be longer than 0: "{text}"')
    return Limit(amount, unit, window)


def parse_limits(value: Sequence[str]) -> tuple[Limit, ...]:
    """A list of limit strings, in order; the first one that does not parse raises."""
    return tuple(parse_limit(item) for item in value)


def from_rate(rate: Rate) -> Limit:
    """`rate = "30/min"`, the older key, as a limit."""
    return Limit(rate.count, "messages", rate.per)


def merged(base: Sequence[Limit], over: Sequence[Limit]) -> tuple[Limit, ...]:
    """`over`'s limits, and those of `base` whose kind `over` does not set."""
    kinds = {limit.kind for limit in over}
    return tuple(limit for limit in base if limit.kind not in kinds) + tuple(over)

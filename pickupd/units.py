"""Durations ("250ms", "30s", "5m", "2h", "5d") and sizes ("25MiB"): pure parsers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pickupd.errors import Invalid

__all__ = [
    "Rate",
    "format_duration",
    "format_size",
    "parse_duration",
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


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$", re.IGNORECASE)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` messages every `per` seconds (a token bucket of `count` tokens)."""

    count: int
    per: float

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}.get(self.per)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per}s"


def parse_rate(text: str) -> Rate:
    """Return the Rate for "30/min" (also "/s", "/h", "/day"); raise Invalid otherwise."""
    match = _RATE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise Invalid(
            f'expected a rate like "30/min", "5/s", "1000/h" or "10000/day", got "{text}"'
        )
    return Rate(int(match.group(1)), _PER[match.group(2)[0].lower()])

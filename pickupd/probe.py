"""`pickupd check --connect`: EHLO, STARTTLS and AUTH against every relay, no mail sent."""

from __future__ import annotations

from .config import Config

__all__ = ["run"]


def run(config: Config) -> int:
    """Connect to every relay with every credential set it is used with; print one line each
    (ok, or the exact failure); return 0 only if all are ok, else 1."""
    raise NotImplementedError("pickupd check --connect: being built")

"""`pickupd-sendmail` / `pickupd sendmail`: a /usr/sbin/sendmail for submission."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Read a message on stdin into the pickup folder; exit 0, 64 (usage) or 75 (tempfail)."""
    print("pickupd sendmail: being built", file=sys.stderr)
    return 75

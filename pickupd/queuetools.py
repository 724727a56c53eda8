"""Operator commands on a spool: init, queue, show, retry, flush, delete, hold, release, drop."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands; each sets `handler` (args -> exit code)."""

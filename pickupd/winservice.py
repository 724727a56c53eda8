"""`pickupd service install|remove|start|stop`: the dispatcher as a Windows service."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the `service` subcommand; it sets `handler` (args -> exit code)."""

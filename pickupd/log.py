"""structlog setup: one JSON object per line on stdout (journald friendly), or console text.

Secrets never print themselves (config.Secret); this module also masks any key that looks like
a password, so a careless `log.info(..., password=...)` cannot leak one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure", "get"]

_SECRET_KEYS = ("password", "secret", "token")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if any(word in key.lower() for word in _SECRET_KEYS):
            event[key] = "***"
    return event


def _order(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Time, level and event first: the columns a person scans a journal by.
    head = {key: event.pop(key) for key in ("timestamp", "level", "event") if key in event}
    head.update(event)
    return head


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process."""
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            _order,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(**context: Any) -> Any:
    """A logger with `context` bound."""
    return structlog.get_logger().bind(**context)

"""structlog setup: one JSON object per line on stdout (journald friendly), or console text.

Secrets never print themselves (config.Secret); this module also masks any key that looks like
a password, so a careless `log.info(..., password=...)` cannot leak one.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["Logger", "configure", "get"]

# What `get()` returns: structlog's bound logger with a level filter (info(), warning()...).
Logger = structlog.typing.FilteringBoundLogger

_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "credentials"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "***"
    return event


_encode = json.JSONEncoder(default=repr).encode


def _render_json(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    # Time, level and event first: the columns a person scans a journal by.
    line = {key: event.pop(key, None) for key in ("timestamp", "level", "event")}
    line.update(event)
    return _encode(line)


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process."""
    renderer: Any = _render_json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(**context: Any) -> Logger:
    """A logger with `context` bound."""
    logger: Logger = structlog.get_logger().bind(**context)
    return logger

"""The exception tree. Expected results are values (see outcome.py); these are for the rest."""

from __future__ import annotations

__all__ = ["ConfigError", "PickupdError", "SpoolError"]


class PickupdError(Exception):
    """Base of every error pickupd raises on purpose."""


class ConfigError(PickupdError):
    """The configuration is unusable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SpoolError(PickupdError):
    """The spool cannot be used (missing, not a directory, not writable)."""

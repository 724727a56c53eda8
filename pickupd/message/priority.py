"""The class of a message under a limit: urgent, normal or bulk, from the header fields that
mail libraries write, capped by what the operator allows its sender and its writer.

Urgent is what .NET's `MailPriority.High`, PHPMailer's `Priority = 1` and Outlook write:
`X-Priority: 1` or `2`, `Priority: urgent`, `Importance: high`. Bulk is a mailing's marks:
`Precedence: bulk`, `list` or `junk`, `List-Unsubscribe`, `X-Priority: 4` or `5`,
`Priority: non-urgent`, `Importance: low`. A message with marks of both kinds is bulk (a
newsletter that calls itself urgent is still a newsletter). Only the class's turn under a
limit depends on it: a message under no limit goes at once whatever its class.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from pickupd.errors import Invalid

__all__ = ["MARK_FIELDS", "MailClass", "marked"]


class MailClass(enum.Enum):
    """A message's class; `rank` 0 goes first."""

    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def capped(self, highest: MailClass | None) -> MailClass:
        """This class, or `highest` if this one is higher (None: no cap)."""
        return self if highest is None or self.rank >= highest.rank else highest

    @classmethod
    def named(cls, text: str) -> MailClass:
        """The class called `text` (Invalid, a ValueError, names the choices)."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise Invalid('expected "urgent", "normal" or "bulk"') from None


_RANK = {MailClass.URGENT: 0, MailClass.NORMAL: 1, MailClass.BULK: 2}

# Header field (lower case) -> value (lower case, first word) -> the class it marks.
_MARKS: dict[str, dict[str, MailClass]] = {
    "x-priority": {
        "1": MailClass.URGENT,
        "2": MailClass.URGENT,
        "4": MailClass.BULK,
        "5": MailClass.BULK,
    },
    "priority": {"urgent": MailClass.URGENT, "non-urgent": MailClass.BULK},
    "importance": {"high": MailClass.URGENT, "low": MailClass.BULK},
    "precedence": {"bulk": MailClass.BULK, "list": MailClass.BULK, "junk": MailClass.BULK},
}
MARK_FIELDS = frozenset(_MARKS) | {"list-unsubscribe"}


def marked(fields: Iterable[tuple[str, bytes]]) -> MailClass:
    """The class the message's own fields mark it as: (lower-case name, raw value) of the
    fields named in MARK_FIELDS."""
    urgent = False
    for name, value in fields:
        if name == "list-unsubscribe":
            return MailClass.BULK
        words = value.decode("ascii", "replace").strip().lower().split()
        # "X-Priority: 1 (Highest)": the first word counts.
        found = _MARKS[name].get(words[0].rstrip(";")) if words else None
        if found is MailClass.BULK:
            return MailClass.BULK
        urgent = urgent or found is MailClass.URGENT
    return MailClass.URGENT if urgent else MailClass.NORMAL

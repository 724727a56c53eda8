"""Outcomes, reason codes and the per-recipient result of one delivery attempt."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Delivery",
    "Outcome",
    "Reason",
    "RecipientResult",
    "Refusal",
    "SessionFault",
    "Stats",
    "every",
    "session_failed",
]


class Outcome(enum.Enum):
    """Where a message goes after an attempt."""

    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"


class Reason(enum.Enum):
    """Why a message failed for good: the codes of the contract, written into sidecars."""

    MALFORMED = "malformed"
    NO_SENDER = "no_sender"
    SENDER_NOT_ALLOWED = "sender_not_allowed"
    HEADER_FROM_NOT_ALLOWED = "header_from_not_allowed"
    NO_RECIPIENTS = "no_recipients"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    TOO_LARGE = "too_large"
    UNSAFE_FILE = "unsafe_file"
    REJECTED = "rejected"
    # Microsoft Graph would deliver to a To:/Cc: address that is not an envelope recipient.
    RECIPIENTS_MISMATCH = "recipients_mismatch"
    EXPIRED = "expired"


# What failed when a session could not be used: the metrics label and the recorder's choice
# of log event. "token": an OAuth2 access token could not be had; "connections": a mailbox's
# connections limit stayed full (not a failure of the relay; the message waits).
class SessionFault(enum.Enum):
    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    TOKEN = "token"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    CONNECTIONS = "connections"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reason with the human text that goes beside it."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the relay said about one recipient (code 0: no reply, e.g. connection lost)."""

    recipient: str
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """The result of one SMTP attempt for one message.

    Every recipient of the attempt is in exactly one of `sent`, `deferred`, `rejected`.
    `code`/`text` is the reply that decided the attempt as a whole (the DATA reply, or
    the error that ended it); `unknown` marks a connection lost after the final dot.
    """

    relay: str
    sent: tuple[str, ...] = ()
    deferred: tuple[RecipientResult, ...] = ()
    rejected: tuple[RecipientResult, ...] = ()
    code: int = 0
    text: str = ""
    unknown: bool = False
    too_large: bool = False
    # Set when the session itself failed (see SessionFault); None when it did not.
    session_error: SessionFault | None = None
    # The server asked to wait this long (seconds; an HTTP Retry-After): its scope pauses.
    retry_after: float = 0.0


@dataclass(slots=True)
class Stats:
    """Counts of outcomes in this run (for `--once` summaries, the demo, the status line)."""

    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            *(
                a + b
                for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
            )
        )


def every(recipients: Sequence[str], code: int, text: str) -> tuple[RecipientResult, ...]:
    """The same result for each of `recipients`."""
    return tuple(RecipientResult(r, code, text) for r in recipients)


def session_failed(
    relay: str, recipients: Sequence[str], code: int, text: str, kind: SessionFault | None
) -> Delivery:
    """Nothing was handed over (the session, the login or the request failed): every
    recipient waits for a retry, and `kind` says what failed (the metrics, the log)."""
    return Delivery(
        relay, deferred=every(recipients, code, text), code=code, text=text, session_error=kind
    )

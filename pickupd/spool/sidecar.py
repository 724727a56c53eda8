"""The `<id>.json` record that travels beside a message in deferred/, failed/ and sent/."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pickupd.errors import Invalid

__all__ = ["Attempt", "KeptTurn", "Sidecar", "from_timestamp", "to_timestamp"]


def from_timestamp(seconds: float) -> str:
    """Epoch seconds -> ISO 8601 UTC with milliseconds, as written in sidecars and logs."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def to_timestamp(text: str) -> float:
    """ISO 8601 (as written by `from_timestamp`) -> epoch seconds."""
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True, slots=True)
class Attempt:
    """One entry of `history`: what one delivery attempt did."""

    time: str
    relay: str | None
    outcome: str
    code: int | None
    text: str


@dataclass(frozen=True, slots=True)
class KeptTurn:
    """A turn booked under a provider limit for a message that waits for it in deferred/:
    kept here, not only in the memory of the process that booked it, so whichever process
    takes the message when it is due (another worker, after a restart) sends it on this turn
    instead of booking another a window later."""

    due: float  # when it may go (this host's clock)
    booked: tuple[tuple[str, int, int], ...]  # (the limit's ledger key, bucket, amount)
    paused: str | None = None  # the scope whose pause it waits for


@dataclass(frozen=True, slots=True)
class Sidecar:
    """Everything an operator needs to know about a queued or failed message."""

    id: str
    source: str
    sender: str | None
    recipients: tuple[str, ...]
    attempts: int
    first_seen: str
    next_attempt: str | None = None
    reason: str | None = None
    detail: str = ""
    message_id: str | None = None
    split_from: str | None = None
    # When [notify] on_deferred_after's hook was run for it (it runs once per message).
    deferred_notice: str | None = None
    # Who wrote the file (its owner at the first claim): the uid, and its name then (None:
    # a uid with no name, shown as uid:NNN). The owners check trusts this, not the file.
    owner_uid: int | None = None
    owner: str | None = None
    # Header fields pickupd added because the file had none (Date, Message-ID).
    added: tuple[str, ...] = ()
    turn: KeptTurn | None = None  # waiting for its turn under a limit
    # Its class under a limit ("urgent", "normal", "bulk": message/priority.py), once it
    # waited for one; next_attempt is then its expected send time.
    mail_class: str | None = None
    history: tuple[Attempt, ...] = field(default=())

    def lifetime_start(self) -> str | None:
        """When `[retry] max_age` started counting: the first delivery attempt since the
        message was (re)queued by `pickupd retry`; None before any. Time spent waiting for a
        provider limit's turn (no attempt) is not held against a message."""
        start = None
        for attempt in self.history:
            if attempt.outcome == "retried":
                start = None
            elif start is None and attempt.outcome in ("sent", "deferred", "failed"):
                start = attempt.time
        return start

    def with_attempt(self, attempt: Attempt, **changes: Any) -> Sidecar:
        """A copy with `attempt` appended to history and the other fields changed."""
        return replace(self, history=(*self.history, attempt), **changes)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        data["added"] = list(self.added)
        if not self.added:
            del data["added"]
        if self.turn is None:
            del data["turn"]
        else:
            data["turn"]["booked"] = [list(entry) for entry in self.turn.booked]
        data["history"] = [asdict(a) for a in self.history]
        # next_attempt belongs to deferred messages, reason to failed ones; split_from only
        # to copies: leave out what does not apply rather than write nulls.
        optional = ("next_attempt", "reason", "split_from", "message_id", "deferred_notice")
        for key in (*optional, "owner_uid", "owner", "mail_class"):
            if data[key] is None:
                del data[key]
        return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Sidecar:
        """Parse a sidecar; raise ValueError if it is not one."""
        try:
            data = json.loads(raw)
            return cls(
                id=str(data["id"]),
                source=str(data.get("source", "")),
                sender=data.get("sender"),
                recipients=tuple(str(r) for r in data.get("recipients", ())),
                attempts=int(data.get("attempts", 0)),
                first_seen=str(data["first_seen"]),
                next_attempt=data.get("next_attempt"),
                reason=data.get("reason"),
                detail=str(data.get("detail", "")),
                message_id=data.get("message_id"),
                split_from=data.get("split_from"),
                deferred_notice=data.get("deferred_notice"),
                owner_uid=_uid(data.get("owner_uid")),
                owner=data.get("owner"),
                added=tuple(str(name) for name in data.get("added", ())),
                turn=_kept(data.get("turn")),
                mail_class=data.get("mail_class"),
                history=tuple(Attempt(**entry) for entry in data.get("history", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Invalid(f"not a pickupd sidecar: {exc}") from None


def _kept(value: object) -> KeptTurn | None:
    """A kept turn as written; one that does not read as one is no turn (booked anew)."""
    if not isinstance(value, dict):
        return None
    try:
        booked = tuple((str(k), int(b), int(a)) for k, b, a in value["booked"])
        paused = value.get("paused")
        return KeptTurn(float(value["due"]), booked, str(paused) if paused else None)
    except (KeyError, TypeError, ValueError):
        return None


def _uid(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

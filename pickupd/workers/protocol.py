"""The messages between the main process and its worker processes, typed.

Up a worker's pipe goes one JSON line per batch: the worker's counts and the events since the
last batch (`Batch`). Down its stdin goes one JSON line per message (`Down`). Each message is
a frozen dataclass; on the wire it is its fields plus `"type"`, its class name in lower case.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pickupd.errors import ProtocolError
from pickupd.outcome import Stats

__all__ = [
    "Batch",
    "Down",
    "Feedback",
    "Flush",
    "GraphReply",
    "Outcome",
    "Paused",
    "Ready",
    "RelayState",
    "Room",
    "SendTime",
    "SessionFailed",
    "StoreUp",
    "Stranded",
    "Suspended",
    "Up",
    "Waiting",
    "decode_batch",
    "decode_down",
    "encode_batch",
    "encode_down",
]


@dataclass(frozen=True, slots=True)
class Ready:
    """Up: the worker watches the spool and takes signals."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """Up: one message's outcome, for the metrics."""

    outcome: str
    reason: str | None
    relay: str | None


@dataclass(frozen=True, slots=True)
class SendTime:
    """Up: how long one transaction took, for the metrics."""

    relay: str
    seconds: float


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """Up: a session to `relay` could not be used (`kind`: outcome.SessionFault)."""

    relay: str
    kind: str


@dataclass(frozen=True, slots=True)
class Suspended:
    """Up: the worker suspended `relay` (`on`), or it answered again."""

    relay: str
    on: bool


@dataclass(frozen=True, slots=True)
class Stranded:
    """Up: the worker's count of claims the spool could not take changed."""

    count: int


@dataclass(frozen=True, slots=True)
class Room:
    """Up: what a limit has left after the worker's last turn (`limit`: the ledger's key)."""

    limit: str
    room: int
    size: int = 0  # the limit's own amount (what "nearly spent" is measured against)


@dataclass(frozen=True, slots=True)
class StoreUp:
    """Up: the worker's view of the fleet's ledger store: answering (`up`) or not."""

    up: bool


@dataclass(frozen=True, slots=True)
class Paused:
    """Up: a provider's reply paused `scope` until `until`: `kind` "spent" (a quota is used
    up), "throttled" (slow down) or "limited" (the tenant's rate)."""

    scope: str
    until: float
    kind: str


@dataclass(frozen=True, slots=True)
class GraphReply:
    """Up: Microsoft Graph answered a sendMail request of `relay` with HTTP `status`."""

    relay: str
    status: int


@dataclass(frozen=True, slots=True)
class Waiting:
    """Up: the messages waiting in the lines of worker `worker` under a limit, by class."""

    worker: int
    urgent: int
    normal: int
    bulk: int


@dataclass(frozen=True, slots=True)
class Feedback:
    """Up: a [notify] event ("failed" or "deferred") with the message's sidecar (JSON);
    the main process runs the hooks and the reports."""

    event: str
    sidecar: str


@dataclass(frozen=True, slots=True)
class Flush:
    """Down: every deferred message was made due: look again now."""


@dataclass(frozen=True, slots=True)
class RelayState:
    """Down: a process of the service found `relay` dead (`suspended`) or answering again:
    every process holds it so, so none keeps connecting to a dead relay, and the mail of all
    goes as soon as one probe gets through."""

    relay: str
    suspended: bool


Up = (
    Ready | Outcome | SendTime | SessionFailed | Suspended | Stranded | Room | StoreUp | Paused
    | Waiting | GraphReply | Feedback
)  # fmt: skip
Down = Flush | RelayState


@dataclass(frozen=True, slots=True)
class Batch:
    """Up: a worker's counts as they are now, and its events since the last batch."""

    stats: Stats
    events: tuple[Up, ...] = ()


_UP: dict[str, type[Up]] = {
    cls.__name__.lower(): cls
    for cls in (
        Ready, Outcome, SendTime, SessionFailed, Suspended, Stranded, Room, StoreUp, Paused,
        Waiting, GraphReply, Feedback,
    )
}  # fmt: skip
_DOWN: dict[str, type[Down]] = {cls.__name__.lower(): cls for cls in (Flush, RelayState)}
# Field types the wire may carry as another JSON type (an int where a float is meant).
_FLOATS = {"seconds", "until"}


def _fields(message: Up | Down) -> dict[str, Any]:
    return {"type": type(message).__name__.lower(), **dataclasses.asdict(message)}


def _message(item: Any, types: dict[str, Any]) -> Any:
    if not isinstance(item, dict) or item.get("type") not in types:
        raise ProtocolError(f"unknown message {item!r:.80}")
    cls = types[item["type"]]
    values = {k: v for k, v in item.items() if k != "type"}
    try:
        message = cls(**{k: float(v) if k in _FLOATS else v for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {item['type']} message: {exc}") from None
    return message


def encode_batch(batch: Batch) -> bytes:
    """One line for the pipe up."""
    line = {"stats": dataclasses.astuple(batch.stats), "events": [_fields(e) for e in batch.events]}
    return (json.dumps(line) + "\n").encode()


def decode_batch(line: bytes) -> Batch:
    """A line from a worker's pipe; ProtocolError if it is not a batch."""
    try:
        item = json.loads(line)
        stats = Stats(*(int(n) for n in item["stats"]))
        events = tuple(_message(e, _UP) for e in item["events"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"not a batch: {exc}") from None
    return Batch(stats, events)


def encode_down(message: Down) -> bytes:
    """One line for a worker's stdin."""
    return (json.dumps(_fields(message)) + "\n").encode()


def decode_down(line: bytes) -> Down:
    """A line from the main process; ProtocolError if it is not a message."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    message: Down = _message(item, _DOWN)
    return message

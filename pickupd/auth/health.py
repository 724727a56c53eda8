"""How a stored refresh token is doing: when it last worked, and whether the provider refused
it for good. Kept beside the token in `<refresh_token_file>.health` (JSON), written by the
process that used it while it holds the token file's lock, so every process of the service,
`pickupd check` and the metrics read the same story.

A refresh token dies when it is not used for long (Microsoft: 90 days of inactivity,
AADSTS700082) or when a person revokes the grant: both come back as `invalid_grant`, and
then only a person signing in again helps. The token's age is its file's mtime: a rotation
(and an operator writing a new one) replaces the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pickupd.spool.files import atomic_write

__all__ = ["Health", "health_path", "note_failed", "note_worked", "read_health"]

# The OAuth2 error that means the grant itself is gone: a person must sign in again.
REFUSED = "invalid_grant"


@dataclass(frozen=True, slots=True)
class Health:
    """What is known of one refresh token (times are Unix times; None: never)."""

    issued: float | None = None  # its file's mtime: written, rotated or replaced then
    worked: float | None = None  # the last grant that gave an access token
    failed: float | None = None  # the last grant that did not
    error: str = ""  # that failure, one line (no token in it)
    refused: bool = False  # the last failure was invalid_grant: sign in again


def health_path(token_file: Path) -> Path:
    """Where the health of the refresh token in `token_file` is kept."""
    return token_file.with_name(token_file.name + ".health")


def read_health(token_file: Path) -> Health:
    """The token's health as recorded (an unreadable or missing record: nothing known)."""
    health = Health()
    with contextlib.suppress(OSError, ValueError, TypeError):
        doc = json.loads(health_path(token_file).read_text())
        health = Health(
            worked=_time(doc.get("worked")),
            failed=_time(doc.get("failed")),
            error=str(doc.get("error") or ""),
            refused=bool(doc.get("refused")),
        )
    with contextlib.suppress(OSError):
        health = replace(health, issued=os.stat(token_file).st_mtime)
    return health


def note_worked(token_file: Path, now: float) -> None:
    """A grant with this token worked (the caller holds the token file's lock)."""
    _write(token_file, replace(read_health(token_file), worked=now, refused=False))


def note_failed(token_file: Path, now: float, code: str, text: str) -> bool:
    """A grant failed with OAuth2 error `code` ("" when the endpoint gave no verdict: it was
    unreachable, or failed); True if that newly means the grant is gone (the first
    invalid_grant since it last worked): the one time to tell the operator."""
    before = read_health(token_file)
    refused = code == REFUSED if code else before.refused
    _write(token_file, replace(before, failed=now, error=text[:300], refused=refused))
    return refused and not before.refused


def _write(token_file: Path, health: Health) -> None:
    doc = asdict(health)
    del doc["issued"]  # the token file's own mtime says that
    # A failure to write it costs the record, never the token: the grant has happened.
    with contextlib.suppress(OSError):
        atomic_write(health_path(token_file), (json.dumps(doc) + "\n").encode())


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None

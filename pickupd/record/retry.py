"""Pure retry arithmetic: when to try again, or that it is time to give up, and the sidecar
that says which."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

from pickupd.config.loading import Config
from pickupd.outcome import Outcome, Reason
from pickupd.spool.sidecar import Attempt, Sidecar, from_timestamp, to_timestamp
from pickupd.units import format_duration

__all__ = ["JITTER", "Retried", "after", "next_attempt"]

# +-10%, so a fleet that failed together does not retry in lock-step.
JITTER = 0.10


def next_attempt(
    attempts: int,
    first_seen: float,
    now: float,
    schedule: tuple[float, ...],
    max_age: float,
    rng: random.Random | None = None,
) -> float | None:
    """The time of the next attempt after `attempts` failed ones, or None when expired.

    The schedule's last delay repeats. The last attempt is made at `max_age` exactly, so a
    message is never given up on without having been tried at the end of its life.
    """
    deadline = first_seen + max_age
    if now >= deadline:
        return None
    delay = schedule[min(max(attempts, 1), len(schedule)) - 1]
    delay *= 1.0 + (rng or random).uniform(-JITTER, JITTER)
    return min(now + delay, deadline)


@dataclass(frozen=True, slots=True)
class Retried:
    """Recipients of an attempt that are to be tried again, and what was said."""

    attempt: int  # the number of this attempt
    recipients: tuple[str, ...]
    relay: str | None  # None: no relay was reached (an internal error)
    code: int | None
    detail: str


def after(
    base: Sidecar, retried: Retried, config: Config, not_before: float | None, now: float
) -> tuple[float | None, Sidecar, bool]:
    """After an attempt that leaves `retried` to try again: the due time of the next one
    (None: expired, `max_age` has passed), the sidecar that says so, and
    whether [notify] on_deferred_after's notice is due now (recorded in the sidecar, so
    its hook runs once per message)."""
    first_attempt = base.lifetime_start()
    since = _seconds(first_attempt) if first_attempt else now
    schedule, max_age = config.retry.schedule, config.retry.max_age
    due = next_attempt(retried.attempt, since, now, schedule, max_age)
    if due is not None and not_before is not None:
        due = max(due, min(not_before, since + max_age))
    outcome = Outcome.DEFERRED if due else Outcome.FAILED
    history = Attempt(
        from_timestamp(now), retried.relay, outcome.value, retried.code, retried.detail
    )
    if due is None:
        expired = base.with_attempt(
            history,
            recipients=retried.recipients,
            attempts=retried.attempt,
            reason=Reason.EXPIRED.value,
            detail=f"undelivered after {format_duration(now - since)}; last: {retried.detail}",
            next_attempt=None,
        )
        return None, expired, False
    sidecar = base.with_attempt(
        history,
        recipients=retried.recipients,
        attempts=retried.attempt,
        detail=retried.detail,
        next_attempt=from_timestamp(due),
        reason=None,
    )
    notice_after = config.notify.on_deferred_after
    long_deferred = (
        notice_after is not None
        and sidecar.deferred_notice is None
        and now - _seconds(base.first_seen) >= notice_after
    )
    if long_deferred:
        sidecar = dataclasses.replace(sidecar, deferred_notice=from_timestamp(now))
    return due, sidecar, long_deferred


def _seconds(iso: str) -> float:
    try:
        return to_timestamp(iso)
    except ValueError:
        return time.time()

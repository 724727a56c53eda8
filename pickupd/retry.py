"""Pure retry arithmetic: when to try again, or that it is time to give up."""

from __future__ import annotations

import random

__all__ = ["JITTER", "next_attempt"]

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

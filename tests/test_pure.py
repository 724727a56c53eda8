"""Pure modules on real values: units, ids, retry, sidecar, policy."""

from __future__ import annotations

import random
import time

import pytest
from configs import unit_config

from pickupd import ids, policy
from pickupd.config.loading import Config, PolicyConfig, SenderRule
from pickupd.message import envelope
from pickupd.outcome import Reason, Refusal
from pickupd.record import retry
from pickupd.spool.sidecar import Attempt, Sidecar, from_timestamp, to_timestamp
from pickupd.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("2h", 7200), ("5d", 432000), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    """Duration strings of the contract parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 minutes", "-1s", "1w", "ms"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    """A bad duration raises ValueError naming the expected form."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_sizes_and_formatting() -> None:
    """Sizes accept bytes or units; durations format for people."""
    assert parse_size(100) == 100
    assert parse_size("25MiB") == 25 * 1024 * 1024
    assert parse_size("64KiB") == 65536
    with pytest.raises(ValueError):
        parse_size("lots")
    assert format_duration(432000) == "5d"
    assert format_duration(0.25) == "250ms"


def test_ids_sort_by_time_and_are_unique() -> None:
    """Ids are filename-safe, 26 characters, unique, and sort in creation order."""
    made = [ids.new() for _ in range(2000)]
    assert len(set(made)) == len(made)
    assert all(ids.is_valid(i) for i in made)
    assert not ids.is_valid("../etc/passwd") and not ids.is_valid("")
    first = ids.new()
    deadline = time.monotonic() + 1
    while (later := ids.new())[:10] == first[:10] and time.monotonic() < deadline:
        pass  # the next millisecond
    assert later > first


def test_ids_are_ulids_and_old_ids_keep_their_order() -> None:
    """A new id is a ULID (spare bits first: a ULID library reads the right time from it);
    an id of pickupd < 0.2 (spare bits last) is still valid and sorts by its time."""
    made = ids.new()
    assert made[0] in "01234567" and abs(ids.timestamp(made) - time.time()) < 5
    # The test vector of the ULID reference implementation: 01ARYZ6S41 is 1469918176385 ms.
    assert ids.timestamp("01ARYZ6S41TSV4RRFFQ69G5FAV") == 1469918176.385
    # The same 128 bits (time then randomness), written the old way: spare bits last.
    value = int.from_bytes((1_796_000_000_000).to_bytes(6, "big") + bytes(range(10)), "big")
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    old = "".join(alphabet[(value << 2 >> s) & 31] for s in range(125, -1, -5))
    assert ids.is_valid(old) and old[1] in "4567"
    assert ids.timestamp(old) == 1_796_000_000.0
    newer = sorted([made, old], key=ids.sort_key)
    assert newer == [old, made]  # 2026-11-30 (old form) before now


def test_retry_schedule_repeats_last_with_jitter() -> None:
    """Delays follow the schedule (+-10%), the last one repeating."""
    rng = random.Random(7)
    schedule = (60.0, 300.0, 3600.0)
    for attempts, base in [(1, 60), (2, 300), (3, 3600), (9, 3600)]:
        for _ in range(50):
            due = retry.next_attempt(attempts, 0.0, 100.0, schedule, 10**9, rng)
            assert due is not None
            assert 0.9 * base <= due - 100.0 <= 1.1 * base
    spread = {retry.next_attempt(1, 0.0, 100.0, schedule, 10**9, rng) for _ in range(20)}
    assert len(spread) > 1  # jitter: a fleet does not retry in lock-step


def test_retry_last_attempt_at_max_age_then_expired() -> None:
    """The last attempt is scheduled at max_age exactly; after that it is expired."""
    assert retry.next_attempt(5, 0.0, 990.0, (60.0,), 1000.0) == 1000.0
    assert retry.next_attempt(5, 0.0, 1000.0, (60.0,), 1000.0) is None


def test_sidecar_round_trip() -> None:
    """A sidecar survives JSON and keeps its history; garbage is refused."""
    car = Sidecar("X", "new/a", "a@b", ("c@d",), 0, from_timestamp(1.5)).with_attempt(
        Attempt(from_timestamp(2), "main", "deferred", 451, "try later"), attempts=1
    )
    again = Sidecar.from_json(car.to_json())
    assert again == car and to_timestamp(again.first_seen) == 1.5
    with pytest.raises(ValueError):
        Sidecar.from_json(b'{"no": "id"}')


def _config(**policy_values: object) -> Config:
    return unit_config(policy=PolicyConfig(**policy_values))  # type: ignore[arg-type]


def _env(raw: bytes) -> envelope.Envelope:
    parsed = envelope.parse(raw)
    assert isinstance(parsed, envelope.Envelope)
    return parsed


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"To: x@y\n\nb\n", Reason.NO_SENDER),
        (b"From: a@evil.example\nTo: x@y\n\nb\n", Reason.SENDER_NOT_ALLOWED),
        (b"From: a@corp.example.evil\nTo: x@y\n\nb\n", Reason.SENDER_NOT_ALLOWED),
        (
            b"Sender: app@example.com\nFrom: boss@evil\nTo: x@y\n\nb\n",
            Reason.HEADER_FROM_NOT_ALLOWED,
        ),
        (b"From: APP@EXAMPLE.COM\n\nb\n", Reason.NO_RECIPIENTS),
        (b"From: app@example.com\nTo: a@x, b@x, c@x\n\nb\n", Reason.TOO_MANY_RECIPIENTS),
        (b"From: app@example.com\nTo: a@x\n\n" + b"x" * 300 + b"\n", Reason.TOO_LARGE),
    ],
)
def test_policy_refusals(raw: bytes, reason: Reason) -> None:
    """Each policy rule refuses with its reason code and a detail."""
    result = policy.check(_env(raw), _config(max_recipients=2, max_message_size=200), len(raw))
    assert isinstance(result, Refusal) and result.reason is reason and result.detail


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (
            b"X-Sender: app@example.com\nX-Receiver: x@y\nFrom: app@example.com\n"
            b"Sender: ceo@evil.example\n\nb\n",
            "Sender",
        ),
        (b"From: app@example.com\nResent-From: ceo@evil.example\nTo: x@y\n\nb\n", "Resent-From"),
        (
            b"From: app@example.com\nResent-From: a@corp.example\n"
            b"Resent-Sender: ceo@evil.example\nTo: x@y\n\nb\n",
            "Resent-Sender",
        ),
    ],
)
def test_every_author_field_must_be_allowed(raw: bytes, field: str) -> None:
    """With check_header_from, Sender: ("on behalf of") and Resent-From: / Resent-Sender:
    must match the allow-list like From:, in both file formats; the detail names the field."""
    result = policy.check(_env(raw), _config(), len(raw))
    assert isinstance(result, Refusal) and result.reason is Reason.HEADER_FROM_NOT_ALLOWED
    assert result.detail.startswith(f"{field}: ceo@evil.example matches no [senders] entry")
    allowed = raw.replace(b"ceo@evil.example", b"ceo@corp.example")
    assert isinstance(policy.check(_env(allowed), _config(), len(raw)), SenderRule)


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\x1b", b"\x7f", b"\x0b"])
def test_control_bytes_in_any_header_field_are_malformed(byte: bytes) -> None:
    """A NUL or other control byte in a non-address field (Subject:, X-Anything:) makes the
    message malformed, with the field named; a TAB is fine."""
    for name in (b"Subject", b"X-Custom", b"Message-ID"):
        raw = b"From: app@example.com\nTo: x@y\n" + name + b": a" + byte + b"b\n\nbody\n"
        result = envelope.parse(raw)
        assert isinstance(result, Refusal) and result.reason is Reason.MALFORMED
        assert result.detail.startswith(name.decode() + ": control character"), result.detail
    assert isinstance(
        envelope.parse(b"From: app@example.com\nSubject: a\tb\n\nx\n"), envelope.Envelope
    )


def test_policy_allows_exact_and_domain_senders() -> None:
    """Exact addresses and *@domain entries match case-insensitively; check_header_from off
    lets an allowed envelope carry another From:."""
    ok = policy.check(_env(b"From: Bob <bob@CORP.example>\nTo: a@x\n\nb\n"), _config(), 40)
    assert isinstance(ok, SenderRule) and ok.pattern == "*@corp.example"
    raw = b"Sender: app@example.com\nFrom: boss@evil\nTo: x@y\n\nb\n"
    assert isinstance(policy.check(_env(raw), _config(check_header_from=False), 40), SenderRule)


def test_max_age_counts_from_the_first_attempt_since_requeue() -> None:
    """Waiting for a provider limit's turn leaves no history, so it is not held against a
    message; `pickupd retry` starts the count again at the next attempt."""
    base = Sidecar("01ARZ3NDEKTSV4RRFFQ69G5FAV", "x", "a@b.c", ("d@e.f",), 0, "2026-01-01T00:00Z")
    assert base.lifetime_start() is None  # still waiting for its first attempt
    tried = base.with_attempt(Attempt("2026-01-03T00:00Z", "main", "deferred", 451, "later"))
    again = tried.with_attempt(Attempt("2026-01-04T00:00Z", "main", "deferred", 451, "later"))
    assert again.lifetime_start() == "2026-01-03T00:00Z"
    failed = again.with_attempt(Attempt("2026-01-05T00:00Z", "main", "failed", None, "expired"))
    retried = failed.with_attempt(Attempt("2026-02-01T00:00Z", None, "retried", None, "op"))
    assert retried.lifetime_start() is None
    held = retried.with_attempt(Attempt("2026-02-01T00:01Z", None, "held", None, "op"))
    next_try = held.with_attempt(Attempt("2026-02-02T00:00Z", "main", "deferred", 421, "bye"))
    assert next_try.lifetime_start() == "2026-02-02T00:00Z"

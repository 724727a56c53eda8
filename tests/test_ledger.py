"""The quota ledger's books: rolling windows that no window of their length ever exceeds, the
spool's file, and the Redis ledger (a real redis-server) with its faults: a store that never
answers, a wrong password, TLS from a test CA, and one that dies and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redisserver import RedisServer
from smtpserver import TestCA

from pickupd.auth.logins import Secret
from pickupd.config.limits import LimitsConfig
from pickupd.limits.ledger import Books, Need, SpoolLedger, book
from pickupd.limits.store import RedisLedger
from pickupd.limits.windows import Window, margin
from pickupd.units import Limit, parse_limit

MINUTE_30 = parse_limit("30 messages/min")


def _need(limit: Limit, amount: int = 1, key: str = "mailbox:h:a/x") -> Need:
    return Need(key, limit, amount, "test", "h")


@settings(max_examples=300, deadline=None)
@given(
    amount=st.integers(1, 12),
    window=st.sampled_from([1.0, 2.5, 60.0, 86400.0]),
    steps=st.lists(st.tuples(st.floats(0, 3.0), st.integers(1, 5)), min_size=1, max_size=60),
)
def test_no_window_ever_holds_more_than_its_amount(
    amount: int, window: float, steps: list[tuple[float, int]]
) -> None:
    """Turns booked at any times, with any needs: every window of the limit's length (plus
    its margin), wherever it starts, holds at most `amount`; and a need that fits is never
    refused."""
    books, limit, now = Books(), Limit(amount, "recipients", window), 1_700_000_000.0
    turns: list[tuple[float, int]] = []
    for advance, need in steps:
        now += advance * window / 3
        turn = book(books, [_need(limit, need)], [], now)
        if need > amount:
            assert turn.never is not None
            continue
        assert turn.never is None and turn.at >= now - 0.001
        turns.append((turn.at, need))
    span = window + margin(window)
    for start, _ in turns:
        inside = sum(n for at, n in turns if start <= at < start + span)
        assert inside <= amount, (start, turns)


def test_a_burst_is_spread_over_its_window_in_order() -> None:
    """30 a minute: thirty go now, the 31st when the first bucket leaves the window (a
    minute, its margin and one bucket later), and every later turn is no earlier."""
    books, now = Books(), 1_700_000_000.0
    ats = [book(books, [_need(MINUTE_30)], [], now).at for _ in range(40)]
    assert ats[:30] == [pytest.approx(now, abs=1.0)] * 30
    w = Window.of(30, 60.0)
    assert 60.5 <= ats[30] - now <= 60.5 + 2 * w.size_ms / 1000
    assert ats == sorted(ats)


def test_all_or_nothing_and_the_refund() -> None:
    """A turn is booked against every limit at the latest time any of them allows; what the
    server refused is given back and can be booked again at once."""
    books, now = Books(), 1_700_000_000.0
    per_min, per_day = MINUTE_30, parse_limit("10 recipients/day")
    first = book(books, [_need(per_min, 1, "m"), _need(per_day, 8, "d")], [], now)
    assert first.at == pytest.approx(now, abs=1.0)
    later = book(books, [_need(per_min, 1, "m"), _need(per_day, 5, "d")], [], now)
    assert later.at - now > 86400  # the day's room (2) cannot take 5
    # Both limits booked at that one time: the minute's turn moved with the day's.
    (_m, m_bucket), (d, d_bucket) = later.booked
    assert m_bucket * Window.of(30, 60.0).size_ms == int(later.at * 1000)
    assert d_bucket * d.window.size_ms == int(later.at * 1000)
    for need, bucket in first.booked:
        if need.key == "d":
            books.keys["d"].refund(bucket, 8)
    # Turns are handed out in order: after the refund the day has room again, but the next
    # turn still comes after the one already booked for tomorrow.
    again = book(books, [_need(per_day, 8, "d")], [], now)
    assert again.at >= later.at


def test_a_pause_holds_every_turn_of_its_scope(tmp_path: Path) -> None:
    """A pause in the spool's ledger is seen by another process's ledger on the same file."""
    one, two = SpoolLedger(tmp_path / "ledger.json"), SpoolLedger(tmp_path / "ledger.json")
    now = time.time()
    assert asyncio.run(one.pause("mailbox:h:a", 60, "spent")) == pytest.approx(60, abs=1)
    turn = two.book([], ["account:h", "mailbox:h:a"], now)
    assert (
        turn.paused == "mailbox:h:a" and turn.why == "spent" and turn.at == pytest.approx(now + 60)
    )
    assert two.book([], ["mailbox:h:b"], now).at == now


def _store(server: RedisServer, tmp_path: Path, **extra: object) -> LimitsConfig:
    values: dict[str, object] = {"store": server.url, "wait": 0.1, "hosts": 2}
    values.update(extra)
    return LimitsConfig(**values)  # type: ignore[arg-type]


def _ledger(
    config: LimitsConfig, tmp_path: Path, events: list[tuple[str, dict[str, object]]]
) -> tuple[RedisLedger, list[bool]]:
    class Log:
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda event, **fields: events.append((event, fields))

    ups: list[bool] = []
    ledger = RedisLedger(config, tmp_path, lambda: Log(), ups.append)  # type: ignore[arg-type,return-value]
    return ledger, ups


def test_the_script_books_as_windows_py_does(redis_server: RedisServer, tmp_path: Path) -> None:
    """The same turns, booked by the Lua script on the server's clock and by windows.py: the
    same delays, bucket for bucket; and the keys expire by themselves."""
    config = _store(redis_server, tmp_path, wait=2.0)
    limits = [parse_limit("5 messages/hour"), parse_limit("12 recipients/hour")]

    async def run() -> list[float]:
        ledger, _ = _ledger(config, tmp_path, [])
        delays = []
        for n in range(9):
            needs = [
                _need(limits[0], 1, "mailbox:h:a/m"),
                _need(limits[1], n % 3 + 1, "mailbox:h:a/r"),
            ]
            turn = await ledger.reserve(needs, ["account:h", "mailbox:h:a"])
            delays.append(turn.at - turn.now)
        await ledger.close()
        return delays

    delays = asyncio.run(run())
    books, now, expected = Books(), time.time(), []
    for n in range(9):
        needs = [_need(limits[0], 1, "mailbox:h:a/m"), _need(limits[1], n % 3 + 1, "mailbox:h:a/r")]
        turn = book(books, needs, [], now)
        expected.append(turn.at - now)
    bucket = 3600 / 60
    for got, want in zip(delays, expected, strict=True):
        assert abs(got - want) <= bucket + 1, (delays, expected)
    assert max(delays) > 3600  # the sixth message waits for the hour to roll
    client = redis_server.client()
    keys = client.keys("pickupd:{h}:*")
    assert keys and all(0 < client.pttl(k) <= 3 * 3600 * 1000 for k in keys)


def test_a_turn_given_back_at_the_tail_never_forgets_the_window_before_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """10 per 2 s, all booked now; one more is booked a window ahead (the tail moves there)
    and given back (its message left the line): the ten booked now still count, in the spool
    file's arithmetic and in the store's script. Before, booking ahead forgot the buckets a
    span before the new tail, the give-back moved the tail back, and ten more went at once."""
    limit = parse_limit("10 messages/2s")
    need = _need(limit, 1, "mailbox:h:a/m")

    books, now = Books(), time.time()
    for _ in range(10):
        assert book(books, [need], [], now).at == now
    ahead = book(books, [need], [], now)
    assert ahead.at - now > 2.0
    key = books.keys[need.key]
    for _, bucket in ahead.booked:
        key.refund(bucket, 1)
    assert book(books, [need], [], now + 0.1, ahead=0.5).full

    async def run() -> bool:
        ledger, _ = _ledger(_store(redis_server, tmp_path, wait=2.0), tmp_path, [])
        for _ in range(10):
            assert (await ledger.reserve([need], [])).booked
        later = await ledger.reserve([need], [])
        assert later.at - later.now > 2.0
        await ledger.refund(later, 0, True)
        again = await ledger.reserve([need], [], ahead=0.5)
        await ledger.close()
        return again.full

    assert asyncio.run(run())


def test_a_store_that_never_answers_costs_the_bounded_wait(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A frozen Redis (it accepts and never answers): each reserve returns from the host's
    share after about `wait`; after three late answers the store is down, logged once, and
    later reserves do not wait at all."""
    events: list[tuple[str, dict[str, object]]] = []

    async def run() -> list[float]:
        ledger, ups = _ledger(_store(redis_server, tmp_path), tmp_path, events)
        await ledger.reserve([_need(MINUTE_30)], ["mailbox:h:a"])  # connected
        redis_server.freeze()
        took = []
        for _ in range(5):
            started = time.monotonic()
            turn = await ledger.reserve([_need(MINUTE_30)], ["mailbox:h:a"])
            took.append(time.monotonic() - started)
            assert turn.never is None and turn.booked
        assert ups == [False] and ledger.down
        redis_server.thaw()
        await ledger.close()
        return took

    took = asyncio.run(run())
    assert all(0.09 < t < 0.5 for t in took[:3]) and max(took[3:]) < 0.05, took
    assert [e for e, _ in events if e != "limit_store_closed"] == ["limit_store_down"]
    assert "no answer within 100 ms" in str(events[0][1]["detail"])


def test_a_wrong_password_is_named(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(password="right")
    events: list[tuple[str, dict[str, object]]] = []

    async def run() -> None:
        config = _store(server, tmp_path, password=Secret("wrong"), wait=1.0)
        ledger, _ = _ledger(config, tmp_path, events)
        turn = await ledger.reserve([_need(MINUTE_30)], [])
        assert turn.booked  # from the host's share
        await ledger.close()

    asyncio.run(run())
    (event, fields), *_ = events
    assert event == "limit_store_down" and "refused our password" in str(fields["detail"])


def test_tls_to_redis_with_a_test_ca(
    redis_factory: Callable[..., RedisServer], test_ca: TestCA, tmp_path: Path
) -> None:
    """rediss:// verified against the test CA books in Redis; without the CA the store is
    down (the certificate is not trusted), never used unverified."""
    server = redis_factory(ca=test_ca, password="pw")
    events: list[tuple[str, dict[str, object]]] = []

    async def run(ca: Path | None) -> bool:
        config = _store(server, tmp_path, ca_file=ca, password=Secret("pw"), wait=1.0)
        ledger, _ = _ledger(config, tmp_path, events)
        await ledger.reserve([_need(MINUTE_30)], [])
        down = bool(ledger.down)
        await ledger.close()
        return down

    assert asyncio.run(run(Path(test_ca.ca_file))) is False
    assert server.client().keys("pickupd:*")
    assert asyncio.run(run(None)) is True
    (down,) = [fields for event, fields in events if event == "limit_store_down"]
    assert "certificate verify failed" in str(down["detail"]).lower()


def test_what_was_booked_while_down_is_added_when_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis dies (and loses everything); the host books on its half share, which counts the
    turn it booked in the store before; when Redis is back on the same port, what was booked
    meanwhile is in it."""
    events: list[tuple[str, dict[str, object]]] = []
    limit = parse_limit("10 messages/hour")

    async def run() -> list[float]:
        ledger, ups = _ledger(_store(redis_server, tmp_path), tmp_path, events)
        await ledger.reserve([_need(limit)], [])
        redis_server.kill()
        delays = []
        for _ in range(6):
            turn = await ledger.reserve([_need(limit)], [])
            delays.append(turn.at - turn.now)
        redis_server.start()
        deadline = time.monotonic() + 10
        while ledger.down and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not ledger.down and ups == [False, True]
        await ledger.close()
        return delays

    delays = asyncio.run(run())
    # The share is 10 // 2 = 5 an hour, one of them booked in the store before it died:
    # four now, the fifth and sixth after the hour.
    assert [d < 1 for d in delays] == [True] * 4 + [False] * 2
    counts = redis_server.client().hgetall("pickupd:{h}:mailbox:h:a/x")
    buckets = [int(v) for k, v in counts.items() if k not in (b"t", b"s")]
    assert sum(buckets) == int(counts[b"s"]) == 6
    assert [e for e, _ in events if e != "limit_store_closed"] == [
        "limit_store_down",
        "limit_store_up",
    ]


def test_a_host_that_spent_its_share_does_not_spend_it_again_while_the_store_is_away(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """10 recipients a day for 2 hosts: this host booked 5 in the store; Redis dies; its
    share of the day (5) is spent already, so its next turn waits for the day to move on,
    instead of 5 more now (and a provider's 554 5.2.0: the mailbox blocked for 24 h)."""
    events: list[tuple[str, dict[str, object]]] = []
    limit = parse_limit("10 messages/day")

    async def run() -> list[float]:
        ledger, _ = _ledger(_store(redis_server, tmp_path), tmp_path, events)
        for _ in range(5):
            turn = await ledger.reserve([_need(limit)], [])
            assert turn.at - turn.now < 1
        redis_server.kill()
        delays = []
        for _ in range(2):
            turn = await ledger.reserve([_need(limit)], [])
            delays.append(turn.at - turn.now)
        await ledger.close()
        return delays

    delays = asyncio.run(run())
    assert all(d > 3600 for d in delays), delays


def test_while_the_store_is_away_the_fleet_takes_only_the_room_that_was_left(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """10 messages an hour for 2 hosts: host A booked 8 in the store, host B 1 (the store
    told B 1 was left). Redis dies: B's share would give it 4 more, but it takes 1/hosts of
    the room it was told of (1), A none: the fleet stays within the 10 in that window."""
    events: list[tuple[str, dict[str, object]]] = []
    limit = parse_limit("10 messages/hour")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    async def run() -> tuple[int, int]:
        a, _ = _ledger(_store(redis_server, tmp_path), tmp_path / "a", events)
        b, _ = _ledger(_store(redis_server, tmp_path), tmp_path / "b", events)
        for _ in range(8):
            assert (await a.reserve([_need(limit)], [])).room
        await b.reserve([_need(limit)], [])
        redis_server.kill()
        now = []
        for ledger in (a, b):
            turns = [await ledger.reserve([_need(limit)], []) for _ in range(5)]
            now.append(sum(1 for t in turns if t.at - t.now < 1))
            await ledger.close()
        return now[0], now[1]

    assert asyncio.run(run()) == (0, 1)


def test_a_kept_turn_whose_pause_is_gone_is_given_back_and_booked_anew(tmp_path: Path) -> None:
    """A process booked a turn after a day's pause for an urgent message (only urgent mail
    books that far ahead) and stopped (its sidecar keeps the turn);
    the pause was then removed. The process that takes the message sees the pause gone: it
    gives that turn back (the window's tail moves back) and books one for now, instead of
    waiting a day on a turn nobody holds."""
    from pickupd.limits.needs import Applies
    from pickupd.limits.quota import Go, Quota, Wait
    from pickupd.message.priority import MailClass

    ledger = SpoolLedger(tmp_path / "ledger.json")
    need = _need(MINUTE_30)
    applies = Applies((need,), ("mailbox:h:a",), "mailbox:h:a", "account:h", None, (), "h")

    async def run() -> tuple[object, object]:
        await ledger.pause("mailbox:h:a", 86400, "quota spent")
        first = await Quota(ledger).turn("M1", applies, 1, klass=MailClass.URGENT)
        assert isinstance(first, Wait) and first.kept is not None
        assert first.kept.paused == "mailbox:h:a" and first.at - time.time() > 80000
        with ledger._books() as books:  # an operator removes the pause
            books.pauses.clear()
        second = await Quota(ledger).turn(
            "M1", applies, 1, first.kept, MailClass.URGENT
        )  # another process
        return first, second

    _, second = asyncio.run(run())
    assert isinstance(second, Go), second

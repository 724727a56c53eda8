"""Limits shared by a fleet: real daemons on their own spools, one real Redis, one SMTP server
that counts what it receives, window by window. And the spool's own ledger, shared by the
workers of one host, without Redis."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import (
    Daemon,
    drop_maildir,
    free_port,
    manual,
    message,
    pickupd,
    relay_for,
    scrape,
    secret_file,
    wait_until,
)
from redisserver import RedisServer
from smtpserver import Received, SmtpServer

from pickupd.spool.sidecar import to_timestamp

TO3 = "a@example.net, b@example.net, c@example.net"


def _most_in_a_window(
    got: Sequence[Received], window: float, weight: Callable[[Received], int]
) -> int:
    """The most any window of `window` seconds (ending at an arrival) saw at the server."""
    times = sorted((r.at, weight(r)) for r in got)
    return max(sum(w for t, w in times if end - window < t <= end) for end, _ in times)


def _fleet(
    make_daemon: Callable[..., Daemon],
    server: SmtpServer,
    store: RedisServer | None,
    limits: list[str],
    count: int = 3,
    hosts: int | None = None,
    relay: dict[str, Any] | None = None,
    **sections: Any,
) -> list[Daemon]:
    extra = {"limits": {"store": store.url, "hosts": hosts or count}} if store else {}
    return [
        make_daemon(
            relays={"main": relay_for(server, **(relay or {}))},
            senders={"app@example.com": {"relay": "main", "limits": limits}},
            retry={"schedule": ["1h"], "max_age": "5d"},
            **extra,
            **sections,
        )
        for _ in range(count)
    ]


def test_three_daemons_share_one_mailbox_limit(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Three daemons, three spools, one Redis: 10 messages a second and 60 recipients per
    10 seconds for the one mailbox they all send as. The server never sees a window over
    either, and every message arrives exactly once."""
    daemons = _fleet(make_daemon, smtp_server, redis_server, ["10 messages/s", "60 recipients/10s"])
    for n in range(15):
        for d, daemon in enumerate(daemons):
            drop_maildir(daemon.spool, message(to=TO3, subject=f"d{d}-{n}"))
    got = smtp_server.wait_for(45, timeout=60)
    subjects = [r.data.split(b"Subject: ")[1].split(b"\r")[0] for r in got]
    assert len(subjects) == len(set(subjects)) == 45
    print(sorted(round(r.at - got[0].at, 3) for r in got))
    assert _most_in_a_window(got, 1.0, lambda r: 1) <= 10
    assert _most_in_a_window(got, 10.0, lambda r: len(r.rcpt_tos)) <= 60
    # 135 recipients at 60 per 10 s: the last cannot have gone before two windows rolled.
    assert max(r.at for r in got) - min(r.at for r in got) > 20
    for daemon in daemons:
        assert daemon.events("limit_store_down") == []
        assert daemon.events("deferred") == []  # waiting is not an attempt
    wait_until(lambda: all(d.census()["deferred"] == 0 for d in daemons), 10, "deferred/ to empty")


def test_a_rolling_quota_never_lets_more_through_in_any_window(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A daily quota as a short window (the same code path): 8 recipients per 4 seconds,
    20 messages of one recipient each from two daemons; no 4 seconds, wherever they start,
    see more than 8 at the server."""
    daemons = _fleet(make_daemon, smtp_server, redis_server, ["8 recipients/4s"], count=2)
    for n in range(10):
        for daemon in daemons:
            drop_maildir(daemon.spool, message(subject=f"q{n}"))
    got = smtp_server.wait_for(20, timeout=40)
    assert _most_in_a_window(got, 4.0, lambda r: len(r.rcpt_tos)) <= 8
    assert max(r.at for r in got) - min(r.at for r in got) > 8  # three windows at least


def test_redis_dies_the_share_holds_and_the_count_resumes(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Redis is killed mid-run: the daemon goes on with its share (hosts = 2: 3 of 6 per 2 s),
    logs it once, loses nothing; Redis comes back on its port and holds the count again."""
    (daemon,) = _fleet(
        make_daemon,
        smtp_server,
        redis_server,
        ["6 messages/2s"],
        1,
        hosts=2,
        dispatch={"workers": 1},
    )
    for n in range(6):
        drop_maildir(daemon.spool, message(subject=f"a{n}"))
    smtp_server.wait_for(6, timeout=20)
    redis_server.kill()
    for n in range(9):
        drop_maildir(daemon.spool, message(subject=f"b{n}"))
    (down,) = daemon.wait_event("limit_store_down", timeout=20)
    assert down["share"].startswith("1/2")
    got = smtp_server.wait_for(15, timeout=40)
    during = [r for r in got if b"Subject: b" in r.data]
    assert _most_in_a_window(during, 2.0, lambda r: 1) <= 3  # the host's share
    redis_server.start()
    daemon.wait_event("limit_store_up", timeout=40)
    for n in range(8):
        drop_maildir(daemon.spool, message(subject=f"c{n}"))
    got = smtp_server.wait_for(23, timeout=30)
    # Back on the store's count: the whole limit again (6 in a window, not the share of 3),
    # and booked in Redis.
    assert redis_server.client().keys("pickupd:*mailbox*")
    after = [r for r in got if b"Subject: c" in r.data]
    assert _most_in_a_window(after, 2.0, lambda r: 1) in (4, 5, 6)
    subjects = [r.data.split(b"Subject: ")[1].split(b"\r")[0] for r in got]
    assert len(set(subjects)) == len(subjects) == 23
    assert len(daemon.events("limit_store_down")) == 1


def test_two_hosts_keep_the_limit_plus_one_share_when_redis_dies_mid_run(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Two daemons share 20 messages/s through Redis, each dropped 60 messages; Redis is
    killed while they send and 40 more are dropped: no 1 s window at the server ever holds
    more than the limit plus one host's share (30; before: 40), and every message arrives
    once."""
    daemons = _fleet(make_daemon, smtp_server, redis_server, ["20 messages/s"], count=2)
    for n in range(60):
        for d, daemon in enumerate(daemons):
            drop_maildir(daemon.spool, message(subject=f"a{d}-{n}"))
    smtp_server.wait_for(30, timeout=20)
    redis_server.kill()
    for n in range(20):
        for d, daemon in enumerate(daemons):
            drop_maildir(daemon.spool, message(subject=f"b{d}-{n}"))
    for daemon in daemons:
        daemon.wait_event("limit_store_down", timeout=20)
    got = smtp_server.wait_for(160, timeout=60)
    subjects = [r.data.split(b"Subject: ")[1].split(b"\r")[0] for r in got]
    assert len(subjects) == len(set(subjects)) == 160
    most = _most_in_a_window(got, 1.0, lambda r: 1)
    assert most <= 30


def test_a_spent_mailbox_stops_the_whole_fleet(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """One daemon gets Microsoft 365's SubmissionQuotaExceeded: the mailbox is paused in
    Redis for a day, so the other daemon stops sending as it too; the message is kept in
    deferred/ (not failed: the mail is fine), once logged, and shown by `queue`."""
    one, two = _fleet(make_daemon, smtp_server, redis_server, ["100 messages/s"], count=2)
    smtp_server.fail_data = (
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
        " Failed to process message due to a permanent exception"
    )
    smtp_server.fail_next = 1
    drop_maildir(one.spool, message(subject="first"))
    (spent,) = one.wait_event("quota_spent")
    assert spent["scope"] == "mailbox:127.0.0.1:sender app@example.com"
    (deferred,) = one.wait_sidecars("deferred")
    assert deferred.get("reason") is None
    assert "daily recipient quota is spent" in deferred["detail"]
    assert to_timestamp(deferred["next_attempt"]) - time.time() > 86000  # not the 1h schedule
    queue = pickupd("queue", "-c", str(one.config_path))
    assert "next attempt in 24h" in queue.stdout or "next attempt in 23h" in queue.stdout, queue
    assert "SubmissionQuotaExceeded" in queue.stdout
    for n in range(3):
        drop_maildir(two.spool, message(subject=f"two{n}"))
    waiting = two.wait_event("waiting", count=3)
    assert all("is paused" in w["detail"] and "quota is spent" in w["detail"] for w in waiting)
    assert smtp_server.received == []
    assert one.events("failed") == [] and two.events("failed") == []


def test_workers_of_one_host_share_the_spool_ledger(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """No Redis: two worker processes on one spool book in its one ledger file, so the
    limit holds for the host (not two halves, not twice)."""
    daemon = make_daemon(
        smtp_server,
        senders={"app@example.com": {"relay": "main", "limits": ["4 messages/2s"]}},
        dispatch={"workers": 2},
        retry={"schedule": ["1h"]},
    )
    for n in range(16):
        drop_maildir(daemon.spool, message(subject=f"w{n}"))
    got = smtp_server.wait_for(16, timeout=40)
    assert _most_in_a_window(got, 2.0, lambda r: 1) <= 4
    assert max(r.at for r in got) - min(r.at for r in got) > 5


def test_a_connections_limit_holds_across_daemons(
    smtp_factory: Callable[..., SmtpServer],
    redis_server: RedisServer,
    make_daemon: Callable[..., Daemon],
) -> None:
    """ "2 connections" for the mailbox, three daemons of up to 4 sessions each: the server
    never has more than two open at once (leases in Redis), and all mail arrives."""
    server = smtp_factory(trickle=True)  # slow replies: sessions overlap if they can
    daemons = _fleet(
        make_daemon, server, redis_server, ["2 connections"], relay={"idle_timeout": "300ms"}
    )
    for n in range(8):
        for d, daemon in enumerate(daemons):
            drop_maildir(daemon.spool, message(subject=f"c{d}-{n}"))
    got = server.wait_for(24, timeout=60)
    assert len({r.data for r in got}) == 24
    assert server.peak_connections <= 2, server.peak_connections


def test_the_metrics_show_room_the_store_and_a_spent_quota(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """The endpoint shows each limit's room after the last turn, the store's gauge (down
    while Redis is frozen), and when a spent mailbox may send again."""
    port = free_port()
    (daemon,) = _fleet(
        make_daemon,
        smtp_server,
        redis_server,
        ["50 messages/min"],
        count=1,
        metrics={"listen": f"127.0.0.1:{port}"},
        dispatch={"workers": 1},
    )
    for n in range(3):
        drop_maildir(daemon.spool, message(subject=f"r{n}"))
    smtp_server.wait_for(3)
    room = 'pickupd_limit_room{limit="mailbox:127.0.0.1:sender app@example.com/messages/60"}'
    got = wait_until(lambda: (s := scrape(port)).get(room) == 47 and s, 5, "the room of 50")
    assert got["pickupd_limit_store_up"] == 1
    redis_server.freeze()
    for n in range(3):  # three late answers in a row: the store is down
        drop_maildir(daemon.spool, message(subject=f"frozen{n}"))
        smtp_server.wait_for(4 + n)  # from the host's share
    wait_until(lambda: scrape(port).get("pickupd_limit_store_up") == 0, 5, "the store down")
    redis_server.thaw()
    smtp_server.fail_data, smtp_server.fail_next = "550 5.4.5 Daily user sending limit exceeded", 1
    wait_until(lambda: scrape(port).get("pickupd_limit_store_up") == 1, 40, "the store back")
    drop_maildir(daemon.spool, message(subject="spent"))
    daemon.wait_event("quota_spent")
    key = 'pickupd_quota_spent_until_seconds{scope="mailbox:127.0.0.1:sender app@example.com"}'
    until = wait_until(lambda: scrape(port).get(key), 5, "the spent gauge")
    assert until > time.time() + 86000


def test_a_forged_pause_is_bounded_and_a_removed_one_holds_no_mail(
    smtp_server: SmtpServer, redis_server: RedisServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Someone who can write to the store pauses a mailbox for ten days: the mail waits a day
    at most (the longest pause pickupd sets); once the pause is deleted from the store, the
    waiting mail goes within the recheck (10 s): the normal message waiting in line and the
    urgent one, whose turn was booked after the pause (and is given back); a pause value that
    does not parse holds nothing."""
    from pickupd.limits.store import _key, _shard

    (daemon,) = _fleet(make_daemon, smtp_server, redis_server, ["100 messages/s"], count=1)
    scope = "mailbox:127.0.0.1:sender app@example.com"
    key = _key(_shard([scope]), f"pause:{scope}")
    client = redis_server.client()
    ten_days = int((time.time() + 10 * 86400) * 1000)
    client.set(key, f"{ten_days}|forged", pxat=ten_days)
    drop_maildir(daemon.spool, message(subject="held"))
    drop_maildir(daemon.spool, message(subject="urgent", extra="X-Priority: 1\n"))

    def both() -> list[dict[str, Any]]:
        seen = daemon.events("waiting")
        return seen if {e["mail_class"] for e in seen} == {"normal", "urgent"} else []

    waiting = wait_until(both, 10, "both messages waiting")
    for event in waiting:
        assert "is paused (forged)" in event["detail"]
        assert to_timestamp(event["next_attempt"]) - time.time() < 86400 + 60
    assert {event["mail_class"] for event in waiting} == {"normal", "urgent"}
    assert smtp_server.received == []
    client.delete(key)
    got = smtp_server.wait_for(2, timeout=25)
    assert sorted(r.data.split(b"Subject: ")[1][:4] for r in got) == [b"held", b"urge"]
    daemon.wait_event("pause_lifted")

    client.set(key, "not a pause")
    drop_maildir(daemon.spool, message(subject="not held"))
    smtp_server.wait_for(3, timeout=10)


def test_the_readmes_acl_user_is_all_pickupd_needs(
    smtp_server: SmtpServer,
    redis_factory: Callable[..., RedisServer],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """The ACL user the README gives pickupd (its keys only, the commands it and its scripts
    use) books, pauses, refunds and leases: mail under a limit goes, a 4xx refunds, the store
    is never refused; and that user cannot read a key that is not pickupd's."""
    readme = manual()
    rule = re.search(r"`user pickupd on >PASSWORD ([^`]+)`", readme.replace("\n  ", " "))
    assert rule, "the README's ACL rule"
    server = redis_factory(password="admin")
    admin = server.client()
    admin.set("other-app:secret", "theirs")
    admin.execute_command(  # type: ignore[no-untyped-call]  # the README's rule as written
        "ACL", "SETUSER", "pickupd", "on", ">pickupd-pw", *rule.group(1).split()
    )
    secret = secret_file(tmp_path / "redis.password", "pickupd-pw")
    store = server.url.replace("redis://", "redis://pickupd@")
    daemon = make_daemon(
        relays={"main": relay_for(smtp_server, max_connections=2)},
        senders={"app@example.com": {"relay": "main", "limits": ["100 messages/s"]}},
        limits={"store": store, "password_file": str(secret)},
    )
    smtp_server.fail_rcpt["later@example.net"] = "451 4.2.0 later"
    drop_maildir(daemon.spool, message(to="later@example.net"))
    for n in range(3):
        drop_maildir(daemon.spool, message(subject=f"acl {n}"))
    smtp_server.wait_for(3)
    daemon.wait_event("deferred")
    assert daemon.events("limit_store_down") == []
    as_pickupd = redis.Redis.from_url(store, password="pickupd-pw", socket_timeout=2)
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_pickupd.get("other-app:secret")


def test_turns_booked_by_one_worker_are_kept_by_the_other(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """3 messages per 15 s with two workers, 9 dropped at once: they go at about 0, 15 and
    30 s, three each time. A deferred message may be another worker's to take than the one
    that booked its turn (the share follows the file's name): its sidecar keeps the turn, so
    it goes on it instead of booking one a window later (before: 0, 15.8 and 47.3 s)."""
    daemon = make_daemon(
        smtp_server,
        senders={"app@example.com": {"relay": "main", "limits": ["3 messages/15s"]}},
        dispatch={"workers": 2},
        retry={"schedule": ["1h"]},
    )
    start = time.time()
    for n in range(9):
        drop_maildir(daemon.spool, message(subject=f"t{n}"))
    got = smtp_server.wait_for(9, timeout=45)
    offsets = sorted(r.at - start for r in got)
    print("arrivals (s):", [round(o, 1) for o in offsets])
    assert _most_in_a_window(got, 15.0, lambda r: 1) <= 3
    assert offsets[2] < 5 and 15 <= offsets[3] < 20 and 30 <= offsets[6] < 35, offsets
    assert offsets[-1] < 35, offsets


def test_check_connect_tries_the_store_and_a_reload_says_limits_need_a_restart(
    smtp_server: SmtpServer,
    redis_factory: Callable[..., RedisServer],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """`check --connect` logs in to the store and loads the ledger's scripts: ok with the
    right password, FAILED (exit 1) naming the password with a wrong one. A running daemon
    told of a corrected [limits] password by SIGHUP says the section needs a restart."""
    server = redis_factory(password="right")
    secret = secret_file(tmp_path / "redis.password", "wrong")
    daemon = make_daemon(
        smtp_server,
        start=False,
        limits={"store": server.url, "password_file": str(secret)},
    )
    failed = pickupd("check", "-c", str(daemon.config_path), "--connect")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"limits.store {server.url}: FAILED: the store refused our password" in failed.stdout
    daemon.start()
    secret.write_text("right\n")
    passed = pickupd("check", "-c", str(daemon.config_path), "--connect")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert re.search(r"limits\.store .*: ok: Redis [0-9.]+, logged in", passed.stdout)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    said = daemon.wait_event("reload_needs_restart")  # by each process of the service
    assert all("limits" in event["keys"] for event in said), said

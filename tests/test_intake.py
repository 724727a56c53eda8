"""The intake in process (pickupd/intake/queues.py): what the lanes are given, and when, from a
real spool in a temporary folder. No daemon: the feeders run as tasks of the test's event loop
and every wait is bounded; the file events are the watcher's, handed in as it hands them."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from pickupd import ids, log
from pickupd.config.loading import DispatchConfig
from pickupd.intake.queues import Intake
from pickupd.intake.watcher import FileEvent
from pickupd.spool.folders import Candidate, Origin, Spool
from pickupd.workers.shares import Part, owns

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    """`test()` on a fresh event loop, bounded in time, its log lines kept apart (a stream
    an earlier test configured may be closed by now)."""
    log.configure("info", "json", stream=io.StringIO())

    async def bounded() -> T:
        return await asyncio.wait_for(test(), 20)

    return asyncio.run(bounded())


def spool_at(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    return spool


def drop(spool: Spool, name: str) -> Path:
    path = spool.new / name
    path.write_bytes(b"From: app@example.com\r\nTo: a@example.net\r\n\r\nhi\r\n")
    return path


def defer(spool: Spool, due: float) -> str:
    """A message in deferred/ due at `due` (its sidecar's mtime), as the recorder leaves it."""
    msg_id = ids.new()
    (spool.deferred / f"{msg_id}.eml").write_bytes(b"From: app@example.com\r\n\r\nhi\r\n")
    sidecar = spool.deferred / f"{msg_id}.json"
    sidecar.write_text("{}")
    os.utime(sidecar, (due, due))
    return msg_id


async def take_all(intake: Intake) -> list[Candidate]:
    """What the lanes get until `next()` says there is no more (`once`), each done at once."""
    taken = []
    while (candidate := await intake.next()) is not None:
        intake.started(candidate)
        taken.append(candidate)
        intake.done(candidate)
    return taken


def test_once_takes_new_mail_and_due_mail_in_turn_and_leaves_what_is_not_due(
    tmp_path: Path,
) -> None:
    """`pickupd run --once`: the new files and the due deferred ones, one of each in turn (so
    neither starves the other), then None; a message due later is not taken."""
    spool = spool_at(tmp_path)
    for n in range(3):
        drop(spool, f"m{n}")
    now = time.time()
    due = {defer(spool, now - 60), defer(spool, now - 1)}
    later = defer(spool, now + 3600)

    async def test() -> list[Candidate]:
        intake = Intake(spool, DispatchConfig(), once=True)
        # Both queues filled first (the feeders end once all is queued), so that the order
        # the lanes are given them in is the intake's choice alone.
        await asyncio.gather(intake.feed_pickup(), intake.feed_deferred())
        return await take_all(intake)

    taken = run(test)
    assert sorted(c.source for c in taken if c.origin is Origin.NEW) == [
        "new/m0",
        "new/m1",
        "new/m2",
    ]
    assert {c.id for c in taken if c.origin is Origin.DEFERRED} == due
    assert later not in {c.id for c in taken}
    origins = [c.origin.value for c in taken]
    assert origins[:4] in (["new", "deferred"] * 2, ["deferred", "new"] * 2), origins


def test_a_file_event_queues_the_file_at_once_and_the_feeder_does_not_queue_it_twice(
    tmp_path: Path,
) -> None:
    spool = spool_at(tmp_path)

    async def test() -> list[Candidate]:
        intake = Intake(spool, DispatchConfig(rescan_interval=3600), once=False)
        feeder = asyncio.create_task(intake.feed_pickup())
        await asyncio.sleep(0)  # the feeder runs its first scan (on the loop): an empty folder
        path = drop(spool, "hinted")
        intake.hint(FileEvent.MOVED, str(path))
        first = await intake.next()
        assert first is not None
        intake.started(first)
        intake.wake()  # a rescan while the file is still being worked on
        second = asyncio.create_task(intake.next())
        done, _ = await asyncio.wait({second}, timeout=0.5)
        intake.close()
        await feeder
        more = [result for task in done if (result := task.result()) is not None]
        return [first, *more]

    taken = run(test)
    assert [c.source for c in taken] == ["new/hinted"]


def test_a_workers_share_is_only_the_files_it_owns(tmp_path: Path) -> None:
    """With two worker processes, each is given exactly the files whose names are its own,
    whether by a file event or by a scan; together they take each file once."""
    spool = spool_at(tmp_path)
    names = [f"file{n}" for n in range(40)]
    for name in names:
        drop(spool, name)

    async def share(index: int) -> set[str]:
        part = Part(index, 2)
        intake = Intake(spool, DispatchConfig(), once=True, part=part)
        for name in names[:10]:  # the watch sees some of them too
            intake.hint(FileEvent.CREATED, str(spool.new / name))
        feeders = [asyncio.create_task(intake.feed_pickup()),
                   asyncio.create_task(intake.feed_deferred())]  # fmt: skip
        taken = {c.source.removeprefix("new/") for c in await take_all(intake)}
        await asyncio.gather(*feeders)
        assert all(owns(part, name) for name in taken)
        return taken

    first, second = run(lambda: share(0)), run(lambda: share(1))
    assert first and second and not first & second
    assert first | second == set(names)


def test_new_mail_waits_on_disk_past_the_queues_bound_and_none_is_lost(tmp_path: Path) -> None:
    """Events for more files than the queue holds (concurrency x 4) are not queued in memory:
    the feeder's scan brings the rest as room is made, each file once."""
    spool = spool_at(tmp_path)

    async def test() -> list[str]:
        intake = Intake(spool, DispatchConfig(concurrency=1, rescan_interval=3600), once=False)
        feeder = asyncio.create_task(intake.feed_pickup())
        await asyncio.sleep(0)  # the feeder runs its first scan (on the loop): an empty folder
        for n in range(12):
            intake.hint(FileEvent.MOVED, str(drop(spool, f"m{n:02}")))
        assert len(intake._new) == 4  # the bound: the rest stays on disk, for the scan
        taken: list[str] = []
        while len(taken) < 12:
            candidate = await intake.next()
            assert candidate is not None
            intake.started(candidate)
            taken.append(candidate.source)
            candidate.path.unlink()  # claimed: gone from pickup/new
            intake.done(candidate)
        intake.close()
        await feeder
        return taken

    taken = run(test)
    assert sorted(taken) == [f"new/m{n:02}" for n in range(12)]


def test_a_retry_by_an_operator_is_taken_when_due_and_our_own_deferral_is_no_news(
    tmp_path: Path,
) -> None:
    """A message an operator makes due (`pickupd retry`: files appear in deferred/) is taken
    by its sidecar's time; one this process is deferring itself is not taken again on the
    strength of its own file events, only when its due time (told by `due_at`) comes."""
    spool = spool_at(tmp_path)

    async def test() -> list[str]:
        intake = Intake(spool, DispatchConfig(rescan_interval=3600), once=False)
        feeder = asyncio.create_task(intake.feed_deferred())
        async with asyncio.timeout(5):  # its first scan, in a thread: deferred/ is empty
            while intake.deferred.scans == 0:
                await asyncio.sleep(0.001)
        retried = defer(spool, time.time() - 1)
        for suffix in ("json", "eml"):
            intake.hint(FileEvent.MOVED, str(spool.deferred / f"{retried}.{suffix}"))
        ours = ids.new()
        intake.deferred.deferring(ours)
        soon = time.time() + 0.3
        (spool.deferred / f"{ours}.eml").write_bytes(b"hi\r\n")
        sidecar = spool.deferred / f"{ours}.json"
        sidecar.write_text("{}")
        os.utime(sidecar, (soon, soon))
        for suffix in ("json", "eml"):
            intake.hint(FileEvent.MOVED, str(spool.deferred / f"{ours}.{suffix}"))
        intake.deferred.due_at(ours, soon)
        taken: list[str] = []
        for _ in range(2):
            candidate = await intake.next()
            assert candidate is not None and candidate.id is not None
            taken.append(candidate.id)
            assert candidate.id != ours or time.time() >= soon, "taken before it was due"
        intake.close()
        await feeder
        assert taken == [retried, ours]
        return taken

    run(test)


def test_a_due_time_beyond_the_horizon_is_taken_now_and_said(tmp_path: Path) -> None:
    """A sidecar's time further ahead than max_age cannot come from pickupd (a clock jump, an
    edit): the message is taken now, the candidate saying what it was (`clamped_from`)."""
    spool = spool_at(tmp_path)
    far = time.time() + 30 * 86400
    msg_id = defer(spool, far)

    async def test() -> list[Candidate]:
        intake = Intake(spool, DispatchConfig(), once=True)
        intake.deferred.horizon = 5 * 86400
        feeders = [asyncio.create_task(intake.feed_pickup()),
                   asyncio.create_task(intake.feed_deferred())]  # fmt: skip
        taken = await take_all(intake)
        await asyncio.gather(*feeders)
        return taken

    (candidate,) = run(test)
    assert candidate.id == msg_id
    assert candidate.clamped_from is not None and abs(candidate.clamped_from - far) < 1


def test_once_takes_a_message_that_came_due_as_the_scan_ran(tmp_path: Path) -> None:
    """`--once` looks at deferred/ once: a message due as it looks is taken in this run, not
    left for a next look that never comes (due times are kept in 0.1 s buckets). Failed
    before the feeder waited out the scan's bucket."""
    spool = spool_at(tmp_path)

    async def test() -> list[Candidate]:
        intake = Intake(spool, DispatchConfig(), once=True)
        # Due a moment ahead, in the bucket the scan runs in.
        msg_id = defer(spool, time.time() + 0.02)
        await asyncio.gather(intake.feed_pickup(), intake.feed_deferred())
        taken = await take_all(intake)
        assert [c.id for c in taken] == [msg_id]
        return taken

    for _ in range(5):
        run(test)
        for leftover in spool.deferred.iterdir():
            leftover.unlink()

"""The spool on a real filesystem: claims, races, atomic writes, recovery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pickupd import ids
from pickupd.intake.duetimes import DueTimes
from pickupd.spool import recovery
from pickupd.spool.files import TooLarge, Unsafe, atomic_write
from pickupd.spool.folders import Candidate, Later, Origin, Spool
from pickupd.spool.sidecar import Sidecar, from_timestamp


def make(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    return spool


def test_layout_is_created(tmp_path: Path) -> None:
    """ensure() creates the Maildir pickup root and the state folders."""
    spool = make(tmp_path)
    for sub in ("pickup/tmp", "pickup/new", "pickup/cur", "active", "deferred", "failed", "sent"):
        assert (spool.root / sub).is_dir()


def test_claim_is_exclusive(tmp_path: Path) -> None:
    """Two spools (two dispatchers) claiming the same file: exactly one wins."""
    first, second = make(tmp_path), Spool(tmp_path / "spool")
    second.owner = "other-host-1"
    (first.new / "m1").write_bytes(b"x")
    candidate = Candidate(first.new / "m1", "new/m1", Origin.NEW)
    results = [first.claim(candidate), second.claim(candidate)]
    assert sum(r is not None for r in results) == 1
    assert len(os.listdir(first.active)) == 1


def test_read_refuses_what_is_not_a_plain_file(tmp_path: Path) -> None:
    """Symlinks are not followed, FIFOs do not block, oversize is reported without reading."""
    spool = make(tmp_path)
    (tmp_path / "target").write_bytes(b"secret")
    os.symlink(tmp_path / "target", spool.new / "link")
    os.mkfifo(spool.new / "fifo")
    (spool.new / "big").write_bytes(b"y" * 1000)
    found = {}
    for name in ("link", "fifo", "big"):
        claimed = spool.claim(Candidate(spool.new / name, name, Origin.NEW))
        assert claimed is not None
        found[name] = spool.read(claimed, 100)
    assert isinstance(found["link"], Unsafe) and "symbolic link" in found["link"].detail
    assert isinstance(found["fifo"], Unsafe) and "fifo" in found["fifo"].detail
    assert found["big"] == TooLarge(1000)


def test_hard_links_are_refused(tmp_path: Path) -> None:
    """A file with another hard link (e.g. to a file only the daemon can read) is unsafe."""
    spool = make(tmp_path)
    (tmp_path / "private").write_bytes(b"From: a@b\n\nsecret\n")
    os.link(tmp_path / "private", spool.new / "m")
    claimed = spool.claim(Candidate(spool.new / "m", "new/m", Origin.NEW))
    assert claimed is not None
    result = spool.read(claimed, 1000)
    assert isinstance(result, Unsafe) and result.linked


def test_direct_eml_waits_for_settle(tmp_path: Path) -> None:
    """A .eml in pickup/ is offered only once unchanged for `settle`; dotfiles never; any
    other file (not tmp/ or new/) is told as a stray at each scan."""
    spool = make(tmp_path)
    (spool.pickup / "fresh.eml").write_bytes(b"x")
    (spool.pickup / ".hidden.eml").write_bytes(b"x")
    (spool.pickup / "notes.txt").write_bytes(b"x")
    now = time.time()
    strays: list[str] = []
    items = list(spool.scan_pickup(now, 5.0, lambda _: True, strays.append))
    assert len(items) == 1 and isinstance(items[0], Later) and items[0].at > now
    items = list(spool.scan_pickup(now + 10, 5.0, lambda _: True, strays.append))
    assert [i.source for i in items if isinstance(i, Candidate)] == ["fresh.eml"]
    assert strays == ["notes.txt", "notes.txt"] and spool.strays() == ["notes.txt"]


def test_deferred_due_time_is_the_mtime(tmp_path: Path) -> None:
    """finish_deferred sets the due time (the .eml's mtime); deferred_times reports it,
    and the due-time index gives the id back only once it is due."""
    spool = make(tmp_path)
    (spool.new / "m").write_bytes(b"x")
    claimed = spool.claim(Candidate(spool.new / "m", "new/m", Origin.NEW))
    assert claimed is not None
    car = Sidecar(claimed.id, "new/m", "a@b", ("c@d",), 1, from_timestamp(time.time()))
    due = time.time() + 100
    spool.finish_deferred(claimed, car, due)
    ((msg_id, found),) = spool.deferred_times(time.time())
    assert msg_id == claimed.id and abs(found - due) < 0.001
    index = DueTimes(spool.deferred_times(time.time()))
    assert list(index.pop_due(due - 0.2)) == [] and index.next_due() == pytest.approx(due, abs=0.1)
    assert list(index.pop_due(due + 0.1)) == [claimed.id] and len(index) == 0
    item = Candidate(spool.deferred / f"{msg_id}.eml", f"{msg_id}.eml", Origin.DEFERRED, msg_id)
    again = spool.claim(item)
    assert again is not None and again.sidecar == car


def test_deferred_times_clamp_a_due_time_beyond_the_horizon(tmp_path: Path) -> None:
    """A due time further ahead than the horizon (a clock jump, an edit) is given as now."""
    spool = make(tmp_path)
    msg_id = ids.new()
    (spool.deferred / f"{msg_id}.eml").write_bytes(b"x")
    path = spool.deferred / f"{msg_id}.json"  # its mtime is the due time
    path.write_bytes(b"{}")
    far = time.time() + 10 * 86400
    os.utime(path, (far, far))
    now = time.time()
    assert [due for _, due in spool.deferred_times(now, horizon=86400)] == [now]
    assert [due for _, due in spool.deferred_times(now)] == [far]


def test_due_times_keep_order_and_take_late_additions() -> None:
    """Entries come out earliest first, never before their time, and an entry added while
    popping is seen when due; a stale duplicate is harmless (the taker re-reads the mtime)."""
    index = DueTimes()
    first, second, third = ids.new(), ids.new(), ids.new()
    index.add(second, 1000.5)
    index.add(first, 1000.0)
    index.add("not-an-id", 999.0)  # only ids can name deferred files
    assert len(index) == 2
    assert list(index.pop_due(999.99)) == []
    popped = []
    for msg_id in index.pop_due(1001.0):
        popped.append(msg_id)
        if msg_id == first:
            index.add(third, 1000.7)
    assert popped == [first, second, third] and len(index) == 0
    other = DueTimes([(first, 5.0)])
    index.merge(other)
    index.merge(other)
    assert list(index.pop_due(5.0)) == [first, first]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    """atomic_write replaces the file whole and leaves nothing else behind."""
    target = tmp_path / "x.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["x.json"]


def test_stale_claims_of_dead_owners_only(tmp_path: Path) -> None:
    """Claims of a live owner (its lock held) are left alone; a dead owner's are recovered."""
    spool = make(tmp_path)
    spool.lock()
    (spool.new / "mine").write_bytes(b"x")
    assert spool.claim(Candidate(spool.new / "mine", "new/mine", Origin.NEW)) is not None
    live = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
    )
    try:
        other = Spool(spool.root)
        other.owner = f"{spool.owner.rpartition('-')[0]}-{live.pid}"
        other.lock()  # held by this test process on behalf of the "live" owner
        (spool.new / "theirs").write_bytes(b"x")
        assert other.claim(Candidate(spool.new / "theirs", "new/theirs", Origin.NEW)) is not None
        dead = Spool(spool.root)
        dead.owner = f"{spool.owner.rpartition('-')[0]}-999999999"
        (spool.new / "dead").write_bytes(b"x")
        dead_claim = dead.claim(Candidate(spool.new / "dead", "new/dead", Origin.NEW))
        assert dead_claim is not None
        stale = recovery.stale_claims(spool)
        assert [c.id for c in stale] == [dead_claim.id]
    finally:
        live.kill()
        live.wait()


def test_claims_of_another_host_are_never_recovered(tmp_path: Path) -> None:
    """On a shared spool, a claim by host "web-1" is not recovered by host "web" even though
    one name starts with the other: locks may not be visible across hosts."""
    spool = make(tmp_path)
    spool.owner, spool._host = "web-100", "web"
    other = Spool(spool.root)
    other.owner = "web-1-200"
    (spool.new / "m").write_bytes(b"x")
    assert other.claim(Candidate(spool.new / "m", "new/m", Origin.NEW)) is not None
    assert recovery.stale_claims(spool) == []


def test_an_unreadable_sidecar_leaves_with_its_message(tmp_path: Path) -> None:
    """A deferred message whose sidecar cannot be read is still sent; its broken sidecar
    does not stay behind in deferred/ as an orphan."""
    spool = make(tmp_path)
    msg_id = ids.new()
    (spool.deferred / f"{msg_id}.eml").write_bytes(b"x")
    (spool.deferred / f"{msg_id}.json").write_bytes(b"{not json")
    claimed = spool.claim(Candidate(spool.deferred / f"{msg_id}.eml", "x", Origin.DEFERRED, msg_id))
    assert claimed is not None and claimed.sidecar is None
    spool.finish_sent(claimed, None)
    assert list(spool.deferred.iterdir()) == []


def test_leftovers_are_cleaned_and_nothing_else(tmp_path: Path) -> None:
    """clean_leftovers removes old orphaned sidecars, lock files of this host's dead
    processes and old temp files; it keeps fresh sidecars (a requeue in progress), sidecars
    of claimed messages, live locks and everything of other hosts."""
    spool = make(tmp_path)
    spool.lock()
    old = time.time() - 2 * 3600
    orphan, fresh, claimed = ids.new(), ids.new(), ids.new()
    for msg_id in (orphan, fresh, claimed):
        (spool.deferred / f"{msg_id}.json").write_bytes(b"{}")
    os.utime(spool.deferred / f"{orphan}.json", (old, old))
    os.utime(spool.deferred / f"{claimed}.json", (old, old))
    (spool.active / f"{claimed}.{spool.owner}").write_bytes(b"x")
    host = spool.owner.rpartition("-")[0]
    dead, elsewhere = f".owner.{host}-999999999", ".owner.other-host-1"
    (spool.active / dead).write_bytes(b"")
    (spool.active / elsewhere).write_bytes(b"")
    stale_tmp = spool.deferred / f".{orphan}.json.4242.tmp"
    stale_tmp.write_bytes(b"{")
    os.utime(stale_tmp, (old, old))
    removed = recovery.clean_leftovers(spool, time.time())
    assert removed == {"sidecars": 1, "locks": 1, "temps": 1}
    left = sorted(p.name for p in spool.deferred.iterdir())
    assert left == sorted([f"{fresh}.json", f"{claimed}.json"])
    assert sorted(p.name for p in spool.active.iterdir() if p.name.startswith(".")) == sorted(
        [f".owner.{spool.owner}", elsewhere]
    )
    spool.unlock()


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    """A write that fails (here: the target is a directory) removes its temp file."""
    (tmp_path / "target").mkdir()
    try:
        atomic_write(tmp_path / "target", b"data")
    except OSError:
        pass
    else:
        raise AssertionError("writing over a directory must fail")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_claim_is_taken_over_only_once_its_lease_expired(tmp_path: Path) -> None:
    """Two hosts share a spool: a claim that its owner renews (its lock file's mtime) is never
    taken, whatever the claimed file's mtime says (its writer may set it); claims not renewed
    for claim_lease (the host is gone) are taken over by the other host, with one rename."""
    host_a, host_b = make(tmp_path), Spool(tmp_path / "spool")
    host_a.owner, host_b.owner = "host-a-1", "host-b-2"
    host_a.lock()
    (host_a.new / "m").write_bytes(b"x")
    claimed = host_a.claim(Candidate(host_a.new / "m", "new/m", Origin.NEW))
    assert claimed is not None
    os.utime(claimed.path, (0, 0))  # what a writer holding the file open can do
    now = time.time()
    assert recovery.expired(host_b, now + 500, lease=600) == []  # locked just now
    later = now + 3000
    recovery.renew(host_a, later)  # host a is alive and renews
    assert recovery.expired(host_b, later + 10, lease=600) == []
    (taken,) = recovery.expired(host_b, later + 700, lease=600)  # host a stopped renewing
    assert taken.id == claimed.id and taken.origin is Origin.RECOVERED
    again = host_b.claim(taken)
    assert again is not None and again.path.name == f"{claimed.id}.host-b-2"
    assert host_a.claim(taken) is None  # the dead owner's claim is gone


def test_two_threads_rewriting_one_sidecar_never_fail(tmp_path: Path) -> None:
    """A waiting line gives a message its turn (a sidecar rewrite in a thread) while the
    loop records the same message's attempt: both rewrite one sidecar at once. Each writer
    has a temp of its own, so no rename fails (before: one temp name per process, and a
    message was stranded with "No such file or directory"), and the file is one whole
    version."""
    import threading

    from pickupd.spool.files import atomic_write

    target = tmp_path / "01ARZ3NDEKTSV4RRFFQ69G5FAV.json"
    errors: list[BaseException] = []

    def write(tag: bytes) -> None:
        try:
            for n in range(300):
                atomic_write(target, tag * 1000 + str(n).encode())
        except BaseException as exc:  # the test reports it below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in (b"a", b"b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    data = target.read_bytes()
    assert data[:1000] in (b"a" * 1000, b"b" * 1000) and data[1000:].isdigit()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

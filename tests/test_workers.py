"""`[dispatch] workers`: several dispatcher processes on one spool, one service to the
operator. Real `pickupd run` processes and a real SMTP server; the split arithmetic too."""

from __future__ import annotations

import os
import signal
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

from harness import PICKUPD, Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.config.loading import load
from pickupd.workers.shares import ENV, MAX_AUTO, Part, count, owns, portion


def worker_pids(daemon: Daemon) -> list[int]:
    """The main process's children that are pickupd workers (from /proc)."""
    assert daemon.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == daemon.proc.pid and f"{ENV}=".encode() in environ:
            found.append(int(entry.name))
    return found


def test_the_split_adds_up_to_the_whole() -> None:
    """Every limit's shares add up to the limit, and every file belongs to exactly one
    worker (a sidecar to its message's)."""
    for total in (1, 2, 3, 4, 7):
        for amount in range(total, 40):
            assert sum(Part(k, total).share(amount) for k in range(total)) == amount
        names = [f"{n}.M{n * 7}P{n}.host" for n in range(500)] + ["01ARZ3NDEKTSV4RRFFQ69G5FAV.eml"]
        for name in names:
            assert sum(owns(Part(k, total), name) for k in range(total)) == 1
        sidecar = "01ARZ3NDEKTSV4RRFFQ69G5FAV.json"
        assert [owns(Part(k, total), sidecar) for k in range(total)] == [
            owns(Part(k, total), "01ARZ3NDEKTSV4RRFFQ69G5FAV.eml") for k in range(total)
        ]
    # Not everything lands on one worker.
    assert 100 < sum(owns(Part(0, 2), f"m{n}") for n in range(400)) < 300
    assert zlib.crc32(b"") == 0  # the hash is the standard CRC-32: the same in every process


def test_limits_are_shared_out_and_small_ones_cap_the_count(tmp_path: Path) -> None:
    """concurrency and max_connections are split so that the service as a whole keeps them;
    provider limits are not split (the workers share one ledger); a limit smaller than the
    number of workers lowers it, and says which key."""
    path = tmp_path / "pickupd.toml"
    path.write_text(
        f"""
[spool]
path = "{tmp_path / "spool"}"
[dispatch]
concurrency = 9
workers = 3
[relays.main]
host = "127.0.0.1"
port = 25
security = "none"
max_connections = 5
rate = "10/min"
[senders."*@example.com"]
relay = "main"
rate = "30/min"
"""
    )
    config = load(path)
    assert count(config, 2) == (3, None)
    parts = [portion(config, Part(k, 3)) for k in range(3)]
    assert sum(p.dispatch.concurrency for p in parts) == 9
    assert sum(p.relays["main"].max_connections for p in parts) == 5
    assert all(str(p.relays["main"].limits) == "(Limit(amount=10, unit='messages', window=60.0),)"
               for p in parts)  # fmt: skip
    assert all(p.senders[0].limits == config.senders[0].limits for p in parts)

    path.write_text(path.read_text().replace("max_connections = 5", "max_connections = 2"))
    why = "relays.main.max_connections = 2 cannot be split among 3 processes"
    assert count(load(path), 2) == (2, why)
    path.write_text(path.read_text().replace("workers = 3", "workers = 0"))
    path.write_text(path.read_text().replace("max_connections = 2", "max_connections = 50"))
    assert count(load(path), 2) == (2, None)  # 0: one per core
    assert count(load(path), 16) == (MAX_AUTO, None)  # at most MAX_AUTO
    path.write_text(path.read_text().replace("concurrency = 9", "concurrency = 1"))
    assert count(load(path), 2) == (1, "dispatch.concurrency = 1 cannot be split among 2 processes")


def test_workers_share_the_spool_and_report_as_one_service(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Two processes relay 40 messages: each exactly once, the work split between them, at
    most max_connections sessions open at once in all, and the main process's "stopped" line
    counts them all."""
    relay = {**relay_for(smtp_server), "max_connections": 2}
    daemon = make_daemon(relays={"main": relay}, dispatch={"workers": 2})
    (ready,) = daemon.wait_event("ready")
    assert ready["workers"] == 2
    assert len(worker_pids(daemon)) == 1
    for n in range(40):
        drop_maildir(daemon.spool, message(subject=f"m{n}"))
    got = smtp_server.wait_for(40, timeout=20)
    subjects = sorted(r.data.split(b"Subject: ")[1].split(b"\r\n")[0] for r in got)
    assert subjects == sorted(f"m{n}".encode() for n in range(40))  # each once
    assert smtp_server.peak_connections <= 2
    daemon.wait_event("sent", count=40)
    assert daemon.stop(signal.SIGTERM) == 0
    (stopped,) = daemon.events("stopped")
    assert stopped["sent"] == 40 and stopped["claimed"] == 40
    (worker_stopped,) = daemon.events("worker_stopped")
    assert 0 < worker_stopped["sent"] < 40  # the worker did its part


def test_a_killed_worker_is_started_again_and_its_claims_sent(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """kill -9 of a worker in the middle of its sends: the main process logs worker_died and
    starts it again; the new worker takes back the dead one's claims, and every message is
    sent."""
    smtp_server.stall = "MAIL"
    relay = {**relay_for(smtp_server), "timeout": "2s"}
    daemon = make_daemon(relays={"main": relay}, dispatch={"workers": 2})
    for n in range(10):
        drop_maildir(daemon.spool, message(subject=f"k{n}"))
    (worker,) = worker_pids(daemon)
    wait_until(
        lambda: [p for p in daemon.files("active") if p.name.endswith(f"-{worker}")],
        5,
        "the worker's claims",
    )
    os.kill(worker, signal.SIGKILL)
    (died,) = daemon.wait_event("worker_died")
    assert died["worker"] == 1 and died["exit_code"] == -signal.SIGKILL
    smtp_server.stall = None
    got = smtp_server.wait_for(10, timeout=20)
    assert len({r.data for r in got}) == 10
    wait_until(lambda: len(daemon.events("worker_ready")) == 2, 10, "the new worker")
    (new,) = worker_pids(daemon)
    assert new != worker
    assert daemon.events("recovered")
    wait_until(
        lambda: not [p for p in daemon.files("active") if ".owner." not in p.name],
        10,
        "active/ without claims",
    )


def test_reload_and_flush_reach_every_worker(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """SIGHUP to the main process: every worker reads the config again (a new sender is
    allowed in all of them); SIGUSR1: the main process makes all deferred mail due and every
    worker takes its part now."""
    daemon = make_daemon(
        smtp_server, dispatch={"workers": 2}, retry={"schedule": ["1h"], "max_age": "1d"}
    )
    assert daemon.proc is not None
    daemon.doc["senders"]["new@example.com"] = {"relay": "main"}
    daemon.write_config(daemon.doc)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(daemon.events("reloaded")) == 2, 10, "both processes to reload")
    for n in range(12):
        drop_maildir(daemon.spool, message(sender="new@example.com", subject=f"r{n}"))
    smtp_server.wait_for(12)
    smtp_server.fail_rcpt["later@example.net"] = "451 4.2.0 Try later"
    for n in range(12):
        drop_maildir(daemon.spool, message(to="later@example.net", subject=f"d{n}"))
    daemon.wait_event("deferred", count=12)
    smtp_server.fail_rcpt.clear()
    daemon.proc.send_signal(signal.SIGUSR1)
    smtp_server.wait_for(24)
    assert len(daemon.events("flushed")) == 1  # the main process moves, the workers look


def test_a_reload_that_lowers_a_limit_below_the_workers_is_refused(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Two workers cannot share max_connections = 1: SIGHUP with it is refused (reload_failed
    names the key), and the old config goes on relaying."""
    daemon = make_daemon(smtp_server, dispatch={"workers": 2})
    assert daemon.proc is not None
    daemon.doc["relays"]["main"]["max_connections"] = 1
    daemon.write_config(daemon.doc)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(daemon.events("reload_failed")) == 2, 10, "both processes to refuse")
    refused = daemon.events("reload_failed")
    assert all("relays.main.max_connections = 1" in e["problems"][0] for e in refused)
    assert not daemon.events("reloaded")
    for n in range(6):
        drop_maildir(daemon.spool, message(subject=f"h{n}"))
    smtp_server.wait_for(6)


def test_the_main_process_covers_a_worker_that_cannot_come_back(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A worker dies and cannot start again (its config file was broken meanwhile): the main
    process takes its share, so no mail waits for it; once the file is fixed, the worker is
    back and takes its share again."""
    daemon = make_daemon(smtp_server, dispatch={"workers": 2})
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace(f"port = {smtp_server.port}", 'port = "abc"'))
    (worker,) = worker_pids(daemon)
    os.kill(worker, signal.SIGKILL)
    (covered,) = daemon.wait_event("worker_share_covered")
    assert covered["worker"] == 1
    daemon.wait_event("worker_died", count=2)  # the restarted one could not read the config
    for n in range(12):
        drop_maildir(daemon.spool, message(subject=f"c{n}"))
    got = smtp_server.wait_for(12)
    assert len({r.data for r in got}) == 12
    daemon.config_path.write_text(good)
    daemon.wait_event("worker_share_returned", timeout=20)
    for n in range(12):
        drop_maildir(daemon.spool, message(subject=f"b{n}"))
    smtp_server.wait_for(24)
    (back,) = worker_pids(daemon)
    assert back != worker and len(daemon.events("worker_ready")) == 2  # at start, and back


def test_a_pickupd_folder_in_the_working_directory_changes_nothing(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """`pickupd run` started from a folder holding a `pickupd/` package of someone else's
    (code that would run as the service) or an empty `pickupd/` (as /etc holds /etc/pickupd):
    the workers import the installed package, run nothing from there, and the mail goes."""
    daemon = make_daemon(smtp_server, start=False, dispatch={"workers": 2})
    for n in range(6):
        drop_maildir(daemon.spool, message(subject=f"m{n}"))
    planted = tmp_path / "planted"
    marker = tmp_path / "ran-planted-code"
    (planted / "pickupd").mkdir(parents=True)
    (planted / "pickupd" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (planted / "pickupd" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    empty = tmp_path / "etc-like"
    (empty / "pickupd").mkdir(parents=True)
    for cwd in (planted, empty):
        done = subprocess.run(
            [PICKUPD, "run", "--once", "-c", str(daemon.config_path)],
            cwd=cwd,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert not marker.exists(), "a worker ran code from the working directory"
        drop_maildir(daemon.spool, message(subject="again"))
    assert len(smtp_server.wait_for(7)) == 7

"""What a backlog costs pickupd: a deferral storm, a million waiting messages, a dead relay.

    python bench/backlog.py                        # the full run: about 15 minutes on 2 cores
    python bench/backlog.py --storm 2000 --waiting 20000 --dead 2000 --probe 2s   # a quick look

1. Storm: `--storm` messages (100,000) waiting in pickup/new/ at start, relayed to a
   `smtp-sink -r MAIL` that answers every MAIL FROM with a 4xx; `[retry] schedule = ["1h"]`.
   From pickupd's `deferred` log lines: the deferral rate over the first and the last 10%
   (at most 10,000 each) and their ratio, and the CPU per deferral of all processes.
2. Waiting backlog: `--waiting` messages (1,000,000) in deferred/, due in an hour. pickupd
   starts; once its first full scan is logged, the CPU of all its processes is measured over
   `--idle` seconds (60) as a share of one core. Then `--latency` single drops (40), 50 ms
   apart, to a working sink: p50 / p99 from the rename to the `sent` line, against the same
   on an empty spool. Peak RSS of all processes (VmHWM, summed).
3. Dead relay: `--dead` messages (100,000) to a loopback port nothing listens on, with
   `probe_interval = --probe` (30s). The connection attempts are the `deferred` lines with
   "cannot connect" (every real attempt logs one; mail waiting for a probe logs `waiting`).
   After `--outage` seconds (60) an smtp-sink starts on that port: the time to the first
   `sent` line (within one probe interval) and until all arrived.

Every message is checked: in the end the sink's count and the spool's folders must add up.
It uses only public tools (Python, Postfix's smtp-sink) and needs pickupd installed in the
Python that runs it. `--json` prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as cmp
import throughput as tp

HOST = "127.0.0.1"
WINDOW = 10_000


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Daemon:
    """`pickupd run` on a spool of its own, with its processes measured from /proc."""

    def __init__(self, work: Path, pickupd: Path, name: str, port: int, extra: str = "") -> None:
        self.folder = work / name
        self.spool = self.folder / "spool"
        self.pickup = tp.make_maildir(self.spool)
        for sub in ("deferred", "active", "failed", "hold", "sent"):
            (self.spool / sub).mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "pickupd.toml"
        self.config.write_text(
            f'[spool]\npath = "{self.spool}"\n[log]\nlevel = "info"\n'
            f'[retry]\nschedule = ["1h"]\n'
            f'[relays.sink]\nhost = "{HOST}"\nport = {port}\nsecurity = "none"\n{extra}\n'
            f'[senders."*@bench.example"]\nrelay = "sink"\n'
        )
        self.pickupd = pickupd
        self.log = self.folder / "pickupd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak = 0.0

    def start(self, ready_event: str = "ready", timeout: float = 600) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.pickupd), "run", "-c", str(self.config)], stdout=out, stderr=out
            )
        self.wait_for(ready_event, 1, timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        needle = f'"event": "{name}"'.encode()
        with self.log.open("rb") as lines:
            return [json.loads(line) for line in lines if needle in line]

    def count(self, name: str) -> int:
        needle = f'"event": "{name}"'.encode()
        with self.log.open("rb") as lines:
            return sum(1 for line in lines if needle in line)

    def wait_for(self, name: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count(name) < count:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise tp.BenchError(
                    f"no {count} {name} lines within {timeout} s: {tp.tail(self.log)}"
                )
            self.sample()
            time.sleep(0.5)

    def processes(self) -> list[int]:
        return [self.proc.pid, *cmp.descendants(self.proc.pid)] if self.proc else []

    def cpu(self) -> float:
        return sum(cmp.cpu_seconds(pid) for pid in self.processes())

    def sample(self) -> None:
        self.peak = max(self.peak, sum(cmp.peak_rss_mib(pid) for pid in self.processes()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc = None

    def census(self) -> dict[str, int]:
        """Messages in each folder (in deferred/ and failed/, the .eml files: one a message)."""
        counts = tp.leftovers(self.spool)
        for sub in ("deferred", "failed"):
            if sub in counts:
                counts[sub] = sum(1 for p in (self.spool / sub).iterdir() if p.suffix == ".eml")
        return counts


def fill_pickup(daemon: Daemon, count: int) -> None:
    stamp = int(time.time())
    for index in range(count):
        name = f"{stamp}.S{index}.P{os.getpid()}.bench"
        data = tp.message(index, 2048, "storm")
        os.rename(tp.write_tmp(daemon.pickup, name, data), daemon.pickup / "new" / name)


def rate(stamps: Sequence[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def storm(work: Path, pickupd: Path, smtp_sink: Path, count: int) -> dict[str, Any]:
    log(f"storm: {count} messages against a relay that answers MAIL with 4xx")
    # smtp-sink -r MAIL: a soft (4xx) reject of every MAIL FROM.
    port = tp.free_port()
    cmd = [str(smtp_sink), "-r", "MAIL", "-c"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    rejecting = subprocess.Popen(
        [*cmd, f"{HOST}:{port}", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        daemon = Daemon(work, pickupd, "storm", port)
        fill_pickup(daemon, count)
        started = time.monotonic()
        daemon.start()
        cpu_before = daemon.cpu()
        daemon.wait_for("deferred", count, timeout=3600)
        seconds = time.monotonic() - started
        cpu = daemon.cpu() - cpu_before
        daemon.stop()
    finally:
        rejecting.terminate()
        rejecting.wait(10)
    stamps = sorted(tp.timestamp(e) for e in daemon.events("deferred"))
    window = min(WINDOW, max(2, count // 10))
    first, last = rate(stamps[:window]), rate(stamps[-window:])
    folders = daemon.census()
    if folders.get("deferred", 0) != count:
        raise tp.BenchError(f"storm: deferred/ holds {folders} of {count}")
    return {
        "messages": count,
        "seconds": round(seconds, 1),
        "first_rate": round(first, 1),
        "last_rate": round(last, 1),
        "last_over_first": round(last / first, 3) if first else 0.0,
        "window": window,
        "cpu_ms_per_deferral": round(cpu / count * 1000, 3),
        "peak_mib": round(daemon.peak, 1),
    }


def fill_deferred(daemon: Daemon, count: int) -> None:
    """`count` messages in deferred/, each due in an hour (its sidecar's mtime is its due
    time: an empty sidecar will do, it is read only when a message is taken)."""
    from pickupd import ids

    due = time.time() + 3600
    data = tp.message(0, 2048, "waiting")
    for index in range(count):
        msg_id = ids.new()
        (daemon.spool / "deferred" / f"{msg_id}.eml").write_bytes(data)
        sidecar = daemon.spool / "deferred" / f"{msg_id}.json"
        sidecar.write_bytes(b"{}")
        os.utime(sidecar, (due, due))
        if index and index % 100_000 == 0:
            log(f"  {index} written")


def latency_of(daemon: Daemon, drops: int) -> dict[str, float]:
    values = []
    for index in range(drops):
        name = f"{time.time_ns()}.L{index}.bench"
        path = tp.write_tmp(daemon.pickup, name, tp.message(index, 2048, "latency"))
        before = daemon.count("sent")
        dropped = time.time()
        os.rename(path, daemon.pickup / "new" / name)
        deadline = time.monotonic() + 30
        while daemon.count("sent") <= before:
            if time.monotonic() > deadline:
                raise tp.BenchError(f"latency drop {index} was not sent: {tp.tail(daemon.log)}")
            time.sleep(0.002)
        sent = daemon.events("sent")[-1]
        values.append((tp.timestamp(sent) - dropped) * 1000)
        time.sleep(0.05)
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p99_ms": round(tp.percentile(values, 0.99), 2),
    }


def waiting(
    work: Path, pickupd: Path, smtp_sink: Path, count: int, idle: float, drops: int
) -> dict[str, Any]:
    sink = tp.Sink("smtp-sink", smtp_sink, work)
    sink.start("waiting")
    try:
        empty = Daemon(work, pickupd, "empty", sink.port)
        empty.start()
        base = latency_of(empty, drops)
        empty.stop()
        log(f"waiting: writing {count} deferred messages")
        daemon = Daemon(work, pickupd, "waiting", sink.port)
        fill_deferred(daemon, count)
        started = time.monotonic()
        daemon.start()
        workers = 1 + len(cmp.descendants(daemon.proc.pid)) if daemon.proc else 1
        daemon.wait_for("deferred_scanned", workers, timeout=1800)
        scanned = time.monotonic() - started
        log(f"waiting: scanned in {scanned:.1f} s; idle for {idle:.0f} s")
        time.sleep(2.0)  # the census and the first rescans settle
        cpu_before, idle_started = daemon.cpu(), time.monotonic()
        time.sleep(idle)
        idle_cpu = (daemon.cpu() - cpu_before) / (time.monotonic() - idle_started)
        daemon.sample()
        loaded = latency_of(daemon, drops)
        daemon.stop()
        folders = daemon.census()
    finally:
        received = sink.stop()
    if folders.get("deferred", 0) != count or received != 2 * drops:
        raise tp.BenchError(f"waiting: deferred/ {folders}, sink {received} of {2 * drops}")
    return {
        "messages": count,
        "start_to_scanned_s": round(scanned, 1),
        "idle_cpu_share_of_one_core": round(idle_cpu, 4),
        "latency_empty": base,
        "latency_waiting": loaded,
        "p50_ratio": round(loaded["p50_ms"] / base["p50_ms"], 2) if base["p50_ms"] else 0.0,
        "peak_mib": round(daemon.peak, 1),
    }


def dead(
    work: Path, pickupd: Path, smtp_sink: Path, count: int, probe: str, outage: float
) -> dict[str, Any]:
    log(f"dead relay: {count} messages to a port nothing listens on")
    port = tp.free_port()
    daemon = Daemon(work, pickupd, "dead", port, extra=f'probe_interval = "{probe}"')
    fill_pickup(daemon, count)
    down_since = time.monotonic()
    daemon.start()
    # All claimed: each either attempted (deferred) or waiting for the probe.
    while daemon.count("deferred") + daemon.count("waiting") < count:
        if time.monotonic() - down_since > 3600:
            raise tp.BenchError("dead relay: not every message was taken")
        daemon.sample()
        time.sleep(0.5)
    while time.monotonic() - down_since < outage:
        daemon.sample()
        time.sleep(0.5)
    attempts_down = sum(
        1 for e in daemon.events("deferred") if "cannot connect" in str(e.get("detail"))
    )
    cmd = [str(smtp_sink), "-c"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    back = time.time()
    sink_out = work / "dead-sink.out"
    with sink_out.open("wb") as out:
        relay = subprocess.Popen([*cmd, f"{HOST}:{port}", "256"], stdout=out, stderr=out)
    try:
        daemon.wait_for("sent", 1, timeout=3600)
        first = min(tp.timestamp(e) for e in daemon.events("sent")) - back
        daemon.wait_for("sent", count, timeout=3600)
        everything = max(tp.timestamp(e) for e in daemon.events("sent")) - back
        daemon.stop()
    finally:
        relay.terminate()
        relay.wait(10)
    folders = daemon.census()
    if any(folders.values()):
        raise tp.BenchError(f"dead relay: left in the spool: {folders}")
    return {
        "messages": count,
        "probe_interval": probe,
        "connection_attempts_while_down": attempts_down,
        "first_sent_after_return_s": round(first, 2),
        "all_sent_after_return_s": round(everything, 1),
        "peak_mib": round(daemon.peak, 1),
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storm", type=int, default=100_000)
    parser.add_argument("--waiting", type=int, default=1_000_000)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measured")
    parser.add_argument("--latency", type=int, default=40)
    parser.add_argument("--dead", type=int, default=100_000)
    parser.add_argument("--probe", default="30s", help="the dead relay's probe_interval")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the relay is down")
    parser.add_argument("--only", choices=["storm", "waiting", "dead"], action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    smtp_sink = tp.find_smtp_sink()
    if smtp_sink is None:
        log("needs Postfix's smtp-sink: apt-get install postfix (choose 'No configuration')")
        return 2
    pickupd = tp.find_pickupd(None)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pickupd-backlog-") as tmp:
        work = Path(tmp)
        only = set(args.only or ["storm", "waiting", "dead"])
        if "storm" in only:
            results["storm"] = storm(work, pickupd, smtp_sink, args.storm)
        if "waiting" in only:
            results["waiting"] = waiting(
                work, pickupd, smtp_sink, args.waiting, args.idle, args.latency
            )
        if "dead" in only:
            results["dead"] = dead(work, pickupd, smtp_sink, args.dead, args.probe, args.outage)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, figures in results.items():
            print(f"{name}:")
            for key, value in figures.items():
                print(f"  {key:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

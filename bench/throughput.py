#!/usr/bin/env python3
"""How fast is pickupd on this machine? Throughput, idle latency and memory against a sink.

    python bench/throughput.py                 # defaults: -n 5000 --size 2048 --backlog 20000
    python bench/throughput.py --json          # one JSON document on stdout, progress on stderr

The reference sink is Postfix's C `smtp-sink` (Debian: `apt-get install postfix`; only that
binary is used, no Postfix daemon). `--sink python` uses an aiosmtpd sink instead; it is much
slower than pickupd's client side, so its figures are not the reference ones.

Phases, each with its own sink process and its own spool under one temp dir:
  1. throughput: N files dropped (Maildir: tmp/ then rename into new/) before pickupd starts,
     then `pickupd run --once` under /usr/bin/time: msg/s = N / wall time, and peak RSS.
  2. naive: the same N files relayed by a plain loop, one smtplib connection per message.
  3. latency: `pickupd run` (a daemon) gets single drops ~50 ms apart; latency is the time
     from the rename into new/ to the timestamp of pickupd's "sent" log line for that file.
  4. backlog: --backlog files, `pickupd run --once` again, to see if memory grows with it.
Every message is checked: the sink's count, pickupd's "sent" lines and an empty spool.
Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

HOST = "127.0.0.1"
SENDER = "app@bench.example"
RECIPIENT = "rcpt@sink.example"
TARGET_RATE = 2000.0  # msg/s at 2 KB, from the brief
TARGET_P50_MS = 2.0
# "Flat" memory: the backlog run's peak RSS within this much of the N-message run's.
FLAT_MB = 5.0
FLAT_RATIO = 0.10
# Log events that mean a message did not simply go through (warnings and errors count too).
TROUBLE = frozenset({"deferred", "failed", "recovered", "put_back", "internal_error"})
# The naive loop opens one TCP connection per message: past this many, TIME_WAIT sockets
# can use up the loopback's ephemeral ports, so it relays at most this many.
NAIVE_MAX = 10_000
SMTP_SINK_HELP = """\
smtp-sink (Postfix's SMTP test server, the reference sink) was not found on PATH or in /usr/sbin.
Install it (only the binary is used, no Postfix daemon is started):
    Debian/Ubuntu: sudo apt-get update
                   sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
    Fedora/RHEL:   sudo dnf install postfix
Or run with `--sink python` (an aiosmtpd sink: slower, NOT the reference figures)."""


class BenchError(Exception):
    """Something went wrong or a message was lost: the run's figures are not valid."""


def run_script(main: Callable[[Sequence[str]], int], name: str) -> NoReturn:
    """Exit with what `main(argv)` returns; a BenchError is one line on stderr and exit 1."""
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)


def log(text: str) -> None:
    """Progress, on stderr (stdout is left for the result)."""
    print(text, file=sys.stderr, flush=True)


# ---- Machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def interpreter_of(script: Path) -> str:
    """The Python a console script runs with (its shebang), else this one."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        first = script.read_bytes()[:256].split(b"\n", 1)[0].decode()
        if first.startswith("#!") and "python" in first:
            return first[2:].strip().split()[0]
    return sys.executable


def command_output(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def machine_info(pickupd: Path, sink: Sink) -> dict[str, Any]:
    python = interpreter_of(pickupd)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": command_output(
            [python, "-c", "import platform; print(platform.python_version())"]
        )
        or platform.python_version(),
        "pickupd": command_output([str(pickupd), "--version"]),
        "pickupd_path": str(pickupd),
        "sink": sink.description(),
    }


# ---- Finding programs ------------------------------------------------------------------------


def find_pickupd(option: str | None) -> Path:
    """The pickupd program: --pickupd, else beside this Python, else on PATH; it must run."""
    beside = Path(sys.executable).parent / "pickupd"
    found = option or (str(beside) if beside.exists() else shutil.which("pickupd"))
    if not found:
        raise BenchError("pickupd not found beside this Python nor on PATH: give --pickupd PATH")
    version = command_output([found, "--version"])
    if not version.startswith("pickupd "):
        raise BenchError(f"{found} --version did not say pickupd's version: {version[-300:]}")
    return Path(found)


def find_smtp_sink() -> Path | None:
    found = shutil.which("smtp-sink")
    if found:
        return Path(found)
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/libexec/postfix"):
        candidate = Path(folder) / "smtp-sink"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# ---- The sink ----------------------------------------------------------------------------------


class Sink:
    """One sink process on a fresh loopback port; counts the messages it received."""

    def __init__(self, kind: str, smtp_sink: Path | None, folder: Path) -> None:
        self.kind = kind
        self.smtp_sink = smtp_sink
        self.folder = folder
        self.port = 0
        self.sessions: int | None = None  # SMTP sessions of the last run (smtp-sink only)
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: Path | None = None

    def description(self) -> str:
        if self.kind == "smtp-sink":
            version = command_output(["dpkg-query", "-W", "-f", "${Version}", "postfix"])
            suffix = f", postfix {version}" if version and "no packages" not in version else ""
            return f"smtp-sink ({self.smtp_sink}{suffix}): reference sink"
        return "python aiosmtpd sink: NOT the reference sink (slower than smtp-sink)"

    def start(self, name: str) -> None:
        self.port = free_port()
        self._out = self.folder / f"sink-{name}.out"
        if self.kind == "smtp-sink":
            assert self.smtp_sink is not None
            cmd = [str(self.smtp_sink), "-c"]
            if os.geteuid() == 0:  # smtp-sink refuses to keep root privileges
                cmd += ["-u", "nobody"]
            cmd += [f"{HOST}:{self.port}", "256"]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "_python-sink", str(self.port)]
        with self._out.open("wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"sink exited at start: {self._out.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            time.sleep(0.02)
        raise BenchError(f"sink not listening on {HOST}:{self.port} after 10 s")

    def stop(self) -> int:
        """Stop it; the number of messages it received."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        assert self._out is not None
        output = self._out.read_bytes()
        sessions = re.findall(rb"sess=(\d+)", output)
        # smtp-sink counts ended sessions; one was start()'s probe connection.
        self.sessions = int(sessions[-1]) - 1 if sessions else None
        counts = re.findall(rb"mesg=(\d+)", output)
        return int(counts[-1]) if counts else 0


# ---- Spool and config ----------------------------------------------------------------------


def message(index: int, size: int, tag: str) -> bytes:
    """A plain-text message of exactly `size` bytes (LF line ends, as apps write them)."""
    head = (
        f"From: Bench <{SENDER}>\n"
        f"To: <{RECIPIENT}>\n"
        f"Subject: pickupd bench {tag} {index}\n"
        f"Message-ID: <{tag}.{index}.{os.getpid()}@bench.example>\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode()
    room = max(0, size - len(head))
    line = b"x" * 75 + b"\n"
    body = (line * (room // len(line) + 1))[:room]
    if body:
        body = body[:-1] + b"\n"
    return head + body


def make_maildir(root: Path) -> Path:
    """pickup/ and its Maildir folders as pickupd makes them (1730: writers drop, never
    list), so the run's log has no config_warning about them."""
    pickup = root / "pickup"
    for sub in ("tmp", "new", "cur"):
        (pickup / sub).mkdir(parents=True, exist_ok=True)
    for folder in (pickup, pickup / "tmp", pickup / "new", pickup / "cur"):
        folder.chmod(0o1730)
    return pickup


def write_tmp(pickup: Path, name: str, data: bytes) -> Path:
    path = pickup / "tmp" / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


def drop(pickup: Path, count: int, size: int, tag: str) -> float:
    """`count` messages written into tmp/ and renamed into new/; returns the seconds taken."""
    start = time.monotonic()
    stamp = int(time.time())
    for index in range(count):
        name = f"{stamp}.B{tag}{index}.P{os.getpid()}.bench"
        os.rename(write_tmp(pickup, name, message(index, size, tag)), pickup / "new" / name)
    return time.monotonic() - start


def write_config(
    folder: Path, spool: Path, port: int, concurrency: int | None, connections: int | None
) -> Path:
    dispatch = f"concurrency = {concurrency}\n" if concurrency else ""
    relay = f"max_connections = {connections}\n" if connections else ""
    text = f"""\
# Written by bench/throughput.py
[spool]
path = "{spool}"

[dispatch]
{dispatch}
[log]
level = "info"
format = "json"

[relays.sink]
host = "{HOST}"
port = {port}
security = "none"
{relay}
[senders."*@bench.example"]
relay = "sink"
"""
    path = folder / f"pickupd-{spool.name}.toml"
    path.write_text(text)
    return path


def leftovers(spool: Path) -> dict[str, int]:
    """Messages still in the spool's folders (should all be 0 after a clean run)."""
    counts = {}
    for sub in ("pickup/tmp", "pickup/new", "active", "deferred", "failed"):
        with contextlib.suppress(FileNotFoundError), os.scandir(spool / sub) as entries:
            counts[sub] = sum(1 for e in entries if not e.name.startswith("."))
    return {k: v for k, v in counts.items() if v}


# ---- Running and timing ----------------------------------------------------------------------


@dataclass
class Timed:
    returncode: int
    wall: float
    max_rss_kb: int
    user: float
    system: float


def run_timed(cmd: Sequence[str], stdout: Path, stderr: Path, timeout: float) -> Timed:
    """Run `cmd` under `/usr/bin/time` (wall, CPU, peak RSS), killed after `timeout` s."""
    time_bin = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"
    report = stdout.with_suffix(".time")
    full = [time_bin, "-o", str(report), "-f", "%M %e %U %S", *cmd]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(full, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException as exc:  # a timeout, or Ctrl-C (it does not reach a new session)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's group: time + pickupd
            proc.wait(timeout=10)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise BenchError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
            raise
    fields = report.read_text().split()[-4:]
    try:
        rss, wall, user, system = int(fields[0]), *map(float, fields[1:])
    except (ValueError, IndexError):
        raise BenchError(f"cannot read /usr/bin/time's report: {report.read_text()!r}") from None
    return Timed(proc.returncode, wall, rss, user, system)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


def timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def check_run(
    name: str, expected: int, sink_count: int, spool: Path, events: Path
) -> dict[str, int]:
    """Fail loudly unless every message was sent exactly once and the spool is empty."""
    counts: dict[str, int] = {}
    bad: dict[str, int] = {}
    for event in read_events(events):
        kind = str(event.get("event"))
        counts[kind] = counts.get(kind, 0) + 1
        if kind in TROUBLE or event.get("level") not in ("debug", "info"):
            bad[kind] = bad.get(kind, 0) + 1
    problems = []
    if counts.get("sent", 0) != expected:
        problems.append(f'pickupd logged {counts.get("sent", 0)} "sent" lines, expected {expected}')
    if sink_count != expected:
        problems.append(f"the sink received {sink_count} messages, expected {expected}")
    left = leftovers(spool)
    if left:
        problems.append(f"left in the spool: {left}")
    if bad:
        problems.append(f"unexpected log events: {bad}")
    if problems:
        raise BenchError(f"{name}: " + "; ".join(problems) + f" (log: {events})")
    return counts


def relay_window(events: Path) -> float:
    """Seconds from the first "claimed" to the last "sent" log line."""
    first = last = None
    for event in read_events(events):
        if event.get("event") == "claimed" and first is None:
            first = timestamp(event)
        elif event.get("event") == "sent":
            last = timestamp(event)
    return (last - first) if first is not None and last is not None else 0.0


# ---- Phases ------------------------------------------------------------------------------------


@dataclass
class Options:
    n: int
    size: int
    backlog: int
    latency_drops: int
    latency_gap: float
    concurrency: int | None
    connections: int | None
    work: Path
    pickupd: Path


def run_once(opts: Options, sink: Sink, name: str, count: int) -> dict[str, Any]:
    """Drop `count` files, then `pickupd run --once` under /usr/bin/time."""
    spool = opts.work / f"spool-{name}"
    pickup = make_maildir(spool)
    log(f"[{name}] writing {count} x {opts.size} B into {pickup}/new ...")
    write_s = drop(pickup, count, opts.size, name)
    sink.start(name)
    config = write_config(opts.work, spool, sink.port, opts.concurrency, opts.connections)
    events = opts.work / f"pickupd-{name}.log"
    log(f"[{name}] pickupd run --once ({count} messages) ...")
    try:
        timed = run_timed(
            [str(opts.pickupd), "run", "--once", "-c", str(config)],
            events,
            opts.work / f"pickupd-{name}.err",
            timeout=120 + count * 0.02,
        )
    finally:
        received = sink.stop()
    if timed.returncode != 0:
        raise BenchError(
            f"[{name}] pickupd exited {timed.returncode}: {tail(events.with_suffix('.err'))}"
        )
    check_run(name, count, received, spool, events)
    window = relay_window(events)
    result = {
        "messages": count,
        "write_seconds": round(write_s, 3),
        "wall_seconds": timed.wall,
        "msg_per_s": round(count / timed.wall, 1) if timed.wall else None,
        "relay_window_seconds": round(window, 3),
        "relay_window_msg_per_s": round(count / window, 1) if window else None,
        "cpu_user_seconds": timed.user,
        "cpu_system_seconds": timed.system,
        "peak_rss_mib": round(timed.max_rss_kb / 1024, 1),
        "sink_received": received,
        "smtp_sessions": sink.sessions,
    }
    log(
        f"[{name}] {count} sent in {timed.wall:.2f} s: {result['msg_per_s']} msg/s,"
        f" peak RSS {result['peak_rss_mib']} MiB"
    )
    return result


def run_naive(opts: Options, sink: Sink) -> dict[str, Any]:
    """The same files relayed by a loop that opens one smtplib connection per message."""
    count = min(opts.n, NAIVE_MAX)
    spool = opts.work / "spool-naive"
    pickup = make_maildir(spool)
    log(f"[naive] writing {count} x {opts.size} B ...")
    drop(pickup, count, opts.size, "naive")
    sink.start("naive")
    out = opts.work / "naive.out"
    log(f"[naive] relaying {count} messages, one SMTP connection each ...")
    try:
        timed = run_timed(
            [sys.executable, str(Path(__file__).resolve()), "_naive", str(pickup), str(sink.port)],
            out,
            opts.work / "naive.err",
            timeout=120 + count * 0.05,
        )
    finally:
        received = sink.stop()
    sent = out.read_text().strip()
    if timed.returncode != 0 or sent != str(count) or received != count:
        raise BenchError(
            f"[naive] exit {timed.returncode}, relayed {sent!r}, sink received {received},"
            f" expected {count}: {tail(opts.work / 'naive.err')}"
        )
    result = {
        "messages": count,
        "wall_seconds": timed.wall,
        "msg_per_s": round(count / timed.wall, 1) if timed.wall else None,
        "peak_rss_mib": round(timed.max_rss_kb / 1024, 1),
        "sink_received": received,
        "smtp_sessions": sink.sessions,
    }
    log(f"[naive] {count} sent in {timed.wall:.2f} s: {result['msg_per_s']} msg/s")
    return result


def wait_for_sent(
    events: Path, count: int, proc: subprocess.Popen[bytes], timeout: float
) -> list[dict[str, Any]]:
    """Poll pickupd's log until it shows `count` "sent" lines (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read_events(events) if e.get("event") == "sent"]
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            raise BenchError(f"[latency] pickupd exited {proc.returncode}: {tail(events)}")
        if time.monotonic() > deadline:
            raise BenchError(f"[latency] {len(found)}/{count} sent after {timeout:.0f} s")
        time.sleep(0.05)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def run_latency(opts: Options, sink: Sink) -> dict[str, Any]:
    """Single drops into a running, idle `pickupd run`; drop-to-"sent" time of each."""
    spool = opts.work / "spool-latency"
    pickup = make_maildir(spool)
    sink.start("latency")
    config = write_config(opts.work, spool, sink.port, opts.concurrency, opts.connections)
    events = opts.work / "pickupd-latency.log"
    err = opts.work / "pickupd-latency.err"
    log(f"[latency] pickupd run (daemon), then {opts.latency_drops} drops ...")
    with events.open("wb") as out, err.open("wb") as errors:
        proc = subprocess.Popen(
            [str(opts.pickupd), "run", "-c", str(config)], stdout=out, stderr=errors
        )
    received = 0
    try:
        # Ready: a warm-up message went through (the watcher is up, a session is open).
        name = "warmup.bench"
        os.rename(write_tmp(pickup, name, message(0, opts.size, "warmup")), pickup / "new" / name)
        wait_for_sent(events, 1, proc, timeout=30)
        time.sleep(1.0)  # let the warm-up's after-effects pass: the drops start on an idle daemon
        names = [
            f"{int(time.time())}.Blat{i}.P{os.getpid()}.bench" for i in range(opts.latency_drops)
        ]
        for i, name in enumerate(names):
            write_tmp(pickup, name, message(i, opts.size, "latency"))
        dropped: dict[str, float] = {}
        start = time.monotonic()
        for i, name in enumerate(names):
            pause = start + i * opts.latency_gap - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            dropped[f"new/{name}"] = time.time()
            os.rename(pickup / "tmp" / name, pickup / "new" / name)
        wait_for_sent(events, 1 + len(names), proc, timeout=30 + 0.5 * len(names))
        proc.send_signal(signal.SIGTERM)
        stop_start = time.monotonic()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError("[latency] pickupd did not exit within 30 s of SIGTERM") from None
        stop_seconds = time.monotonic() - stop_start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        received = sink.stop()
    if code != 0:
        raise BenchError(f"[latency] pickupd exited {code} after SIGTERM: {tail(err)}")
    check_run("latency", 1 + len(names), received, spool, events)
    ids: dict[str, str] = {}
    sent_at: dict[str, float] = {}
    for event in read_events(events):
        if event.get("event") == "claimed" and event.get("source") in dropped:
            ids[str(event["id"])] = str(event["source"])
        elif event.get("event") == "sent":
            sent_at[str(event["id"])] = timestamp(event)
    latencies = [
        (sent_at[msg_id] - dropped[source]) * 1000
        for msg_id, source in ids.items()
        if msg_id in sent_at
    ]
    if len(latencies) != len(names):
        raise BenchError(f"[latency] matched {len(latencies)} of {len(names)} drops in {events}")
    result = {
        "drops": len(names),
        "gap_ms": opts.latency_gap * 1000,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "min_ms": round(min(latencies), 2),
        "sigterm_exit_code": code,
        "sigterm_exit_seconds": round(stop_seconds, 2),
    }
    log(
        f"[latency] p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms,"
        f" max {result['max_ms']} ms; exit {code} {stop_seconds:.2f} s after SIGTERM"
    )
    return result


# ---- Report ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "meets" if ok else "BELOW"


def report(machine: dict[str, Any], opts: Options, results: dict[str, Any], out: TextIO) -> None:
    thr, naive, lat, back = (results[k] for k in ("throughput", "naive", "latency", "backlog"))
    ratio = results["pickupd_vs_naive"]
    growth = back["peak_rss_mib"] - thr["peak_rss_mib"]
    rows = [
        (
            f"throughput, {thr['messages']} x {opts.size} B (N / wall)",
            f"{thr['msg_per_s']:.0f} msg/s",
            f">= {TARGET_RATE:.0f} msg/s",
            verdict(thr["msg_per_s"] >= TARGET_RATE),
        ),
        (
            "  wall time (incl. start-up) / relay window",
            f"{thr['wall_seconds']:.2f} s / {thr['relay_window_seconds']:.2f} s",
            "",
            "",
        ),
        (
            "  rate in the relay window (log)",
            f"{thr['relay_window_msg_per_s'] or 0:.0f} msg/s",
            "",
            "",
        ),
        (
            "  CPU user + system",
            f"{thr['cpu_user_seconds']:.2f} + {thr['cpu_system_seconds']:.2f} s",
            "",
            "",
        ),
        ("  SMTP sessions opened (sink's count)", str(thr["smtp_sessions"] or "n/a"), "", ""),
        (f"peak RSS, {thr['messages']} messages", f"{thr['peak_rss_mib']:.1f} MiB", "", ""),
        (
            f"naive loop, {naive['messages']} msgs (conn/msg)",
            f"{naive['msg_per_s']:.0f} msg/s",
            "",
            "",
        ),
        ("pickupd / naive", f"{ratio:.2f}x", "", ""),
        (
            f"idle latency p50 ({lat['drops']} drops, {lat['gap_ms']:.0f} ms apart)",
            f"{lat['p50_ms']:.2f} ms",
            f"<= {TARGET_P50_MS:g} ms",
            verdict(lat["p50_ms"] <= TARGET_P50_MS),
        ),
        ("idle latency p99 / max", f"{lat['p99_ms']:.2f} / {lat['max_ms']:.2f} ms", "", ""),
        (
            "exit after SIGTERM",
            f"code {lat['sigterm_exit_code']} in {lat['sigterm_exit_seconds']:.2f} s",
            "0 within 30 s",
            verdict(lat["sigterm_exit_code"] == 0 and lat["sigterm_exit_seconds"] <= 30),
        ),
        (
            f"backlog {back['messages']}: throughput",
            f"{back['msg_per_s']:.0f} msg/s",
            "",
            "",
        ),
        (
            f"backlog {back['messages']}: peak RSS",
            f"{back['peak_rss_mib']:.1f} MiB ({growth:+.1f})",
            f"flat (+-{FLAT_MB:g} MiB / {FLAT_RATIO:.0%})",
            verdict(results["memory_flat"]),
        ),
    ]
    print("\npickupd benchmark", file=out)
    print(
        f"  machine: {machine['nproc']} CPUs, {machine['cpu_model']}, Linux {machine['kernel']}",
        file=out,
    )
    print(
        f"  python {machine['python']}, {machine['pickupd']} ({machine['pickupd_path']})", file=out
    )
    print(f"  sink:    {machine['sink']}", file=out)
    concurrency = opts.concurrency or "default"
    connections = opts.connections or "default"
    print(
        f"  config:  concurrency {concurrency}, max_connections {connections},"
        " log level info (JSON to a file)\n",
        file=out,
    )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("measure", "result", "target", "")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    print(
        "\nTargets are the brief's goals, shown for comparison; the run fails only if a message"
        " is lost.",
        file=out,
    )


# ---- Workers (run as subprocesses of the bench) ------------------------------------------------


def naive_worker(pickup: Path, port: int) -> int:
    """Relay every file of pickup/new: per message connect, sendmail, quit; print the count."""
    import smtplib
    from email.parser import BytesHeaderParser
    from email.utils import getaddresses, parseaddr

    parser = BytesHeaderParser()
    sent = 0
    for entry in os.scandir(pickup / "new"):
        with open(entry.path, "rb") as handle:
            data = re.sub(rb"\r?\n", b"\r\n", handle.read())  # SMTP wants CRLF, as pickupd sends
        headers = parser.parsebytes(data)
        sender = parseaddr(headers.get("From", ""))[1]
        recipients = [a for _, a in getaddresses(headers.get_all("To", []))]
        with smtplib.SMTP(HOST, port, timeout=30) as smtp:
            smtp.sendmail(sender, recipients, data)
        os.unlink(entry.path)
        sent += 1
    print(sent)
    return 0


def python_sink_worker(port: int) -> int:
    """An aiosmtpd sink (the `--sink python` fallback): prints `mesg=N` as smtp-sink -c does."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    count = 0

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            nonlocal count
            count += 1
            return "250 2.0.0 Ok: discarded"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = await loop.create_server(lambda: SMTP(Handler()), HOST, port, backlog=256)
        await stop.wait()
        server.close()

    asyncio.run(serve())
    print(f"mesg={count}", flush=True)
    return 0


# ---- Main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure pickupd's throughput, idle latency and memory on this machine.",
        epilog="The brief's memory check uses --backlog 100000 (a longer run).",
    )
    parser.add_argument("-n", type=int, default=5000, help="messages for throughput (5000)")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message (2048)")
    parser.add_argument(
        "--backlog", type=int, default=20000, help="messages for the memory run (20000)"
    )
    parser.add_argument("--latency-drops", type=int, default=60, help="single drops (60)")
    parser.add_argument(
        "--latency-gap", type=float, default=0.05, help="seconds between drops (0.05)"
    )
    parser.add_argument("--concurrency", type=int, help="[dispatch] concurrency (pickupd's)")
    parser.add_argument("--connections", type=int, help="relays.<name>.max_connections (pickupd's)")
    parser.add_argument(
        "--sink",
        choices=("smtp-sink", "python"),
        default="smtp-sink",
        help="smtp-sink (reference, Postfix's C test server) or python (aiosmtpd, slower)",
    )
    parser.add_argument("--pickupd", help="the pickupd program (default: beside python, PATH)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    args = parser.parse_args(argv)
    for name in ("n", "size", "backlog", "latency_drops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.latency_gap <= 10:
        parser.error("--latency-gap must be in (0, 10] seconds")
    return args


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_naive"]:
        return naive_worker(Path(argv[1]), int(argv[2]))
    if argv[:1] == ["_python-sink"]:
        return python_sink_worker(int(argv[1]))
    args = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C: the sink and pickupd are stopped, the temp dir goes.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    smtp_sink = find_smtp_sink()
    if args.sink == "smtp-sink" and smtp_sink is None:
        print(SMTP_SINK_HELP, file=sys.stderr)
        return 2
    if not Path("/usr/bin/time").exists() and not shutil.which("time", path="/bin"):
        print("GNU time (/usr/bin/time) is needed: apt-get install time", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pickupd-bench-"))
    sink = Sink(args.sink, smtp_sink, work)
    try:
        opts = Options(
            n=args.n,
            size=args.size,
            backlog=args.backlog,
            latency_drops=args.latency_drops,
            latency_gap=args.latency_gap,
            concurrency=args.concurrency,
            connections=args.connections,
            work=work,
            pickupd=find_pickupd(args.pickupd),
        )
        machine = machine_info(opts.pickupd, sink)
        log(f"pickupd bench in {work} ({machine['pickupd']}, sink: {machine['sink']})")
        results = run_all(opts, sink)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        if not args.keep:
            print("(run again with --keep to keep the logs and spools)", file=sys.stderr)
        return 1
    finally:
        sink.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        document = {
            "machine": machine,
            "options": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in asdict(opts).items()
                if k != "work" or args.keep  # the temp dir is gone unless --keep
            },
            "targets": {
                "msg_per_s": TARGET_RATE,
                "p50_ms": TARGET_P50_MS,
                "memory": "flat with backlog",
            },
            "results": results,
        }
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        report(machine, opts, results, sys.stdout)
    return 0


def run_all(opts: Options, sink: Sink) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["throughput"] = run_once(opts, sink, "throughput", opts.n)
    results["naive"] = run_naive(opts, sink)
    results["latency"] = run_latency(opts, sink)
    results["backlog"] = run_once(opts, sink, "backlog", opts.backlog)
    results["pickupd_vs_naive"] = round(
        results["throughput"]["msg_per_s"] / results["naive"]["msg_per_s"], 2
    )
    small, big = results["throughput"]["peak_rss_mib"], results["backlog"]["peak_rss_mib"]
    results["memory_flat"] = big - small <= max(FLAT_MB, FLAT_RATIO * small)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop or 'SIGINT'}): stopped the sink and pickupd", file=sys.stderr)
        sys.exit(130)

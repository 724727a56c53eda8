"""pickupd side by side with Postfix, on this machine, in one run.

    python bench/compare.py                 # 3 rounds; about 5 minutes on 2 cores
    python bench/compare.py --rounds 1 --small 200 --large 20 --latency 5   # a quick look

Both relay to the same kind of sink: Postfix's C `smtp-sink` on loopback, a fresh one per
scenario. Rounds are interleaved (pickupd, then Postfix, then the ceilings, in every round)
so that a noisy neighbour hurts both alike; the table shows medians over the rounds.

- pickupd: `pickupd run` with its defaults; mail is dropped the Maildir way.
- Postfix: a private instance in a temporary directory (its own main.cf/master.cf, queue
  and data; no listener), relaying to the sink through `relayhost`; mail is injected with
  `sendmail -C` (maildrop -> pickup -> cleanup -> qmgr -> smtp). Needs root (Postfix runs as
  its `postfix` user); without root, or without Postfix installed, its rows are left out.
- Ceilings: `smtp-source` (C, 8 reused sessions) and a bare aiosmtplib client (8 sessions, no
  spool work) show what the sink and the client library allow at all.

Scenarios: "warm" = an idle service, then the whole backlog appears at once (files already
written are renamed into pickup/new/, or into Postfix's maildrop/ followed by a `postkick`);
"cold" = the backlog waits when the service starts; "latency" = single drops into an idle
service, from the moment the message is safely queued (the rename; sendmail's exit) to its
arrival at the sink, p50/p99. CPU per message is the service's own CPU time while it relays
(for Postfix: every process of the instance), not the writing of the messages; peak memory
is the service's (all Postfix processes together).

It uses only public tools (Python, smtp-sink, smtp-source, postfix, sendmail) and needs
pickupd installed in the Python that runs it. `--json` prints the results as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp

HOST = "127.0.0.1"
SENDER, RECIPIENT = tp.SENDER, tp.RECIPIENT
CLOCK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- measuring processes ------------------------------------------------------------------


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (and of its reaped children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK


def peak_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else 0.0


def descendants(root: int) -> list[int]:
    """The processes below `root` (children, grandchildren ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return found


class SinkCounter:
    """smtp-sink's running count, read from its output file while it runs."""

    def __init__(self, sink: tp.Sink) -> None:
        self.sink = sink

    def count(self) -> int:
        out = self.sink._out
        if out is None or not out.exists():
            return 0
        counts = re.findall(rb"mesg=(\d+)", out.read_bytes()[-4096:])
        return int(counts[-1]) if counts else 0

    def wait(self, count: int, timeout: float) -> float:
        """Until the sink has `count` messages; the time it happened (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count() >= count:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise tp.BenchError(f"the sink got {self.count()} of {count} within {timeout} s")
            time.sleep(0.005)


# ---- the two services ------------------------------------------------------------------------


class Pickupd:
    name = "pickupd"

    def __init__(self, work: Path, pickupd: Path, port: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pickupd-", dir=work))
        self.spool = self.folder / "spool"
        self.pickup = tp.make_maildir(self.spool)
        self.config = tp.write_config(self.folder, self.spool, port, None, None)
        self.pickupd = pickupd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "pickupd.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.pickupd), "run", "-c", str(self.config)], stdout=out, stderr=out
            )
        deadline = time.monotonic() + 20
        while b'"ready"' not in self.log.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise tp.BenchError(f"pickupd did not start: {tp.tail(self.log)}")
            time.sleep(0.01)

    def inject(self, messages: Sequence[bytes]) -> None:
        names = [f"{time.time_ns()}.B{i}.P{os.getpid()}.bench" for i in range(len(messages))]
        for name, data in zip(names, messages, strict=True):
            os.rename(tp.write_tmp(self.pickup, name, data), self.pickup / "new" / name)

    def prepare(self, messages: Sequence[bytes]) -> list[Path]:
        """Write into tmp/ now, so that `publish` is only the renames (a backlog at once)."""
        paths = []
        for i, data in enumerate(messages):
            paths.append(tp.write_tmp(self.pickup, f"{time.time_ns()}.W{i}.bench", data))
        return paths

    def publish(self, paths: Sequence[Path]) -> None:
        for path in paths:
            os.rename(path, self.pickup / "new" / path.name)

    def processes(self) -> list[int]:
        """The main process and its workers ([dispatch] workers)."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc else []

    def cpu(self) -> float:
        return sum(cpu_seconds(pid, children=True) for pid in self.processes())

    def memory(self) -> float:
        return sum(peak_rss_mib(pid) for pid in self.processes())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=40)
        self.proc = None


MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: no listener, relaying everything to the sink."""

    name = "postfix"

    def __init__(self, work: Path, port: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="postfix-", dir=work))
        os.chmod(self.folder, 0o755)
        self.etc = self.folder / "etc"
        self.etc.mkdir()
        queue, data = self.folder / "queue", self.folder / "data"
        queue.mkdir()
        data.mkdir()
        shutil.chown(data, "postfix")
        for name in ("postfix-files", "dynamicmaps.cf"):
            with contextlib.suppress(OSError):
                shutil.copy(f"/etc/postfix/{name}", self.etc / name)
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
meta_directory = {self.etc}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [{HOST}]:{port}
smtp_tls_security_level = none
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {self.folder}/maillog
maillog_file_prefixes = {self.folder}
biff = no
"""
        )
        (self.etc / "master.cf").write_text(MASTER_CF)
        self._run("check")
        self.master = 0

    def _run(self, command: str) -> None:
        done = subprocess.run(
            ["postfix", "-c", str(self.etc), command], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise tp.BenchError(f"postfix {command}: {done.stderr.strip()}")

    def start(self) -> None:
        self._run("start")
        pidfile = self.folder / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise tp.BenchError("postfix master did not start")
            time.sleep(0.01)
        self.master = int(pidfile.read_text().strip())

    def inject(self, messages: Sequence[bytes]) -> None:
        """`sendmail -C` per message, four at a time (its own submission path)."""

        def send(data: bytes) -> None:
            done = subprocess.run(
                ["sendmail", "-C", str(self.etc), "-f", SENDER, RECIPIENT],
                input=data,
                capture_output=True,
                timeout=60,
            )
            if done.returncode != 0:
                raise tp.BenchError(f"sendmail: {done.stderr.decode(errors='replace')}")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, messages))

    def prepare(self, messages: Sequence[bytes]) -> list[Path]:
        """Queue through sendmail while the instance is stopped, then move the maildrop files
        aside, so that `publish` is only the renames back (a backlog at once)."""
        maildrop = self.folder / "queue" / "maildrop"
        aside = self.folder / "queue" / "aside"
        aside.mkdir(exist_ok=True)
        self.inject(messages)
        paths = []
        for entry in os.scandir(maildrop):
            os.rename(entry.path, aside / entry.name)
            paths.append(aside / entry.name)
        return paths

    def publish(self, paths: Sequence[Path]) -> None:
        maildrop = self.folder / "queue" / "maildrop"
        for path in paths:
            os.rename(path, maildrop / path.name)
        subprocess.run(["postkick", "-c", str(self.etc), "public", "pickup", "W"], check=True)

    def cpu(self) -> float:
        if not self.master:
            return 0.0
        total = cpu_seconds(self.master, children=True)
        return total + sum(cpu_seconds(pid) for pid in descendants(self.master))

    def memory(self) -> float:
        if not self.master:
            return 0.0
        return peak_rss_mib(self.master) + sum(peak_rss_mib(p) for p in descendants(self.master))

    def stop(self) -> None:
        with contextlib.suppress(tp.BenchError):
            self._run("stop")
        self.master = 0


# ---- scenarios ---------------------------------------------------------------------------------


def relay(
    service: Any, sink: tp.Sink, count: int, size: int, tag: str, warm: bool
) -> dict[str, float]:
    """Relay `count` messages of `size` bytes: warm (the backlog appears at an idle service)
    or cold (it waits when the service starts). msg/s from the backlog's appearance (or the
    start) to the last message at the sink."""
    counter = SinkCounter(sink)
    paths = service.prepare([tp.message(i, size, tag) for i in range(count)])
    cpu_before = 0.0
    if warm:
        service.start()
        time.sleep(1.0)  # idle, then the backlog appears
        cpu_before = service.cpu()
        started = time.monotonic()
        service.publish(paths)
    else:
        service.publish(paths) if isinstance(service, Pickupd) else None
        started = time.monotonic()
        service.start()
        if isinstance(service, Postfix):
            service.publish(paths)
    finished = counter.wait(count, timeout=60 + count * 0.05)
    cpu = service.cpu() - cpu_before
    memory = service.memory()
    service.stop()
    seconds = finished - started
    return {
        "msg_per_s": count / seconds,
        "cpu_ms_per_msg": cpu / count * 1000,
        "peak_mib": memory,
    }


class LatencySink:
    """A minimal SMTP sink that notes when each message arrives (by its Subject)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.port = tp.free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        import threading

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._session, HOST, self.port)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 latency sink\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    subject = ""
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        if data.startswith(b"Subject: "):
                            subject = data[9:].strip().decode(errors="replace")
                    self.arrived[subject] = time.time()
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)


def latency(service_of: Callable[[int], Any], drops: int, gap: float) -> dict[str, float]:
    """Single drops `gap` apart into an idle service: drop -> arrival at the sink."""
    sink = LatencySink()
    service = service_of(sink.port)
    try:
        service.start()
        service.inject([tp.message(0, 2048, "warmup")])
        deadline = time.monotonic() + 30
        while "pickupd bench warmup 0" not in sink.arrived:
            if time.monotonic() > deadline:
                raise tp.BenchError(f"{service.name}: the warm-up message did not arrive")
            time.sleep(0.01)
        time.sleep(1.0)
        dropped = {}
        for i in range(drops):
            data = tp.message(i, 2048, "latency")
            service.inject([data])
            dropped[f"pickupd bench latency {i}"] = time.time()  # safely queued now
            time.sleep(gap)
        deadline = time.monotonic() + 30
        while not all(s in sink.arrived for s in dropped):
            if time.monotonic() > deadline:
                raise tp.BenchError(f"{service.name}: not every latency drop arrived")
            time.sleep(0.01)
        service.stop()
    finally:
        sink.close()
    values = [(sink.arrived[s] - t) * 1000 for s, t in dropped.items()]
    return {"p50_ms": statistics.median(values), "p99_ms": tp.percentile(values, 0.99)}


def smtp_source(smtp_source_path: Path, sink: tp.Sink, count: int, size: int) -> dict[str, float]:
    """The C client's ceiling: 8 sessions, each reused."""
    counter = SinkCounter(sink)
    started = time.monotonic()
    subprocess.run(
        [str(smtp_source_path), "-s", "8", "-m", str(count), "-l", str(size), "-f", SENDER,
         "-t", RECIPIENT, f"{HOST}:{sink.port}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    finished = counter.wait(count, 30)
    return {"msg_per_s": count / (finished - started)}


def bare_aiosmtplib(sink: tp.Sink, count: int, size: int) -> dict[str, float]:
    """The client library's ceiling: 8 sessions, no spool, no parsing, no logging."""
    import aiosmtplib

    data = tp.message(0, size, "bare").replace(b"\n", b"\r\n")
    counter = SinkCounter(sink)

    async def session(share: int) -> None:
        smtp = aiosmtplib.SMTP(hostname=HOST, port=sink.port, start_tls=False)
        await smtp.connect()
        for _ in range(share):
            await smtp.sendmail(SENDER, [RECIPIENT], data)
        await smtp.quit()

    async def run() -> None:
        shares = [count // 8 + (1 if i < count % 8 else 0) for i in range(8)]
        await asyncio.gather(*(session(s) for s in shares if s))

    started = time.monotonic()
    asyncio.run(run())
    finished = counter.wait(count, 30)
    return {"msg_per_s": count / (finished - started)}


# ---- the run -----------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=5000, help="2 KB messages per run")
    parser.add_argument("--large", type=int, default=1000, help="100 KB messages per run")
    parser.add_argument("--latency", type=int, default=40, help="single drops per run")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between drops")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="then a backlog of this many 2 KB messages waiting at pickupd's start: the peak"
        " memory of all its processes together (the brief's check: 100000; not by default)",
    )
    args = parser.parse_args(argv)

    smtp_sink = tp.find_smtp_sink()
    if smtp_sink is None:
        log("smtp-sink (Debian's postfix package) is needed: apt-get install postfix")
        return 2
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    with_postfix = not args.no_postfix and os.geteuid() == 0 and shutil.which("postfix") is not None
    if not with_postfix and not args.no_postfix:
        log("Postfix left out: it needs root and Debian's postfix package")
    pickupd = tp.find_pickupd(None)
    work = Path(tempfile.mkdtemp(prefix="pickupd-compare-"))
    os.chmod(work, 0o755)
    if with_postfix:
        try:  # a private instance must start here, or Postfix is left out (with the reason)
            probe = Postfix(work, tp.free_port())
            probe.start()
            probe.stop()
        except (tp.BenchError, OSError, subprocess.SubprocessError) as exc:
            log(f"Postfix left out: a private instance does not start here: {exc}")
            with_postfix = False
    results: dict[str, list[dict[str, float]]] = {}

    def record(key: str, value: dict[str, float]) -> None:
        results.setdefault(key, []).append(value)
        log(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))

    try:
        for number in range(1, args.rounds + 1):
            log(f"round {number} of {args.rounds}")
            systems: list[tuple[str, Callable[[int], Any]]] = [
                ("pickupd", lambda port: Pickupd(work, pickupd, port))
            ]
            if with_postfix:
                systems.append(("postfix", lambda port: Postfix(work, port)))
            for name, make in systems:
                for label, count, size, warm in (
                    ("2KB warm", args.small, 2048, True),
                    ("2KB cold", args.small, 2048, False),
                    ("100KB warm", args.large, 100 * 1024, True),
                ):
                    sink = tp.Sink("smtp-sink", smtp_sink, work)
                    sink.start(f"{name}-{label}".replace(" ", "-"))
                    try:
                        record(
                            f"{name} {label}", relay(make(sink.port), sink, count, size, name, warm)
                        )
                    finally:
                        sink.stop()
                record(f"{name} latency", latency(make, args.latency, args.gap))
            for label, count, size in (
                ("2KB", args.small, 2048),
                ("100KB", args.large, 100 * 1024),
            ):
                for name in ("smtp-source", "aiosmtplib"):
                    sink = tp.Sink("smtp-sink", smtp_sink, work)
                    sink.start(f"{name}-{label}")
                    try:
                        if name == "smtp-source":
                            value = smtp_source(Path(source), sink, count, size)
                        else:
                            value = bare_aiosmtplib(sink, count, size)
                        record(f"{name} {label}", value)
                    finally:
                        sink.stop()
        if args.backlog:
            log(f"backlog: {args.backlog} x 2 KB waiting at pickupd's start")
            sink = tp.Sink("smtp-sink", smtp_sink, work)
            sink.start("pickupd-backlog")
            try:
                service = Pickupd(work, pickupd, sink.port)
                record(
                    "pickupd backlog", relay(service, sink, args.backlog, 2048, "pickupd", False)
                )
            finally:
                sink.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {
        key: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for key, runs in results.items()
    }
    if args.json:
        doc = {
            "machine": tp.cpu_model(),
            "cpus": os.cpu_count(),
            "rounds": args.rounds,
            "postfix": with_postfix,
            "medians": medians,
        }
        print(json.dumps(doc, indent=2))
    else:
        report(medians, args, with_postfix)
    return 0


def report(
    medians: dict[str, dict[str, float]], args: argparse.Namespace, with_postfix: bool
) -> None:
    def rate(key: str) -> str:
        value = medians.get(key)
        return f"{value['msg_per_s']:,.0f} msg/s" if value else "-"

    print(f"\npickupd and Postfix side by side: {tp.cpu_model()}, {os.cpu_count()} CPUs")
    print(f"medians of {args.rounds} round(s); {args.small} x 2 KB, {args.large} x 100 KB\n")
    header = (
        "who",
        "2 KB warm",
        "2 KB cold",
        "100 KB warm",
        "CPU/2 KB msg",
        "peak MiB",
        "latency p50 / p99",
    )
    rows = []
    for name in ("pickupd", "postfix") if with_postfix else ("pickupd",):
        warm, cold, large = (
            medians.get(f"{name} {k}") for k in ("2KB warm", "2KB cold", "100KB warm")
        )
        lat = medians.get(f"{name} latency")
        rows.append((
            name,
            rate(f"{name} 2KB warm"),
            rate(f"{name} 2KB cold"),
            rate(f"{name} 100KB warm"),
            f"{warm['cpu_ms_per_msg']:.2f} ms" if warm else "-",
            f"{max(warm['peak_mib'], large['peak_mib'] if large else 0):.1f}" if warm else "-",
            f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} ms" if lat else "-",
        ))  # fmt: skip
        del cold
    for name in ("smtp-source", "aiosmtplib"):
        rows.append(
            (f"{name} (ceiling)", rate(f"{name} 2KB"), "-", rate(f"{name} 100KB"), "-", "-", "-")
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    if with_postfix:
        print("\npickupd / Postfix:")
        for label in ("2KB warm", "2KB cold", "100KB warm"):
            ours, theirs = medians.get(f"pickupd {label}"), medians.get(f"postfix {label}")
            if ours and theirs:
                print(f"  {label:<11} {ours['msg_per_s'] / theirs['msg_per_s']:.2f}x")
    warm, cold = medians.get("pickupd 2KB warm"), medians.get("pickupd 2KB cold")
    if warm and cold:
        print(f"\npickupd warm / cold at 2 KB: {warm['msg_per_s'] / cold['msg_per_s']:.2f}x")
    backlog = medians.get("pickupd backlog")
    if backlog:
        print(
            f"pickupd with {args.backlog:,} x 2 KB waiting at start: peak RSS of all its"
            f" processes together {backlog['peak_mib']:.1f} MiB"
            f" ({backlog['peak_mib'] * 1.048576:.1f} MB), relayed at"
            f" {backlog['msg_per_s']:,.0f} msg/s"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

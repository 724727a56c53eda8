"""What the fleet's quota ledger costs: the 2 KB warm rate of bench/compare.py with and without
a Redis store, limits far above the load, and the store's round trips per message.

    python bench/ledger.py                  # 3 rounds of 5000 x 2 KB, each way, interleaved
    python bench/ledger.py --count 1000 --rounds 1 --json
    python bench/ledger.py --classes        # the same, a third of the messages urgent, a
                                            # third bulk (the cost of classes of mail)
    python bench/ledger.py --backlog 100000 # an urgent message's wait behind a bulk backlog

Each round runs pickupd (its workers as configured by default) against Postfix's smtp-sink,
once with `[limits] store` naming a private redis-server (started here on a free loopback port,
`--save '' --appendonly no`) and once without, in alternating order. The sender has
`limits = ["1000000 messages/min", "10000000 recipients/day"]`, so every message books a turn
and none waits. Round trips are what pickupd's processes log when they stop
(`limit_store_closed`: turns asked for while one is on its way share a pipeline); scripts
are Redis's own count of the commands pickupd sends (INFO commandstats: EVALSHA, EVAL,
SCRIPT LOAD, ZREM; not those a script runs inside). Both per message. The rate with the
store must be at least 80% of without.
Needs redis-server (Debian's package), smtp-sink (Debian's postfix) and pickupd installed in
the Python that runs it.

`--backlog N` runs no process: it books turns with the ledger's own arithmetic
(limits/ledger.py `book`, limits/lines.py) on a simulated clock, at Microsoft 365's preset
limits for one mailbox (30 messages/min, 10,000 recipients/day), one recipient a message. N
bulk messages wait in line from time 0, their line's head asking whenever the ledger says room
comes; an urgent message is dropped at each of a few times and its wait is printed, beside
the wait it had when every turn was booked in order at the drop (the way pickupd booked
before classes of mail).
"""

from __future__ import annotations

import argparse
import json
import shutil
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

LIMITS = '["1000000 messages/min", "10000000 recipients/day"]'


class Redis:
    """A private redis-server on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise tp.BenchError("redis-server is needed (apt-get install redis-server)")
        self.port = tp.free_port()
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline:
                raise tp.BenchError("redis-server did not answer")
            time.sleep(0.05)

    def cli(self, *args: str) -> str:
        found = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=False
        )
        return found.stdout.strip()

    def commands(self) -> int:
        """The commands clients sent: pickupd sends only scripts (EVALSHA, EVAL, and SCRIPT
        LOAD once per connection) and ZREM; commandstats also counts the commands a script
        runs inside, which are not round trips."""
        total = 0
        for line in self.cli("INFO", "commandstats").splitlines():
            name = line.partition(":")[0]
            if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load", "cmdstat_zrem"):
                total += int(line.split("calls=")[1].split(",")[0])
        return total

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def with_limits(service: cmp.Pickupd, store: str | None) -> None:
    text = service.config.read_text()
    text = text.replace('relay = "sink"\n', f'relay = "sink"\nlimits = {LIMITS}\n')
    if store:
        text = text.replace("[log]\n", f'[limits]\nstore = "{store}"\n\n[log]\n')
    service.config.write_text(text)


def urgent_waits(backlog: int, hours: Sequence[float]) -> list[dict[str, float]]:
    """The wait of an urgent message dropped `hours` after `backlog` bulk messages, at
    Microsoft 365's preset limits: with classes (bulk books only now, and leaves a tenth of
    the day to the other classes) and as before (every turn booked in order)."""
    from pickupd.config.routing import MAILBOX_PRESETS
    from pickupd.limits.ledger import Books, Need, book
    from pickupd.limits.lines import needs_for, reach
    from pickupd.message.priority import MailClass

    needs = tuple(
        Need(f"mailbox:m365:app/{limit.unit}/{limit.window:g}", limit, 1, "preset", "m365")
        for limit in MAILBOX_PRESETS["microsoft365"]
        if limit.unit in ("messages", "recipients")
    )
    bulk, urgent = needs_for(MailClass.BULK, needs), needs_for(MailClass.URGENT, needs)
    bulk_ahead = reach(MailClass.BULK, needs)
    start = 1_800_000_000.0
    out = []
    for at in hours:
        drop = start + at * 3600
        # With classes: the line's head books whenever the ledger says room comes (and asks
        # again every 10 s at least), until the urgent message is dropped.
        books, now, sent = Books(), start, 0
        while sent < backlog:
            turn = book(books, bulk, [], now, ahead=bulk_ahead)
            if turn.full:
                if min(turn.at, now + 10.0) >= drop:
                    break
                now = min(turn.at, now + 10.0)
            else:
                sent += 1
        waited = book(books, urgent, [], drop).at - drop
        # Before: every bulk turn booked in order at time 0, far into the future.
        books = Books()
        for _ in range(backlog):
            book(books, needs, [], start)
        before = book(books, needs, [], drop).at - drop
        out.append({"hours": at, "bulk_sent": sent, "wait_s": waited, "before_s": before})
    return out


def _show_waits(backlog: int, waits: list[dict[str, float]]) -> None:
    print(
        f"urgent message behind {backlog} bulk, Microsoft 365 preset (30 messages/min,"
        " 10,000 recipients/day)"
    )
    for w in waits:
        print(
            f"  dropped at {w['hours']:5.1f} h ({w['bulk_sent']:6.0f} bulk sent): waits"
            f" {w['wait_s']:8.1f} s (before: {w['before_s'] / 3600:7.1f} h)"
        )


def mark_classes(service: cmp.Pickupd) -> None:
    """A third of the prepared messages marked urgent, a third bulk (the files are written
    when the round starts: this wraps the service's prepare)."""
    prepare = service.prepare

    def marked(messages: list[bytes]) -> Any:
        marks = (b"X-Priority: 1\n", b"", b"Precedence: bulk\n")
        return prepare([marks[i % 3] + m for i, m in enumerate(messages)])

    service.prepare = marked  # type: ignore[method-assign]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pickupd", help="the pickupd command (default: beside this Python)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--classes",
        action="store_true",
        help="mark a third of the messages urgent and a third bulk (the cost of classes)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        help="only compute an urgent message's wait behind this many bulk ones (no processes)",
    )
    args = parser.parse_args(argv)
    if args.backlog:
        waits = urgent_waits(args.backlog, [0.0, 1.0, 5.0, 12.0, 30.0])
        if args.json:
            print(json.dumps({"backlog": args.backlog, "waits": waits}, indent=2))
        else:
            _show_waits(args.backlog, waits)
        return 0
    pickupd = tp.find_pickupd(args.pickupd)
    sink_path = tp.find_smtp_sink()
    if sink_path is None:
        raise tp.BenchError("smtp-sink is needed (Debian's postfix package)")
    work = Path(tempfile.mkdtemp(prefix="pickupd-ledger-"))
    redis = Redis(work)
    runs: dict[str, list[dict[str, float]]] = {"without": [], "store": []}
    trips: list[float] = []  # network round trips to Redis (pipelines), as pickupd logs them
    scripts: list[float] = []  # scripts Redis ran (one a turn)
    try:
        for round_ in range(args.rounds):
            order = ["without", "store"] if round_ % 2 == 0 else ["store", "without"]
            for way in order:
                sink = tp.Sink("smtp-sink", sink_path, work)
                sink.start(f"{way}-{round_}")
                service = cmp.Pickupd(work, pickupd, sink.port)
                with_limits(
                    service, f"redis://127.0.0.1:{redis.port}/0" if way == "store" else None
                )
                if args.classes:
                    mark_classes(service)
                before = redis.commands()
                try:
                    result = cmp.relay(
                        service, sink, args.count, 2048, f"L{round_}{way}", warm=True
                    )
                finally:
                    sink.stop()
                if way == "store":
                    scripts.append((redis.commands() - before) / args.count)
                    closed = [
                        json.loads(line)
                        for line in service.log.read_text().splitlines()
                        if '"limit_store_closed"' in line
                    ]
                    trips.append(sum(c["round_trips"] for c in closed) / args.count)
                if b"limit_store_down" in service.log.read_bytes():
                    raise tp.BenchError(f"the store went down: {tp.tail(service.log)}")
                runs[way].append(result)
                print(f"round {round_ + 1} {way}: {result['msg_per_s']:.0f} msg/s", file=sys.stderr)
    finally:
        redis.stop()
    median = {way: statistics.median(r["msg_per_s"] for r in rs) for way, rs in runs.items()}
    cpu = {way: statistics.median(r["cpu_ms_per_msg"] for r in rs) for way, rs in runs.items()}
    out: dict[str, Any] = {
        "count": args.count,
        "rounds": args.rounds,
        "msg_per_s": median,
        "cpu_ms_per_msg": cpu,
        "store_over_without": round(median["store"] / median["without"], 3),
        "round_trips_per_msg": round(statistics.median(trips), 3),
        "scripts_per_msg": round(statistics.median(scripts), 3),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"2 KB warm, {args.count} messages, median of {args.rounds} rounds")
        for way in ("without", "store"):
            print(f"  {way:8} {median[way]:7.0f} msg/s   CPU {cpu[way]:.2f} ms/msg")
        ok = out["store_over_without"] >= 0.8
        print(
            f"  store / without: {out['store_over_without']:.2f} ({'ok' if ok else 'under 0.80'})"
        )
        print(f"  Redis round trips per message: {out['round_trips_per_msg']:.2f}")
        print(f"  scripts run per message: {out['scripts_per_msg']:.2f}")
    return 0


if __name__ == "__main__":
    tp.run_script(main, "bench/ledger.py")

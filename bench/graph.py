"""pickupd through Microsoft Graph: messages per second to a local Graph-like endpoint.

    python bench/graph.py                   # 2000 x 2 KB: 1 mailbox, 20 mailboxes, and 20
                                            # with 20,000 messages already waiting
    python bench/graph.py --count 500 --json

The endpoint (this script, `--serve`, in a process of its own) speaks what pickupd uses over
HTTPS on loopback, with a self-signed P-256 certificate made by `openssl`: the tenant's OpenID
document and the client-credentials grant (msal's real code path gets its token there), and
`POST /v1.0/users/{mailbox}/sendMail`, answered 202 after 50 ms, as a remote service would.
(P-256 rather than RSA: the endpoint is one Python process on the cores pickupd uses, and
its side of 80 RSA handshakes, which a remote service does on its own machines, held the
first answers back by a tenth of a second. pickupd's side of the handshake costs more with
P-256, not less.) It reports the most requests it had in flight, a sample each 10 ms.

pickupd runs with `transport = "graph"` and its defaults but `[dispatch] concurrency = 200`,
`workers = 1` (`--workers N` to compare) and the relay's `max_connections = 100`; Graph's
preset holds each mailbox to 4 requests at once (so one mailbox can do at most 80 a second,
20 mailboxes 1,600). One worker: it uses each mailbox's 4 requests whole, where two workers
have 2 each, and the one that took more of a mailbox's messages (the files are shared by
name, not by sender) finishes last. The rate counts from the backlog's appearance (an idle
service, then 2000 files renamed into pickup/new/) to the last 202; CPU is pickupd's own
(every process), per message; memory its peak RSS.

Bounds (issue 26): one mailbox at least 75 msg/s, 20 mailboxes at least 1,200 msg/s, at most
1 ms of CPU a message, and the same rate and memory with 20,000 messages waiting.
Needs openssl, and pickupd installed in the Python that runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backlog
import compare as cmp
import throughput as tp

DELAY = 0.05


# ---- The endpoint ------------------------------------------------------------------------


async def _serve(port: int, cert: str, key: str, delay: float) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    counts: dict[str, int] = {}
    flight = [0, 0]  # requests in flight now, and the most since the last /stats
    base = f"https://127.0.0.1:{port}"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                doc: dict[str, Any] | None = {
                    "error": {"code": "ResourceNotFound", "message": path}
                }
                status = 404
                if path.endswith("/v2.0/.well-known/openid-configuration"):
                    tenant = path.split("/")[1]
                    status, doc = (
                        200,
                        {
                            "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
                            "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
                            "issuer": f"{base}/{tenant}/v2.0",
                        },
                    )
                elif path.endswith("/oauth2/v2.0/token"):
                    status, doc = 200, {"access_token": "bench", "expires_in": 3600,
                                        "token_type": "Bearer"}  # fmt: skip
                elif method == "POST" and path.endswith("/sendMail"):
                    flight[0] += 1
                    flight[1] = max(flight[1], flight[0])
                    await asyncio.sleep(delay)
                    flight[0] -= 1
                    mailbox = path.split("/")[3]
                    counts[mailbox] = counts.get(mailbox, 0) + 1
                    status, doc = 202, None
                elif path == "/stats":
                    status, doc = 200, {"sent": sum(counts.values()), "most_in_flight": flight[1]}
                    flight[1] = flight[0]
                data = b"" if doc is None else json.dumps(doc).encode()
                del body
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n"
                    f"Content-Type: application/json\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, ssl=context, backlog=512)
    async with server:
        await server.serve_forever()


class Endpoint:
    """The endpoint in a process of its own, with its certificate."""

    def __init__(self, work: Path, delay: float) -> None:
        self.cert, self.key = work / "graph.crt", work / "graph.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.port = tp.free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), str(self.cert),
             str(self.key), str(delay)]
        )  # fmt: skip
        self._context = ssl.create_default_context(cafile=str(self.cert))
        self.in_flight: list[int] = []  # the most requests in flight, each time sent() asks
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sent()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise tp.BenchError("the Graph endpoint did not start") from None
                time.sleep(0.05)

    def sent(self) -> int:
        with urllib.request.urlopen(f"{self.url}/stats", context=self._context) as got:
            stats = json.loads(got.read())
        self.in_flight.append(int(stats["most_in_flight"]))
        return int(stats["sent"])

    def cpu(self) -> float:
        return cmp.cpu_seconds(self.proc.pid, children=False)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


# ---- pickupd -----------------------------------------------------------------------------


def graph_config(service: cmp.Pickupd, endpoint: Endpoint, workers: int) -> None:
    """The service's config, relaying through the endpoint as Graph."""
    service.config.write_text(
        f"""\
[spool]
path = "{service.spool}"

[dispatch]
concurrency = 200
workers = {workers}

[log]
level = "info"
format = "json"

[relays.graph]
transport = "graph"
graph_url = "{endpoint.url}"
ca_file = "{endpoint.cert}"
max_connections = 100
auth = "oauth2"
tenant = "bench"
client_id = "bench"
client_secret_env = "BENCH_GRAPH_SECRET"
authority = "{endpoint.url}"

[senders."*@bench.example"]
relay = "graph"
"""
    )


def messages(count: int, mailboxes: int) -> list[bytes]:
    """2 KB messages from `mailboxes` senders in turn."""
    out = []
    for index in range(count):
        data = tp.message(index, 2048, "graph")
        sender = f"sender{index % mailboxes}@bench.example"
        out.append(data.replace(tp.SENDER.encode(), sender.encode(), 1))
    return out


def run(work: Path, pickupd: Path, endpoint: Endpoint, count: int, mailboxes: int,
        waiting: int, workers: int) -> dict[str, float]:  # fmt: skip
    service = cmp.Pickupd(work, pickupd, 0)
    graph_config(service, endpoint, workers)
    if waiting:
        (service.spool / "deferred").mkdir(parents=True, exist_ok=True)
        backlog.fill_deferred(service, waiting)  # type: ignore[arg-type]
    paths = service.prepare(messages(count, mailboxes))
    os.environ["BENCH_GRAPH_SECRET"] = "bench"
    os.environ["REQUESTS_CA_BUNDLE"] = str(endpoint.cert)
    service.start()
    try:
        time.sleep(1.0)
        before, cpu_before, graph_cpu = endpoint.sent(), service.cpu(), endpoint.cpu()
        started = time.monotonic()
        endpoint.in_flight.clear()
        service.publish(paths)
        deadline = started + 60 + count * 0.05
        while endpoint.sent() - before < count:
            if time.monotonic() > deadline:
                raise tp.BenchError(f"only {endpoint.sent() - before} of {count} arrived")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        cpu = service.cpu() - cpu_before
        memory = service.memory()
    finally:
        service.stop()
    return {
        "msg_per_s": round(count / seconds, 1),
        "cpu_ms_per_msg": round(cpu / count * 1000, 3),
        "endpoint_cpu_ms_per_msg": round((endpoint.cpu() - graph_cpu) / count * 1000, 3),
        "peak_mib": round(memory, 1),
        "in_flight_median": sorted(endpoint.in_flight)[len(endpoint.in_flight) // 2],
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--waiting", type=int, default=20_000)
    parser.add_argument(
        "--workers", type=int, default=1, help="[dispatch] workers (default 1: see above)"
    )
    parser.add_argument("--pickupd", help="the pickupd command (default: beside this Python)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        port, cert, key, delay = args.serve
        asyncio.run(_serve(int(port), cert, key, float(delay)))
        return 0
    pickupd = tp.find_pickupd(args.pickupd)
    work = Path(tempfile.mkdtemp(prefix="pickupd-graph-"))
    endpoint = Endpoint(work, DELAY)
    results: dict[str, Any] = {
        "count": args.count, "delay_ms": DELAY * 1000, "workers": args.workers
    }  # fmt: skip
    try:
        for name, mailboxes, waiting in (
            ("one mailbox", 1, 0),
            ("20 mailboxes", 20, 0),
            (f"20 mailboxes, {args.waiting} waiting", 20, args.waiting),
        ):
            results[name] = run(
                work, pickupd, endpoint, args.count, mailboxes, waiting, args.workers
            )
            print(f"{name}: {results[name]}", file=sys.stderr)
    finally:
        endpoint.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{args.count} x 2 KB through a Graph-like endpoint answering 202 after 50 ms,"
        f" {args.workers} worker(s)"
    )
    bounds = {"one mailbox": 75, "20 mailboxes": 1200}
    for name, got in results.items():
        if not isinstance(got, dict):
            continue
        least = bounds.get(name, bounds["20 mailboxes"])
        ok = got["msg_per_s"] >= least and got["cpu_ms_per_msg"] <= 1.0
        print(
            f"  {name:34} {got['msg_per_s']:7.1f} msg/s  CPU {got['cpu_ms_per_msg']:.2f} ms/msg"
            f"  peak {got['peak_mib']:.0f} MiB  ({'ok' if ok else f'bound: {least}/s, 1 ms'})"
        )
    return 0


if __name__ == "__main__":
    tp.run_script(main, "bench/graph.py")

"""`pickupd demo`: a capture SMTP server, the real dispatcher and three sample messages."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mailbox
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pickupd import log as logs
from pickupd.cli.common import add_command
from pickupd.config.loading import load
from pickupd.service import Service

if TYPE_CHECKING:  # aiosmtpd is imported by the demo only: a daemon need not carry it
    from aiosmtpd.smtp import Envelope as ServerEnvelope
    from aiosmtpd.smtp import Session as ServerSession

__all__ = ["register", "run_demo"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `demo`."""
    demo = add_command(
        commands,
        "demo",
        lambda args: run_demo(args.dir),
        config=False,
        help="a first look without any mail server: capture server, dispatcher, sample mail",
        description=(
            "Writes a demo config and spool under DIR, starts a capture SMTP server on a free "
            "loopback port (it stores what it receives in DIR/received/), runs the dispatcher, "
            "drops three sample messages, prints where each ended up and why, then keeps "
            "running so you can drop your own files, until Ctrl-C."
        ),
    )
    demo.add_argument(
        "--dir", default="pickupd-demo", type=Path, help="where to put it (default: ./pickupd-demo)"
    )


REFUSED = "nobody@example.net"
_SAMPLES = [
    (
        "welcome",
        "app@demo.example",
        "alice@example.net",
        "a sign-up mail from an allowed sender",
    ),
    (
        "intruder",
        "mallory@elsewhere.example",
        "alice@example.net",
        "a sender that is not on the allow-list",
    ),
    (
        "bounce",
        "app@demo.example",
        REFUSED,
        "a recipient the capture server refuses with 550",
    ),
]
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


class _Capture:
    """aiosmtpd handler: refuses REFUSED with 550, stores everything else in received/."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.message_ids: dict[str, Path] = {}

    async def handle_RCPT(
        self,
        server: Any,
        session: ServerSession,
        envelope: ServerEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if address.lower() == REFUSED:
            return "550 5.1.1 <nobody@example.net>: no such mailbox here (demo)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: Any, session: ServerSession, envelope: ServerEnvelope
    ) -> str:
        self.count += 1
        data = envelope.original_content or b""
        path = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.count}.eml"
        header = (
            f"X-Demo-Envelope-From: {envelope.mail_from}\r\n"
            f"X-Demo-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        path.write_bytes(header + data)
        match = _MESSAGE_ID.search(data)
        if match:
            self.message_ids[match.group(1).decode(errors="replace")] = path
        print(
            f"  capture server received: {envelope.mail_from} -> "
            f"{', '.join(envelope.rcpt_tos)}  ({path})",
            flush=True,
        )
        return "250 2.0.0 OK: stored by the pickupd demo"


def _sample(name: str, sender: str, recipient: str, about: str) -> bytes:
    return (
        f"From: Demo App <{sender}>\n"
        f"To: {recipient}\n"
        f"Subject: pickupd demo: {about}\n"
        f"Message-ID: <{name}.{time.time_ns()}@demo.example>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
        f"Hello! This is the '{name}' sample of the pickupd demo: {about}.\n"
    ).encode()


def _config(folder: Path, port: int) -> str:
    return f"""\
# Written by `pickupd demo`: a relay to the demo's capture server on loopback.
[spool]
path = "spool"

[dispatch]
settle = "250ms"
rescan_interval = "5s"

[retry]
schedule = ["10s", "30s"]
max_age = "5m"

[log]
format = "json"

[relays.capture]
host = "127.0.0.1"
port = {port}
security = "none"   # loopback only; a real relay uses "starttls" or "tls"

[senders."app@demo.example"]
relay = "capture"

[senders."*@apps.demo.example"]
relay = "capture"
"""


def _where(spool: Path, message_id: str, capture: _Capture) -> str | None:
    if message_id in capture.message_ids:
        return f"relayed -> {capture.message_ids[message_id]}"
    for folder in ("failed", "deferred"):
        for sidecar in (spool / folder).glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(sidecar.read_text())
                if data.get("message_id") == message_id:
                    why = data.get("reason") or f"retry at {data.get('next_attempt')}"
                    return f"{folder}/{sidecar.with_suffix('.eml').name}: {why}: {data['detail']}"
    return None


async def _follow(spool: Path) -> None:
    """Print each message that lands in failed/ or deferred/ from now on, and why."""
    seen = {p.name for folder in ("failed", "deferred") for p in (spool / folder).glob("*.json")}
    while True:
        await asyncio.sleep(0.25)
        for folder in ("failed", "deferred"):
            for sidecar in sorted((spool / folder).glob("*.json")):
                if sidecar.name in seen:
                    continue
                seen.add(sidecar.name)
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(sidecar.read_text())
                    why = data.get("reason") or f"retry at {data.get('next_attempt')}"
                    print(
                        f"  {folder}/{sidecar.with_suffix('.eml').name}: {why}: {data['detail']}",
                        flush=True,
                    )


async def _samples(pickup: Path, spool: Path, capture: _Capture) -> None:
    """Drop the three samples as an app would, and say where each ended up (15 s at most)."""
    print("Dropping three sample messages (Maildir protocol: tmp/ then rename to new/):")
    maildir = mailbox.Maildir(pickup, create=False)
    ids = []
    for name, sender, recipient, about in _SAMPLES:
        raw = _sample(name, sender, recipient, about)
        maildir.add(raw)
        match = _MESSAGE_ID.search(raw)
        assert match is not None
        ids.append((name, about, match.group(1).decode()))
    deadline = time.monotonic() + 15
    results: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        results = {mid: _where(spool, mid, capture) for _, _, mid in ids}
        if all(results.values()):
            break
        await asyncio.sleep(0.05)
    print("\nWhere each one ended up, and why:")
    for name, about, mid in ids:
        print(f"  {name:9} ({about}):\n      {results.get(mid) or 'still in flight'}")


async def _demo(folder: Path) -> int:
    from aiosmtpd.smtp import SMTP as SMTPServer

    received = folder / "received"
    received.mkdir(parents=True, exist_ok=True)
    capture = _Capture(received)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(capture, hostname="capture.demo", enable_SMTPUTF8=True),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    config_file = folder / "pickupd.toml"
    config_file.write_text(_config(folder, port))
    config = load(config_file)
    log_file = (folder / "pickupd.log").open("a", encoding="utf-8")
    logs.configure(config.log.level, config.log.format, stream=log_file)
    service = Service(config)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, service.stop)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), timeout=10)

    pickup = config.spool.path / "pickup"
    print(f"pickupd demo in {folder}/")
    print(f"  config:          {config_file}")
    print(f"  capture server:  127.0.0.1:{port} (stores mail in {received}/)")
    print(f"  dispatcher log:  {folder / 'pickupd.log'}")
    print(f"  pickup folder:   {pickup}/\n")
    await _samples(pickup, config.spool.path, capture)
    print(
        "\nThe dispatcher keeps running. Drop your own mail, for example:\n"
        f"  printf 'From: app@demo.example\\nTo: bob@example.net\\nSubject: hi\\n\\nhello\\n'"
        f" > {pickup}/hello.eml\n"
        f"(allowed senders: app@demo.example and *@apps.demo.example; failed mail goes to"
        f" {config.spool.path / 'failed'}/ with a .json beside it saying why)\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )
    follower = asyncio.create_task(_follow(config.spool.path))
    try:
        await task
    finally:
        follower.cancel()
        server.close()
        await server.wait_closed()
        log_file.close()
    print("pickupd demo stopped; nothing was lost: see the folders under", config.spool.path)
    return 0


def run_demo(folder: Path) -> int:
    """Run the demo in `folder` until Ctrl-C; returns the exit code."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_demo(folder))

"""Run the real `pickupd` process as a user would, and look at what it did.

A `Daemon` writes a TOML config (via tomli-w) pointing at a spool under the test's tmp_path,
starts `pickupd run` (the installed console script), and offers bounded waits on the log and on
the spool folders. Nothing here mocks SMTP or the filesystem.
"""

from __future__ import annotations

import contextlib
import json
import mailbox
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

__all__ = [
    "PICKUPD",
    "Daemon",
    "NotifySocket",
    "drop_eml",
    "drop_maildir",
    "free_port",
    "message",
    "pickupd",
    "relay_for",
    "scrape",
    "tls_relay",
    "wait_until",
]

PICKUPD = str(Path(sys.executable).with_name("pickupd"))
FOLDERS = ("pickup/new", "active", "deferred", "failed", "sent")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def message(
    sender: str = "app@example.com",
    to: str = "alice@example.net",
    subject: str = "hello",
    body: str = "Hello there.\n",
    extra: str = "",
    message_id: str | None = None,
    date: str = "Sun, 06 Dec 2026 10:00:00 +0000",
) -> bytes:
    """A small message with LF line endings, as an app would write it (with Date: and
    Message-ID:, so pickupd adds neither and relays it byte for byte)."""
    mid = message_id or f"<{time.time_ns()}.{os.getpid()}@example.com>"
    return (
        f"From: {sender}\nTo: {to}\nSubject: {subject}\nDate: {date}\nMessage-ID: {mid}\n"
        f"{extra}\n{body}"
    ).encode()


def pickupd(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run the `pickupd` command as a user would (text in and out), bounded in time. Without
    `stdin` it reads from /dev/null, as from a script; `env` is added to the environment."""
    return subprocess.run(
        [PICKUPD, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env is not None else None,
    )


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound, then closed), never the same one twice
    in a test run: two calls in a row must not name one port for two purposes."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


_HANDED_OUT: set[int] = set()


def tls_relay(server: Any, ca: Any, **extra: Any) -> dict[str, Any]:
    """A `[relays.<name>]` table for a STARTTLS tests/smtpserver.py server, verified against
    the test CA (`ca.ca_file`)."""
    return {
        "host": server.host,
        "port": server.port,
        "security": "starttls",
        "ca_file": str(ca.ca_file),
        "timeout": "5s",
        **extra,
    }


class NotifySocket:
    """A datagram socket standing in for systemd's: collects what pickupd says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    def having(self, key: str) -> list[dict[str, str]]:
        return [m for m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value, from the daemon's Prometheus endpoint (text exposition)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def secret_file(path: Path, secret: str) -> Path:
    """A file holding `secret` (and a newline) that only its owner may read, as pickupd
    wants a password file; its path."""
    path.write_text(f"{secret}\n")
    path.chmod(0o600)
    return path


def relay_for(server: Any, **extra: Any) -> dict[str, Any]:
    """A `[relays.<name>]` table for a tests/smtpserver.py server (plain, no credentials)."""
    return {"host": server.host, "port": server.port, "security": "none", **extra}


def drop_maildir(spool: Path, data: bytes) -> str:
    """Drop with the Maildir protocol (tmp/ then new/); returns the file name in new/."""
    return mailbox.Maildir(spool / "pickup", create=False).add(data)


def drop_eml(spool: Path, name: str, data: bytes) -> Path:
    """Write a .eml straight into pickup/, as IIS-style writers do."""
    path = spool / "pickup" / name
    path.write_bytes(data)
    return path


class Daemon:
    """One `pickupd` process with its own config and spool."""

    def __init__(
        self, tmp_path: Path, relays: dict[str, Any], senders: dict[str, Any], **sections: Any
    ) -> None:
        self.dir = tmp_path
        self.spool = tmp_path / "spool"
        self.config_path = tmp_path / "pickupd.toml"
        self.log_path = tmp_path / "pickupd.log"
        self.stderr_path = tmp_path / "pickupd.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        tmp_path.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "spool": {"path": str(self.spool)},
            "dispatch": {"settle": "100ms", "rescan_interval": "2s"},
            "retry": {"schedule": ["300ms"], "max_age": "1h"},
            "relays": relays,
            "senders": senders,
        }
        for name, values in sections.items():
            doc.setdefault(name, {}).update(values)
        self.write_config(doc)
        self.spool.mkdir(exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            (self.spool / "pickup" / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("", "tmp", "new", "cur"):  # as the tmpfiles make them: drop, never list
            (self.spool / "pickup" / sub).chmod(0o1730)

    def write_config(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.config_path.write_text(tomli_w.dumps(doc))
        self.config_path.chmod(0o600)

    # -- the process --------------------------------------------------------------------------

    def run_once(self, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """`pickupd run --once`: returns when it exits (bounded)."""
        with self.log_path.open("ab") as out, self.stderr_path.open("ab") as err:
            return subprocess.run(
                [PICKUPD, "run", "--once", "-c", str(self.config_path)],
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
            )

    def start(
        self,
        env: dict[str, str] | None = None,
        host: str | None = None,
        wrap: list[str] | None = None,
    ) -> Daemon:
        """Start `pickupd run` (with `env` added to the environment) and wait until it logs
        that it is watching. With `host`, in a UTS namespace of its own under that host name
        (`unshare -u`): to each other, daemons with different hosts are different hosts.
        `wrap`: a command that runs it (`setpriv ...`)."""
        ready_before = len(self.events("ready"))
        out = self.log_path.open("ab")
        err = self.stderr_path.open("ab")
        argv = [*(wrap or []), PICKUPD, "run", "-c", str(self.config_path)]
        if host is not None:
            argv = ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$0" "$@"', *argv]
        self.proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
        out.close()
        err.close()
        wait_until(
            lambda: len(self.events("ready")) > ready_before or self.proc.poll() is not None,  # type: ignore[union-attr]
            15,
            "pickupd to log ready",
        )
        assert self.proc.poll() is None, f"pickupd exited: {self.stderr()}"
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Signal the process and wait for it to exit; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        return code

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    # -- what it did ----------------------------------------------------------------------------

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines: list[dict[str, Any]] = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
        return lines

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.log_lines()
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(
        self, name: str, count: int = 1, timeout: float = 10.0, **match: Any
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = wait_until(
            lambda: (seen := self.events(name, **match)) and len(seen) >= count and seen,
            timeout,
            f"{count} '{name}' log line(s) {match or ''}; log: {self.log_tail()}",
        )
        return found

    def scans(self, more: int, timeout: float = 10.0) -> None:
        """Wait until pickupd has scanned pickup/ `more` times from now: the positive sign
        before a check that something did not happen (needs `log={"level": "debug"}`)."""
        seen = len(self.events("pickup_scanned"))
        self.wait_event("pickup_scanned", count=seen + more, timeout=timeout)

    def log_tail(self) -> str:
        return "\n".join(json.dumps(e) for e in self.log_lines()[-8:]) + "\n" + self.stderr()

    def files(self, folder: str, suffix: str = "") -> list[Path]:
        path = self.spool / folder
        if not path.exists():
            return []
        return sorted(
            p for p in path.iterdir() if not p.name.startswith(".") and p.name.endswith(suffix)
        )

    def sidecars(self, folder: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in self.files(folder, ".json")]

    def wait_sidecars(
        self, folder: str, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = wait_until(
            lambda: (
                (seen := self.sidecars(folder))
                and len(seen) >= count
                and len(self.files(folder, ".eml")) >= count
                and seen
            ),
            timeout,
            f"{count} message(s) in {folder}/; log: {self.log_tail()}",
        )
        return found

    def census(self) -> dict[str, int]:
        """How many messages each folder holds (pickup counts new/ and direct .eml files)."""
        counts = {
            folder: len(
                self.files(folder, ".eml" if folder in ("deferred", "failed", "sent") else "")
            )
            for folder in FOLDERS
        }
        counts["pickup/new"] += len(self.files("pickup", ".eml"))
        return counts

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL if exc[0] else signal.SIGTERM)


def manual() -> str:
    """The README and every page of the manual (docs/), one text: where a test checks
    that the documents say what the code does, wherever the page that says it."""
    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return "\n\n".join(page.read_text() for page in pages)

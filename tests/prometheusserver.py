"""A real Prometheus (tests/debian-packages.sh installs Debian's) on a free loopback
port, scraping given targets every second, with its data in a temporary folder, and its
HTTP API asked as Grafana asks it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from harness import free_port

__all__ = ["PROMETHEUS", "Prometheus", "promtool"]

PROMETHEUS = shutil.which("prometheus")


def promtool() -> str:
    """promtool, from the same package."""
    found = shutil.which("promtool")
    assert found, "promtool is needed (apt-get install prometheus; .ci/run does)"
    return found


class Prometheus:
    """`prometheus` scraping `targets` (host:port) every second on 127.0.0.1."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        assert PROMETHEUS, "prometheus is needed (apt-get install prometheus; .ci/run does)"
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "pickupd", "static_configs": [{"targets": targets}]}],
        }
        # JSON is YAML: no YAML library needed to write the config.
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = (self.dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url("/-/ready"), timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus was not ready in 30 s"
            time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result (a list of series), as Grafana's panels ask it."""
        address = self.url("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(address, timeout=5) as answer:
            doc = json.load(answer)
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

"""A real redis-server (tests/debian-packages.sh installs Debian's) on a free loopback port, with
no persistence, for the tests of the fleet's ledger. It can be killed, restarted on the same
port, frozen (SIGSTOP: it accepts connections and never answers) and thawed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from smtpserver import TestCA

__all__ = ["RedisServer"]

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """`redis-server --save '' --appendonly no` on 127.0.0.1; with `password`, AUTH; with
    `ca`, TLS only (a certificate from the test CA)."""

    def __init__(self, directory: Path, password: str | None = None, ca: TestCA | None = None):
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed (apt-get install redis-server; .ci/run does)"
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.ca = ca
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.ca else 'redis'}://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.dir), "--protected-mode", "no"]
        if self.ca is not None:
            cert, key = self.ca.server_files(self.dir)
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key), "--tls-ca-cert-file", self.ca.ca_file]
            args += ["--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return self
            except redis.RedisError:
                assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not answer in 10 s"
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        """A client of the tests' own (not pickupd's)."""
        kwargs: dict[str, object] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        if self.ca is not None:
            kwargs["ssl_ca_certs"] = self.ca.ca_file
        return redis.Redis.from_url(self.url, password=self.password, **kwargs)

    def kill(self) -> None:
        """kill -9: what it held is gone (it keeps nothing on disk)."""
        if self.proc is not None:
            self.thaw()
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections; nothing answers them."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.kill()

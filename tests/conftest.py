"""Shared fixtures for the pickupd test suite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, NotifySocket, relay_for
from redisserver import RedisServer
from smtpserver import SmtpServer, TestCA
from tokenserver import CLIENT_SECRET, TokenServer

PACKAGES = Path(__file__).with_name("debian-packages.sh")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The Debian packages the tests drive (redis-server, prometheus, postfix's smtp-sink,
    bsd-mailx, systemd-analyze), installed when missing, so `python -m pytest` passes on a
    fresh machine; where they cannot be installed, one line says what to run."""
    del session
    missing = subprocess.run(
        [str(PACKAGES), "--list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    if not missing:
        return
    if not shutil.which("apt-get") or (os.geteuid() != 0 and not shutil.which("sudo")):
        pytest.exit(f"the tests need {', '.join(missing)}: install them ({PACKAGES})", 4)
    done = subprocess.run([str(PACKAGES)], timeout=1800, check=False)
    if done.returncode != 0:
        pytest.exit(f"installing {', '.join(missing)} failed ({PACKAGES})", 4)


# -- SMTP test server (tests/smtpserver.py) ----------------------------------------------


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway CA for the whole run; ``test_ca.ca_file`` is its PEM."""
    return TestCA(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A started plain server (security "none", no AUTH), stopped after the test."""
    with SmtpServer() as server:
        yield server


@pytest.fixture
def smtp_factory(test_ca: TestCA) -> Iterator[Callable[..., SmtpServer]]:
    """Start servers from SmtpServer keyword arguments; all are stopped after the test.

    ``ca`` defaults to ``test_ca`` for security "starttls" and "tls".
    """
    servers: list[SmtpServer] = []

    def make(**kwargs: Any) -> SmtpServer:
        if kwargs.get("security", "none") != "none":
            kwargs.setdefault("ca", test_ca)
        server = SmtpServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()


# -- Redis (tests/redisserver.py) ----------------------------------------------------------


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start real redis-server processes (`password=`, `ca=`); all are killed after."""
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A started Redis without a password, on a free loopback port."""
    return redis_factory()


@pytest.fixture
def token_server(test_ca: TestCA) -> Iterator[TokenServer]:
    """A started OAuth2 token endpoint (tests/tokenserver.py) that knows one client: app-id
    with the secret tokenserver.CLIENT_SECRET."""
    server = TokenServer(test_ca).start()
    server.clients["app-id"] = CLIENT_SECRET
    yield server
    server.stop()


# -- the real daemon (tests/harness.py) ----------------------------------------------------


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start real `pickupd run` processes: `make_daemon(server, relays=, senders=, start=,
    **sections)`. Each is stopped with SIGTERM after the test, which must exit 0."""
    daemons: list[Daemon] = []

    def make(
        server: SmtpServer | None = None,
        relays: dict[str, Any] | None = None,
        senders: dict[str, Any] | None = None,
        start: bool = True,
        **sections: Any,
    ) -> Daemon:
        relays = relays or {"main": relay_for(server)} if server else relays or {}
        senders = senders or {"app@example.com": {"relay": "main"}}
        daemon = Daemon(tmp_path / f"d{len(daemons)}", relays, senders, **sections)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    # SIGTERM, as systemd would: every test also ends with a clean drain and exit 0.
    codes = [daemon.stop(signal.SIGTERM, timeout=40) for daemon in daemons]
    assert all(code == 0 for code in codes), codes


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A stand-in for systemd's notify socket; pass its path as NOTIFY_SOCKET."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()

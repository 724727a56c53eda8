"""Shared fixtures for the pickupd test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from smtpserver import SmtpServer, TestCA

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

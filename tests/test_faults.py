"""Faults of the environment, with the real daemon: a spool whose disk fills up, and SMTP
servers that misbehave (tests/smtpserver.py scripts the faults on the server side)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, message, relay_for, tls_relay, wait_until
from smtpserver import SmtpServer, TestCA


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the block (needs root)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_strands_nothing_and_heals_without_a_restart(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """On a full spool disk, the 10 messages the relay defers cannot be put back (no room for
    their sidecars): they stay claimed, logged once each as stranded, nothing half-written is
    left, and the other 20 are relayed meanwhile (sending needs no space). Once space is
    freed, the same process puts the 10 back and sends them: no restart."""
    daemon = make_daemon(smtp_server, start=False)
    with small_tmpfs(daemon.spool, "1m"):
        for sub in ("pickup/tmp", "pickup/new", "pickup/cur"):
            (daemon.spool / sub).mkdir(parents=True)
        for n in range(30):
            drop_maildir(daemon.spool, message(subject=f"m{n}"))
        filler = fill(daemon.spool)
        smtp_server.fail_mail = "451 4.3.0 Try again later"
        smtp_server.fail_next = 10
        try:
            daemon.start()
            smtp_server.wait_for(20, timeout=20)
            stranded = daemon.wait_event("stranded", count=10, timeout=10)
            assert set(Counter(e["id"] for e in stranded).values()) == {1}  # once each
            # (a sent message may still be on its way from active/ to being deleted)
            wait_until(lambda: len(daemon.files("active")) == 10, 5, "10 claims left")
            leftovers = [p.name for p in (daemon.spool / "deferred").iterdir()]
            assert leftovers == [], leftovers  # no half-written sidecar or temp file

            filler.unlink()
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGUSR1)  # retry now rather than after the backoff
            smtp_server.wait_for(30, timeout=20)
            wait_until(lambda: not daemon.files("active"), 10, "active/ to empty")
            assert len(daemon.events("unstranded")) == 10
            assert daemon.files("deferred") == [] and daemon.files("failed") == []
        finally:
            assert daemon.stop() == 0


Factory = Callable[..., SmtpServer]


@pytest.mark.parametrize(
    ("server_kwargs", "said"),
    [
        ({"greeting": "never"}, "timed out"),
        ({"greeting": "421"}, "421"),
    ],
)
def test_a_server_that_does_not_greet_properly_defers(
    smtp_factory: Factory,
    make_daemon: Callable[..., Daemon],
    server_kwargs: dict[str, str],
    said: str,
) -> None:
    """No greeting at all (bounded by the relay's timeout), or a 421 greeting: the message
    is deferred with the reason, and nothing is sent."""
    server = smtp_factory(**server_kwargs)
    daemon = make_daemon(relays={"main": relay_for(server, timeout="1s")})
    drop_maildir(daemon.spool, message())
    (deferred, *_) = daemon.wait_event("deferred", timeout=10)
    assert said in deferred["detail"], deferred
    assert server.received == []


@pytest.mark.parametrize(
    ("cert", "tls_max", "said"),
    [
        ("wrong_host", None, "certificate verification failed"),
        ("expired", None, "certificate verification failed"),
        ("untrusted", None, "certificate verification failed"),
        ("good", "1.1", "TLS handshake failed"),
    ],
)
def test_tls_that_cannot_be_trusted_defers_and_never_falls_back_to_clear(
    smtp_factory: Factory,
    test_ca: TestCA,
    make_daemon: Callable[..., Daemon],
    cert: str,
    tls_max: str | None,
    said: str,
) -> None:
    """A certificate for another name, an expired one, one from an unknown CA, or a server
    that offers only TLS 1.1: deferred with the TLS problem named; no MAIL ever crosses."""
    server = smtp_factory(security="starttls", cert=cert, tls_max=tls_max)
    daemon = make_daemon(relays={"main": tls_relay(server, test_ca)})
    drop_maildir(daemon.spool, message())
    (deferred, *_) = daemon.wait_event("deferred", timeout=10)
    assert said in deferred["detail"], deferred
    assert "MAIL" not in server.commands and server.received == []


def test_replies_trickled_byte_by_byte_and_no_8bitmime_still_deliver(
    smtp_factory: Factory, make_daemon: Callable[..., Daemon]
) -> None:
    """A server that writes each reply a byte at a time and offers no 8BITMIME: the 8-bit
    message is sent intact, without a BODY=8BITMIME it may not use."""
    server = smtp_factory(trickle=True, offer_8bitmime=False)
    daemon = make_daemon(server)
    drop_maildir(daemon.spool, message(body="Grüße aus Köln\n"))
    (got,) = server.wait_for(1, timeout=15)
    assert "Grüße aus Köln".encode() in got.data
    assert not [o for o in got.mail_options if o.startswith("BODY")]


@pytest.mark.parametrize("where", ["MAIL", "RCPT", "DATA"])
def test_a_connection_reset_mid_transaction_is_retried_and_sent_once(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], where: str
) -> None:
    """The server drops the connection at MAIL, RCPT or DATA (before the message was
    handed over): deferred or retried on a new session, then sent exactly once."""
    smtp_server.drop_at = where
    smtp_server.fail_next = 1
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message())
    smtp_server.wait_for(1, timeout=10)
    daemon.wait_event("sent")
    assert len(smtp_server.received) == 1

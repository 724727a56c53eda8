"""Faults of the environment, with the real daemon: a spool whose disk fills up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Daemon, drop_maildir, message, wait_until
from smtpserver import SmtpServer


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

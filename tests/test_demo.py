"""`pickupd demo`, run as a new user would run it from the README."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from harness import PICKUPD, message, wait_until


def test_demo_shows_each_outcome_then_relays_user_drops(tmp_path: Path) -> None:
    """The demo relays the good sample, refuses the unlisted sender, records the 550, keeps
    running for the user's own drops, and stops cleanly on Ctrl-C (SIGINT)."""
    folder = tmp_path / "demo"
    proc = subprocess.Popen(
        [PICKUPD, "demo", "--dir", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Press Ctrl-C" in text, text
        assert "relayed ->" in text
        assert "sender_not_allowed" in text
        assert "rejected: RCPT TO: 550" in text
        received = folder / "received"
        assert len(list(received.glob("*.eml"))) == 1
        pickup = folder / "spool" / "pickup"
        (pickup / "mine.eml").write_bytes(message(sender="app@demo.example", subject="mine"))
        wait_until(lambda: len(list(received.glob("*.eml"))) == 2, 10, "the user's drop")
        (pickup / "theirs.eml").write_bytes(message(sender="eve@example.org"))
        failed = folder / "spool" / "failed"
        wait_until(lambda: len(list(failed.glob("*.json"))) == 3, 10, "the refused drop")
        # The demo says each new failure as it sees it (it looks every 0.25 s).
        said = ""
        deadline = time.monotonic() + 10
        while "eve@example.org" not in said and time.monotonic() < deadline:
            said = proc.stdout.readline()
        assert "sender_not_allowed: eve@example.org matches no [senders] entry" in said, said
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

"""intake/watcher.py against the real file system: inotify read on the loop (Linux) and the
watchdog fallback give the intake the same hints."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from pickupd.intake.watcher import FileEvent, Watcher


@pytest.mark.parametrize(
    "native",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify"),
        ),
        False,
    ],
)
def test_arrivals_and_a_writers_open_and_close_become_hints(tmp_path: Path, native: bool) -> None:
    """A Maildir rename into new/, a file created in deferred/, and a direct .eml opened,
    written and closed in pickup/; nothing for directories or a file leaving."""
    pickup, new, deferred = tmp_path / "pickup", tmp_path / "pickup" / "new", tmp_path / "deferred"
    for folder in (pickup, new, deferred, pickup / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    seen: list[tuple[str, str]] = []

    async def run() -> None:
        def hint(kind: FileEvent, path: str) -> None:
            seen.append((kind.value, path))

        watcher = Watcher([pickup, new, deferred], hint, native=native)
        watcher.start(asyncio.get_running_loop())
        try:
            # Watching has begun once a probe file's event arrives (watchdog's threads take
            # a moment to start): a positive sign, then the real arrivals.
            probe = f"{deferred}/.probe"
            for _ in range(200):
                Path(probe).write_bytes(b"p")
                if any(p == probe for _, p in seen):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the watcher never reported the probe file")
            os.unlink(probe)
            seen.clear()
            (pickup / "tmp" / "m1").write_bytes(b"x")
            os.rename(pickup / "tmp" / "m1", new / "m1")
            (deferred / "01ARZ3NDEKTSV4RRFFQ69G5FAV.eml").write_bytes(b"x")
            (new / "a-directory").mkdir()
            with (pickup / "direct.eml").open("wb") as handle:
                handle.write(b"x")
            os.rename(new / "m1", tmp_path / "gone")  # leaving: no hint
            wanted = {
                ("created", f"{deferred}/01ARZ3NDEKTSV4RRFFQ69G5FAV.eml"),
                ("closed", f"{pickup}/direct.eml"),
            }
            for _ in range(100):
                if wanted <= set(seen) and any(p == f"{new}/m1" for _, p in seen):
                    break
                await asyncio.sleep(0.05)
        finally:
            watcher.stop()

    asyncio.run(run())
    kinds = {path: [k for k, p in seen if p == path] for _, path in seen}
    assert set(kinds[f"{new}/m1"]) <= {"created", "moved"} and kinds[f"{new}/m1"]
    assert "created" in kinds[f"{deferred}/01ARZ3NDEKTSV4RRFFQ69G5FAV.eml"]
    assert "opened" in kinds[f"{pickup}/direct.eml"] and "closed" in kinds[f"{pickup}/direct.eml"]
    assert f"{new}/a-directory" not in kinds
    assert f"{tmp_path}/gone" not in kinds

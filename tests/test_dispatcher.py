"""The dispatcher in-process, for what the end-to-end tests cannot reach from outside."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from configs import unit_config

from pickupd import log
from pickupd.config.loading import Config, DispatchConfig, SpoolConfig
from pickupd.intake.queues import Intake
from pickupd.intake.watcher import FileEvent
from pickupd.service import Service
from pickupd.spool.folders import Candidate, Spool


def _config(tmp_path: Path) -> Config:
    return unit_config(
        tmp_path / "pickupd.toml",
        host="127.0.0.1",
        port=9,
        spool=SpoolConfig(path=tmp_path / "spool"),
    )


def test_new_mail_is_not_held_back_behind_due_deferred_mail(tmp_path: Path) -> None:
    """With a backlog of deferred mail all due at once, new mail is taken in turn with it
    (one new, one deferred), not after the whole backlog."""

    async def order() -> list[str]:
        spool = Spool(tmp_path / "spool")
        intake = Intake(spool, DispatchConfig(), once=False)
        intake.recover([Candidate(tmp_path / f"d{n}", f"d{n}", "deferred") for n in range(20)])
        for n in range(3):
            intake.hint(FileEvent.CREATED, str(spool.new / f"n{n}"))
        taken: list[str] = []
        for _ in range(8):
            candidate = await intake.next()
            assert candidate is not None
            taken.append(candidate.origin)
        return taken

    taken = asyncio.run(order())
    assert taken[:6].count("new") == 3


def test_a_file_that_cannot_be_moved_is_logged_once_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A candidate whose claim (a rename) fails for a reason other than a lost race is logged
    once as `unmovable` and skipped; the dispatcher goes on."""
    log.configure("info", "json")
    (tmp_path / "plain-file").write_bytes(b"not a directory")

    async def run() -> None:
        service = Service(_config(tmp_path))
        service.spool.ensure()
        # Renaming "plain-file/x" fails with ENOTDIR: not a race, an unmovable entry.
        candidate = Candidate(tmp_path / "plain-file" / "x", "plain-file/x", "new")
        await service.dispatcher.process(candidate, service.config)
        await service.dispatcher.process(candidate, service.config)
        assert service.stats.claimed == 0

    asyncio.run(run())
    out = capsys.readouterr().out
    assert out.count('"unmovable"') == 1 and "plain-file/x" in out

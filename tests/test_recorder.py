"""recorder.py without an event loop: one attempt's result becomes a folder, a sidecar and
a log line, under the config the attempt was made with."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

from configs import unit_config

from pickupd import log
from pickupd.config.loading import Config, RetryConfig
from pickupd.message import envelope
from pickupd.outcome import Delivery, RecipientResult
from pickupd.recorder import Recorder
from pickupd.spool.folders import Candidate, Claimed, Spool
from pickupd.spool.sidecar import to_timestamp

RAW = b"From: app@example.com\nTo: a@example.net, b@example.net\nSubject: s\n\nbody\n"


def _claimed(spool: Spool) -> Claimed:
    spool.ensure()
    (spool.new / "m").write_bytes(RAW)
    claimed = spool.claim(Candidate(spool.new / "m", "new/m", "new"))
    assert claimed is not None
    return claimed


def _recorder(spool: Spool) -> tuple[Recorder, io.StringIO]:
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    return Recorder(spool, log.get()), out


def test_a_deferral_follows_the_schedule_of_the_config_it_is_given(tmp_path: Path) -> None:
    """A 451 for everyone: the message goes to deferred/, due after the first wait of the
    schedule in the config passed in (not any other)."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, out = _recorder(spool)
    parsed = envelope.parse(RAW)
    assert isinstance(parsed, envelope.Envelope)
    config = unit_config(tmp_path / "c.toml", retry=RetryConfig(schedule=(3600.0,)))
    deferred = tuple(RecipientResult(r, 451, "451 later") for r in parsed.recipients)
    before = time.time()
    due = asyncio.run(
        recorder.record(claimed, parsed, Delivery("m", deferred=deferred), RAW, config)
    )
    assert due is not None and 0.9 * 3600 <= due - before <= 1.1 * 3600 + 1
    (sidecar,) = [json.loads(p.read_text()) for p in spool.deferred.glob("*.json")]
    assert abs(to_timestamp(sidecar["next_attempt"]) - due) < 0.01
    assert sidecar["attempts"] == 1 and sidecar["recipients"] == ["a@example.net", "b@example.net"]
    assert list(spool.active.iterdir()) == [] and recorder.stats.deferred == 1
    assert json.loads(out.getvalue().splitlines()[-1])["event"] == "deferred"


def test_a_partial_refusal_splits_a_copy_into_failed(tmp_path: Path) -> None:
    """One recipient refused for good, one deferred: the message waits in deferred/ for the
    deferred one, and a copy for the refused one goes to failed/ naming its origin."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, _ = _recorder(spool)
    parsed = envelope.parse(RAW)
    assert isinstance(parsed, envelope.Envelope)
    delivery = Delivery(
        "m",
        deferred=(RecipientResult("a@example.net", 452, "452 full"),),
        rejected=(RecipientResult("b@example.net", 550, "550 no such user"),),
    )
    asyncio.run(recorder.record(claimed, parsed, delivery, RAW, Config(path=tmp_path / "c.toml")))
    (failed,) = [json.loads(p.read_text()) for p in spool.failed.glob("*.json")]
    (waiting,) = [json.loads(p.read_text()) for p in spool.deferred.glob("*.json")]
    assert failed["split_from"] == claimed.id and failed["recipients"] == ["b@example.net"]
    assert failed["reason"] == "rejected" and waiting["recipients"] == ["a@example.net"]
    assert (spool.failed / f"{failed['id']}.eml").read_bytes() == RAW
    assert (recorder.stats.failed, recorder.stats.deferred) == (1, 1)

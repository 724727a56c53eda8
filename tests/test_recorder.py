"""record/recorder.py without an event loop: one attempt's result becomes a folder, a sidecar and
a log line, under the config the attempt was made with."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from pathlib import Path

from configs import unit_config

from pickupd import log
from pickupd.config.loading import Config, RetryConfig
from pickupd.message import envelope
from pickupd.outcome import Delivery, RecipientResult
from pickupd.record.recorder import Recorder
from pickupd.spool.folders import Candidate, Claimed, Spool
from pickupd.spool.sidecar import Sidecar, to_timestamp

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


def test_an_internal_error_counts_as_an_attempt_and_max_age_ends_it(tmp_path: Path) -> None:
    """A bug during an attempt defers the message by the schedule with attempts counted and
    the error named; once the first such attempt is older than max_age, the next one puts it
    in failed/ as expired, the error in its detail (a poison file is not tried for ever)."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, out = _recorder(spool)
    parsed = envelope.parse(RAW)
    assert isinstance(parsed, envelope.Envelope)
    config = unit_config(tmp_path / "c.toml", retry=RetryConfig(schedule=(60.0,), max_age=3600.0))
    before = time.time()
    due = asyncio.run(recorder.crashed(claimed, parsed, "RecursionError: too deep", config))
    assert due is not None and 0.9 * 60 <= due - before <= 1.1 * 60 + 1
    car = json.loads((spool.deferred / f"{claimed.id}.json").read_text())
    assert car["attempts"] == 1 and car["detail"] == "internal error: RecursionError: too deep"
    assert car["sender"] == "app@example.com" and car["history"][0]["outcome"] == "deferred"
    assert abs(spool.due_time(claimed.id, 0.0) - due) < 0.01  # the sidecar's mtime is its due
    # Its first attempt an hour and more ago: the next internal error ends it.
    first = car_of(spool, claimed.id)
    long_ago = dataclasses.replace(first.history[0], time="2000-01-01T00:00:00.000+00:00")
    candidate = Candidate(spool.deferred / f"{claimed.id}.eml", "x", "deferred", claimed.id)
    again = spool.claim(candidate)
    assert again is not None
    again = dataclasses.replace(again, sidecar=dataclasses.replace(first, history=(long_ago,)))
    assert asyncio.run(recorder.crashed(again, parsed, "RecursionError: too deep", config)) is None
    failed = json.loads((spool.failed / f"{claimed.id}.json").read_text())
    assert failed["reason"] == "expired" and failed["attempts"] == 2
    assert "last: internal error: RecursionError" in failed["detail"]
    assert json.loads(out.getvalue().splitlines()[-1])["event"] == "failed"


def test_a_claim_taken_over_is_said_once_not_stranded(tmp_path: Path) -> None:
    """If our claim left active/ meanwhile (another process took it over), recording it does
    not raise a SpoolWriteError to be retried for ever: claim_lost, once."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, out = _recorder(spool)
    parsed = envelope.parse(RAW)
    assert isinstance(parsed, envelope.Envelope)
    claimed.path.rename(spool.active / f"{claimed.id}.other-host-1")
    deferred = tuple(RecipientResult(r, 451, "451 later") for r in parsed.recipients)
    asyncio.run(
        recorder.record(claimed, parsed, Delivery("m", deferred=deferred), RAW, unit_config())
    )
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events.count("claim_lost") == 1
    assert (spool.active / f"{claimed.id}.other-host-1").exists()


def car_of(spool: Spool, msg_id: str) -> Sidecar:
    loaded = spool.read_sidecar(spool.deferred / f"{msg_id}.json")
    assert loaded is not None
    return loaded

"""record/recorder.py in process, on a real spool in a temporary folder: each kind of result
(sent, refused, deferred, split, waiting, put back, a bug, a refused login, an unknown outcome,
a claim lost, a move the spool refused and its retry) becomes a folder, a sidecar and a log
line, under the config the attempt was made with."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
import time
from pathlib import Path

from configs import unit_config

from pickupd import log
from pickupd.config.loading import Config, RetryConfig, SpoolConfig
from pickupd.errors import SpoolWriteError
from pickupd.message import envelope
from pickupd.outcome import Delivery, Outcome, Reason, RecipientResult, Refusal, SessionFault
from pickupd.record.recorder import Recorder
from pickupd.spool.disk import Disk
from pickupd.spool.folders import Candidate, Claimed, Origin, Spool
from pickupd.spool.sidecar import Sidecar, to_timestamp
from pickupd.spool.stranded import Stranded

RAW = b"From: app@example.com\nTo: a@example.net, b@example.net\nSubject: s\n\nbody\n"


def _claimed(spool: Spool) -> Claimed:
    spool.ensure()
    (spool.new / "m").write_bytes(RAW)
    claimed = spool.claim(Candidate(spool.new / "m", "new/m", Origin.NEW))
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
    candidate = Candidate(spool.deferred / f"{claimed.id}.eml", "x", Origin.DEFERRED, claimed.id)
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


def _parsed() -> envelope.Envelope:
    parsed = envelope.parse(RAW)
    assert isinstance(parsed, envelope.Envelope)
    return parsed


def _events(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_message_every_recipient_took_leaves_no_file_or_an_archive_with_keep_sent(
    tmp_path: Path,
) -> None:
    """Sent: the claim is deleted (nothing to keep), or with keep_sent archived in sent/
    with its sidecar saying so; one `sent` line with the accepted recipients and the code."""
    for keep in (False, True):
        spool = Spool(tmp_path / str(keep))
        claimed = _claimed(spool)
        recorder, out = _recorder(spool)
        parsed = _parsed()
        config = unit_config(tmp_path / "c.toml", spool=SpoolConfig(keep_sent=keep))
        delivery = Delivery("m", sent=parsed.recipients, code=250, text="250 ok")
        assert asyncio.run(recorder.record(claimed, parsed, delivery, RAW, config)) is None
        assert not any(p.name.startswith(claimed.id) for p in spool.active.iterdir())
        archived = sorted(p.name for p in spool.sent.iterdir())
        assert archived == ([f"{claimed.id}.eml", f"{claimed.id}.json"] if keep else [])
        if keep:
            car = json.loads((spool.sent / f"{claimed.id}.json").read_text())
            assert car["history"][-1]["outcome"] == "sent" and car["attempts"] == 1
        (sent,) = [e for e in _events(out) if e["event"] == "sent"]
        assert sent["recipients"] == list(parsed.recipients) and sent["code"] == 250
        assert recorder.stats.sent == 1


def test_a_refusal_before_any_connection_goes_to_failed_with_its_reason(tmp_path: Path) -> None:
    """Refused by policy: failed/ with the reason code and the detail, the report hook told,
    one `failed` line with relay null."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    told: list[tuple[Outcome, Sidecar]] = []
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    recorder = Recorder(spool, log.get(), notify=lambda kind, car: told.append((kind, car)))
    refusal = Refusal(Reason.SENDER_NOT_ALLOWED, "app@example.com matches no [senders] entry")
    asyncio.run(recorder.fail(claimed, _parsed(), refusal))
    car = json.loads((spool.failed / f"{claimed.id}.json").read_text())
    assert car["reason"] == "sender_not_allowed" and car["detail"] == refusal.detail
    assert (spool.failed / f"{claimed.id}.eml").read_bytes() == RAW
    assert [kind for kind, _ in told] == [Outcome.FAILED]
    (failed,) = [e for e in _events(out) if e["event"] == "failed"]
    assert failed["relay"] is None and failed["reason"] == "sender_not_allowed"
    assert recorder.stats.failed == 1


def test_waiting_for_a_limit_and_a_put_back_are_not_attempts(tmp_path: Path) -> None:
    """Over a provider limit, and put back at shutdown: to deferred/, due when given, the
    attempts unchanged, the class kept in the sidecar; `waiting` and `put_back` lines."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, out = _recorder(spool)
    due = time.time() + 120
    asyncio.run(
        recorder.waiting(claimed, _parsed(), due, "waiting in line (bulk): x", mail_class="bulk")
    )
    car = json.loads((spool.deferred / f"{claimed.id}.json").read_text())
    assert car["attempts"] == 0 and car["mail_class"] == "bulk"
    assert abs(spool.due_time(claimed.id, 0.0) - due) < 0.01
    # Taken again, then put back (a stop): still no attempt counted.
    candidate = Candidate(spool.deferred / f"{claimed.id}.eml", "x", Origin.DEFERRED, claimed.id)
    again = spool.claim(candidate)
    assert again is not None
    recorder.put_back(again, due + 60)
    car = json.loads((spool.deferred / f"{claimed.id}.json").read_text())
    assert car["attempts"] == 0 and abs(spool.due_time(claimed.id, 0.0) - (due + 60)) < 0.01
    events = [e["event"] for e in _events(out)]
    assert events == ["waiting", "put_back"], events
    assert recorder.stats.deferred == 0  # neither is an outcome


def test_a_refused_login_is_said_as_such_and_the_message_waits(tmp_path: Path) -> None:
    """The relay refused the login (auth) or no token could be had (token): the operator must
    act, so the log says relay_auth_failed / token_failed at error level; the message is
    deferred by the schedule (the login may be fixed)."""
    faults: list[tuple[SessionFault, str]] = [
        (SessionFault.AUTH, "relay_auth_failed"),
        (SessionFault.TOKEN, "token_failed"),
    ]
    for fault, event in faults:
        spool = Spool(tmp_path / fault.value)
        claimed = _claimed(spool)
        recorder, out = _recorder(spool)
        parsed = _parsed()
        deferred = tuple(RecipientResult(r, 535, "535 5.7.8 bad login") for r in parsed.recipients)
        delivery = Delivery(
            "m", deferred=deferred, code=535, text="535 5.7.8 bad login", session_error=fault
        )
        due = asyncio.run(recorder.record(claimed, parsed, delivery, RAW, unit_config()))
        assert due is not None and (spool.deferred / f"{claimed.id}.eml").exists()
        said = [e for e in _events(out) if e["event"] == event]
        assert len(said) == 1 and said[0]["level"] == "error", _events(out)


def test_a_connection_lost_after_the_final_dot_is_deferred_and_said(tmp_path: Path) -> None:
    """The outcome is unknown (the data went, the reply did not come): `outcome_unknown`
    with the Message-ID (a recipient may see it twice), and the message is deferred."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    recorder, out = _recorder(spool)
    parsed = _parsed()
    deferred = tuple(RecipientResult(r, 0, "connection lost") for r in parsed.recipients)
    delivery = Delivery("m", deferred=deferred, text="connection lost", unknown=True)
    assert asyncio.run(recorder.record(claimed, parsed, delivery, RAW, unit_config())) is not None
    (unknown,) = [e for e in _events(out) if e["event"] == "outcome_unknown"]
    assert unknown["id"] == claimed.id and "message_id" in unknown
    assert (spool.deferred / f"{claimed.id}.eml").exists()


def test_a_stranded_outcome_is_carried_out_later_its_moves_off_the_loop_the_rest_on_it(
    tmp_path: Path,
) -> None:
    """A move the spool refuses (failed/ is in the way) strands the claim; once the spool
    takes it, the retry runs the move where the disk says (a thread, as on NFS) and what
    follows it on the event loop: [notify] is told there, where it can start its hook."""
    spool = Spool(tmp_path)
    claimed = _claimed(spool)
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    told: list[tuple[Outcome, bool]] = []

    def notify(kind: Outcome, car: Sidecar) -> None:
        told.append((kind, threading.current_thread() is threading.main_thread()))

    disk = Disk("threads", tmp_path)
    recorder = Recorder(spool, log.get(), notify=notify, disk=disk)
    stranded = Stranded(log.get())
    refusal = Refusal(Reason.SENDER_NOT_ALLOWED, "app@example.com matches no [senders] entry")

    async def run() -> None:
        spool.failed.rmdir()
        spool.failed.write_text("in the way")  # the rename into failed/ fails: ENOTDIR
        try:
            await recorder.fail(claimed, _parsed(), refusal)
        except SpoolWriteError as error:
            stranded.add(error)
        assert len(stranded) == 1 and told == []
        spool.failed.unlink()
        spool.failed.mkdir()
        retrying = asyncio.create_task(stranded.run(lambda: None))
        stranded.wake()
        async with asyncio.timeout(5):
            while len(stranded):
                await asyncio.sleep(0.01)
        retrying.cancel()

    asyncio.run(run())
    disk.close()
    assert told == [(Outcome.FAILED, True)]
    assert (spool.failed / f"{claimed.id}.eml").read_bytes() == RAW
    events = [e["event"] for e in _events(out)]
    assert events.count("stranded") == 1 and events.count("unstranded") == 1
    assert events.count("failed") == 1

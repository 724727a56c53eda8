"""The dispatcher in process: one attempt's branches (refused, relayed, deferred, a suspended
relay, over a limit, too many recipients for one, a spent quota, a lost race, a clamped due
time, a directory, an unmovable entry), each ending in one folder with its log lines, and
the intake told when a message is due again."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from configs import unit_config
from harness import free_port
from smtpserver import SmtpServer

from pickupd import log
from pickupd.config.loading import Config, DispatchConfig, SpoolConfig
from pickupd.intake.queues import Intake
from pickupd.intake.watcher import FileEvent
from pickupd.service import Service
from pickupd.spool.folders import Candidate, Origin, Spool
from pickupd.units import parse_limits


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
        intake.recover([Candidate(tmp_path / f"d{n}", f"d{n}", Origin.DEFERRED) for n in range(20)])
        for n in range(3):
            intake.hint(FileEvent.CREATED, str(spool.new / f"n{n}"))
        taken: list[str] = []
        for _ in range(8):
            candidate = await intake.next()
            assert candidate is not None
            taken.append(candidate.origin.value)
        return taken

    taken = asyncio.run(order())
    assert taken[:6].count("new") == 3


def test_a_file_that_cannot_be_moved_is_logged_once_and_skipped(tmp_path: Path) -> None:
    """A candidate whose claim (a rename) fails for a reason other than a lost race is logged
    once as `unmovable` and skipped; the dispatcher goes on."""
    stream = io.StringIO()
    log.configure("info", "json", stream=stream)
    (tmp_path / "plain-file").write_bytes(b"not a directory")

    async def run() -> None:
        service = Service(_config(tmp_path))
        service.spool.ensure()
        # Renaming "plain-file/x" fails with ENOTDIR: not a race, an unmovable entry.
        candidate = Candidate(tmp_path / "plain-file" / "x", "plain-file/x", Origin.NEW)
        await service.dispatcher.process(candidate, service.config)
        await service.dispatcher.process(candidate, service.config)
        assert service.stats.claimed == 0

    asyncio.run(run())
    out = stream.getvalue()
    assert out.count('"unmovable"') == 1 and "plain-file/x" in out


# ---- one attempt's branches, in process, against a real SMTP server -----------------------

RAW = b"From: app@example.com\r\nTo: a@example.net\r\nSubject: s\r\n\r\nbody\r\n"


def _service(
    tmp_path: Path, server: SmtpServer | None, **relay: Any
) -> tuple[Service, io.StringIO]:
    """A service whose relay "m" is `server` (or a port nobody listens on), its log kept."""
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    config = _config(tmp_path)
    port = server.port if server is not None else free_port()
    relays = {"m": dataclasses.replace(config.relays["m"], port=port, security="none", **relay)}
    service = Service(dataclasses.replace(config, relays=relays))
    service.spool.ensure()
    return service, out


def _drop(service: Service, name: str, raw: bytes = RAW) -> Candidate:
    (service.spool.new / name).write_bytes(raw)
    return Candidate(service.spool.new / name, f"new/{name}", Origin.NEW)


def _events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _sidecars(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_a_refused_sender_fails_without_a_connection(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    service, _ = _service(tmp_path, smtp_server)
    raw = RAW.replace(b"app@example.com", b"mallory@example.org")
    asyncio.run(service.dispatcher.process(_drop(service, "m1", raw), service.config))
    (car,) = _sidecars(service.spool.failed)
    assert car["reason"] == "sender_not_allowed" and smtp_server.sessions == 0
    assert service.intake.deferred.waiting == 0


def test_a_4xx_defers_and_the_intake_is_told_when_it_is_due(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """The dispatcher's one call back: the deferred message's due time is the intake's to
    watch (no scan needed to find it)."""
    service, _ = _service(tmp_path, smtp_server)
    smtp_server.fail_rcpt["a@example.net"] = "451 4.3.0 later"
    asyncio.run(service.dispatcher.process(_drop(service, "m1"), service.config))
    (car,) = _sidecars(service.spool.deferred)
    assert car["attempts"] == 1 and service.intake.deferred.waiting == 1


def test_a_relayed_message_leaves_nothing_and_tells_the_intake_nothing(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    service, out = _service(tmp_path, smtp_server)
    asyncio.run(service.dispatcher.process(_drop(service, "m1"), service.config))
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["a@example.net"]
    assert not list(service.spool.new.iterdir()) and service.intake.deferred.waiting == 0
    assert [e["event"] for e in _events(out)] == ["claimed", "sent"]


def test_a_suspended_relay_makes_mail_wait_without_an_attempt(tmp_path: Path) -> None:
    """A relay that does not answer is suspended after `suspend_after` failures; the next
    message is not tried (no attempt counted) and waits for the probe, told to the intake."""
    service, out = _service(tmp_path, None, suspend_after=1, probe_interval=60.0)

    async def two() -> None:
        await service.dispatcher.process(_drop(service, "m1"), service.config)
        await service.dispatcher.process(_drop(service, "m2"), service.config)

    asyncio.run(two())
    cars = {car["attempts"] for car in _sidecars(service.spool.deferred)}
    assert cars == {0, 1}  # the first was an attempt, the second only waits
    events = [e["event"] for e in _events(out)]
    assert "relay_suspended" in events and events.count("waiting") == 1
    assert service.intake.deferred.waiting == 2


def test_over_a_limit_the_message_waits_its_turn_without_an_attempt(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    service, out = _service(tmp_path, smtp_server, limits=parse_limits(["1 messages/min"]))

    async def two() -> None:
        await service.dispatcher.process(_drop(service, "m1"), service.config)
        await service.dispatcher.process(_drop(service, "m2"), service.config)
        await service.ledger.close()

    asyncio.run(two())
    assert len(smtp_server.wait_for(1)) == 1
    (car,) = _sidecars(service.spool.deferred)
    assert car["attempts"] == 0 and "1 messages/min" in car["detail"]
    (waiting,) = [e for e in _events(out) if e["event"] == "waiting"]
    assert waiting["mail_class"] == "normal"


def test_a_clamped_due_time_is_said_and_a_directory_is_never_claimed(tmp_path: Path) -> None:
    service, out = _service(tmp_path, None)
    (service.spool.new / "a-directory").mkdir()
    directory = Candidate(service.spool.new / "a-directory", "new/a-directory", Origin.NEW)
    clamped = dataclasses.replace(_drop(service, "m1"), clamped_from=4102444800.0)

    async def run() -> None:
        await service.dispatcher.process(directory, service.config)
        await service.dispatcher.process(directory, service.config)
        await service.dispatcher.process(clamped, service.config)

    asyncio.run(run())
    assert (service.spool.new / "a-directory").is_dir()
    events = [e["event"] for e in _events(out)]
    assert events.count("ignored_file") == 1 and "due_clamped" in events


def test_a_claim_lost_to_another_dispatcher_is_left_without_a_word(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Two lanes with the same candidate: the first claims and relays it; the second finds
    it gone (a lost race, not an error), counts nothing and logs nothing."""
    service, out = _service(tmp_path, smtp_server)
    candidate = _drop(service, "m1")

    async def twice() -> None:
        await service.dispatcher.process(candidate, service.config)
        await service.dispatcher.process(candidate, service.config)

    asyncio.run(twice())
    assert len(smtp_server.wait_for(1)) == 1 and service.stats.claimed == 1
    assert [e["event"] for e in _events(out)] == ["claimed", "sent"]


def test_more_recipients_than_a_limit_allows_a_message_fail_without_a_connection(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Over a relay's "N recipients/message": pickupd never splits a message, so it fails
    at once (too_many_recipients, saying how to send it), with no session opened."""
    limits = parse_limits(["2 recipients/message"])
    service, _ = _service(tmp_path, smtp_server, mailbox_limits=limits)
    raw = RAW.replace(b"To: a@example.net", b"To: a@example.net, b@example.net, c@example.net")
    asyncio.run(service.dispatcher.process(_drop(service, "m1", raw), service.config))
    (car,) = _sidecars(service.spool.failed)
    assert car["reason"] == "too_many_recipients" and "at most 2 recipients" in car["detail"]
    assert smtp_server.sessions == 0 and service.intake.deferred.waiting == 0


def test_a_spent_quota_reply_pauses_the_mailbox_and_the_next_message_waits(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """A provider's "spent" reply (Microsoft 365's 5.2.2 SubmissionQuotaExceeded) is not a
    rejection: the message waits a day (deferred, an attempt), the mailbox is paused in the
    ledger, and the next message for it waits for the pause without a connection."""
    service, out = _service(tmp_path, smtp_server)
    smtp_server.fail_rcpt["a@example.net"] = (
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    )

    async def two() -> None:
        await service.dispatcher.process(_drop(service, "m1"), service.config)
        smtp_server.fail_rcpt.clear()
        await service.dispatcher.process(_drop(service, "m2"), service.config)
        await service.ledger.close()

    asyncio.run(two())
    assert smtp_server.sessions == 1 and not list(service.spool.failed.iterdir())
    attempts = sorted(car["attempts"] for car in _sidecars(service.spool.deferred))
    assert attempts == [0, 1]  # the refused one was an attempt; the next only waits
    events = [e["event"] for e in _events(out)]
    assert events.count("quota_spent") == 1 and events.count("waiting") == 1
    assert service.intake.deferred.waiting == 2

"""Recording: the one place that turns a `Delivery` or a `Refusal` into a folder, a sidecar,
a log line and a metric. The moves run where the spool's disk says (spool/disk.py: in a
thread on a network file system), what follows them on the loop; `put_back` runs here and
now, as it is called where nothing can be awaited (a lane cancelled at shutdown).

Each call is given the config the attempt was made under, so a reload in the middle of a send
does not apply the new retry schedule to an attempt made with the old one.

Each outcome is a list of steps, a move in the spool and what follows it (log line, counts,
hooks), carried out by steps.py (which resumes them after a full disk).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

from pickupd import ids
from pickupd.auth.owners import user_name
from pickupd.config.loading import Config
from pickupd.log import Logger
from pickupd.message.envelope import Envelope
from pickupd.outcome import (
    Delivery,
    Outcome,
    Reason,
    RecipientResult,
    Refusal,
    SessionFault,
    Stats,
)
from pickupd.record import retry
from pickupd.record.steps import Step, Steps
from pickupd.spool.disk import Disk
from pickupd.spool.folders import Claimed, Spool
from pickupd.spool.sidecar import Attempt, KeptTurn, Sidecar, from_timestamp

__all__ = ["Meter", "Recorder"]

# The session faults the operator must act on, and the event that says so: a login refused,
# or no token to log in with.
_OPERATOR_MUST_ACT = {SessionFault.AUTH: "relay_auth_failed", SessionFault.TOKEN: "token_failed"}

# A move in the spool, then what follows it once it is done.


class Meter(Protocol):
    """What the recorder and the dispatcher tell the metrics: metrics.Metrics, or in a worker
    process uplink.Forwarder, which passes it on to the main process."""

    def outcome(self, outcome: str, reason: str | None, relay: str | None) -> None: ...
    def send_seconds(self, relay: str, seconds: float) -> None: ...
    def stranded(self, count: int) -> None: ...
    def connection_error(self, relay: str, kind: str) -> None: ...
    def suspended(self, relay: str, on: bool) -> None: ...
    def room(self, limit: str, room: int, size: int = 0) -> None: ...
    def store_up(self, up: bool) -> None: ...
    def paused(self, scope: str, until: float, kind: str) -> None: ...
    def waiting(self, worker: int, urgent: int, normal: int, bulk: int) -> None: ...
    def graph_reply(self, relay: str, status: int) -> None: ...


class Recorder:
    """Moves finished attempts to their folder and says so in the log and the metrics."""

    def __init__(
        self,
        spool: Spool,
        log: Logger,
        metrics: Meter | None = None,
        deferring: Callable[[str], None] = lambda msg_id: None,
        notify: Callable[[Outcome, Sidecar], None] = lambda event, sidecar: None,
        disk: Disk | None = None,
    ) -> None:
        """`disk`: where the moves run (spool/disk.py; None: here, at once)."""
        self.spool = spool
        self.disk = disk
        self.log = log  # swapped on reload (a new level or format)
        self.steps = Steps(disk, lambda: self.log)
        self.metrics = metrics
        self.stats = Stats()
        # Called with a message's id just before we move it into deferred/ ourselves.
        self._deferring = deferring
        # Called once a message is in failed/ ("failed"), or has been deferred for longer
        # than [notify] on_deferred_after ("deferred"): notify.py's hooks and reports.
        self._notify = notify

    # -- refused before any connection ---------------------------------------------------------

    async def fail(self, claimed: Claimed, parsed: Envelope | None, refusal: Refusal) -> None:
        """A message refused before any connection: to failed/ with the reason."""
        base = self.base(claimed, parsed)
        sidecar = base.with_attempt(
            Attempt(from_timestamp(time.time()), None, Outcome.FAILED.value, None, refusal.detail),
            attempts=base.attempts + 1,
            reason=refusal.reason.value,
            detail=refusal.detail,
            next_attempt=None,
        )
        fields: dict[str, Any] = {"id": claimed.id, "sender": base.sender, "relay": None}
        fields |= {"code": None, "recipients": list(base.recipients), "attempt": sidecar.attempts}
        told = functools.partial(self._failed, sidecar, refusal.reason, None, fields)
        await self.steps.run(claimed, [(lambda: self.spool.finish_failed(claimed, sidecar), told)])

    # -- not an attempt --------------------------------------------------------------------------

    def put_back(
        self,
        claimed: Claimed,
        due: float,
        sidecar: Sidecar | None = None,
        event: str = "put_back",
    ) -> None:
        """Move a claimed message to deferred/ without counting an attempt, here and now
        (at shutdown, and after an internal error)."""
        self.steps.run_now(claimed, self._back(claimed, due, sidecar, event))

    async def crashed(
        self, claimed: Claimed, parsed: Envelope | None, detail: str, config: Config
    ) -> float | None:
        """A bug ended the attempt: it counts as one, so the retry schedule spaces the next
        and `[retry] max_age` ends it in failed/ as expired, the error named (a file that
        always trips the bug is not tried for ever). Returns the due time (None: failed)."""
        base = self.base(claimed, parsed)
        attempt = base.attempts + 1
        fields = {"id": claimed.id, "sender": base.sender, "relay": None, "attempt": attempt}
        text = f"internal error: {detail}"[:400]
        retried = retry.Retried(attempt, base.recipients, None, None, text)
        due, step = self._defer(claimed, base, retried, fields, config, None)
        await self.steps.run(claimed, [step])
        return due

    async def waiting(
        self,
        claimed: Claimed,
        parsed: Envelope,
        due: float,
        detail: str,
        kept: KeptTurn | None = None,
        mail_class: str | None = None,
    ) -> None:
        """Over a provider limit: not an attempt, not an error; it waits for its turn (`kept`,
        in the sidecar for whichever process takes it then), as a message of `mail_class`."""
        base = self.base(claimed, parsed)
        waiting = dataclasses.replace(base, detail=detail, turn=kept, mail_class=mail_class)
        await self.steps.run(claimed, self._back(claimed, due, waiting, "waiting"))

    def _back(
        self, claimed: Claimed, due: float, sidecar: Sidecar | None, event: str
    ) -> list[Step]:
        sidecar = sidecar or claimed.sidecar or _new_sidecar(claimed, None, ())
        sidecar = dataclasses.replace(sidecar, next_attempt=from_timestamp(due))

        def done() -> None:
            fields = {"next_attempt": sidecar.next_attempt, "detail": sidecar.detail}
            if sidecar.mail_class is not None:
                fields["mail_class"] = sidecar.mail_class
            self.log.info(event, id=claimed.id, **fields)

        return [(lambda: self._to_deferred(claimed, sidecar, due), done)]

    # -- one SMTP attempt ------------------------------------------------------------------------

    async def record(
        self,
        claimed: Claimed,
        parsed: Envelope,
        delivery: Delivery,
        data: bytes,
        config: Config,
        not_before: float | None = None,
    ) -> float | None:
        """Turn one SMTP attempt into folders and log lines; return the time the message (or
        what is left of it) is due again, if it was deferred (not before `not_before`: a
        provider paused its scope)."""
        base = self.base(claimed, parsed)
        attempt = base.attempts + 1
        fields: dict[str, Any] = {
            "id": claimed.id,
            "sender": parsed.sender,
            "relay": delivery.relay,
            "attempt": attempt,
        }
        self._said(delivery, parsed, fields)
        if not delivery.deferred and not delivery.rejected:
            archive = _archived(base, delivery, attempt) if config.spool.keep_sent else None
            await self.steps.run(claimed, [(lambda: self._sent(claimed, archive), lambda: None)])
            return None

        steps: list[Step] = []
        if delivery.rejected:
            steps.append(self._reject(claimed, base, delivery, data, attempt, fields))
        due = None
        if delivery.deferred:
            retried = retry.Retried(
                attempt,
                tuple(r.recipient for r in delivery.deferred),
                delivery.relay,
                delivery.deferred[0].code or None,
                _detail(delivery.deferred, delivery.sent),
            )
            due, step = self._defer(claimed, base, retried, fields, config, not_before)
            steps.append(step)
        await self.steps.run(claimed, steps)
        return due

    def _said(self, delivery: Delivery, parsed: Envelope, fields: dict[str, Any]) -> None:
        """What the attempt says before its moves: a login the operator must fix, an outcome
        unknown, the recipients sent to."""
        event = _OPERATOR_MUST_ACT.get(delivery.session_error)  # type: ignore[arg-type]
        if event is not None:
            self.log.error(event, relay=delivery.relay, code=delivery.code, detail=delivery.text)
        if delivery.unknown:
            self.log.warning(
                "outcome_unknown", message_id=parsed.message_id, **fields, detail=delivery.text
            )
        if delivery.sent:
            self._counted(Outcome.SENT, None, delivery.relay)
            self.log.info("sent", **fields, recipients=list(delivery.sent), code=delivery.code)

    def _sent(self, claimed: Claimed, archive: Sidecar | None) -> None:
        """Delivered: delete it (no new space needed), or archive it to sent/. An archive
        that cannot be written does not keep a sent message around to be sent again."""
        try:
            self.spool.finish_sent(claimed, archive)
        except OSError as exc:
            self.log.error("archive_failed", id=claimed.id, error=exc.strerror or str(exc))
            self.spool.finish_sent(claimed, None)

    def _reject(
        self,
        claimed: Claimed,
        base: Sidecar,
        delivery: Delivery,
        data: bytes,
        attempt: int,
        fields: dict[str, Any],
    ) -> Step:
        """Recipients refused for good: the message to failed/, or a copy of it there when
        other recipients are still to be tried."""
        failed = _rejected(base, claimed, delivery, attempt)
        code = delivery.rejected[0].code or None
        fields = {**fields, "id": failed.id, "recipients": list(failed.recipients), "code": code}

        def move() -> None:
            if delivery.deferred:
                self.spool.write_failed_copy(data, failed)
            else:
                self.spool.finish_failed(claimed, failed)

        reason = Reason.TOO_LARGE if delivery.too_large else Reason.REJECTED
        return move, functools.partial(self._failed, failed, reason, delivery.relay, fields)

    def _defer(
        self,
        claimed: Claimed,
        base: Sidecar,
        retried: retry.Retried,
        fields: dict[str, Any],
        config: Config,
        not_before: float | None,
    ) -> tuple[float | None, Step]:
        """Recipients to try again: to deferred/ with the next attempt's time, or to failed/
        as expired once max_age is reached; returns the due time (None: expired)."""
        due, sidecar, long_deferred = retry.after(base, retried, config, not_before, time.time())
        fields = {**fields, "recipients": list(retried.recipients), "code": retried.code}
        if due is None:
            told = functools.partial(self._failed, sidecar, Reason.EXPIRED, retried.relay, fields)
            return None, (lambda: self.spool.finish_failed(claimed, sidecar), told)

        def deferred() -> None:
            if long_deferred:
                self._notify(Outcome.DEFERRED, sidecar)
            self._counted(Outcome.DEFERRED, None, retried.relay)
            self.log.warning(
                "deferred", **fields, detail=retried.detail, next_attempt=sidecar.next_attempt
            )

        at = due
        return due, (lambda: self._to_deferred(claimed, sidecar, at), deferred)

    # -- helpers ---------------------------------------------------------------------------------

    def _to_deferred(self, claimed: Claimed, sidecar: Sidecar, due: float) -> None:
        self._deferring(claimed.id)
        self.spool.finish_deferred(claimed, sidecar, due)

    def _failed(
        self, sidecar: Sidecar, reason: Reason, relay: str | None, fields: dict[str, Any]
    ) -> None:
        """A message (or a copy of it) is in failed/: counted, told to [notify], logged."""
        self._counted(Outcome.FAILED, reason, relay)
        self._notify(Outcome.FAILED, sidecar)
        self.log.warning("failed", **fields, reason=reason.value, detail=sidecar.detail)

    def _counted(self, outcome: Outcome, reason: Reason | None, relay: str | None) -> None:
        if outcome is Outcome.SENT:
            self.stats.sent += 1
        elif outcome is Outcome.DEFERRED:
            self.stats.deferred += 1
        else:
            self.stats.failed += 1
        if self.metrics is not None:
            self.metrics.outcome(outcome.value, reason.value if reason else None, relay)

    @staticmethod
    def base(claimed: Claimed, parsed: Envelope | None) -> Sidecar:
        """The sidecar this attempt starts from: a kept turn is this attempt's (it is used,
        or given again by waiting())."""
        if claimed.sidecar is None:
            return _new_sidecar(claimed, parsed, parsed.recipients if parsed else ())
        return dataclasses.replace(claimed.sidecar, turn=None)


def _archived(base: Sidecar, delivery: Delivery, attempt: int) -> Sidecar:
    """The sidecar sent/ keeps beside a relayed message (`[spool] keep_sent`)."""
    said = Attempt(
        from_timestamp(time.time()),
        delivery.relay,
        Outcome.SENT.value,
        delivery.code,
        delivery.text,
    )
    return base.with_attempt(said, attempts=attempt, next_attempt=None)


def _rejected(base: Sidecar, claimed: Claimed, delivery: Delivery, attempt: int) -> Sidecar:
    """The sidecar failed/ keeps for the recipients refused for good: the message's own, or,
    when other recipients are still to be tried, a copy's under a new id."""
    reason = Reason.TOO_LARGE if delivery.too_large else Reason.REJECTED
    code = delivery.rejected[0].code or None
    detail = _detail(delivery.rejected, delivery.sent)
    failed = base.with_attempt(
        Attempt(from_timestamp(time.time()), delivery.relay, Outcome.FAILED.value, code, detail),
        recipients=tuple(r.recipient for r in delivery.rejected),
        attempts=attempt,
        reason=reason.value,
        detail=detail,
        next_attempt=None,
    )
    if delivery.deferred:
        failed = dataclasses.replace(failed, id=ids.new(), split_from=claimed.id)
    return failed


def _new_sidecar(claimed: Claimed, parsed: Envelope | None, recipients: tuple[str, ...]) -> Sidecar:
    return Sidecar(
        id=claimed.id,
        source=claimed.source,
        sender=parsed.sender if parsed else None,
        recipients=recipients,
        attempts=0,
        first_seen=from_timestamp(claimed.claimed_at),
        message_id=parsed.message_id if parsed else None,
        added=parsed.added if parsed else (),
        owner_uid=claimed.owner,
        owner=None if claimed.owner is None else user_name(claimed.owner),
    )


def _detail(results: tuple[RecipientResult, ...], sent: tuple[str, ...]) -> str:
    texts = sorted({r.text for r in results})
    detail = "; ".join(texts)
    if sent:
        detail += f" (sent to {len(sent)} other recipient{'s' if len(sent) > 1 else ''})"
    return detail

"""Failure feedback to the apps (`[notify]`): an app that hands mail to a folder loses the
immediate error, so pickupd tells it another way.

- `on_failed`: a command run for each message that lands in failed/ (and, with
  `on_deferred_after`, once for a message still deferred that long), with the sidecar JSON on
  stdin and PICKUPD_ID, PICKUPD_REASON, PICKUPD_EVENT in its environment. No shell, a
  timeout, at most HOOKS_AT_ONCE at a time; its failure is logged and never holds up delivery.
  It runs at most once per event: a hook that fails is not run again.
- `report_to`: one plain-text mail listing the failed messages, at most every
  `report_interval`, dropped into the pickup folder from `report_from` (so it is relayed like
  any mail, through the allow-list). It never goes to the original senders (no backscatter),
  and the failure of a report is never reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from pickupd import ids
from pickupd.auth.childenv import child_env
from pickupd.config.loading import NotifyConfig
from pickupd.log import Logger
from pickupd.outcome import Outcome
from pickupd.spool.folders import Spool
from pickupd.spool.sidecar import Sidecar

__all__ = ["HOOKS_AT_ONCE", "Feedback"]

HOOKS_AT_ONCE = 4
# Hooks waiting for a turn beyond this are dropped (and logged): feedback never grows memory
# without bound while a hook is slow.
_MOST_WAITING = 1000
# A report lists at most this many messages; the rest are counted.
_REPORT_LINES = 1000
# The first failure after a quiet spell is reported this soon (or after report_interval,
# if shorter), so a burst of failures goes out as one report.
_BATCH_DELAY = 60.0
_REPORT_ID = "pickupd-report."


class Feedback:
    """Runs hooks and batches reports for one dispatcher; `config` is swapped on reload."""

    def __init__(self, config: NotifyConfig, spool: Spool, log: Logger) -> None:
        self.config = config
        self.spool = spool
        self.log = log
        self._slots = asyncio.Semaphore(HOOKS_AT_ONCE)
        self._hooks: set[asyncio.Task[None]] = set()
        self._failures: list[Sidecar] = []
        self._report: asyncio.TimerHandle | None = None
        self._last_report = 0.0

    # -- from the recorder (on the loop, never blocking) ---------------------------------------

    def notify(self, event: Outcome, sidecar: Sidecar) -> None:
        """A message landed in failed/ (`event` FAILED) or has been deferred longer than
        on_deferred_after (DEFERRED)."""
        if self.config.on_failed is not None:
            if len(self._hooks) >= _MOST_WAITING:
                self.log.error("hook_dropped", id=sidecar.id, reason="too many hooks waiting")
            else:
                task = asyncio.get_running_loop().create_task(self._run_hook(event, sidecar))
                self._hooks.add(task)
                task.add_done_callback(self._hooks.discard)
        if (
            event is Outcome.FAILED
            and self.config.report_to is not None
            and not _is_report(sidecar)
        ):
            self._failures.append(sidecar)
            self._schedule_report()

    # -- hooks -----------------------------------------------------------------------------------

    async def _run_hook(self, event: Outcome, sidecar: Sidecar) -> None:
        command = self.config.on_failed
        timeout = self.config.hook_timeout
        if command is None:
            return
        async with self._slots:
            # None of the service's secrets: the hook is a command of the operator's, but
            # it needs no sender's password (auth/childenv.py).
            env = child_env(
                PICKUPD_ID=sidecar.id,
                PICKUPD_REASON=sidecar.reason or "",
                PICKUPD_EVENT=event.value,
            )
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
            except OSError as exc:
                self.log.error("hook_failed", id=sidecar.id, command=command[0], error=str(exc))
                return
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(sidecar.to_json()), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                self.log.error("hook_timeout", id=sidecar.id, command=command[0], seconds=timeout)
                return
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            said = stderr.decode("utf-8", "replace").strip()
            if proc.returncode:
                self.log.error(
                    "hook_failed",
                    id=sidecar.id,
                    command=command[0],
                    status=proc.returncode,
                    stderr=said[:500],
                )
            else:
                self.log.info("hook_ran", id=sidecar.id, kind=event, command=command[0])

    # -- reports ---------------------------------------------------------------------------------

    def _schedule_report(self) -> None:
        if self._report is not None:
            return
        now = time.time()
        interval = self.config.report_interval
        at = max(now + min(_BATCH_DELAY, interval), self._last_report + interval)
        self._report = asyncio.get_running_loop().call_later(at - now, self.send_report)

    def send_report(self) -> None:
        """Drop the report of the failures batched so far (none: nothing is sent)."""
        self._report = None
        failures, self._failures = self._failures, []
        config = self.config
        if not failures or config.report_to is None or config.report_from is None:
            return
        self._last_report = time.time()
        data = _report(failures, config.report_from, config.report_to)
        try:
            self.spool.drop(data)
        except OSError as exc:
            self.log.error("report_failed", messages=len(failures), error=str(exc))
            return
        self.log.info("report_queued", to=config.report_to, messages=len(failures))

    async def close(self, timeout: float) -> None:
        """At shutdown: queue the pending report now, give running hooks `timeout`."""
        if self._report is not None:
            self._report.cancel()
        self.send_report()
        if self._hooks:
            await asyncio.wait(list(self._hooks), timeout=timeout)
        for task in list(self._hooks):
            task.cancel()


def _is_report(sidecar: Sidecar) -> bool:
    """One of our own reports: its Message-ID says so, and (where files have owners) the
    file was written by this service's user, which no writer can forge (any writer can write
    the Message-ID, to keep a failure out of the report)."""
    if not (sidecar.message_id or "").startswith(f"<{_REPORT_ID}"):
        return False
    return os.name != "posix" or sidecar.owner_uid == os.geteuid()


def _report(failures: list[Sidecar], sender: str, recipient: str) -> bytes:
    """The report mail, with its envelope as X-Sender/X-Receiver (the pickup format)."""
    host = socket.gethostname()
    count = len(failures)
    lines = [
        f"pickupd on {host}: {count} message{'s' if count != 1 else ''} failed for good.",
        "Each is in failed/ with its reason; `pickupd show ID` shows one, `pickupd retry ID`"
        " sends it again once the cause is fixed.",
        "",
    ]
    for sidecar in failures[:_REPORT_LINES]:
        recipients = ", ".join(sidecar.recipients) or "-"
        lines.append(
            f"{sidecar.id}  {sidecar.reason or '-'}  {sidecar.sender or '-'} -> {recipients}"
        )
        lines.append(f"    {sidecar.detail}"[:400])
    if count > _REPORT_LINES:
        lines.append(f"... and {count - _REPORT_LINES} more (pickupd queue lists them all)")
    import email.utils  # only when a report is written

    domain = sender.rpartition("@")[2]
    head = [
        f"X-Sender: <{sender}>",
        f"X-Receiver: <{recipient}>",
        f"From: pickupd <{sender}>",
        f"To: <{recipient}>",
        f"Subject: pickupd: {count} failed message{'s' if count != 1 else ''} on {host}",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <{_REPORT_ID}{ids.new()}@{domain}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode("utf-8")

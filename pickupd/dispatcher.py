"""The asyncio core: watcher hints, rescans, the due-deferred scheduler, workers and the drain.

One message flows through one call per step:
    spool.claim -> envelope.parse -> policy.check -> relay.send -> spool.finish_*
and this module is the one place that turns results into folders and log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import envelope, ids, policy, relay, retry
from . import log as logs
from .config import Config, Credentials, RelayConfig, SenderRule, load
from .errors import ConfigError
from .notify import Notifier
from .outcome import Delivery, Reason, RecipientResult, Refusal
from .pool import Pool
from .ratelimit import Limiter, is_throttling
from .sidecar import Attempt, Sidecar, from_timestamp, to_timestamp
from .spool import Candidate, Claimed, Spool, Unsafe, printable
from .units import Rate, format_duration
from .watcher import Watcher

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["GRACE", "Dispatcher", "Stats"]

# On SIGTERM, in-flight sends get this long to finish before they are put back.
GRACE = 30.0
# How many candidates wait in memory per queue: the backlog stays on disk, not in RAM.
_QUEUE_PER_WORKER = 4
# Messages larger than this are relayed LARGE_AT_ONCE at a time, to bound memory.
LARGE_MESSAGE = 1024 * 1024
LARGE_AT_ONCE = 2
# A direct .eml still open by its writer after this long is taken anyway (missed event).
WRITER_PATIENCE = 300.0
# After an operator's change in deferred/ (retry, flush, release), look again this soon: a
# burst of renames gives one rescan, and the message still goes out well within a second.
DEFERRED_DEBOUNCE = 0.1
# How often the status line for systemd is renewed.
STATUS_EVERY = 5.0
# Config keys a reload cannot change in a running process (they need a restart).
_FIXED_ON_RELOAD = ("spool.path", "dispatch.concurrency", "metrics.listen")


@dataclasses.dataclass(slots=True)
class Stats:
    """Counts of outcomes in this run (for `--once` summaries and the demo)."""

    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0


class Dispatcher:
    """Takes messages from the spool and relays them until stopped (or, `once`, until idle)."""

    def __init__(self, config: Config, *, once: bool = False) -> None:
        self.config = config
        self.once = once
        self.spool = Spool(config.spool.path)
        self.pool = Pool()
        self.limiter = Limiter()
        self.notifier = None if once else Notifier.from_env()
        self.metrics: Metrics | None = None
        if config.metrics.listen and not once:
            # Imported only when enabled: prometheus-client costs ~3 MiB of memory.
            from .metrics import Metrics

            self.metrics = Metrics(self.spool)
        self.stats = Stats()
        self.log = logs.get()
        self._new: deque[Candidate] = deque()
        self._due: deque[Candidate] = deque()
        self._queued: set[Path] = set()
        self._writers: dict[Path, tuple[int, float]] = {}  # open .eml -> (opens, since)
        self._unmovable: set[Path] = set()  # logged once, skipped since
        self._own_deferrals: set[str] = set()  # ids we are moving into deferred/ ourselves
        self._deferred_rescan: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._large = asyncio.Semaphore(LARGE_AT_ONCE)
        self._prefer_new = True
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._pickup_wake = asyncio.Event()
        self._deferred_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False
        self._feeders_done = 0
        self._busy = 0
        self._next_due = float("inf")

    # -- public -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new messages; in-flight sends get GRACE seconds. Safe to call twice."""
        self._stop.set()

    def reload(self) -> None:
        """Read the config file again (SIGHUP). A valid one is used from the next attempt on,
        in-flight sends go on with the old one; an invalid one is logged and ignored."""
        if self.notifier:
            self.notifier.reloading()
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            self.log.error("reload_failed", config=str(self.config.path), problems=exc.problems)
            if self.notifier:
                self.notifier.ready(self.status_line())
            return
        old = self.config
        fixed = {
            "spool.path": (old.spool.path, new.spool.path),
            "dispatch.concurrency": (old.dispatch.concurrency, new.dispatch.concurrency),
            "metrics.listen": (old.metrics.listen, new.metrics.listen),
        }
        unchanged = [key for key in _FIXED_ON_RELOAD if fixed[key][0] != fixed[key][1]]
        new = dataclasses.replace(
            new,
            spool=dataclasses.replace(new.spool, path=old.spool.path),
            dispatch=dataclasses.replace(new.dispatch, concurrency=old.dispatch.concurrency),
            metrics=old.metrics,
        )
        self.config = new
        logs.configure(new.log.level, new.log.format)
        self.log = logs.get()
        if unchanged:
            self.log.warning("reload_needs_restart", keys=unchanged)
        self.log.info(
            "reloaded",
            config=str(new.path),
            relays=sorted(new.relays),
            senders=len(new.senders),
        )
        self._pickup_wake.set()
        self._deferred_wake.set()
        if self.notifier:
            self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """One line for `systemctl status`: this run's outcomes and what the spool holds."""
        spool = self.spool
        waiting = spool.count(spool.new, "") + spool.count(spool.pickup)
        return (
            f"sent {self.stats.sent}, deferred {self.stats.deferred}, failed"
            f" {self.stats.failed} since start; queue: pickup {waiting}, deferred"
            f" {spool.count(spool.deferred)}, hold {spool.count(spool.hold)}, failed"
            f" {spool.count(spool.failed)}"
        )

    def flush(self) -> None:
        """Make every deferred message due now (SIGUSR1, as `pickupd flush`)."""
        if self._stopping:
            return

        async def flush() -> None:
            count = await asyncio.to_thread(self.spool.make_due, time.time())
            self.log.info("flushed", messages=count)
            self._deferred_wake.set()

        task = asyncio.get_running_loop().create_task(flush())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_ready(self) -> None:
        """Return once the dispatcher is watching the pickup folder."""
        await self._ready.wait()

    async def run(self) -> Stats:
        """Recover, take what is waiting, then react to new files until `stop()`."""
        started = time.monotonic()
        self.spool.ensure()
        self.spool.lock()
        watcher = None
        try:
            if self.metrics is not None and self.config.metrics.listen:
                self.metrics.start(self.config.metrics.listen)
            removed = self.spool.clean_tmp(time.time())
            if removed:
                self.log.info("tmp_cleaned", removed=removed)
            for candidate in self.spool.stale_claims():
                self.log.info("recovered", id=candidate.id)
                self._queued.add(candidate.path)
                self._due.append(candidate)
            if not self.once:
                watcher = Watcher(
                    [self.spool.pickup, self.spool.new, self.spool.deferred], self._hint
                )
                watcher.start(asyncio.get_running_loop())
            async with asyncio.TaskGroup() as group:
                workers = [
                    group.create_task(self._worker())
                    for _ in range(self.config.dispatch.concurrency)
                ]
                helpers = [
                    group.create_task(self._feed_pickup()),
                    group.create_task(self._feed_deferred()),
                    group.create_task(self._reap_sessions()),
                ]
                if self.notifier:
                    helpers.append(group.create_task(self._heartbeat(self.notifier)))
                group.create_task(self._supervise(workers, helpers))
                self._ready.set()
                self.log.info(
                    "ready",
                    spool=str(self.spool.root),
                    once=self.once,
                    concurrency=self.config.dispatch.concurrency,
                    relays=sorted(self.config.relays),
                )
        finally:
            if watcher is not None:
                watcher.stop()
            await self.pool.close_all()
            self.spool.unlock()
            if self.notifier:
                self.notifier.close()
            if self.metrics is not None:
                self.metrics.stop()
        self.log.info(
            "stopped",
            seconds=round(time.monotonic() - started, 3),
            **dataclasses.asdict(self.stats),
        )
        return self.stats

    # -- feeding ---------------------------------------------------------------------------------

    def _hint(self, event_type: str, path: str) -> None:
        """A watchdog event (on the loop): enqueue a Maildir file at once, or rescan later."""
        if self._stopping:
            return
        candidate_path = Path(path)
        if candidate_path.parent == self.spool.deferred:
            self._deferred_hint(event_type, candidate_path.name)
        elif candidate_path.parent == self.spool.new:
            if event_type not in ("created", "moved") or candidate_path.name.startswith("."):
                return
            if len(self._new) >= self._capacity():
                self._pickup_wake.set()  # the feeder rescans once it has room
            elif candidate_path not in self._queued:
                self._enqueue(
                    self._new, Candidate(candidate_path, f"new/{candidate_path.name}", "new")
                )
        elif candidate_path.suffix.lower() == ".eml" and candidate_path.parent == self.spool.pickup:
            # A direct .eml is taken once its writer has closed it (inotify tells us on Linux)
            # and it has been unchanged for `settle`: look again after that.
            if event_type == "opened":
                count, since = self._writers.get(candidate_path, (0, time.monotonic()))
                self._writers[candidate_path] = (count + 1, since)
                return
            if event_type in ("closed", "closed_no_write"):
                count, since = self._writers.pop(candidate_path, (1, 0.0))
                if count > 1:
                    self._writers[candidate_path] = (count - 1, since)
            asyncio.get_running_loop().call_later(
                self.config.dispatch.settle + 0.01, self._pickup_wake.set
            )

    def _deferred_hint(self, event_type: str, name: str) -> None:
        """Something arrived in deferred/: `pickupd retry`, `release` and `flush` (and we
        ourselves, which is no news). Rescan shortly, once per burst."""
        if event_type not in ("created", "moved") or name.startswith("."):
            return
        msg_id, _, suffix = name.partition(".")
        if msg_id in self._own_deferrals:
            if suffix == "eml":  # our sidecar came first; the .eml is the last of our two
                self._own_deferrals.discard(msg_id)
            return
        if self._deferred_rescan is None:

            def rescan() -> None:
                self._deferred_rescan = None
                self._deferred_wake.set()

            loop = asyncio.get_running_loop()
            self._deferred_rescan = loop.call_later(DEFERRED_DEBOUNCE, rescan)

    def _still_open(self, path: Path) -> bool:
        """True while a writer holds a direct .eml open (bounded: a missed close event must not
        hold a message back for more than WRITER_PATIENCE)."""
        count, since = self._writers.get(path, (0, 0.0))
        if count and time.monotonic() - since > WRITER_PATIENCE:
            del self._writers[path]
            return False
        return count > 0

    def _capacity(self) -> int:
        return self.config.dispatch.concurrency * _QUEUE_PER_WORKER

    def _enqueue(self, queue: deque[Candidate], candidate: Candidate) -> None:
        self._queued.add(candidate.path)
        queue.append(candidate)
        self._has_work.set()

    async def _put(self, queue: deque[Candidate], candidate: Candidate) -> bool:
        """Enqueue, waiting for room; False if stopping."""
        while len(queue) >= self._capacity():
            self._has_room.clear()
            await self._has_room.wait()
        if self._stopping:
            return False
        if candidate.path not in self._queued:
            self._enqueue(queue, candidate)
        return True

    async def _feed_pickup(self) -> None:
        """Scan pickup/ on start, on hints that did not fit the queue, and every rescan_interval."""
        try:
            while not self._stopping:
                self._pickup_wake.clear()
                now = time.time()
                wake_at = now + self.config.dispatch.rescan_interval
                for item in self.spool.scan_pickup(now, self.config.dispatch.settle):
                    if isinstance(item, float):
                        wake_at = min(wake_at, item + 0.01)
                    elif item.origin == "eml" and self._still_open(item.path):
                        continue  # its close event wakes us
                    elif item.path in self._unmovable:
                        continue
                    elif item.path not in self._queued and not await self._put(self._new, item):
                        return
                if self.once:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._pickup_wake.wait(), max(0.0, wake_at - time.time())
                    )
        finally:
            self._feeder_done()

    async def _feed_deferred(self) -> None:
        """Take deferred messages as they come due (their file's mtime is the due time)."""
        try:
            while not self._stopping:
                self._deferred_wake.clear()
                now = time.time()
                self._next_due = now + self.config.dispatch.rescan_interval
                for item in self.spool.scan_deferred(now):
                    if isinstance(item, float):
                        self._next_due = min(self._next_due, item)
                    elif item.path not in self._queued and not await self._put(self._due, item):
                        return
                if self.once:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._deferred_wake.wait(), max(0.0, self._next_due - time.time())
                    )
        finally:
            self._feeder_done()

    def _feeder_done(self) -> None:
        self._feeders_done += 1
        self._has_work.set()

    def _deferred_until(self, due: float) -> None:
        if due < self._next_due:
            self._next_due = due
            self._deferred_wake.set()

    async def _heartbeat(self, notifier: Notifier) -> None:
        """READY=1, then STATUS= every few seconds and WATCHDOG=1 pings. They come from the
        event loop itself, so a loop that is stuck stops them and systemd notices."""
        notifier.ready(self.status_line())
        interval = notifier.watchdog_interval()
        every = min(STATUS_EVERY, interval) if interval else STATUS_EVERY
        last_status = time.monotonic()
        while True:
            if interval:
                notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_EVERY:
                notifier.status(self.status_line())
                last_status = time.monotonic()
            await asyncio.sleep(every)

    async def _reap_sessions(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            timeouts = {name: r.idle_timeout for name, r in self.config.relays.items()}
            await self.pool.close_idle(timeouts)
            self.limiter.prune(time.time())

    # -- working ---------------------------------------------------------------------------------

    async def _next(self) -> Candidate | None:
        """The next candidate, one new and one deferred in turn so neither starves the other."""
        while not self._stopping:
            first, second = (self._new, self._due) if self._prefer_new else (self._due, self._new)
            queue = first if first else second
            if queue:
                self._prefer_new = queue is not self._new
                self._has_room.set()
                return queue.popleft()
            if self.once and self._feeders_done >= 2 and self._busy == 0:
                self._has_work.set()  # wake the other idle workers so they see it too
                return None
            self._has_work.clear()
            await self._has_work.wait()
        return None

    async def _worker(self) -> None:
        while (candidate := await self._next()) is not None:
            self._busy += 1
            try:
                await self._process(candidate)
            except Exception:
                # One bad file must never stop the daemon (claiming failed: nothing to put
                # back; the file stays where it was and the next scan sees it again).
                self.log.exception("internal_error", source=candidate.source)
            finally:
                self._busy -= 1
                self._queued.discard(candidate.path)
                self._has_work.set()

    async def _supervise(
        self, workers: list[asyncio.Task[None]], helpers: list[asyncio.Task[Any]]
    ) -> None:
        """Wait for stop (or, once, for the work to end), then drain in two stages."""
        stop = asyncio.ensure_future(self._stop.wait())
        all_workers = asyncio.ensure_future(asyncio.wait(workers))
        await asyncio.wait([stop, all_workers], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        for event in (self._has_work, self._has_room, self._pickup_wake, self._deferred_wake):
            event.set()
        for task in helpers:
            task.cancel()
        if self.notifier:
            self.notifier.stopping()
        if not all_workers.done():
            self.log.info("stopping", in_flight=self._busy, grace=GRACE)
            self._stop.clear()
            second = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait(
                [all_workers, second], timeout=GRACE, return_when=asyncio.FIRST_COMPLETED
            )
            second.cancel()
            for task in workers:
                task.cancel()
        stop.cancel()
        all_workers.cancel()

    async def _process(self, candidate: Candidate) -> None:
        try:
            claimed = self.spool.claim(candidate)
        except OSError as exc:
            # Not ours to move (a directory we may not rename, a file on a read-only mount):
            # say so once, leave it where it is, and keep going.
            if candidate.path not in self._unmovable:
                if len(self._unmovable) > 10_000:
                    self._unmovable.clear()
                self._unmovable.add(candidate.path)
                self.log.error(
                    "unmovable", source=printable(candidate.source), error=exc.strerror or str(exc)
                )
            return
        if claimed is None:
            return  # another dispatcher took it first
        self.stats.claimed += 1
        try:
            await self._deliver(claimed)
        except asyncio.CancelledError:
            # Shutdown ran out of time: put it back, due now, so it is sent next time.
            self._put_back(claimed, time.time())
            raise
        except Exception:
            # A bug or a full disk must not strand the message in active/: log it and put
            # it back to be tried again in a minute.
            self.log.exception("internal_error", id=claimed.id, source=claimed.source)
            self._put_back(claimed, time.time() + 60)

    def _put_back(
        self, claimed: Claimed, due: float, sidecar: Sidecar | None = None, event: str = "put_back"
    ) -> None:
        """Move a claimed message to deferred/ without counting an attempt."""
        sidecar = sidecar or claimed.sidecar or self._new_sidecar(claimed, None, ())
        sidecar = dataclasses.replace(sidecar, next_attempt=from_timestamp(due))
        try:
            self._to_deferred(claimed, sidecar, due)
        except OSError as exc:
            if claimed.path.exists():  # else it had already reached its folder
                self.log.error("put_back_failed", id=claimed.id, error=str(exc))
            return
        self.log.info(
            event, id=claimed.id, next_attempt=sidecar.next_attempt, detail=sidecar.detail
        )

    def _to_deferred(self, claimed: Claimed, sidecar: Sidecar, due: float) -> None:
        if not self.once:
            # Our own rename into deferred/ is not news for the deferred/ watch.
            if len(self._own_deferrals) > 10_000:
                self._own_deferrals.clear()
            self._own_deferrals.add(claimed.id)
        self.spool.finish_deferred(claimed, sidecar, due)

    async def _deliver(self, claimed: Claimed) -> None:
        try:
            large = os.stat(claimed.path, follow_symlinks=False).st_size > LARGE_MESSAGE
        except OSError:
            large = False  # the read below says what is wrong with it
        if not large:
            await self._attempt(claimed)
            return
        # A message is copied a few times on its way to the socket: at 25 MiB, a handful of
        # them at once would take a gigabyte. Large ones go a few at a time.
        async with self._large:
            await self._attempt(claimed)

    async def _attempt(self, claimed: Claimed) -> None:
        config = self.config  # the config in force for this whole attempt
        data, parsed, decision = await self._examine(claimed, config)
        self.log.info(
            "claimed",
            id=claimed.id,
            source=claimed.source,
            sender=parsed.sender if parsed else None,
            recipients=list(parsed.recipients) if parsed else [],
            relay=None if isinstance(decision, Refusal) else decision.relay,
            attempt=(claimed.sidecar.attempts if claimed.sidecar else 0) + 1,
            code=None,
        )
        if isinstance(decision, Refusal):
            self._fail(claimed, parsed, decision)
            return
        assert parsed is not None and parsed.sender is not None  # policy.check saw to that
        relay_config = config.relays[decision.relay]
        credentials = decision.credentials or relay_config.credentials
        now = time.time()
        slot = self.limiter.slot(
            claimed.id, relay_config.name, _buckets(relay_config, decision, credentials), now
        )
        if slot > now:
            # Over a provider limit: not an attempt, not an error; it waits its turn.
            detail = f"waiting its turn: {_limits(relay_config, decision)}"
            waiting = dataclasses.replace(self._base(claimed, parsed), detail=detail)
            self._put_back(claimed, slot, waiting, event="waiting")
            self._deferred_until(slot)
            return
        started = time.monotonic()
        delivery = await relay.send(
            self.pool, relay_config, credentials, parsed.sender, parsed.recipients, parsed.data
        )
        if self.metrics is not None:
            self.metrics.send_seconds(relay_config.name, time.monotonic() - started)
            if delivery.session_error:
                self.metrics.connection_error(relay_config.name, delivery.session_error)
        self._pace(relay_config.name, delivery)
        self._record(claimed, parsed, delivery, data)

    def _pace(self, relay_name: str, delivery: Delivery) -> None:
        """A throttling reply slows the whole relay down; an accepted message ends that."""
        throttling = next((r for r in delivery.deferred if is_throttling(r.code, r.text)), None)
        if throttling is not None:
            until = self.limiter.throttled(relay_name, time.time())
            self.log.warning(
                "relay_throttled",
                relay=relay_name,
                code=throttling.code,
                detail=throttling.text,
                paused_until=from_timestamp(until),
            )
        elif delivery.sent:
            self.limiter.accepted(relay_name)

    async def _examine(
        self, claimed: Claimed, config: Config
    ) -> tuple[bytes, envelope.Envelope | None, SenderRule | Refusal]:
        """Read, parse and check a claimed message: the bytes, the envelope if it parsed, and
        the sender's rule or the reason it may not be sent."""
        data = self.spool.read(claimed, config.policy.max_message_size)
        for _ in range(50):  # a Maildir writer between link() and unlink(): up to 1 s
            if not (isinstance(data, Unsafe) and data.linked):
                break
            await asyncio.sleep(0.02)
            data = self.spool.read(claimed, config.policy.max_message_size)
        if isinstance(data, Unsafe):
            return b"", None, Refusal(Reason.UNSAFE_FILE, f"{claimed.source} {data.detail}")
        if isinstance(data, int):
            limit = config.policy.max_message_size
            detail = f"{data} bytes, larger than max_message_size = {limit}"
            return b"", None, Refusal(Reason.TOO_LARGE, detail)
        parsed = envelope.parse(
            data,
            max_header_size=config.policy.max_header_size,
            local_domain=config.policy.local_domain,
        )
        if isinstance(parsed, Refusal):
            return data, None, parsed
        if claimed.sidecar is not None and claimed.sidecar.recipients:
            # Recipients already delivered (or failed) are not sent to again.
            parsed = dataclasses.replace(parsed, recipients=claimed.sidecar.recipients)
        return data, parsed, policy.check(parsed, config, len(data))

    # -- outcomes --------------------------------------------------------------------------------

    def _count(self, outcome: str, reason: str | None, relay: str | None) -> None:
        if self.metrics is not None:
            self.metrics.outcome(outcome, reason, relay)

    def _new_sidecar(
        self, claimed: Claimed, parsed: envelope.Envelope | None, recipients: tuple[str, ...]
    ) -> Sidecar:
        return Sidecar(
            id=claimed.id,
            source=claimed.source,
            sender=parsed.sender if parsed else None,
            recipients=recipients,
            attempts=0,
            first_seen=from_timestamp(claimed.claimed_at),
            message_id=parsed.message_id if parsed else None,
        )

    def _base(self, claimed: Claimed, parsed: envelope.Envelope | None) -> Sidecar:
        recipients = parsed.recipients if parsed else ()
        if claimed.sidecar is None:
            return self._new_sidecar(claimed, parsed, recipients)
        return claimed.sidecar

    def _fail(self, claimed: Claimed, parsed: envelope.Envelope | None, refusal: Refusal) -> None:
        """A message refused before any connection: to failed/ with the reason."""
        base = self._base(claimed, parsed)
        now = time.time()
        sidecar = base.with_attempt(
            Attempt(from_timestamp(now), None, "failed", None, refusal.detail),
            attempts=base.attempts + 1,
            reason=refusal.reason.value,
            detail=refusal.detail,
            next_attempt=None,
        )
        try:
            self.spool.finish_failed(claimed, sidecar)
        except OSError as exc:
            self.log.error(
                "failed_stuck", id=claimed.id, reason=refusal.reason.value, error=str(exc)
            )
            return
        self.stats.failed += 1
        self._count("failed", refusal.reason.value, None)
        self.log.warning(
            "failed",
            id=claimed.id,
            sender=base.sender,
            recipients=list(base.recipients),
            relay=None,
            attempt=sidecar.attempts,
            code=None,
            reason=refusal.reason.value,
            detail=refusal.detail,
        )

    def _record(
        self, claimed: Claimed, parsed: envelope.Envelope, delivery: Delivery, data: bytes
    ) -> None:
        """Turn one SMTP attempt into folders and log lines."""
        now = time.time()
        base = self._base(claimed, parsed)
        attempt = base.attempts + 1
        stamp = from_timestamp(now)
        fields: dict[str, Any] = {
            "id": claimed.id,
            "sender": parsed.sender,
            "relay": delivery.relay,
            "attempt": attempt,
        }
        if delivery.session_error == "auth":
            self.log.error(
                "relay_auth_failed", relay=delivery.relay, code=delivery.code, detail=delivery.text
            )
        if delivery.unknown:
            self.log.warning(
                "outcome_unknown", message_id=parsed.message_id, **fields, detail=delivery.text
            )

        if delivery.sent:
            self.stats.sent += 1
            self._count("sent", None, delivery.relay)
            self.log.info("sent", **fields, recipients=list(delivery.sent), code=delivery.code)
        if not delivery.deferred and not delivery.rejected:
            archive = None
            if self.config.spool.keep_sent:
                archive = base.with_attempt(
                    Attempt(stamp, delivery.relay, "sent", delivery.code, delivery.text),
                    attempts=attempt,
                    next_attempt=None,
                )
            self.spool.finish_sent(claimed, archive)
            return

        if delivery.rejected:
            self._reject(claimed, base, delivery, data, attempt, fields)
        if delivery.deferred:
            self._defer(claimed, base, delivery, attempt, fields)

    def _reject(
        self,
        claimed: Claimed,
        base: Sidecar,
        delivery: Delivery,
        data: bytes,
        attempt: int,
        fields: dict[str, Any],
    ) -> None:
        """Recipients refused for good: the message to failed/, or a copy of it there when
        other recipients are still to be tried."""
        reason = Reason.TOO_LARGE if delivery.too_large else Reason.REJECTED
        code = delivery.rejected[0].code or None
        detail = _detail(delivery.rejected, delivery.sent)
        failed = base.with_attempt(
            Attempt(from_timestamp(time.time()), delivery.relay, "failed", code, detail),
            recipients=tuple(r.recipient for r in delivery.rejected),
            attempts=attempt,
            reason=reason.value,
            detail=detail,
            next_attempt=None,
        )
        if delivery.deferred:
            failed = dataclasses.replace(failed, id=ids.new(), split_from=claimed.id)
            self.spool.write_failed_copy(data, failed)
        else:
            self.spool.finish_failed(claimed, failed)
        self.stats.failed += 1
        self._count("failed", reason.value, delivery.relay)
        self.log.warning(
            "failed",
            **{**fields, "id": failed.id},
            recipients=list(failed.recipients),
            code=code,
            reason=reason.value,
            detail=detail,
        )

    def _defer(
        self,
        claimed: Claimed,
        base: Sidecar,
        delivery: Delivery,
        attempt: int,
        fields: dict[str, Any],
    ) -> None:
        """Recipients to try again: to deferred/ with the next attempt's time, or to failed/
        as expired once max_age is reached."""
        now = time.time()
        first_attempt = base.lifetime_start()
        since = _seconds(first_attempt) if first_attempt else now
        recipients = tuple(r.recipient for r in delivery.deferred)
        code = delivery.deferred[0].code or None
        detail = _detail(delivery.deferred, delivery.sent)
        retry_config = self.config.retry
        due = retry.next_attempt(attempt, since, now, retry_config.schedule, retry_config.max_age)
        outcome = "deferred" if due else "failed"
        history = Attempt(from_timestamp(now), delivery.relay, outcome, code, detail)
        if due is None:
            sidecar = base.with_attempt(
                history,
                recipients=recipients,
                attempts=attempt,
                reason=Reason.EXPIRED.value,
                detail=f"undelivered after {format_duration(now - since)}; last: {detail}",
                next_attempt=None,
            )
            self.spool.finish_failed(claimed, sidecar)
            self.stats.failed += 1
            self._count("failed", Reason.EXPIRED.value, delivery.relay)
            self.log.warning(
                "failed",
                **fields,
                recipients=list(recipients),
                code=code,
                reason=Reason.EXPIRED.value,
                detail=sidecar.detail,
            )
            return
        sidecar = base.with_attempt(
            history,
            recipients=recipients,
            attempts=attempt,
            detail=detail,
            next_attempt=from_timestamp(due),
            reason=None,
        )
        self._to_deferred(claimed, sidecar, due)
        self._deferred_until(due)
        self.stats.deferred += 1
        self._count("deferred", None, delivery.relay)
        self.log.warning(
            "deferred",
            **fields,
            recipients=list(recipients),
            code=code,
            detail=detail,
            next_attempt=sidecar.next_attempt,
        )


def _buckets(
    relay_config: RelayConfig, rule: SenderRule, credentials: Credentials | None
) -> list[tuple[tuple[str, ...], Rate]]:
    """The token buckets a message draws on: its relay's, and its credentials' (a sender
    entry's `rate` is per mailbox: Microsoft 365 counts 30 a minute per mailbox)."""
    buckets: list[tuple[tuple[str, ...], Rate]] = []
    if relay_config.rate is not None:
        buckets.append((("relay", relay_config.name), relay_config.rate))
    if rule.rate is not None:
        user = credentials.username if credentials else f"sender {rule.pattern}"
        buckets.append((("credentials", relay_config.name, user), rule.rate))
    return buckets


def _limits(relay_config: RelayConfig, rule: SenderRule) -> str:
    parts = []
    if relay_config.rate is not None:
        parts.append(f"relays.{relay_config.name}.rate = {relay_config.rate}")
    if rule.rate is not None:
        parts.append(f'senders."{rule.pattern}".rate = {rule.rate}')
    return ", ".join(parts) or f"relay {relay_config.name} asked us to slow down"


def _detail(results: tuple[RecipientResult, ...], sent: tuple[str, ...]) -> str:
    texts = sorted({r.text for r in results})
    detail = "; ".join(texts)
    if sent:
        detail += f" (sent to {len(sent)} other recipient{'s' if len(sent) > 1 else ''})"
    return detail


def _seconds(iso: str) -> float:
    try:
        return to_timestamp(iso)
    except ValueError:
        return time.time()

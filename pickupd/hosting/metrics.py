"""The optional Prometheus endpoint (`[metrics] listen`), with prometheus-client.

Counters and the histogram are fed by the dispatcher as outcomes happen; the queue gauges are
read from the spool at scrape time (a directory count per folder), so they are right even
with several dispatchers, the queue tools and the sendmail shim changing the spool.

Metrics:
- `pickupd_messages_total{outcome, reason, relay}`: sent / deferred / failed, one per outcome
  line in the log (`reason` only on failed; `relay` empty when none was reached)
- `pickupd_send_duration_seconds{relay}`: one SMTP attempt, from taking a session to the
  reply to the data
- `pickupd_relay_connection_errors_total{relay, kind}`: sessions that could not be opened or
  broke (kind: connect, tls, auth, timeout, protocol)
- `pickupd_queue_messages{folder}`: pickup, active, deferred, hold, failed, sent
- `pickupd_oldest_deferred_age_seconds`: since the first_seen of the oldest deferred message
- `pickupd_relay_suspended{relay}`: processes holding the relay suspended
- `pickupd_limit_room{limit}`: what a counted limit had left after the last turn booked
  (`limit`: the ledger's key, "mailbox:<host>:<user>/recipients/86400")
- `pickupd_limit_size{limit}`: what that limit allows in its window (for "nearly spent")
- `pickupd_limit_store_up`: 1 while the fleet's ledger store answers (0: each host is on its
  share); absent without a store
- `pickupd_quota_spent_until_seconds{scope}`: a provider said this mailbox's or account's
  quota is spent: paused until this time (alert on `> time()`)
- `pickupd_paused_until_seconds{scope, kind}`: any pause a provider's reply set (throttled,
  spent, limited: the tenant's rate), until this time
- `pickupd_graph_replies_total{relay, status}`: Microsoft Graph's answers to sendMail, by
  HTTP status (202 accepted, 429 throttled, 401, 403 ...)
- `pickupd_limit_waiting_messages{class}`: messages waiting in line under a limit (urgent,
  normal, bulk: the class decides who goes first), all processes
- `pickupd_stranded_messages`: claims that could not be moved to their folder, retried
- `pickupd_refresh_token_age_seconds{file}`, `pickupd_refresh_token_last_worked_seconds{file}`
  (Unix time, 0: never) and `pickupd_refresh_token_refused{file}` (1: invalid_grant, a person
  must sign in again): each stored refresh token, from its record (auth/health.py) at scrape
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pickupd.auth.health import read_health
from pickupd.auth.logins import RefreshTokenSource
from pickupd.config.metrics import MetricsConfig
from pickupd.errors import EndpointError
from pickupd.hosting.endpoint import Endpoint, serve
from pickupd.spool import census
from pickupd.spool.folders import Spool
from pickupd.workers import protocol

__all__ = ["Metrics"]

# SMTP attempts take milliseconds on a LAN and up to the relay's timeout on a bad day.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _SpoolCollector(Collector):
    """Queue depth per folder and the age of the oldest deferred message, at scrape (from
    the service's census, spool/census.py)."""

    def __init__(self, count: Callable[[], dict[str, census.FolderCount]]) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        census = self._count()
        depth = GaugeMetricFamily(
            "pickupd_queue_messages", "Messages in each spool folder", labels=["folder"]
        )
        for name, counted in census.items():
            depth.add_metric([name], counted.count)
        yield depth
        oldest = GaugeMetricFamily(
            "pickupd_oldest_deferred_age_seconds",
            "Seconds since the oldest deferred message was first seen (0 if none)",
        )
        oldest.add_metric([], census["deferred"].oldest_age or 0.0)
        yield oldest


class _TokenCollector(Collector):
    """The health of each stored refresh token, read from its record at scrape (whichever
    process used it last wrote it)."""

    def __init__(self, sources: Callable[[], list[RefreshTokenSource]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        age = GaugeMetricFamily(
            "pickupd_refresh_token_age_seconds",
            "Seconds since the stored refresh token was written (rotated or replaced)",
            labels=["file"],
        )
        worked = GaugeMetricFamily(
            "pickupd_refresh_token_last_worked_seconds",
            "Unix time the refresh token last gave an access token (0: never)",
            labels=["file"],
        )
        refused = GaugeMetricFamily(
            "pickupd_refresh_token_refused",
            "1 if the provider refused the refresh token (invalid_grant): sign in again",
            labels=["file"],
        )
        for path in sorted({source.refresh_token_file for source in self._sources()}):
            health = read_health(path)
            label = [str(path)]
            if health.issued is not None:
                age.add_metric(label, max(0.0, now - health.issued))
            worked.add_metric(label, health.worked or 0.0)
            refused.add_metric(label, 1.0 if health.refused else 0.0)
        yield from (age, worked, refused)


class Metrics:
    """The dispatcher's metrics and, once started, their HTTP endpoint."""

    def __init__(
        self,
        spool: Spool,
        count: Callable[[], dict[str, census.FolderCount]] | None = None,
        store: bool = False,
        tokens: Callable[[], list[RefreshTokenSource]] = list,
    ) -> None:
        """`count`: the census to show (default: a fresh one at every scrape); `store`: a
        ledger store is configured (its gauge starts at 1); `tokens`: the stored refresh
        tokens the config uses now."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._relaying()
        self._limits(store)
        self._lines: dict[int, tuple[int, int, int]] = {}  # worker -> its lines' counts
        self._down: set[int] = set()  # processes (0: main) whose store is down
        self._stranded = Gauge(
            "pickupd_stranded_messages",
            "Claimed messages that could not be moved to their folder (disk full?), retried",
            registry=self.registry,
        )
        self.registry.register(
            _SpoolCollector(count or (lambda: census.take(spool, time.time(), ages=("deferred",))))
        )
        self.registry.register(_TokenCollector(tokens))
        self._server: Endpoint | None = None

    def _relaying(self) -> None:
        """What the attempts say: outcomes, durations, sessions, relays, Graph's answers."""
        self._messages = Counter(
            "pickupd_messages",
            "Messages by outcome (sent, deferred, failed), reason and relay",
            ["outcome", "reason", "relay"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "pickupd_send_duration_seconds",
            "Duration of one SMTP attempt",
            ["relay"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._connection_errors = Counter(
            "pickupd_relay_connection_errors",
            "SMTP sessions that could not be opened or broke, by kind",
            ["relay", "kind"],
            registry=self.registry,
        )
        self._suspended = Gauge(
            "pickupd_relay_suspended",
            "Processes of the service holding the relay suspended (it stopped answering)",
            ["relay"],
            registry=self.registry,
        )
        self._graph = Counter(
            "pickupd_graph_replies",
            "Microsoft Graph's answers to sendMail requests, by HTTP status",
            ["relay", "status"],
            registry=self.registry,
        )

    def _limits(self, store: bool) -> None:
        """What the limits say: room, pauses, the store, the waiting lines."""
        self._room = Gauge(
            "pickupd_limit_room",
            "What a counted limit had left after the last turn booked",
            ["limit"],
            registry=self.registry,
        )
        self._size = Gauge(
            "pickupd_limit_size",
            "The amount a counted limit allows in its window (room is measured against it)",
            ["limit"],
            registry=self.registry,
        )
        # Only with a store: a gauge at 0 on every host without one would be an alert.
        self._store_up = (
            Gauge(
                "pickupd_limit_store_up",
                "1 while the ledger store answers every process (0: hosts are on their share)",
                registry=self.registry,
            )
            if store
            else None
        )
        if self._store_up is not None:
            self._store_up.set(1)
        self._spent = Gauge(
            "pickupd_quota_spent_until_seconds",
            "A quota the provider said is spent: paused until this Unix time",
            ["scope"],
            registry=self.registry,
        )
        self._paused = Gauge(
            "pickupd_paused_until_seconds",
            "A provider's reply paused this scope until this Unix time (kind: throttled, spent,"
            " limited)",
            ["scope", "kind"],
            registry=self.registry,
        )
        self._waiting = Gauge(
            "pickupd_limit_waiting_messages",
            "Messages waiting in line under a limit, by class (urgent goes first, then normal)",
            ["class"],
            registry=self.registry,
        )

    def start(self, config: MetricsConfig) -> None:
        """Serve /metrics as `config` says (its listen, TLS, basic auth); EndpointError (one
        line) if it cannot."""
        assert config.listen is not None
        host, port = config.listen
        user, password = config.basic_auth_user, config.basic_auth_password
        auth = (user, password) if user is not None and password is not None else None
        try:
            self._server = serve(make_wsgi_app(self.registry), config.listen, config.tls, auth)
        except ssl.SSLError as exc:
            raise EndpointError("tls_cert_file", f"cannot use it: {exc}") from None
        except OSError as exc:
            raise EndpointError(
                "listen", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def outcome(self, outcome: str, reason: str | None, relay: str | None) -> None:
        self._messages.labels(outcome, reason or "", relay or "").inc()

    def apply(self, event: protocol.Up) -> None:
        """A metric event a worker process sent up (others are not the metrics' business)."""
        match event:
            case protocol.Outcome(outcome, reason, relay):
                self.outcome(outcome, reason, relay)
            case protocol.SendTime(relay, seconds):
                self.send_seconds(relay, seconds)
            case protocol.SessionFailed(relay, kind):
                self.connection_error(relay, kind)
            case protocol.Suspended(relay, on):
                self.suspended(relay, on)
            case protocol.Room(limit, room, size):
                self.room(limit, room, size)
            case protocol.Paused(scope, until, kind):
                self.paused(scope, until, kind)
            case protocol.StoreUp(up):
                self.store_up(up, worker=-1)
            case protocol.Waiting(worker, urgent, normal, bulk):
                self.waiting(worker, urgent, normal, bulk)
            case protocol.GraphReply(relay, status):
                self.graph_reply(relay, status)

    def graph_reply(self, relay: str, status: int) -> None:
        self._graph.labels(relay, str(status)).inc()

    def waiting(self, worker: int, urgent: int, normal: int, bulk: int) -> None:
        """Worker `worker`'s lines hold so many messages of each class."""
        self._lines[worker] = (urgent, normal, bulk)
        for i, name in enumerate(("urgent", "normal", "bulk")):
            self._waiting.labels(name).set(sum(counts[i] for counts in self._lines.values()))

    def room(self, limit: str, room: int, size: int = 0) -> None:
        self._room.labels(limit).set(room)
        if size:
            self._size.labels(limit).set(size)

    def store_up(self, up: bool, worker: int = 0) -> None:
        """The store answers this process (`worker`; -1: some worker) or not."""
        if up:
            self._down.discard(worker)
        else:
            self._down.add(worker)
        if self._store_up is not None:
            self._store_up.set(0 if self._down else 1)

    def paused(self, scope: str, until: float, kind: str) -> None:
        """A provider's reply paused `scope` until `until` (kind: see protocol.Paused)."""
        if kind == "spent":
            self._spent.labels(scope).set(until)
        self._paused.labels(scope, kind).set(until)

    def suspended(self, relay: str, on: bool) -> None:
        gauge = self._suspended.labels(relay)
        if on:
            gauge.inc()
        else:
            gauge.dec()

    def send_seconds(self, relay: str, seconds: float) -> None:
        self._duration.labels(relay).observe(seconds)

    def stranded(self, count: int) -> None:
        self._stranded.set(count)

    def connection_error(self, relay: str, kind: str) -> None:
        self._connection_errors.labels(relay, kind).inc()

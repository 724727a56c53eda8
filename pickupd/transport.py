"""The relay step: one SMTP transaction (smtp/) or one Microsoft Graph request (graph/), as
the relay's `transport` says, timed for the metrics.

Either way the answer is a Delivery; Graph may also refuse a message before sending it
(graph/message.py: a header recipient the envelope does not name, a request too large).
"""

from __future__ import annotations

import time

from pickupd.auth.logins import Credentials, XOAuth2
from pickupd.config.routing import RelayConfig
from pickupd.graph.client import Graph
from pickupd.limits.needs import Applies
from pickupd.message.envelope import Envelope
from pickupd.outcome import Delivery, Refusal
from pickupd.record.recorder import Meter
from pickupd.smtp import transaction
from pickupd.smtp.pool import Pool

__all__ = ["Transports"]


class Transports:
    """SMTP sessions from the pool, Graph requests from its clients."""

    def __init__(self, pool: Pool, processes: int, metrics: Meter | None) -> None:
        self.pool = pool
        self.graph = Graph(pool, processes)
        self.metrics = metrics
        pool.closing.append(self.graph.close)  # a pool's close_all closes Graph's clients
        if metrics is not None:
            self.graph.replied = metrics.graph_reply

    async def send(
        self,
        relay: RelayConfig,
        login: Credentials | XOAuth2 | None,
        parsed: Envelope,
        applies: Applies,
    ) -> Delivery | Refusal:
        """Relay `parsed` through `relay` as `login`, under `applies`' connection limits."""
        assert parsed.sender is not None
        started = time.monotonic()
        if relay.transport == "graph":
            delivery = await self.graph.send(
                relay, login, parsed.recipients, parsed.data, applies.connections
            )
        else:
            delivery = await transaction.send(
                self.pool,
                relay,
                login,
                parsed.sender,
                parsed.recipients,
                parsed.data,
                parsed.dsn,
                applies.connections,
            )
        if self.metrics is not None and isinstance(delivery, Delivery):
            self.metrics.send_seconds(relay.name, time.monotonic() - started)
            if delivery.session_error:
                self.metrics.connection_error(relay.name, delivery.session_error.value)
        return delivery

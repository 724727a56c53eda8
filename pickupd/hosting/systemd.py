"""The systemd notify protocol (sd_notify), without libsystemd: one datagram per message.

With `Type=notify` systemd passes `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
namespace). We say READY=1 once the dispatcher watches the pickup folder, STATUS= with the
queue counts, RELOADING=1 / READY=1 around a SIGHUP reload, STOPPING=1 when draining, and
WATCHDOG=1 from the event loop itself, so a stuck loop stops the pings and systemd restarts us
(`WatchdogSec=`; `$WATCHDOG_USEC` says the interval and we ping at half of it).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from pickupd import log as logs

__all__ = ["STATUS_EVERY", "Notifier"]

# How often the status line for systemd is renewed.
STATUS_EVERY = 5.0


class Notifier:
    """Sends notify messages to systemd; a failure to send is logged once, never raised."""

    def __init__(self, address: str) -> None:
        # "@name" is Linux's abstract namespace: a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._failed = False

    @classmethod
    def from_env(cls) -> Notifier | None:
        """A Notifier when started by systemd with Type=notify (NOTIFY_SOCKET set), else None."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address or not hasattr(socket, "AF_UNIX"):
            return None
        return cls(address)

    def send(self, **fields: str | int) -> None:
        """One datagram of `KEY=value` lines, e.g. `send(READY=1, STATUS="...")`."""
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logs.get().warning("notify_failed", socket=self._address, error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match READY=1 to this reload.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="draining in-flight sends")

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        self._socket.close()

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None when the
        service has no watchdog (or it is meant for another process: `$WATCHDOG_PID`)."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1_000_000 / 2

    async def heartbeat(self, status: Callable[[], str]) -> None:
        """READY=1, then STATUS= every few seconds and WATCHDOG=1 pings, until cancelled.
        They come from the event loop itself, so a loop that is stuck stops them and
        systemd notices."""
        self.ready(status())
        interval = self.watchdog_interval()
        every = min(STATUS_EVERY, interval) if interval else STATUS_EVERY
        last_status = time.monotonic()
        while True:
            if interval:
                self.watchdog()
            if time.monotonic() - last_status >= STATUS_EVERY:
                self.status(status())
                last_status = time.monotonic()
            await asyncio.sleep(every)

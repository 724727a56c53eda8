"""A slow spool (a file server that takes seconds to answer) stalls only the message it is
slow for: with `[spool] io = "threads"` (what "auto" picks on NFS) the other relays keep
sending. The slowness is the kernel's: fanotify holds the open of that one message's file in
active/ for seconds (tests/slowfs.py), as a slow file server holds the calls made to it; with
`io = "loop"` the same slow open holds everything up, which shows the test can tell."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from harness import Daemon, drop_maildir, message, relay_for, wait_until
from slowfs import SlowOpens
from smtpserver import SmtpServer

from pickupd.spool.folders import claim_id

SLOW = 3.0


@pytest.mark.parametrize("io", ["threads", "loop"])
def test_a_slow_read_holds_up_only_its_own_message(
    io: str, smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    slow_relay, fast_relay = smtp_factory(), smtp_factory()
    daemon = make_daemon(
        relays={"slow": relay_for(slow_relay), "fast": relay_for(fast_relay)},
        senders={"app@example.com": {"relay": "slow"}, "ops@example.com": {"relay": "fast"}},
        spool={"io": io},
        dispatch={"workers": 1},
        start=False,
    )
    daemon.start()
    (ready,) = daemon.wait_event("ready")
    assert ready["io"] == io
    with SlowOpens(daemon.spool / "active", b"SLOWREAD", SLOW) as slow:
        _one_slow_message(daemon, slow_relay, fast_relay, io)
        assert slow.held == 1


def _one_slow_message(
    daemon: Daemon, slow_relay: SmtpServer, fast_relay: SmtpServer, io: str
) -> None:
    drop_maildir(daemon.spool, message(subject="SLOWREAD"))
    # It is being read once it is claimed (the read follows the rename into active/).
    active = daemon.spool / "active"
    wait_until(lambda: any(claim_id(p.name) for p in active.iterdir()), 10, "the claim")
    started = time.monotonic()
    for n in range(5):
        drop_maildir(daemon.spool, message(sender="ops@example.com", subject=f"f{n}"))
    fast_relay.wait_for(5, timeout=SLOW + 10)
    took = time.monotonic() - started
    slow_relay.wait_for(1, timeout=SLOW + 10)
    if io == "threads":
        assert took < SLOW - 1.5, took  # the other relay did not wait
        assert fast_relay.received[-1].at < slow_relay.received[0].at
    else:
        assert took > SLOW - 1.0, took  # on the loop, everything waited for the one read

"""SIGHUP reloads the config of a running daemon: a good one takes effect for the next message,
a bad one is refused with a logged error and the old one stays in force."""

from __future__ import annotations

import signal
from collections.abc import Callable

from harness import Daemon, drop_maildir, free_port, message, relay_for, wait_until
from smtpserver import SmtpServer

from pickupd.spool.sidecar import to_timestamp


def _hup(daemon: Daemon, event: str) -> dict[str, object]:
    before = len(daemon.events(event))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    return daemon.wait_event(event, count=before + 1)[-1]


def test_reload_allows_a_new_sender(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A sender added to the allow-list is relayed after SIGHUP, without a restart."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(sender="other@example.com"))
    (failed,) = daemon.wait_event("failed")
    assert failed["reason"] == "sender_not_allowed"

    doc = daemon.doc
    doc["senders"]["other@example.com"] = {"relay": "main"}
    daemon.write_config(doc)
    reloaded = _hup(daemon, "reloaded")
    assert reloaded["senders"] == 2
    drop_maildir(daemon.spool, message(sender="other@example.com"))
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "other@example.com"


def test_bad_config_is_refused_and_the_old_one_stays(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A broken config on SIGHUP logs reload_failed and the old one keeps relaying."""
    daemon = make_daemon(smtp_server)
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace(f"port = {smtp_server.port}", 'port = "abc"'))
    refused = _hup(daemon, "reload_failed")
    assert any("relays.main.port" in p for p in refused["problems"]), refused  # type: ignore[attr-defined]
    drop_maildir(daemon.spool, message())
    smtp_server.wait_for(1)
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_reload_rescues_deferred_mail_and_says_what_needs_a_restart(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Mail deferred because the relay was wrong goes out once the fixed config is reloaded;
    a changed spool path is reported as needing a restart and is not applied."""
    wrong = relay_for(smtp_server, port=free_port())  # a port nobody listens on
    daemon = make_daemon(relays={"main": wrong}, retry={"schedule": ["1s"], "max_age": "1h"})
    drop_maildir(daemon.spool, message())
    daemon.wait_event("deferred")

    doc = daemon.doc
    doc["relays"]["main"] = relay_for(smtp_server)
    doc["spool"]["path"] = str(daemon.dir / "elsewhere")
    daemon.write_config(doc)
    restart = _hup(daemon, "reload_needs_restart")
    assert restart["keys"] == ["spool.path"]
    (got,) = smtp_server.wait_for(1, timeout=15)
    assert got.mail_from == "app@example.com"
    assert not (daemon.dir / "elsewhere").exists()


def test_a_send_in_flight_at_a_reload_is_recorded_under_its_own_config(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A send stalled when SIGHUP arrives is deferred by the retry schedule it was made
    under (300ms), not by the reloaded one (1h): in-flight sends go on with the old config."""
    smtp_server.stall = "DATA"
    daemon = make_daemon(relays={"main": relay_for(smtp_server, timeout="2s")})
    drop_maildir(daemon.spool, message())
    wait_until(lambda: "DATA" in smtp_server.commands, 10, "the send to stall at DATA")

    doc = daemon.doc
    doc["retry"] = {"schedule": ["1h"], "max_age": "5d"}
    daemon.write_config(doc)
    _hup(daemon, "reloaded")
    (deferred,) = daemon.wait_event("deferred", timeout=15)
    waited = to_timestamp(deferred["next_attempt"]) - to_timestamp(deferred["timestamp"])
    assert 0 < waited < 60, deferred  # 300ms +-10%; the new schedule would say an hour

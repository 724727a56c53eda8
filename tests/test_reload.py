"""SIGHUP reloads the config of a running daemon: a good one takes effect for the next message,
a bad one is refused with a logged error and the old one stays in force."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

from daemon import Daemon, drop_maildir, message, relay_for
from smtpserver import SmtpServer


def _hup(daemon: Daemon, event: str) -> dict[str, object]:
    before = len(daemon.events(event))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    return daemon.wait_event(event, count=before + 1)[-1]


def test_reload_allows_a_new_sender(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
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
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    wrong = relay_for(smtp_server, port=closed_port)
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

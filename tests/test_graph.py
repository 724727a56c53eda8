"""Relaying through Microsoft Graph: the real `pickupd` process gets app-only tokens through
msal (its real code path) from the test token endpoint (tests/tokenserver.py) and posts each
message to a local HTTPS server that follows Graph's documented sendMail contract
(tests/graphserver.py), which checks the bearer token and records what it received."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from graphserver import GraphServer
from harness import Daemon, drop_maildir, free_port, message, pickupd, scrape, wait_until
from smtpserver import TestCA
from tokenserver import CLIENT_SECRET, TokenServer

SENDER = "app@contoso.example"


@pytest.fixture
def graph(test_ca: TestCA, token_server: TokenServer) -> Iterator[GraphServer]:
    server = GraphServer(test_ca, token_server).start()
    yield server
    server.stop()


@dataclass
class Rig:
    """A Graph test's parts: the Graph server, the test CA, the token endpoint, a folder."""

    graph: GraphServer
    ca: TestCA
    tokens: TokenServer
    tmp: Path
    make_daemon: Callable[..., Daemon]

    def relay(self, **extra: Any) -> dict[str, Any]:
        """A `[relays.graph]` table: the app registration the token endpoint knows."""
        secret = self.tmp / "graph.secret"
        secret.write_text(CLIENT_SECRET + "\n")
        secret.chmod(0o600)
        return {
            "transport": "graph",
            "graph_url": self.graph.url,
            "ca_file": str(self.ca.ca_file),
            "timeout": "5s",
            "auth": "oauth2",
            "tenant": "contoso",
            "client_id": "app-id",
            "client_secret_file": str(secret),
            "authority": self.tokens.url,
            **extra,
        }

    def daemon(self, env: dict[str, str] | None = None, **sections: Any) -> Daemon:
        """A running daemon relaying *@contoso.example through Graph (msal trusting the
        test CA, as an operator's REQUESTS_CA_BUNDLE)."""
        daemon = self.make_daemon(
            relays={"graph": self.relay()},
            senders={"*@contoso.example": {"relay": "graph"}},
            start=False,
            **sections,
        )
        return daemon.start(env={"REQUESTS_CA_BUNDLE": self.ca.ca_file, **(env or {})})

    def config(self) -> Path:
        """The same relay and sender as a config file, for `pickupd check`."""
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.relay().items()]
        path = self.tmp / "good.toml"
        path.write_text(
            f'[spool]\npath = "{self.tmp / "spool"}"\n[relays.graph]\n' + "\n".join(lines)
            + '\n[senders."*@contoso.example"]\nrelay = "graph"\n'
        )  # fmt: skip
        return path


@pytest.fixture
def rig(
    graph: GraphServer,
    test_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
    make_daemon: Callable[..., Daemon],
) -> Rig:
    return Rig(graph, test_ca, token_server, tmp_path, make_daemon)


def test_a_message_goes_through_graph_with_its_envelope(rig: Rig) -> None:
    """Posted to /users/<envelope sender>/sendMail with a Graph-scoped app-only token; the
    copy Graph gets has a Bcc: of exactly the envelope recipients the header does not name,
    and is otherwise the message as relayed; the log says Graph accepted it; no secret or
    token in the log or sidecars. The app's token is fetched at the start, before any
    message needs it."""
    daemon = rig.daemon()
    wait_until(lambda: rig.tokens.token_requests(), timeout=20, what="the token at start")
    assert rig.graph.requests == 0
    text = message(
        sender=SENDER,
        to="alice@example.net",
        extra="Cc: carol@example.net\nBcc: hidden@example.net\n",
    )
    drop_maildir(daemon.spool, text)
    (posted,) = rig.graph.wait_for(1, timeout=20)
    assert posted.mailbox == SENDER
    assert rig.tokens.scope_of(posted.token) == rig.graph.scope
    head = posted.mime.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Bcc: hidden@example.net\r\n")
    assert head.count(b"Bcc:") == 1
    assert b"\r\nTo: alice@example.net\r\n" in head and b"\r\nCc: carol@example.net" in head
    (sent,) = daemon.wait_event("sent")
    assert sent["code"] == 202
    log = daemon.log_path.read_text()
    assert CLIENT_SECRET not in log and posted.token not in log


def test_a_header_recipient_outside_the_envelope_is_never_sent(rig: Rig) -> None:
    """An IIS pickup file whose X-Receiver: names alice only, with To: alice and mallory:
    Graph would deliver to mallory, so it fails as recipients_mismatch and Graph gets
    nothing."""
    daemon = rig.daemon()
    text = (
        f"X-Sender: {SENDER}\nX-Receiver: alice@example.net\n"
        f"From: {SENDER}\nTo: alice@example.net, mallory@example.net\nSubject: narrow\n"
        "Date: Sun, 06 Dec 2026 10:00:00 +0000\nMessage-ID: <narrow@example>\n\nhi\n"
    ).encode()
    drop_maildir(daemon.spool, text)
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "recipients_mismatch"
    assert "mallory@example.net" in failed["detail"]
    assert rig.graph.requests == 0


def test_graphs_replies_as_an_operator_expects(rig: Rig) -> None:
    """429 with Retry-After 2: the mailbox pauses at least 2 s, no attempt counted, then the
    message goes; a 401 (a token revoked early): a fresh token, sent; 403
    ErrorSendAsDenied: failed, naming Mail.Send; 404 MailboxNotEnabledForRESTAPI: failed;
    500: deferred on the schedule."""
    daemon = rig.daemon(dispatch={"workers": 1}, retry={"schedule": ["1h"]})
    rig.graph.answers.append((429, "ApplicationThrottled", 2.0))
    dropped = time.time()
    drop_maildir(daemon.spool, message(sender=SENDER, subject="throttled"))
    (waiting,) = daemon.wait_event("waiting", timeout=20)
    assert "Retry-After 2 s" in waiting["detail"]
    (posted,) = rig.graph.wait_for(1, timeout=20)
    assert posted.at - dropped >= 2.0
    daemon.wait_event("sent")
    assert daemon.events("deferred") == []

    rig.tokens.revoke_all()
    drop_maildir(daemon.spool, message(sender=SENDER, subject="revoked"))
    rig.graph.wait_for(2, timeout=20)
    assert len(rig.tokens.token_requests()) == 2

    rig.graph.answers.append((403, "ErrorSendAsDenied", None))
    rig.graph.answers.append((404, "MailboxNotEnabledForRESTAPI", None))
    for n in range(2):
        drop_maildir(daemon.spool, message(sender=SENDER, subject=f"refused{n}"))
        daemon.wait_sidecars("failed", count=n + 1)
    details = " ".join(s["detail"] for s in daemon.wait_sidecars("failed", count=2))
    assert "ErrorSendAsDenied" in details and "Mail.Send application permission" in details
    assert "MailboxNotEnabledForRESTAPI" in details

    rig.graph.answers.append((500, "InternalServerError", None))
    drop_maildir(daemon.spool, message(sender=SENDER, subject="broken"))
    (deferred,) = daemon.wait_event("deferred", timeout=20)
    assert "Graph 500" in deferred["detail"]
    (sidecar,) = daemon.wait_sidecars("deferred")
    assert sidecar["attempts"] == 1


def test_a_message_over_graphs_request_limit_fails_before_it_is_sent(rig: Rig) -> None:
    """3.5 MB of message is over 4 MB as base64: too_large, naming Graph's limit; nothing
    posted."""
    daemon = rig.daemon()
    drop_maildir(daemon.spool, message(sender=SENDER, body="x" * 75 + "\n") * 1 + b"y" * 3_500_000)
    (failed,) = daemon.wait_sidecars("failed", timeout=20)
    assert failed["reason"] == "too_large"
    assert "Microsoft Graph's request limit" in failed["detail"]
    assert rig.graph.requests == 0


def test_graph_connections_are_reused_and_a_mailbox_takes_four_at_once(rig: Rig) -> None:
    """40 messages from one mailbox at 50 ms a request: Graph's preset holds it to 4
    requests at once (across the worker processes), over a handful of TLS connections; the
    metrics count Graph's replies by status for the whole service."""
    rig.graph.delay = 0.05
    port = free_port()
    daemon = rig.daemon(metrics={"listen": f"127.0.0.1:{port}"})
    for n in range(40):
        drop_maildir(daemon.spool, message(sender=SENDER, subject=f"m{n}"))
    rig.graph.wait_for(40, timeout=30)
    assert rig.graph.most_in_flight[SENDER] <= 4
    assert rig.graph.connections <= 8, rig.graph.connections
    wait_until(lambda: len(daemon.events("sent")) == 40, 10, "40 sent")
    key = 'pickupd_graph_replies_total{relay="graph",status="202"}'
    wait_until(lambda: scrape(port).get(key) == 40, 5, "40 replies of 202 in the metrics")


def test_check_lists_graphs_preset_and_a_graph_relay_needs_an_app_login(rig: Rig) -> None:
    """`pickupd check` shows a Graph relay's limits (Graph's and Exchange's); a Graph relay
    with a password login is a config error naming the key."""
    shown = pickupd("check", "-c", str(rig.config()))
    assert shown.returncode == 0, shown
    assert (
        "relays.graph.mailbox_limits (each login): 4 connections (graph's), 10000 messages/10m"
        " (graph's), 10000 recipients/day (graph's), 500 recipients/message (graph's)"
    ) in shown.stdout
    config = rig.tmp / "pickupd.toml"
    config.write_text(
        f'[spool]\npath = "{rig.tmp / "spool"}"\n'
        '[relays.graph]\ntransport = "graph"\nusername = "a@contoso.example"\n'
        'password_env = "X"\n'
        '[senders."a@contoso.example"]\nrelay = "graph"\n'
    )
    result = pickupd("check", "-c", str(config), env={"X": "secret"})
    assert result.returncode == 78, result
    assert 'relays.graph.auth: transport = "graph" logs in with auth = "oauth2"' in result.stderr


def test_check_connect_gets_a_graph_token_and_reads_its_permission(rig: Rig) -> None:
    """`check --connect` on a Graph relay gets an app-only token for Graph's scope through
    msal and says it carries Mail.Send, and what only sending proves; without Mail.Send,
    or with a wrong secret, FAILED (exit 1) naming what to fix."""
    config = rig.config()
    env = {"REQUESTS_CA_BUNDLE": rig.ca.ca_file}
    ok = pickupd("check", "--connect", "-c", str(config), env=env)
    assert ok.returncode == 0, ok
    assert f"ok: token acquired for {rig.graph.url}/.default" in ok.stdout
    assert "with the application permission Mail.Send" in ok.stdout
    assert "RBAC for Applications" in ok.stdout
    rig.tokens.roles = ["User.Read.All"]
    rig.tokens.revoke_all()
    lacking = pickupd("check", "--connect", "-c", str(config), env=env)
    assert lacking.returncode == 1 and "lack Mail.Send" in lacking.stdout, lacking
    rig.tokens.clients["app-id"] = "another secret"
    wrong = pickupd("check", "--connect", "-c", str(config), env=env)
    assert wrong.returncode == 1 and "FAILED" in wrong.stdout and "invalid_client" in wrong.stdout
    assert CLIENT_SECRET not in ok.stdout + ok.stderr + wrong.stdout + wrong.stderr


class _ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), as an egress proxy does for HTTPS; it
    counts the tunnels it opened, by target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode()
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                method, target, _ = line.split(" ", 2)
                if method != "CONNECT":
                    self.wfile.write(b"HTTP/1.1 405 Only CONNECT\r\n\r\n")
                    return
                owner.tunnels.append(target)
                host, port = target.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=10) as upstream:
                    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    self.wfile.flush()
                    pipes = [
                        threading.Thread(target=_pipe, args=(self.connection, upstream)),
                        threading.Thread(target=_pipe, args=(upstream, self.connection)),
                    ]
                    for pipe in pipes:
                        pipe.start()
                    for pipe in pipes:
                        pipe.join(30)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)


def test_graph_and_its_token_go_through_the_proxy_the_environment_names(rig: Rig) -> None:
    """HTTPS_PROXY in the service's environment (as an operator sets it in the unit's
    Environment=): the sendMail requests and msal's token requests go through the proxy's
    tunnels, and the message arrives."""
    proxy = _ConnectProxy()
    try:
        daemon = rig.daemon(env={"HTTPS_PROXY": proxy.url})
        drop_maildir(daemon.spool, message(sender=SENDER))
        rig.graph.wait_for(1, timeout=20)
        graph_host = rig.graph.url.removeprefix("https://")
        token_host = rig.tokens.url.removeprefix("https://")
        assert graph_host in proxy.tunnels and token_host in proxy.tunnels, proxy.tunnels
    finally:
        proxy.stop()

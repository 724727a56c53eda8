"""The HTTP endpoint that serves /metrics: prometheus-client's WSGI app behind basic auth
(when `[metrics] basic_auth_user` is set) and TLS (`tls_cert_file`), in a thread of its own.
prometheus-client's own server takes TLS but no basic auth; Prometheus's scrape config sends
both (`basic_auth`, `tls_config`), as its own web config asks them of its clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pickupd.auth.logins import Secret

__all__ = ["Endpoint", "serve"]

_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    """No access log on stderr: scrapes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _guarded(app: _App, user: str, password: Secret) -> _App:
    """`app`, answering 401 to a request without `user`'s credentials (compared in constant
    time, as digests: neither length nor content shows in the timing)."""
    wanted = _digest(f"{user}:{password.reveal()}")

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            given = ""
        if scheme.lower() == "basic" and hmac.compare_digest(_digest(given), wanted):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="pickupd"'), ("Content-Type", "text/plain")],
        )
        return [b"401: basic auth required\n"]

    return guarded


class Endpoint:
    """A running endpoint; `close()` stops it."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(
    app: _App,
    listen: tuple[str, int],
    tls: tuple[Path, Path] | None = None,
    auth: tuple[str, Secret] | None = None,
) -> Endpoint:
    """Serve `app` on host:port (OSError if it cannot listen; ssl.SSLError for a bad
    certificate or key)."""
    host, port = listen
    if auth is not None:
        app = _guarded(app, *auth)
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_class=server_class, handler_class=_Quiet)
    if tls is not None:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        except BaseException:
            server.server_close()
            raise
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return Endpoint(server)

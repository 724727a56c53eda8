"""A Microsoft Graph `sendMail` endpoint over HTTPS on 127.0.0.1, as Microsoft documents it.

`POST /v1.0/users/{id}/sendMail` with `Content-Type: text/plain` and the base64 of a MIME
message: 202 Accepted, no body. A bearer token the token endpoint (tests/tokenserver.py)
issued for this server's scope (`{url}/.default`), else 401 with Graph's error body
(`InvalidAuthenticationToken`). A request body over 4 MB: 413 with
`ErrorMessageSizeExceeded`. Tests script other answers (`answers`: status, Graph error code,
Retry-After), a delay before each answer (a remote service's latency), and read what it
received: the URL's mailbox, the token, and the decoded message.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from smtpserver import TestCA
from tokenserver import TokenServer

__all__ = ["GraphServer", "Posted"]

LIMIT = 4 * 1024 * 1024


@dataclass
class Posted:
    """One sendMail request the server accepted (202)."""

    mailbox: str
    token: str
    mime: bytes
    at: float = field(default_factory=time.time)


class GraphServer:
    """The endpoint; `url` once started."""

    __test__ = False

    def __init__(self, ca: TestCA, tokens: TokenServer, delay: float = 0.0) -> None:
        self.ca = ca
        self.tokens = tokens
        self.delay = delay
        self.posted: list[Posted] = []
        self.requests = 0
        self.connections = 0  # TCP connections accepted (each a TLS handshake)
        # Scripted answers, used one per request before the normal ones: (status, code,
        # Retry-After or None).
        self.answers: deque[tuple[int, str, float | None]] = deque()
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    @property
    def scope(self) -> str:
        return f"{self.url}/.default"

    def start(self) -> GraphServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def get_request(self) -> Any:
                with owner._lock:
                    owner.connections += 1
                return super().get_request()

        server = Server(("127.0.0.1", 0), Handler)
        server.socket = self.ca.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self.url = f"https://127.0.0.1:{server.server_address[1]}"
        self.tokens.scopes.add(self.scope)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Posted]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.posted) >= count:
                    return list(self.posted)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} sendMail within {timeout}s, got {len(self.posted)}")

    def handle(
        self, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        parts = urllib.parse.unquote(path).split("/")
        if len(parts) != 5 or parts[1:3] != ["v1.0", "users"] or parts[4] != "sendMail":
            return 404, _error("ResourceNotFound", f"no such resource {path}"), {}
        mailbox = parts[3]
        with self._lock:
            self.requests += 1
            now = self.in_flight.get(mailbox, 0) + 1
            self.in_flight[mailbox] = now
            self.most_in_flight[mailbox] = max(self.most_in_flight.get(mailbox, 0), now)
        try:
            if self.delay:
                time.sleep(self.delay)
            auth = headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ")
            if not auth.startswith("Bearer ") or self.tokens.scope_of(token) != self.scope:
                return (
                    401,
                    _error("InvalidAuthenticationToken", "Access token is empty or invalid."),
                    {},
                )
            with self._lock:
                scripted = self.answers.popleft() if self.answers else None
            if scripted is not None:
                status, code, retry = scripted
                extra = {} if retry is None else {"Retry-After": f"{retry:g}"}
                return status, _error(code, f"scripted {code}"), extra
            if headers.get("Content-Type", "").split(";")[0].strip() != "text/plain":
                return 400, _error("RequestBodyRead", "expected text/plain (MIME) or JSON"), {}
            if len(body) > LIMIT:
                return (
                    413,
                    _error(
                        "ErrorMessageSizeExceeded",
                        "The message exceeds the maximum supported size.",
                    ),
                    {},
                )
            try:
                mime = base64.b64decode(body, validate=True)
            except ValueError:
                return (
                    400,
                    _error(
                        "ErrorMimeContentInvalidBase64String",
                        "Invalid base64 string for MIME content.",
                    ),
                    {},
                )
            with self._lock:
                self.posted.append(Posted(mailbox, token, mime))
            return 202, None, {}
        finally:
            with self._lock:
                self.in_flight[mailbox] -= 1


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    server_owner: GraphServer
    protocol_version = "HTTP/1.1"  # keep-alive, as Graph's front door

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        status, doc, extra = self.server_owner.handle(self.path, self.headers, body)
        data = b"" if doc is None else json.dumps(doc).encode()
        try:
            self.send_response(status)
            if doc is not None:
                self.send_header("Content-Type", "application/json")
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

"""A real OAuth2 token endpoint over HTTPS on 127.0.0.1, for the OAuth2 tests.

It speaks what the libraries pickupd uses send, through their real code paths:
- msal (Microsoft 365 app-only): the tenant's OpenID discovery document, then the
  client-credentials grant at `/<tenant>/oauth2/v2.0/token`;
- google-auth: the JWT-bearer grant of a service account (the assertion's signature is
  checked against the account's public key, its `sub` is the mailbox) and the refresh-token
  grant at `/token`, each refresh token good once (rotated on use, as providers do).

It issues tokens with `expires_in`, remembers whom each is for, counts requests, and can
answer `mode = "invalid_client"`, `"500"` or `"stall"`. The SMTP test server asks `valid()`
whether a token presented with AUTH XOAUTH2 is good for that mailbox.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from smtpserver import TestCA

__all__ = ["CLIENT_SECRET", "Issued", "TokenServer"]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs service-account assertions for Google's endpoint, whatever token_uri says.
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"


# The one client secret the tests' token endpoint knows (never to be seen in any output).
CLIENT_SECRET = "client-s3cret-never-logged"


@dataclass
class Issued:
    """One access token handed out: for whom (None: app-only, any mailbox), until when."""

    user: str | None
    expires_at: float
    revoked: bool = False
    scope: str = ""  # what a client-credentials token was asked for


class TokenServer:
    """The endpoint; `url` once started. All state is guarded by one lock."""

    __test__ = False

    def __init__(self, ca: TestCA, *, expires_in: int = 3600) -> None:
        self.ca = ca
        self.expires_in = expires_in
        self.mode = "ok"
        self.clients: dict[str, str] = {}  # client_id -> client_secret
        self.service_accounts: dict[str, str] = {}  # client_email -> public key PEM
        self.refresh_tokens: set[str] = set()  # currently valid (each is used once)
        # Scopes a client-credentials grant may ask for (a Graph test adds its server's).
        self.scopes = {"https://outlook.office365.com/.default"}
        # The application permissions an app-only token says it carries (its `roles` claim:
        # client-credentials tokens are JWTs, as Microsoft's are).
        self.roles = ["Mail.Send"]
        self.issued: dict[str, Issued] = {}
        self.requests: list[tuple[float, str, str]] = []  # (time, path, grant_type)
        self.presented_expired = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._stall = threading.Event()
        self.url = ""

    # -- test API ------------------------------------------------------------------------

    def start(self) -> TokenServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = self.ca.server_context()
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        self.url = f"https://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stall.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def new_refresh_token(self) -> str:
        token = "rt-" + secrets.token_urlsafe(16)
        with self._lock:
            self.refresh_tokens.add(token)
        return token

    def token_requests(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return [r for r in self.requests if r[2]]

    def revoke_all(self) -> None:
        with self._lock:
            for issued in self.issued.values():
                issued.revoked = True

    def valid(self, token: str, user: str) -> bool:
        """Whether `token` may log in as `user` now (expired ones are counted)."""
        with self._lock:
            issued = self.issued.get(token)
            if issued is None or issued.revoked:
                return False
            if issued.expires_at <= time.time():
                self.presented_expired += 1
                return False
            return issued.user is None or issued.user.lower() == user.lower()

    # -- the endpoint --------------------------------------------------------------------

    def handle(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        with self._lock:
            self.requests.append((time.time(), path, grant))
            mode = self.mode
        if method == "GET" and path.endswith("/v2.0/.well-known/openid-configuration"):
            base = self.url + path.removesuffix("/v2.0/.well-known/openid-configuration")
            return 200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
            }
        if method != "POST":
            return 404, {"error": "not_found"}
        if mode == "stall":
            # The client gives up long before; what it abandoned must not spend a refresh token.
            self._stall.wait(30)
            return 504, {"error": "temporarily_unavailable", "error_description": "stalled"}
        if mode == "500":
            return 500, {"error": "server_error", "error_description": "try again later"}
        if mode == "invalid_client":
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
            }
        if grant == "client_credentials":
            if self.clients.get(form.get("client_id", "")) != form.get("client_secret"):
                return 401, {"error": "invalid_client", "error_description": "bad secret"}
            if form.get("scope") not in self.scopes:
                return 400, {"error": "invalid_scope", "error_description": form.get("scope")}
            return 200, self._issue(None, form["scope"])
        if grant == "refresh_token" and mode == "inactive":
            # Microsoft's answer for a refresh token unused for 90 days.
            return 400, {
                "error": "invalid_grant",
                "error_description": "AADSTS700082: The refresh token has expired due to"
                " inactivity.",
            }
        if grant == "refresh_token":
            if self.clients.get(form.get("client_id", "")) != form.get("client_secret"):
                return 401, {"error": "invalid_client", "error_description": "bad secret"}
            with self._lock:
                if form.get("refresh_token") not in self.refresh_tokens:
                    return 400, {"error": "invalid_grant", "error_description": "used or unknown"}
                self.refresh_tokens.discard(form["refresh_token"])
            return 200, {**self._issue(None), "refresh_token": self.new_refresh_token()}
        if grant == JWT_BEARER:
            return self._jwt_bearer(form.get("assertion", ""))
        return 400, {"error": "unsupported_grant_type"}

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
            key = self.service_accounts[claims["iss"]]
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=GOOGLE_AUDIENCE)
        except (KeyError, jwt.PyJWTError) as exc:
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        if claims.get("scope") != "https://mail.google.com/" or not claims.get("sub"):
            return 400, {"error": "invalid_scope", "error_description": "scope or sub"}
        return 200, self._issue(claims["sub"])

    def scope_of(self, token: str) -> str | None:
        """The scope `token` was issued for, if it is good now (None: unknown, revoked or
        expired)."""
        with self._lock:
            issued = self.issued.get(token)
            if issued is None or issued.revoked or issued.expires_at <= time.time():
                return None
            return issued.scope

    def _issue(self, user: str | None, scope: str = "") -> dict[str, Any]:
        token = "at-" + secrets.token_urlsafe(24)
        if scope:  # a JWT with its roles (signed with a throwaway key: only Graph checks it)
            claims = {"roles": self.roles, "aud": scope.removesuffix("/.default")}
            token = jwt.encode({**claims, "jti": token}, "k" * 32, algorithm="HS256")
        with self._lock:
            self.issued[token] = Issued(user, time.time() + self.expires_in, scope=scope)
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}


class _Handler(BaseHTTPRequestHandler):
    server_owner: TokenServer

    def do_GET(self) -> None:
        self._answer("GET", {})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
        self._answer("POST", form)

    def _answer(self, method: str, form: dict[str, str]) -> None:
        path = urllib.parse.urlsplit(self.path).path
        status, doc = self.server_owner.handle(method, path, form)
        body = json.dumps(doc).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (a stall)

    def log_message(self, format: str, *args: Any) -> None:
        pass

"""Getting one OAuth2 access token from a token source: msal for Microsoft 365, google-auth for
Google service accounts and stored refresh tokens, or a command. Blocking calls: tokencache.py
runs them off the event loop and keeps what they return.

A failure is a `TokenError` that names the source and says whether it looks like
misconfiguration (the endpoint answered invalid_client, unauthorized_client, invalid_grant...)
or a passing trouble (unreachable, 5xx, timed out). Tokens and secrets never appear in it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pickupd.auth import health
from pickupd.auth.childenv import child_env
from pickupd.auth.logins import (
    GOOGLE_SCOPE,
    CommandSource,
    GoogleSource,
    MicrosoftSource,
    RefreshTokenSource,
    Secret,
    TokenSource,
)
from pickupd.errors import TokenError
from pickupd.spool.files import atomic_write, try_lock

__all__ = ["COMMAND_TOKEN_LIFETIME", "Fetcher", "Token", "TokenError"]

# A token printed by a command as plain text (no expiry given) is used this long.
COMMAND_TOKEN_LIFETIME = 300.0
# OAuth2 error codes that mean the login is set up wrong, not that the endpoint is unwell.
_MISCONFIGURED = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_grant",
        "invalid_request",
        "invalid_scope",
        "unsupported_grant_type",
        "access_denied",
    }
)


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when it expires (Unix time); the value never prints itself."""

    value: Secret
    expires_at: float
    fetched_at: float


class Fetcher:
    """Fetches tokens, keeping what a library wants kept between calls (msal's app and its
    token cache, per source). Not thread-safe per source: tokencache.py runs one fetch per
    source and mailbox at a time."""

    def __init__(self) -> None:
        self._msal_apps: dict[MicrosoftSource, Any] = {}

    def fetch(self, source: TokenSource, user: str) -> Token:
        """A fresh token for `user` (the mailbox) from `source`; TokenError if none."""
        if isinstance(source, MicrosoftSource):
            return self._microsoft(source)
        if isinstance(source, GoogleSource):
            return _google(source, user)
        if isinstance(source, RefreshTokenSource):
            return _refresh(source)
        return _command(source, user)

    def forget(self, source: TokenSource) -> None:
        """Drop what is kept for `source` (a token the relay refused must not come back from
        a library's own cache: msal's acquire_token_for_client cannot be forced)."""
        if isinstance(source, MicrosoftSource):
            self._msal_apps.pop(source, None)

    def _microsoft(self, source: MicrosoftSource) -> Token:
        import msal
        import requests

        started = time.time()
        try:
            app = self._msal_apps.get(source)
            if app is None:
                # The constructor fetches the tenant's OpenID configuration already.
                app = msal.ConfidentialClientApplication(
                    source.client_id,
                    client_credential=_msal_credential(source),
                    authority=f"{source.authority}/{source.tenant}",
                    instance_discovery=False,  # sovereign clouds and test endpoints too
                    timeout=source.timeout,
                    token_cache=msal.TokenCache(),
                )
                self._msal_apps[source] = app
            result = app.acquire_token_for_client(scopes=[source.scope])
        except requests.exceptions.Timeout:
            raise TokenError(
                source.describe(), f"token endpoint timed out after {source.timeout:g}s"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise TokenError(
                source.describe(), f"token endpoint unreachable: {_first_line(exc)}"
            ) from None
        except msal.exceptions.MsalServiceError as exc:
            raise TokenError(
                source.describe(), f"token endpoint error: {_first_line(exc)}"
            ) from None
        except ValueError as exc:  # msal: the tenant's discovery document was refused (4xx)
            raise TokenError(source.describe(), _first_line(exc), misconfigured=True) from None
        if "access_token" in result:
            expires_in = float(result.get("expires_in", 3600))
            return Token(Secret(result["access_token"]), started + expires_in, started)
        error = str(result.get("error", "error"))
        description = _first_line(result.get("error_description") or "")
        raise TokenError(
            source.describe(),
            f"{error}: {description}" if description else error,
            misconfigured=error in _MISCONFIGURED,
            code=error if error in _MISCONFIGURED else "",
        )


def _msal_credential(source: MicrosoftSource) -> str | dict[str, str]:
    if source.client_secret is not None:
        return source.client_secret.reveal()
    assert source.certificate_file is not None and source.key_file is not None
    try:
        credential = {
            "private_key": source.key_file.read_text(),
            "public_certificate": source.certificate_file.read_text(),
        }
    except OSError as exc:  # a login problem, not a connection problem: name the file
        raise TokenError(
            source.describe(),
            f"cannot read {exc.filename}: {exc.strerror or exc}",
            misconfigured=True,
        ) from None
    if source.thumbprint:
        credential["thumbprint"] = source.thumbprint.replace(":", "")
    return credential


class _Request:
    """google-auth's requests transport with our timeout (its own default is 120 s)."""

    def __init__(self, timeout: float) -> None:
        import google.auth.transport.requests

        self._request = google.auth.transport.requests.Request()
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = self._timeout
        return self._request(*args, **kwargs)


def _google_errors(source: TokenSource, call: Any) -> Any:
    """Run a google-auth refresh, turning its exceptions into TokenError."""
    import google.auth.exceptions

    try:
        return call()
    except google.auth.exceptions.RefreshError as exc:
        error = _oauth_error(exc)
        retryable = bool(getattr(exc, "retryable", False))
        raise TokenError(
            source.describe(),
            _first_line(exc.args[0] if exc.args else exc),
            misconfigured=not retryable and error in _MISCONFIGURED,
            code=error if error in _MISCONFIGURED else "",
        ) from None
    except google.auth.exceptions.TransportError as exc:
        raise TokenError(
            source.describe(), f"token endpoint unreachable: {_first_line(exc)}"
        ) from None
    except (OSError, ValueError) as exc:
        raise TokenError(source.describe(), _first_line(exc), misconfigured=True) from None


def _oauth_error(exc: Exception) -> str:
    """The OAuth2 `error` code in a google-auth RefreshError, if it carries the response."""
    for arg in exc.args:
        if isinstance(arg, dict) and "error" in arg:
            return str(arg["error"])
    text = str(exc.args[0]) if exc.args else ""
    return text.split(":", 1)[0].strip()


def _expiry(value: datetime.datetime | None, fetched: float, default: float) -> float:
    if value is None:
        return fetched + default
    return value.replace(tzinfo=datetime.UTC).timestamp()


def _google(source: GoogleSource, user: str) -> Token:
    from google.oauth2 import service_account

    started = time.time()

    def refresh() -> Any:
        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(source.service_account_file), scopes=[GOOGLE_SCOPE]
        ).with_subject(user)
        credentials.refresh(_Request(source.timeout))
        return credentials

    credentials = _google_errors(source, refresh)
    return Token(Secret(credentials.token), _expiry(credentials.expiry, started, 3600), started)


def _lock_current(source: RefreshTokenSource, path: Path, deadline: float) -> int:
    """An open, locked descriptor of the file `path` names now. A write-back replaces the
    file (a rename), so a lock won on the file as it was before is given up and taken again
    on the new one: two processes (workers, `check --connect`) never hold it at once."""
    while True:
        try:
            lock = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise TokenError(source.describe(), f"cannot read {path}: {exc.strerror}") from None
        while not try_lock(lock):
            if time.monotonic() > deadline:
                os.close(lock)
                raise TokenError(source.describe(), f"{path} stayed locked by another process")
            time.sleep(0.05)
        try:
            current = os.stat(path).st_ino == os.fstat(lock).st_ino
        except OSError:
            current = False
        if current:
            return lock
        os.close(lock)


def _refresh(source: RefreshTokenSource) -> Token:
    """One refresh-token grant. The file is locked meanwhile, so two pickupd processes (the
    daemon and `check --connect`) never spend the same refresh token; a rotated one is
    written back, atomically, with the file's mode."""
    from google.oauth2 import credentials as oauth2

    path = source.refresh_token_file
    started = time.time()
    lock = _lock_current(source, path, time.monotonic() + source.timeout)
    try:
        refresh_token = path.read_text().strip()
        if not refresh_token:
            raise TokenError(source.describe(), f"{path} is empty", misconfigured=True)
        credentials = oauth2.Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=refresh_token,
            token_uri=source.token_url,
            client_id=source.client_id,
            client_secret=source.client_secret.reveal() if source.client_secret else None,
        )
        try:
            _google_errors(
                source,
                lambda: credentials.refresh(_Request(source.timeout)),  # type: ignore[no-untyped-call]
            )
        except TokenError as exc:
            exc.refused_now = health.note_failed(path, time.time(), exc.code, str(exc))
            raise
        rotated = credentials.refresh_token
        if rotated and rotated != refresh_token:
            _write_back(path, rotated)
        health.note_worked(path, time.time())
    finally:
        os.close(lock)  # releases the lock
    expires_at = _expiry(credentials.expiry, started, 3600)
    return Token(Secret(str(credentials.token)), expires_at, started)


def _write_back(path: Path, refresh_token: str) -> None:
    mode = path.stat().st_mode & 0o777
    atomic_write(path, f"{refresh_token}\n".encode())
    os.chmod(path, mode)


def _command(source: CommandSource, user: str) -> Token:
    """Run the command (no shell; the mailbox in $PICKUPD_MAILBOX). Its stdout is the token,
    or a JSON object with access_token and expires_in."""
    started = time.time()
    env = child_env(PICKUPD_MAILBOX=user)  # no other login's secret (auth/childenv.py)
    try:
        done = subprocess.run(
            list(source.command),
            capture_output=True,
            timeout=source.timeout,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise TokenError(
            source.describe(), f"timed out after {source.timeout:g}s (killed)"
        ) from None
    except OSError as exc:
        raise TokenError(
            source.describe(), f"cannot run: {exc.strerror}", misconfigured=True
        ) from None
    stderr = _first_line(done.stderr.decode("utf-8", "replace"))
    if done.returncode != 0:
        said = f": {stderr}" if stderr else ""
        raise TokenError(source.describe(), f"exited with status {done.returncode}{said}")
    out = done.stdout.decode("utf-8", "replace").strip()
    lifetime = COMMAND_TOKEN_LIFETIME
    if out.startswith("{"):
        with contextlib.suppress(ValueError, TypeError):
            doc = json.loads(out)
            out = str(doc["access_token"]).strip()
            lifetime = float(doc.get("expires_in", lifetime))
    if not out or "\n" in out:
        raise TokenError(source.describe(), "printed no token (one line, or a JSON access_token)")
    return Token(Secret(out), started + lifetime, started)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0][:300] if text else ""

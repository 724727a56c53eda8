"""Logins for relays, as the config declares them: a username with its password, or an OAuth2
login (SASL XOAUTH2) with the source of its access tokens. Secrets never print themselves, and
a secret file others can read is refused.

Token sources (one per OAuth2 login, told apart by their keys):
- `tenant`: Microsoft 365 app-only (client credentials) through msal;
- `service_account_file`: a Google service account with domain-wide delegation (google-auth);
- `refresh_token_file`: a stored refresh token, rotated tokens written back (google-auth);
- `token_command`: a command that prints an access token (as msmtp's passwordeval).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pickupd.config.keys import Reader, positive_duration, string, type_name
from pickupd.config.keys import command as settings_command

__all__ = [
    "CREDENTIAL_KEYS",
    "GOOGLE_SCOPE",
    "MICROSOFT_AUTHORITY",
    "MICROSOFT_SCOPE",
    "CommandSource",
    "Credentials",
    "GoogleSource",
    "Login",
    "MicrosoftSource",
    "OAuth2Login",
    "RefreshTokenSource",
    "Secret",
    "TokenSource",
    "XOAuth2",
    "bind",
    "others_can_access",
    "read_credentials",
    "read_secret",
]

_PASSWORD_KEYS = frozenset({"password", "password_file", "password_env"})
_SECRET_KEYS = frozenset({"client_secret", "client_secret_file", "client_secret_env"})
_OAUTH2_KEYS = frozenset(
    {
        "tenant",
        "client_id",
        "client_certificate_file",
        "client_key_file",
        "thumbprint",
        "authority",
        "service_account_file",
        "token_url",
        "refresh_token_file",
        "token_command",
        "token_timeout",
    }
)
# Every key a relay or sender table may hold for its login.
CREDENTIAL_KEYS = frozenset({"username", "auth"}) | _PASSWORD_KEYS | _SECRET_KEYS | _OAUTH2_KEYS
# The key that says which token source an OAuth2 login uses.
_SOURCE_KEYS = ("tenant", "service_account_file", "refresh_token_file", "token_command")

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"


class Secret:
    """A password. It never prints itself: repr, str and f-strings show `***`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the one place that sends it (AUTH)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and its password; the pool keys sessions by these."""

    username: str
    password: Secret


@dataclass(frozen=True, slots=True)
class MicrosoftSource:
    """Microsoft 365 app-only tokens (client credentials) for one app registration."""

    tenant: str
    client_id: str
    authority: str = MICROSOFT_AUTHORITY
    client_secret: Secret | None = None
    certificate_file: Path | None = None  # with key_file: a certificate credential
    key_file: Path | None = None
    thumbprint: str | None = None  # SHA-1, as the portal shows it; else msal computes one
    timeout: float = 30.0  # for each request to the token endpoint

    def describe(self) -> str:
        return f"microsoft365 token for client_id {self.client_id} (tenant {self.tenant})"


@dataclass(frozen=True, slots=True)
class GoogleSource:
    """Google Workspace tokens from a service account with domain-wide delegation."""

    service_account_file: Path
    timeout: float = 30.0  # for each request to the token endpoint

    def describe(self) -> str:
        return f"google service account token ({self.service_account_file})"


@dataclass(frozen=True, slots=True)
class RefreshTokenSource:
    """Tokens from a stored refresh token at a token endpoint (rotated ones written back)."""

    token_url: str
    client_id: str
    refresh_token_file: Path
    client_secret: Secret | None = None
    timeout: float = 30.0  # for each request to the token endpoint

    def describe(self) -> str:
        return f"refresh token grant at {self.token_url}"


@dataclass(frozen=True, slots=True)
class CommandSource:
    """Tokens printed by a command (run without a shell, with a timeout)."""

    command: tuple[str, ...]
    timeout: float = 30.0

    def describe(self) -> str:
        return f"token_command {self.command[0]}"


TokenSource = MicrosoftSource | GoogleSource | RefreshTokenSource | CommandSource


@dataclass(frozen=True, slots=True)
class OAuth2Login:
    """An OAuth2 login: where its tokens come from, and the mailbox it logs in as (None:
    the envelope sender's address, so one app registration serves a whole domain)."""

    source: TokenSource
    username: str | None = None


Login = Credentials | OAuth2Login


@dataclass(frozen=True, slots=True)
class XOAuth2:
    """An OAuth2 login bound to the mailbox of one message: what a session logs in as."""

    source: TokenSource
    username: str  # the mailbox (XOAUTH2's user=), named as Credentials name theirs


def bind(login: Login | None, sender: str) -> Credentials | XOAuth2 | None:
    """The identity a session for `sender`'s mail logs in with (the pool keys by it)."""
    if isinstance(login, OAuth2Login):
        return XOAuth2(login.source, login.username or sender)
    return login


def others_can_access(path: Path) -> bool:
    """True if users other than the owner and group may read or write `path`."""
    return bool(path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH))


def read_secret(reader: Reader, table: Mapping[str, Any], prefix: str, base: str) -> Secret | None:
    """One secret from `<base>`, `<base>_file` or `<base>_env` of `table` (exactly one of them
    must be there; the caller checked that one is). Problems go to `reader`."""
    sources = [key for key in (base, f"{base}_file", f"{base}_env") if key in table]
    if len(sources) > 1:
        reader.problem(prefix + sources[1], f"give only one of {', '.join(sources)}")
        return None
    source = sources[0]
    value = table[source]
    if not isinstance(value, str) or not value:
        reader.problem(prefix + source, f"expected a non-empty string, got {type_name(value)}")
        return None
    if source == base:
        return Secret(value)
    if source.endswith("_env"):
        env = os.environ.get(value)
        if env is None:
            reader.problem(prefix + source, f"environment variable {value} is not set")
            return None
        return Secret(env)
    file = reader.file(value)
    try:
        if others_can_access(file):
            reader.problem(
                prefix + source,
                f"{file} can be read by others; chmod o-rw {file} (as with ssh and msmtp)",
            )
            return None
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        reader.problem(prefix + source, f"cannot read {file}: {exc.strerror or exc}")
        return None
    # `echo secret > file` leaves one newline: that is not part of the secret.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        reader.problem(prefix + source, f"{file} is empty")
        return None
    return Secret(text)


def _private_file(reader: Reader, table: Mapping[str, Any], prefix: str, key: str) -> Path | None:
    """A file holding a secret (a key, a service account, a refresh token): it must exist
    and others may not read it (the same rule as password_file)."""
    value = reader.get(table, prefix, key, None, string, "a file path")
    if value is None:
        return None
    path = reader.file(value)
    try:
        if others_can_access(path):
            reader.problem(
                prefix + key,
                f"{path} can be read by others; chmod o-rw {path} (as with ssh and msmtp)",
            )
            return None
    except OSError as exc:
        reader.problem(prefix + key, f"cannot read {path}: {exc.strerror or exc}")
        return None
    return path


def _https_url(value: Any) -> str:
    text = string(value)
    url = urlparse(text)
    if url.scheme != "https" or not url.hostname:
        raise ValueError("expected an https:// URL")
    return text.rstrip("/")


def _read_oauth2(reader: Reader, table: Mapping[str, Any], prefix: str) -> OAuth2Login | None:
    """`auth = "oauth2"` and one token source (see the module docstring)."""
    for key in _PASSWORD_KEYS:
        if key in table:
            reader.problem(prefix + key, 'not used with auth = "oauth2" (tokens replace it)')
    username = reader.get(table, prefix, "username", None, string, "a mailbox address")
    sources = [key for key in _SOURCE_KEYS if key in table]
    if len(sources) != 1:
        if sources:
            reader.problem(prefix + sources[1], f"give only one of {', '.join(sources)}")
        else:
            reader.problem(
                prefix + "auth",
                "oauth2 needs a token source: tenant (Microsoft 365), service_account_file"
                " (Google), refresh_token_file or token_command",
            )
        return None
    kind = sources[0]
    timeout = reader.get(table, prefix, "token_timeout", 30.0, positive_duration, "a duration")

    def required(key: str, convert: Any = string, expected: str = "a non-empty string") -> Any:
        if key not in table:
            reader.problem(prefix + key, f"required with {kind}")
            return None
        return reader.get(table, prefix, key, None, convert, expected)

    def secret() -> Secret | None:
        return (
            read_secret(reader, table, prefix, "client_secret")
            if _SECRET_KEYS & set(table)
            else None
        )

    source: TokenSource | None = None
    if kind == "tenant":
        tenant, client_id = required("tenant"), required("client_id")
        authority = reader.get(
            table, prefix, "authority", MICROSOFT_AUTHORITY, _https_url, "an https:// URL"
        )
        client_secret = secret()
        certificate = _private_file(reader, table, prefix, "client_certificate_file")
        key_file = _private_file(reader, table, prefix, "client_key_file")
        thumbprint = reader.get(table, prefix, "thumbprint", None, string, "a hex string")
        with_secret = bool(_SECRET_KEYS & set(table))
        with_certificate = {"client_certificate_file", "client_key_file"} <= set(table)
        if with_secret == with_certificate:
            reader.problem(
                prefix + "client_id",
                "needs either client_secret_file (or _env), or client_certificate_file"
                " with client_key_file",
            )
        elif tenant and client_id and (client_secret or (certificate and key_file)):
            source = MicrosoftSource(
                tenant=tenant,
                client_id=client_id,
                authority=authority,
                client_secret=client_secret,
                certificate_file=certificate,
                key_file=key_file,
                thumbprint=thumbprint,
                timeout=timeout,
            )
    elif kind == "service_account_file":
        path = _private_file(reader, table, prefix, "service_account_file")
        if path is not None:
            source = GoogleSource(path, timeout)
    elif kind == "refresh_token_file":
        token_url = required("token_url", _https_url, "an https:// URL")
        client_id = required("client_id")
        path = _private_file(reader, table, prefix, "refresh_token_file")
        client_secret = secret()
        if token_url and client_id and path is not None:
            source = RefreshTokenSource(token_url, client_id, path, client_secret, timeout)
    else:
        command = reader.get(table, prefix, "token_command", None, settings_command, "")
        if command is not None:
            source = CommandSource(command, timeout)
    return None if source is None else OAuth2Login(source, username)


def read_credentials(reader: Reader, table: Mapping[str, Any], prefix: str) -> Login | None:
    """The login a relay or sender table declares: `auth = "oauth2"` with a token source,
    or username + one of password / password_file / password_env; None if it has none."""
    auth = reader.get(table, prefix, "auth", "password", _auth, "")
    if auth == "oauth2":
        return _read_oauth2(reader, table, prefix)
    for key in sorted((_SECRET_KEYS | _OAUTH2_KEYS) & set(table)):
        reader.problem(prefix + key, 'goes with auth = "oauth2"')
    username = reader.get(table, prefix, "username", None, string, "a non-empty string")
    sources = [key for key in ("password", "password_file", "password_env") if key in table]
    if len(sources) > 1:
        reader.problem(prefix + sources[1], f"give only one of {', '.join(sources)}")
        return None
    if username is None:
        if sources:
            reader.problem(prefix + "username", f"required with {sources[0]}")
        return None
    if not sources:
        reader.problem(prefix + "username", "needs a password, password_file or password_env")
        return None
    password = read_secret(reader, table, prefix, "password")
    return None if password is None else Credentials(username, password)


def _auth(value: Any) -> str:
    if value not in ("password", "oauth2"):
        raise ValueError('expected "password" or "oauth2"')
    return str(value)

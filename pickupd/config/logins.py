"""Reading a relay's or a sender's login from its TOML table: a password (inline, from a
file or the environment) or an OAuth2 login with one token source (see auth/logins.py). A
secret file others can read is refused, as ssh and msmtp refuse one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pickupd.auth.logins import (
    MICROSOFT_AUTHORITY,
    REFRESH_KEEPALIVE,
    TOKEN_TIMEOUT,
    CommandSource,
    Credentials,
    GoogleSource,
    Login,
    MicrosoftSource,
    OAuth2Login,
    RefreshTokenSource,
    Secret,
    TokenSource,
)
from pickupd.config.keys import (
    Reader,
    choice,
    https_url,
    keys,
    pathname,
    positive_duration,
    setting,
    string,
    type_name,
)
from pickupd.config.keys import command as settings_command

__all__ = [
    "CREDENTIAL_KEYS",
    "PASSWORD_KEYS",
    "LoginKeys",
    "PasswordKeys",
    "given",
    "others_can_access",
    "read_credentials",
    "read_secret",
    "secret_keys",
]


def secret_keys(base: str) -> tuple[str, str, str]:
    """The three ways a secret is given: inline, in a file, or in the environment."""
    return base, f"{base}_file", f"{base}_env"


def given(reader: Reader, table: Mapping[str, Any], prefix: str, keys: Sequence[str]) -> list[str]:
    """Which of `keys` (alternatives: at most one may be there) `table` holds; a problem
    naming them if more than one."""
    found = [key for key in keys if key in table]
    if len(found) > 1:
        reader.problem(prefix + found[1], f"give only one of {', '.join(found)}")
    return found


PASSWORD_KEYS = secret_keys("password")
_SECRET_KEYS = frozenset(secret_keys("client_secret"))
# The key that says which token source an OAuth2 login uses.
_SOURCE_KEYS = ("tenant", "service_account_file", "refresh_token_file", "token_command")


def others_can_access(path: Path) -> bool:
    """True if users other than the owner and group may read or write `path`."""
    return bool(path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH))


def read_secret(reader: Reader, table: Mapping[str, Any], prefix: str, base: str) -> Secret | None:
    """One secret from `<base>`, `<base>_file` or `<base>_env` of `table` (exactly one of them
    must be there; the caller checked that one is). Problems go to `reader`."""
    sources = given(reader, table, prefix, secret_keys(base))
    if len(sources) > 1:
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
                f"{file} can be read or written by others; chmod o-rw {file}"
                " (as with ssh and msmtp)",
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
    value = reader.get(table, prefix, key, None, pathname)
    if value is None:
        return None
    path = reader.file(value)
    try:
        if others_can_access(path):
            reader.problem(
                prefix + key,
                f"{path} can be read or written by others; chmod o-rw {path}"
                " (as with ssh and msmtp)",
            )
            return None
    except OSError as exc:
        reader.problem(prefix + key, f"cannot read {path}: {exc.strerror or exc}")
        return None
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordKeys:
    """A password's keys, in a login and in `[limits]` (the store's): one of the three,
    read apart as a Secret (read_secret), never kept as text in a config."""

    password: str | None = setting(None, string, "inline: better password_file or password_env")
    password_file: str | None = setting(None, pathname, "a file holding the password (mode 0600)")
    password_env: str | None = setting(None, string, "an environment variable holding it")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginKeys:
    """Every key of a login, in a relay table or a sender entry: part of the one table of
    keys, like the sections'. A login is not one dataclass (auth/logins.py has one per kind),
    so these are only read, by `read_credentials`."""

    auth: str | None = setting(
        None,
        choice("password", "oauth2"),
        '"password" (with username and a password) or "oauth2" (with a token source)',
    )
    username: str | None = setting(
        None, string, "the login (with oauth2: the mailbox, if not the sender's own)"
    )
    tenant: str | None = setting(None, string, "oauth2, Microsoft 365: the tenant's id or domain")
    client_id: str | None = setting(None, string, "oauth2: the app registration's client id")
    client_secret: str | None = setting(None, string, "oauth2: inline; better _file or _env")
    client_secret_file: str | None = setting(None, pathname, "oauth2: a file holding the secret")
    client_secret_env: str | None = setting(None, string, "oauth2: a variable holding it")
    client_certificate_file: str | None = setting(
        None, pathname, "with tenant: the app's certificate (PEM; with client_key_file)"
    )
    client_key_file: str | None = setting(None, pathname, "with tenant: its private key (PEM)")
    thumbprint: str | None = setting(
        None, string, "with tenant: the certificate's SHA-1 thumbprint (not set: computed)"
    )
    authority: str = setting(
        MICROSOFT_AUTHORITY,
        https_url,
        "with tenant: the Microsoft identity platform (a sovereign cloud has its own)",
    )
    service_account_file: str | None = setting(
        None, pathname, "oauth2, Google: the service account's key (JSON)"
    )
    token_url: str | None = setting(
        None, https_url, "with refresh_token_file: the provider's token endpoint"
    )
    refresh_token_file: str | None = setting(
        None, pathname, "oauth2: a file holding a refresh token (pickupd keeps it fresh)"
    )
    token_command: tuple[str, ...] | None = setting(
        None, settings_command, "oauth2: a command that prints an access token"
    )
    token_timeout: float = setting(
        TOKEN_TIMEOUT,
        positive_duration,
        "for each request to the token endpoint (or each token_command)",
    )
    refresh_token_keepalive: float = setting(
        REFRESH_KEEPALIVE,
        positive_duration,
        "with refresh_token_file: use the token at least this often, mail or not (an idle"
        " one dies: Microsoft's after 90 days)",
    )


# Every key a relay or sender table may hold for its login (declared by LoginKeys below).
CREDENTIAL_KEYS = frozenset(key.name for table in (LoginKeys, PasswordKeys) for key in keys(table))
# The keys only an OAuth2 login takes.
_OAUTH2_KEYS = CREDENTIAL_KEYS - {"username", "auth", *PASSWORD_KEYS} - _SECRET_KEYS


def _read_oauth2(reader: Reader, table: Mapping[str, Any], prefix: str) -> OAuth2Login | None:
    """`auth = "oauth2"` and one token source (see the module docstring)."""
    username = reader.value(table, prefix, LoginKeys, "username")
    sources = given(reader, table, prefix, _SOURCE_KEYS)
    if len(sources) != 1:
        if not sources:
            reader.problem(
                prefix + "auth",
                "oauth2 needs a token source: tenant (Microsoft 365), service_account_file"
                " (Google), refresh_token_file or token_command",
            )
        return None
    kind = sources[0]
    timeout = reader.value(table, prefix, LoginKeys, "token_timeout")

    def value(key: str, required: bool = False) -> Any:
        if required and key not in table:
            reader.problem(prefix + key, f"required with {kind}")
            return None
        return reader.value(table, prefix, LoginKeys, key)

    with_secret = bool(_SECRET_KEYS & set(table))
    secret = read_secret(reader, table, prefix, "client_secret") if with_secret else None
    source: TokenSource | None = None
    if kind == "tenant":
        tenant, client_id = value("tenant", True), value("client_id", True)
        certificate = _private_file(reader, table, prefix, "client_certificate_file")
        key_file = _private_file(reader, table, prefix, "client_key_file")
        with_certificate = {"client_certificate_file", "client_key_file"} <= set(table)
        if with_secret == with_certificate:
            reader.problem(
                prefix + "client_id",
                "needs either client_secret_file (or _env), or client_certificate_file"
                " with client_key_file",
            )
        elif tenant and client_id and (secret or (certificate and key_file)):
            source = MicrosoftSource(
                tenant=tenant,
                client_id=client_id,
                authority=value("authority"),
                client_secret=secret,
                certificate_file=certificate,
                key_file=key_file,
                thumbprint=value("thumbprint"),
                timeout=timeout,
            )
    elif kind == "service_account_file":
        path = _private_file(reader, table, prefix, "service_account_file")
        if path is not None:
            source = GoogleSource(path, timeout)
    elif kind == "refresh_token_file":
        token_url, client_id = value("token_url", True), value("client_id", True)
        path = _private_file(reader, table, prefix, "refresh_token_file")
        keepalive = value("refresh_token_keepalive")
        if token_url and client_id and path is not None:
            source = RefreshTokenSource(token_url, client_id, path, secret, timeout, keepalive)
    elif (command := value("token_command")) is not None:
        source = CommandSource(command, timeout)
    return None if source is None else OAuth2Login(source, username)


def read_credentials(reader: Reader, table: Mapping[str, Any], prefix: str) -> Login | None:
    """The login a relay or sender table declares: `auth = "oauth2"` with a token source,
    or username + one of password / password_file / password_env; None if it has none."""
    if reader.value(table, prefix, LoginKeys, "auth") == "oauth2":
        for key in sorted(set(PASSWORD_KEYS) & set(table)):
            reader.problem(prefix + key, 'not used with auth = "oauth2" (tokens replace it)')
        return _read_oauth2(reader, table, prefix)
    for key in sorted((_SECRET_KEYS | _OAUTH2_KEYS) & set(table)):
        reader.problem(prefix + key, 'goes with auth = "oauth2"')
    username = reader.value(table, prefix, LoginKeys, "username")
    sources = given(reader, table, prefix, PASSWORD_KEYS)
    if len(sources) > 1:
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

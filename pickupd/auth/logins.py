"""The login model: a username with its password, or an OAuth2 login (SASL XOAUTH2) with the
source of its access tokens. Secrets never print themselves. config/logins.py reads these
from TOML; the token cache and the sources (tokencache.py, sources.py) use them.

Token sources (one per OAuth2 login, told apart by their keys):
- `tenant`: Microsoft 365 app-only (client credentials) through msal;
- `service_account_file`: a Google service account with domain-wide delegation (google-auth);
- `refresh_token_file`: a stored refresh token, rotated tokens written back (google-auth);
- `token_command`: a command that prints an access token (as msmtp's passwordeval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GOOGLE_SCOPE",
    "MICROSOFT_AUTHORITY",
    "MICROSOFT_SCOPE",
    "REFRESH_KEEPALIVE",
    "TOKEN_TIMEOUT",
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
]

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
# How long one request to a token endpoint (or one token_command) may take.
TOKEN_TIMEOUT = 30.0
# A stored refresh token not used for this long is used anyway (Microsoft's die after 90
# days without use; a week leaves room for an outage or a long weekend with no mail).
REFRESH_KEEPALIVE = 7 * 86400.0


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
    timeout: float = TOKEN_TIMEOUT  # for each request to the token endpoint
    scope: str = MICROSOFT_SCOPE  # Exchange's (SMTP); a Graph relay's is "{graph_url}/.default"

    def describe(self) -> str:
        return f"microsoft365 token for client_id {self.client_id} (tenant {self.tenant})"


@dataclass(frozen=True, slots=True)
class GoogleSource:
    """Google Workspace tokens from a service account with domain-wide delegation."""

    service_account_file: Path
    timeout: float = TOKEN_TIMEOUT  # for each request to the token endpoint

    def describe(self) -> str:
        return f"google service account token ({self.service_account_file})"


@dataclass(frozen=True, slots=True)
class RefreshTokenSource:
    """Tokens from a stored refresh token at a token endpoint (rotated ones written back)."""

    token_url: str
    client_id: str
    refresh_token_file: Path
    client_secret: Secret | None = None
    timeout: float = TOKEN_TIMEOUT  # for each request to the token endpoint
    # Used at least this often, mail or not: an idle refresh token dies (Microsoft: 90 days).
    keepalive: float = REFRESH_KEEPALIVE

    def describe(self) -> str:
        return f"refresh token grant at {self.token_url}"


@dataclass(frozen=True, slots=True)
class CommandSource:
    """Tokens printed by a command (run without a shell, with a timeout)."""

    command: tuple[str, ...]
    timeout: float = TOKEN_TIMEOUT

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

"""`[relays.<name>]` and `[senders."<address or *@domain>"]`: where each sender's mail goes
and how it logs in there, read from the config (the allow-list is the senders)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pickupd.auth.logins import Login, MicrosoftSource, OAuth2Login
from pickupd.auth.owners import Owner
from pickupd.config import keys as s
from pickupd.config.keys import Reader, setting
from pickupd.config.logins import CREDENTIAL_KEYS, read_credentials
from pickupd.errors import AddressError
from pickupd.message.addresses import parse_address_list
from pickupd.message.priority import MailClass
from pickupd.units import Limit, Rate, from_rate, merged, parse_limits

__all__ = [
    "DEFAULT_PORTS",
    "MAILBOX_PRESETS",
    "MAX_SESSION_AGE",
    "PROVIDERS",
    "RELAY_PRESETS",
    "RelayConfig",
    "SenderRule",
    "is_loopback",
    "named_tables",
    "read_relay",
    "read_sender",
]

Security = Literal["starttls", "tls", "none"]

# A session is retired after this long even if busy: servers and middleboxes drop old ones
# (smtp/pool.py keeps to it; max_messages_per_connection's help names it).
MAX_SESSION_AGE = 300.0

DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}
# provider = "...": the host of its SMTP submission service (SES: per region). They all take
# STARTTLS on port 587, which are the defaults anyway. `host` still overrides it.
PROVIDERS: dict[str, str] = {
    "microsoft365": "smtp.office365.com",
    "google": "smtp.gmail.com",
    "ses": "email-smtp.{region}.amazonaws.com",
}
# The providers' published limits, checked 2026-12-01 (sources: the README's "Provider
# limits"). Microsoft 365 and Google count each mailbox (each login through the relay).
MAILBOX_PRESETS: dict[str, tuple[Limit, ...]] = {
    "microsoft365": parse_limits(
        ["30 messages/min", "10000 recipients/day", "3 connections", "500 recipients/message"]
    ),
    "google": parse_limits(["2000 messages/day", "10000 recipients/day", "100 recipients/message"]),
    "ses": (),
}
# SES counts the account (the relay's login); its rate and quota differ per account.
RELAY_PRESETS: dict[str, tuple[Limit, ...]] = {
    "microsoft365": (),
    "google": (),
    "ses": parse_limits(["50 recipients/message"]),
}
# A Graph relay's mailboxes (sources: the README's "Microsoft 365 through Graph"): Graph's
# 4 concurrent requests per app and mailbox and 10,000 requests per 10 minutes, Exchange's
# 10,000 recipients a day and 500 a message.
GRAPH_PRESET = parse_limits(
    ["4 connections", "10000 messages/600s", "10000 recipients/day", "500 recipients/message"]
)
GRAPH_URL = "https://graph.microsoft.com"


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """One `[relays.<name>]` section (`name` is the table's, the login read apart)."""

    name: str
    # Set once read (unset in the file: the provider's host, the security's port).
    host: str = setting(
        None, s.string, "the relay's host name or address (not set: the provider's)"
    )
    port: int = setting(
        None, s.int_range(1, 65535), "not set: 587 for starttls, 465 for tls, 25 for none"
    )
    security: Security = setting(
        "starttls",
        s.choice("starttls", "tls", "none"),
        '"starttls" (required, verified), "tls" (implicit, port 465) or "none"',
    )
    ca_file: Path | None = setting(
        None, s.pathname, "CA certificates to verify the server with (not set)"
    )
    timeout: float = setting(
        30.0,
        s.positive_duration,
        "for connecting and for each SMTP command",
    )
    max_connections: int = setting(4, s.int_range(1, 1000), "open sessions to this relay at most")
    idle_timeout: float = setting(10.0, s.duration, "close a session idle this long")
    max_messages_per_connection: int = setting(
        100,
        s.int_range(1, 1_000_000),
        f"then open a new session (also after {MAX_SESSION_AGE:g} s)",
    )
    rate: Rate | None = setting(
        None, s.rate, 'the older form of limits = ["100 messages/min"] (not set)'
    )
    # Unset by default: the provider's preset (or none). Once read, what applies.
    limits: tuple[Limit, ...] | None = setting(
        None,
        s.limits,
        "for all mail through this relay (the account), shared by the fleet; over the"
        " provider's, kind by kind",
    )
    mailbox_limits: tuple[Limit, ...] | None = setting(
        None,
        s.limits,
        "for each mailbox (login) through this relay; over the provider's, kind by kind",
    )
    suspend_after: int = setting(
        3,
        s.int_range(0, 1000),
        "connection failures in a row that suspend the relay (0: never)",
    )
    probe_interval: float = setting(
        30.0, s.positive_duration, "while suspended: one probe this often"
    )
    provider: str | None = setting(
        None,
        s.choice(*PROVIDERS),
        'fills host, port and security: "microsoft365", "google" or "ses" (not set)',
    )
    region: str | None = setting(
        None, s.string, 'with provider = "ses": the AWS region, like "eu-west-1"'
    )
    transport: str = setting(
        "smtp",
        s.choice("smtp", "graph"),
        '"smtp", or "graph": Microsoft Graph\'s sendMail (needs auth = "oauth2", Mail.Send)',
    )
    graph_url: str = setting(
        GRAPH_URL,
        s.https_url,
        'with transport = "graph": its base URL (national clouds: graph.microsoft.us,'
        " dod-graph.microsoft.us, microsoftgraph.chinacloudapi.cn)",
    )
    credentials: Login | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderRule:
    """One `[senders."<address or *@domain>"]` entry."""

    pattern: str  # lower-cased: "a@example.com" or "*@example.com"
    relay: str = setting(None, s.string, "required: the name of a [relays.<name>] table")
    credentials: Login | None = None
    # For this sender's credentials (or the relay's, if it has none).
    rate: Rate | None = setting(
        None, s.rate, 'the older form of limits = ["30 messages/min"] (not set)'
    )
    limits: tuple[Limit, ...] | None = setting(
        None,
        s.limits,
        "for this sender's mailbox (its login); over the relay's mailbox_limits, kind by kind",
    )
    owners: tuple[Owner, ...] | None = setting(
        None,
        s.owners,
        "the local users, @groups and uid:NNN whose dropped files may send as this sender"
        " (not set: any writer)",
    )
    mail_class: MailClass | None = setting(
        None,
        s.mail_class,
        '"urgent", "normal" or "bulk": the class of all its mail under a limit, whatever'
        " the message's fields mark (not set: as marked)",
    )
    highest_class: MailClass | None = setting(
        None,
        s.mail_class,
        "a message marked higher than this goes as this class (not set: no cap)",
    )

    def matches(self, address: str) -> bool:
        """Case-insensitive match of an addr-spec against this entry."""
        address = address.lower()
        if self.pattern.startswith("*@"):
            return address.rpartition("@")[2] == self.pattern[2:]
        return address == self.pattern


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the only hosts a password may go to in clear."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_relay(reader: Reader, name: str, table: Mapping[str, Any]) -> RelayConfig | None:
    prefix = f"relays.{name}."
    values = reader.values(table, prefix, RelayConfig, CREDENTIAL_KEYS)
    preset = ""
    provider, region = values["provider"], values["region"]
    graph = values["transport"] == "graph"
    if graph:
        # The ledger names scopes by the relay's host; Graph's is in its URL.
        preset, values["security"] = urllib.parse.urlsplit(values["graph_url"]).netloc, "tls"
    if provider is not None and "host" not in table and not graph:
        if provider == "ses" and region is None:
            reader.problem(prefix + "region", 'required with provider = "ses" (or give host)')
        preset = PROVIDERS[provider].format(region=region)
    if "host" not in table and not preset:
        reader.problem(prefix + "host", "required")
    host = values.pop("host") or preset
    port = values.pop("port") or DEFAULT_PORTS[values["security"]]
    if values["ca_file"] is not None:
        values["ca_file"] = reader.file(values["ca_file"])
        if not values["ca_file"].is_file():
            reader.problem(prefix + "ca_file", f"{values['ca_file']} does not exist")
    credentials = read_credentials(reader, table, prefix)
    if not host:
        return None
    # What applies, as `pickupd check` shows it: the presets, overridden kind by kind.
    rate = () if values["rate"] is None else (from_rate(values["rate"]),)
    values["limits"] = merged(
        RELAY_PRESETS.get(provider or "", ()), (values["limits"] or ()) + rate
    )
    values["mailbox_limits"] = merged(
        GRAPH_PRESET if graph else MAILBOX_PRESETS.get(provider or "", ()),
        values["mailbox_limits"] or (),
    )
    if graph and credentials is not None and not _microsoft_oauth2(credentials):
        reader.problem(prefix + "auth", _GRAPH_LOGIN)
    relay = RelayConfig(name=name, host=host, port=port, credentials=credentials, **values)
    if credentials is not None:
        problem = _cleartext_problem(relay)
        if problem:
            reader.problem(prefix + "username", problem)
    return relay


_GRAPH_LOGIN = (
    'transport = "graph" logs in with auth = "oauth2" and a Microsoft app registration'
    " (tenant, client_id, client_secret_file or certificate_file)"
)


def _microsoft_oauth2(login: Login) -> bool:
    return isinstance(login, OAuth2Login) and isinstance(login.source, MicrosoftSource)


def _cleartext_problem(relay: RelayConfig) -> str | None:
    if relay.security == "none" and not is_loopback(relay.host):
        return (
            f'credentials would be sent in clear to {relay.host}; use security = "starttls"'
            ' or "tls" (only loopback relays may use "none" with credentials)'
        )
    return None


def read_sender(
    reader: Reader, pattern: str, table: Mapping[str, Any], relays: Mapping[str, RelayConfig]
) -> SenderRule | None:
    prefix = f'senders."{pattern}".'
    values = reader.values(table, prefix, SenderRule, CREDENTIAL_KEYS)
    local, at, domain = pattern.rpartition("@")
    if not at or not local or not domain or ("*" in local and local != "*") or "*" in domain:
        reader.problem(
            f'senders."{pattern}"', 'expected an address ("app@example.com") or "*@example.com"'
        )
        return None
    canonical = pattern if local == "*" else _canonical(pattern)
    if canonical is None:
        reader.problem(f'senders."{pattern}"', "not an RFC 5321 address")
        return None
    if "relay" not in table:
        reader.problem(prefix + "relay", "required: the name of a [relays.<name>] section")
        return None
    relay = values.pop("relay") or ""
    if relay and relay not in relays:
        known = ", ".join(sorted(relays)) or "none defined"
        reader.problem(prefix + "relay", f'no relay named "{relay}" (relays: {known})')
        return None
    credentials = read_credentials(reader, table, prefix)
    if relay in relays and relays[relay].transport == "graph":
        login = credentials or relays[relay].credentials
        if login is None or not _microsoft_oauth2(login):
            reader.problem(prefix + "auth", _GRAPH_LOGIN)
    if credentials is not None and relay in relays:
        problem = _cleartext_problem(relays[relay])
        if problem:
            reader.problem(prefix + "username", problem)
    values["limits"] = merged(
        () if values["rate"] is None else (from_rate(values["rate"]),), values["limits"] or ()
    )
    return SenderRule(pattern=canonical.lower(), relay=relay, credentials=credentials, **values)


def _canonical(address: str) -> str | None:
    """The entry's address in the one form envelopes are read in (`"alice"@x` is `alice@x`),
    so an entry written with quotes is the entry of the address it names; None if it is not
    one address."""
    try:
        found = parse_address_list(address)
    except AddressError:
        return None
    return found[0] if len(found) == 1 else None


def named_tables(reader: Reader, doc: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    """`[relays.<name>]` / `[senders."<pattern>"]`: the tables by name; others are problems."""
    found = {}
    for name, table in reader.table(doc, section).items():
        if isinstance(table, dict):
            found[name] = table
        else:
            where = f"relays.{name}" if section == "relays" else f'senders."{name}"'
            reader.problem(where, f"expected a table, got {s.type_name(table)}")
    return found

"""TOML -> frozen `Config`. Collects every problem as `file: key.path: problem`.

The section dataclasses below are the one table of config keys: each field declared with
`setting(default, converter, expected, help, shown)` is a key (see settings.py).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import settings as s
from .credentials import (
    CREDENTIAL_KEYS,
    Credentials,
    Login,
    OAuth2Login,
    Secret,
    others_can_access,
    read_credentials,
)
from .errors import ConfigError
from .settings import Reader, setting
from .units import Rate

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "Config",
    "Credentials",
    "DispatchConfig",
    "LogConfig",
    "Login",
    "MetricsConfig",
    "NotifyConfig",
    "OAuth2Login",
    "PolicyConfig",
    "RelayConfig",
    "RetryConfig",
    "Secret",
    "SenderRule",
    "SpoolConfig",
    "Submission",
    "config_path",
    "is_loopback",
    "load",
    "load_submission",
]

DEFAULT_CONFIG_PATH = "/etc/pickupd/pickupd.toml"
Security = Literal["starttls", "tls", "none"]
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}
# provider = "...": the host of its SMTP submission service (SES: per region). They all take
# STARTTLS on port 587, which are the defaults anyway. `host` still overrides it.
PROVIDERS: dict[str, str] = {
    "microsoft365": "smtp.office365.com",
    "google": "smtp.gmail.com",
    "ses": "email-smtp.{region}.amazonaws.com",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    """`[spool]`"""

    path: Path = setting(
        Path("/var/spool/pickupd"),
        s.string,
        "a path",
        "the root of pickup/, active/, deferred/, hold/, failed/ and sent/ (one filesystem)",
        '"/var/spool/pickupd"',
    )
    keep_sent: bool = setting(
        False,
        s.boolean,
        "true or false",
        "keep relayed messages in sent/ with their .json",
        "false",
    )
    claim_lease: float = setting(
        600.0,
        s.positive_duration,
        "a duration",
        "a claim not renewed this long (its host is gone) may be taken over by another host",
        '"10m"',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchConfig:
    """`[dispatch]`"""

    concurrency: int = setting(
        8, s.int_range(1, 1000), "an integer 1-1000", "messages relayed at the same time", "8"
    )
    settle: float = setting(
        1.0,
        s.duration,
        "a duration",
        "a .eml written straight into pickup/ is taken once unchanged this long",
        '"1s"',
    )
    rescan_interval: float = setting(
        30.0,
        s.positive_duration,
        "a duration",
        "rescan pickup/ and deferred/ this often, in case a file event was missed",
        '"30s"',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """`[policy]`"""

    max_recipients: int = setting(
        100,
        s.int_range(1, 100_000),
        "an integer >= 1",
        "more recipients: failed/ with reason too_many_recipients",
        "100",
    )
    max_message_size: int = setting(
        25 * 1024 * 1024, s.size, "", "larger messages: failed/ with reason too_large", '"25MiB"'
    )
    max_header_size: int = setting(
        64 * 1024, s.size, "", "a larger header section: failed/ as malformed", '"64KiB"'
    )
    check_header_from: bool = setting(
        True,
        s.boolean,
        "a boolean",
        "every From: address must match a [senders] entry too",
        "true",
    )
    # Qualifies a bare local part ("root") in the envelope and From/To/Cc, as Postfix's myorigin.
    local_domain: str | None = setting(
        None, s.domain, "", "qualify bare names like root as root@local_domain (not set)"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """`[retry]`"""

    schedule: tuple[float, ...] = setting(
        (60.0, 300.0, 900.0, 3600.0, 7200.0, 14400.0),
        s.schedule,
        "",
        "wait after the 1st, 2nd, 3rd ... failed attempt; the last value repeats",
        '["1m", "5m", "15m", "1h", "2h", "4h"]',
    )
    max_age: float = setting(
        5 * 86400.0,
        s.positive_duration,
        "a duration",
        "give up after this long: failed/ with reason expired",
        '"5d"',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """`[log]`"""

    level: str = setting(
        "info",
        s.choice("debug", "info", "warning", "error"),
        "",
        "debug | info | warning | error",
        '"info"',
    )
    format: Literal["json", "console"] = setting(
        "json",
        s.choice("json", "console"),
        "",
        '"json": one JSON object per line (journald); "console": text for people',
        '"json"',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """`[metrics]`: a Prometheus endpoint, off unless `listen` is set."""

    listen: tuple[str, int] | None = setting(
        None, s.listen, "", 'serve /metrics on "host:port" (not set: off)'
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """One `[relays.<name>]` section (`name`, `host`, `port` and the login are read apart)."""

    name: str
    host: str
    port: int
    security: Security = setting(
        "starttls",
        s.choice("starttls", "tls", "none"),
        "",
        '"starttls" (required, verified), "tls" (implicit, port 465) or "none"',
        '"starttls"',
    )
    ca_file: Path | None = setting(
        None, s.string, "a file path", "CA certificates to verify the server with (not set)"
    )
    timeout: float = setting(
        30.0,
        s.positive_duration,
        "a duration",
        "for connecting and for each SMTP command",
        '"30s"',
    )
    max_connections: int = setting(
        4, s.int_range(1, 1000), "an integer 1-1000", "open sessions to this relay at most", "4"
    )
    idle_timeout: float = setting(
        10.0, s.duration, "a duration", "close a session idle this long", '"10s"'
    )
    max_messages_per_connection: int = setting(
        100,
        s.int_range(1, 1_000_000),
        "an integer >= 1",
        "then open a new session (also after 300 s)",
        "100",
    )
    rate: Rate | None = setting(
        None, s.rate, "", 'provider limit for the whole relay, like "100/min" (not set)'
    )
    provider: str | None = setting(
        None,
        s.choice(*PROVIDERS),
        "",
        'fills host, port and security: "microsoft365", "google" or "ses" (not set)',
    )
    region: str | None = setting(
        None, s.string, "a region name", 'with provider = "ses": the AWS region, like "eu-west-1"'
    )
    credentials: Login | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderRule:
    """One `[senders."<address or *@domain>"]` entry."""

    pattern: str  # lower-cased: "a@example.com" or "*@example.com"
    relay: str
    credentials: Login | None = None
    # For this sender's credentials (or the relay's, if it has none).
    rate: Rate | None = setting(None, s.rate, "", 'per mailbox, like "30/min" (not set)')

    def matches(self, address: str) -> bool:
        """Case-insensitive match of an addr-spec against this entry."""
        address = address.lower()
        if self.pattern.startswith("*@"):
            return address.rpartition("@")[2] == self.pattern[2:]
        return address == self.pattern


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyConfig:
    """`[notify]`: failure feedback to the apps, by a command and by a report mail."""

    on_failed: tuple[str, ...] | None = setting(
        None,
        s.command,
        "",
        "run for each message that lands in failed/: the sidecar JSON on stdin (not set)",
    )
    on_deferred_after: float | None = setting(
        None,
        s.positive_duration,
        "a duration",
        "also run on_failed's command, once, for a message still deferred this long (not set)",
    )
    hook_timeout: float = setting(
        30.0,
        s.positive_duration,
        "a duration",
        "a hook still running after this is killed",
        '"30s"',
    )
    report_to: str | None = setting(
        None, s.address, "", "mail a report of failed messages to this address (not set)"
    )
    report_from: str | None = setting(
        None, s.address, "", "the report's sender: must be allowed by a [senders] entry"
    )
    report_interval: float = setting(
        3600.0,
        s.positive_duration,
        "a duration",
        "at most one report this often; failures in between are batched",
        '"1h"',
    )


# The plain sections, in the order the docs show them.
SECTIONS: dict[str, type] = {
    "spool": SpoolConfig,
    "dispatch": DispatchConfig,
    "policy": PolicyConfig,
    "retry": RetryConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "notify": NotifyConfig,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration, as loaded from one file."""

    path: Path
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    relays: Mapping[str, RelayConfig] = field(default_factory=dict)
    senders: tuple[SenderRule, ...] = ()

    def sender_rule(self, address: str) -> SenderRule | None:
        """The entry that allows `address`: an exact address wins over a `*@domain`."""
        lowered = address.lower()
        for rule in self.senders:
            if rule.pattern == lowered:
                return rule
        for rule in self.senders:
            if rule.matches(lowered):
                return rule
        return None


def config_path(cli_value: str | None) -> Path:
    """`-c FILE`, else `$PICKUPD_CONFIG`, else the default path."""
    return Path(cli_value or os.environ.get("PICKUPD_CONFIG") or DEFAULT_CONFIG_PATH)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the only hosts a password may go to in clear."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _relay(reader: Reader, name: str, table: Mapping[str, Any]) -> RelayConfig | None:
    prefix = f"relays.{name}."
    values = reader.values(table, prefix, RelayConfig, {"host", "port"} | CREDENTIAL_KEYS)
    preset = ""
    provider, region = values["provider"], values["region"]
    if provider is not None and "host" not in table:
        if provider == "ses" and region is None:
            reader.problem(prefix + "region", 'required with provider = "ses" (or give host)')
        preset = PROVIDERS[provider].format(region=region)
    if "host" not in table and not preset:
        reader.problem(prefix + "host", "required")
    host = reader.get(table, prefix, "host", preset, s.string, "a host name or address")
    port = reader.get(
        table,
        prefix,
        "port",
        DEFAULT_PORTS[values["security"]],
        s.int_range(1, 65535),
        "an integer 1-65535",
    )
    if values["ca_file"] is not None:
        values["ca_file"] = reader.file(values["ca_file"])
        if not values["ca_file"].is_file():
            reader.problem(prefix + "ca_file", f"{values['ca_file']} does not exist")
    credentials = read_credentials(reader, table, prefix)
    if not host:
        return None
    relay = RelayConfig(name=name, host=host, port=port, credentials=credentials, **values)
    if credentials is not None:
        problem = _cleartext_problem(relay)
        if problem:
            reader.problem(prefix + "username", problem)
    return relay


def _cleartext_problem(relay: RelayConfig) -> str | None:
    if relay.security == "none" and not is_loopback(relay.host):
        return (
            f'credentials would be sent in clear to {relay.host}; use security = "starttls"'
            ' or "tls" (only loopback relays may use "none" with credentials)'
        )
    return None


def _sender(
    reader: Reader, pattern: str, table: Mapping[str, Any], relays: Mapping[str, RelayConfig]
) -> SenderRule | None:
    prefix = f'senders."{pattern}".'
    values = reader.values(table, prefix, SenderRule, {"relay"} | CREDENTIAL_KEYS)
    local, at, domain = pattern.rpartition("@")
    if not at or not local or not domain or ("*" in local and local != "*") or "*" in domain:
        reader.problem(
            f'senders."{pattern}"', 'expected an address ("app@example.com") or "*@example.com"'
        )
        return None
    if "relay" not in table:
        reader.problem(prefix + "relay", "required: the name of a [relays.<name>] section")
        return None
    relay = reader.get(table, prefix, "relay", "", s.string, "a relay name")
    if relay and relay not in relays:
        known = ", ".join(sorted(relays)) or "none defined"
        reader.problem(prefix + "relay", f'no relay named "{relay}" (relays: {known})')
        return None
    credentials = read_credentials(reader, table, prefix)
    if credentials is not None and relay in relays:
        problem = _cleartext_problem(relays[relay])
        if problem:
            reader.problem(prefix + "username", problem)
    return SenderRule(pattern=pattern.lower(), relay=relay, credentials=credentials, **values)


def _named_tables(reader: Reader, doc: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    """`[relays.<name>]` / `[senders."<pattern>"]`: the tables by name; others are problems."""
    found = {}
    for name, table in reader.table(doc, section).items():
        if isinstance(table, dict):
            found[name] = table
        else:
            where = f"relays.{name}" if section == "relays" else f'senders."{name}"'
            reader.problem(where, f"expected a table, got {s.type_name(table)}")
    return found


def _parse(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _spool(reader: Reader, doc: Mapping[str, Any]) -> SpoolConfig:
    values = reader.values(reader.table(doc, "spool"), "spool.", SpoolConfig)
    values["path"] = reader.file(str(values["path"]))
    return SpoolConfig(**values)


def load(path: Path) -> Config:
    """Read and validate the config file; raise ConfigError listing every problem found."""
    reader = Reader(path)
    doc = _parse(path)
    reader.unknown(doc, "", set(SECTIONS) | {"relays", "senders"})
    sections: dict[str, Any] = {"spool": _spool(reader, doc)}
    for name, section in SECTIONS.items():
        if name != "spool":
            sections[name] = section(**reader.values(reader.table(doc, name), f"{name}.", section))

    relays: dict[str, RelayConfig] = {}
    for name, table in _named_tables(reader, doc, "relays").items():
        relay = _relay(reader, name, table)
        if relay is not None:
            relays[name] = relay
    senders: list[SenderRule] = []
    for pattern, table in _named_tables(reader, doc, "senders").items():
        rule = _sender(reader, pattern, table, relays)
        if rule is not None:
            senders.append(rule)
    if not senders and not reader.problems:
        reader.problem("senders", 'no sender is allowed: add a [senders."..."] entry')
    notify: NotifyConfig = sections["notify"]
    if (notify.report_to is None) != (notify.report_from is None):
        missing = "report_from" if notify.report_from is None else "report_to"
        reader.problem(f"notify.{missing}", "report_to and report_from go together")
    elif notify.report_from is not None and not any(r.matches(notify.report_from) for r in senders):
        reader.problem("notify.report_from", f"{notify.report_from} matches no [senders] entry")

    if _holds_inline_secret(doc):
        try:
            if others_can_access(path):
                reader.problem("", f"holds a password but others can read it; chmod o-rw {path}")
        except OSError:
            pass

    if reader.problems:
        raise ConfigError(reader.problems)
    # Absolute: a daemon chdirs to / and reloads from here.
    return Config(path=path.absolute(), relays=relays, senders=tuple(senders), **sections)


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    """The few settings the sendmail shim needs, read by users who may not read secrets."""

    spool_path: Path
    local_domain: str | None
    max_message_size: int


def load_submission(path: Path) -> Submission:
    """Read only `[spool] path` and `[policy] local_domain` / `max_message_size`: an app user
    running pickupd-sendmail may read the config but not the password files it names (and
    need not: the daemon checks everything else). Raise ConfigError."""
    reader = Reader(path)
    doc = _parse(path)
    spool, policy = reader.table(doc, "spool"), reader.table(doc, "policy")
    submission = Submission(
        spool_path=reader.file(str(reader.value(spool, "spool.", SpoolConfig, "path"))),
        local_domain=reader.value(policy, "policy.", PolicyConfig, "local_domain"),
        max_message_size=reader.value(policy, "policy.", PolicyConfig, "max_message_size"),
    )
    if reader.problems:
        raise ConfigError(reader.problems)
    return submission


def _holds_inline_secret(doc: Mapping[str, Any]) -> bool:
    for section in ("relays", "senders"):
        tables = doc.get(section)
        if isinstance(tables, dict) and any(
            isinstance(t, dict) and "password" in t for t in tables.values()
        ):
            return True
    return False

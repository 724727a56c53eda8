"""TOML -> frozen `Config`. Collects every problem as `file: key.path: problem`."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from .errors import ConfigError
from .units import Rate, parse_duration, parse_rate, parse_size

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "Credentials",
    "DispatchConfig",
    "LogConfig",
    "MetricsConfig",
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
DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 3600.0, 7200.0, 14400.0)
_DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}
T = TypeVar("T")


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
class RelayConfig:
    """One `[relays.<name>]` section."""

    name: str
    host: str
    port: int
    security: Security = "starttls"
    ca_file: Path | None = None
    timeout: float = 30.0
    max_connections: int = 4
    idle_timeout: float = 10.0
    max_messages_per_connection: int = 100
    credentials: Credentials | None = None
    rate: Rate | None = None  # for the whole relay, all credentials together


@dataclass(frozen=True, slots=True)
class SenderRule:
    """One `[senders."<address or *@domain>"]` entry."""

    pattern: str  # lower-cased: "a@example.com" or "*@example.com"
    relay: str
    credentials: Credentials | None = None
    rate: Rate | None = None  # for this sender's credentials (or the relay's, if it has none)

    def matches(self, address: str) -> bool:
        """Case-insensitive match of an addr-spec against this entry."""
        address = address.lower()
        if self.pattern.startswith("*@"):
            return address.rpartition("@")[2] == self.pattern[2:]
        return address == self.pattern


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = Path("/var/spool/pickupd")
    keep_sent: bool = False


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    concurrency: int = 8
    settle: float = 1.0
    rescan_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    max_recipients: int = 100
    max_message_size: int = 25 * 1024 * 1024
    max_header_size: int = 64 * 1024
    check_header_from: bool = True
    # Qualifies a bare local part ("root") in the envelope and From/To/Cc, as Postfix's myorigin.
    local_domain: str | None = None


@dataclass(frozen=True, slots=True)
class RetryConfig:
    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    max_age: float = 5 * 86400.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`[metrics]`: a Prometheus endpoint, off unless `listen` is set."""

    listen: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, as loaded from one file."""

    path: Path
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
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


def _type_name(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


class _Reader:
    """Walks the TOML tables, converting values and collecting problems with their key paths."""

    def __init__(self, path: Path) -> None:
        self.path = path  # as the user named it, for messages
        self.dir = path.absolute().parent  # what relative paths in the file are relative to
        self.problems: list[str] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.path}: {key}: {text}" if key else f"{self.path}: {text}")

    def table(self, parent: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            self.problem(prefix + key, f"expected a table, got {_type_name(value)}")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                self.problem(f"{prefix}{key}", "unknown key")

    def get(
        self,
        table: Mapping[str, Any],
        prefix: str,
        key: str,
        default: T,
        convert: Callable[[Any], T],
        expected: str,
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            detail = str(exc) if str(exc).startswith("expected") else None
            self.problem(prefix + key, detail or f"expected {expected}, got {_type_name(value)}")
            return default


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError
        return value

    return convert


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError
    return value


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration greater than zero")
    return seconds


def _schedule(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('expected a non-empty array of durations like ["1m", "5m"]')
    return tuple(_positive_duration(item) for item in value)


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError
    return parse_size(value)


def _rate(value: Any) -> Rate:
    if not isinstance(value, str):
        raise ValueError('expected a rate like "30/min"')
    return parse_rate(value)


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value
    ):
        raise ValueError('expected a domain name like "example.com"')
    return value.lower()


def _listen(value: Any) -> tuple[str, int]:
    expected = 'expected "host:port", like "127.0.0.1:9464" or "[::1]:9464"'
    if not isinstance(value, str):
        raise ValueError(expected)
    host, colon, port = value.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(expected)
    return host, int(port)


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
        return str(value)

    return convert


def _others_can_access(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH))


_CREDENTIAL_KEYS = {"username", "password", "password_file", "password_env"}


def _credentials(reader: _Reader, table: Mapping[str, Any], prefix: str) -> Credentials | None:
    """Read username + one of password / password_file / password_env."""
    username = reader.get(table, prefix, "username", None, _string, "a non-empty string")
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
    source = sources[0]
    value = table[source]
    if not isinstance(value, str) or not value:
        reader.problem(prefix + source, f"expected a non-empty string, got {_type_name(value)}")
        return None
    if source == "password":
        return Credentials(username, Secret(value))
    if source == "password_env":
        env = os.environ.get(value)
        if env is None:
            reader.problem(prefix + source, f"environment variable {value} is not set")
            return None
        return Credentials(username, Secret(env))
    file = Path(value)
    if not file.is_absolute():
        file = reader.dir / file
    try:
        if _others_can_access(file):
            reader.problem(
                prefix + source,
                f"{file} can be read by others; chmod o-rw {file} (as with ssh and msmtp)",
            )
            return None
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        reader.problem(prefix + source, f"cannot read {file}: {exc.strerror or exc}")
        return None
    # `echo secret > file` leaves one newline: that is not part of the password.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        reader.problem(prefix + source, f"{file} is empty")
        return None
    return Credentials(username, Secret(text))


_RELAY_KEYS = {
    "host",
    "port",
    "security",
    "ca_file",
    "timeout",
    "max_connections",
    "idle_timeout",
    "max_messages_per_connection",
    "rate",
} | _CREDENTIAL_KEYS


def _relay(reader: _Reader, name: str, table: Mapping[str, Any]) -> RelayConfig | None:
    prefix = f"relays.{name}."
    reader.unknown(table, prefix, _RELAY_KEYS)
    if "host" not in table:
        reader.problem(prefix + "host", "required")
    host = reader.get(table, prefix, "host", "", _string, "a host name or address")
    security = cast(
        Security,
        reader.get(table, prefix, "security", "starttls", _choice("starttls", "tls", "none"), ""),
    )
    port = reader.get(
        table, prefix, "port", _DEFAULT_PORTS[security], _int_range(1, 65535), "an integer 1-65535"
    )
    ca_file = reader.get(table, prefix, "ca_file", None, _string, "a file path")
    ca_path = None
    if ca_file is not None:
        ca_path = Path(ca_file) if Path(ca_file).is_absolute() else reader.dir / ca_file
        if not ca_path.is_file():
            reader.problem(prefix + "ca_file", f"{ca_path} does not exist")
    relay = RelayConfig(
        name=name,
        host=host,
        port=port,
        security=security,
        ca_file=ca_path,
        timeout=reader.get(table, prefix, "timeout", 30.0, _positive_duration, "a duration"),
        max_connections=reader.get(
            table, prefix, "max_connections", 4, _int_range(1, 1000), "an integer 1-1000"
        ),
        idle_timeout=reader.get(table, prefix, "idle_timeout", 10.0, _duration, "a duration"),
        max_messages_per_connection=reader.get(
            table,
            prefix,
            "max_messages_per_connection",
            100,
            _int_range(1, 1_000_000),
            "an integer >= 1",
        ),
        credentials=_credentials(reader, table, prefix),
        rate=reader.get(table, prefix, "rate", None, _rate, ""),
    )
    return relay if host else None


def _cleartext_problem(relay: RelayConfig) -> str | None:
    if relay.security == "none" and not is_loopback(relay.host):
        return (
            f'credentials would be sent in clear to {relay.host}; use security = "starttls"'
            ' or "tls" (only loopback relays may use "none" with credentials)'
        )
    return None


def _sender(
    reader: _Reader, pattern: str, table: Mapping[str, Any], relays: Mapping[str, RelayConfig]
) -> SenderRule | None:
    prefix = f'senders."{pattern}".'
    reader.unknown(table, prefix, {"relay", "rate"} | _CREDENTIAL_KEYS)
    local, at, domain = pattern.rpartition("@")
    if not at or not local or not domain or ("*" in local and local != "*") or "*" in domain:
        reader.problem(
            f'senders."{pattern}"', 'expected an address ("app@example.com") or "*@example.com"'
        )
        return None
    if "relay" not in table:
        reader.problem(prefix + "relay", "required: the name of a [relays.<name>] section")
        return None
    relay = reader.get(table, prefix, "relay", "", _string, "a relay name")
    if relay and relay not in relays:
        known = ", ".join(sorted(relays)) or "none defined"
        reader.problem(prefix + "relay", f'no relay named "{relay}" (relays: {known})')
        return None
    credentials = _credentials(reader, table, prefix)
    if credentials is not None and relay in relays:
        problem = _cleartext_problem(relays[relay])
        if problem:
            reader.problem(prefix + "username", problem)
    rate = reader.get(table, prefix, "rate", None, _rate, "")
    return SenderRule(pattern.lower(), relay, credentials, rate)


_SECTIONS = {"spool", "dispatch", "policy", "retry", "log", "metrics", "relays", "senders"}


def load(path: Path) -> Config:
    """Read and validate the config file; raise ConfigError listing every problem found."""
    reader = _Reader(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    reader.unknown(doc, "", _SECTIONS)

    t = reader.table(doc, "spool")
    reader.unknown(t, "spool.", {"path", "keep_sent"})
    spool_path = Path(reader.get(t, "spool.", "path", "/var/spool/pickupd", _string, "a path"))
    if not spool_path.is_absolute():
        spool_path = reader.dir / spool_path
    spool = SpoolConfig(
        path=spool_path,
        keep_sent=reader.get(t, "spool.", "keep_sent", False, _bool, "true or false"),
    )

    t = reader.table(doc, "dispatch")
    reader.unknown(t, "dispatch.", {"concurrency", "settle", "rescan_interval"})
    dispatch = DispatchConfig(
        concurrency=reader.get(
            t, "dispatch.", "concurrency", 8, _int_range(1, 1000), "an integer 1-1000"
        ),
        settle=reader.get(t, "dispatch.", "settle", 1.0, _duration, "a duration"),
        rescan_interval=reader.get(
            t, "dispatch.", "rescan_interval", 30.0, _positive_duration, "a duration"
        ),
    )

    t = reader.table(doc, "policy")
    reader.unknown(
        t,
        "policy.",
        {
            "max_recipients",
            "max_message_size",
            "max_header_size",
            "check_header_from",
            "local_domain",
        },
    )
    policy = PolicyConfig(
        max_recipients=reader.get(
            t, "policy.", "max_recipients", 100, _int_range(1, 100_000), "an integer >= 1"
        ),
        max_message_size=reader.get(t, "policy.", "max_message_size", 25 * 1024**2, _size, ""),
        max_header_size=reader.get(t, "policy.", "max_header_size", 64 * 1024, _size, ""),
        check_header_from=reader.get(t, "policy.", "check_header_from", True, _bool, "a boolean"),
        local_domain=reader.get(t, "policy.", "local_domain", None, _domain, ""),
    )

    t = reader.table(doc, "retry")
    reader.unknown(t, "retry.", {"schedule", "max_age"})
    retry = RetryConfig(
        schedule=reader.get(t, "retry.", "schedule", DEFAULT_SCHEDULE, _schedule, ""),
        max_age=reader.get(t, "retry.", "max_age", 5 * 86400.0, _positive_duration, "a duration"),
    )

    t = reader.table(doc, "log")
    reader.unknown(t, "log.", {"level", "format"})
    log = LogConfig(
        level=reader.get(
            t, "log.", "level", "info", _choice("debug", "info", "warning", "error"), ""
        ),
        format=reader.get(t, "log.", "format", "json", _choice("json", "console"), ""),  # type: ignore[arg-type]
    )

    t = reader.table(doc, "metrics")
    reader.unknown(t, "metrics.", {"listen"})
    metrics = MetricsConfig(listen=reader.get(t, "metrics.", "listen", None, _listen, ""))

    relays: dict[str, RelayConfig] = {}
    for name, table in reader.table(doc, "relays").items():
        if not isinstance(table, dict):
            reader.problem(f"relays.{name}", f"expected a table, got {_type_name(table)}")
            continue
        relay = _relay(reader, name, table)
        if relay is None:
            continue
        if relay.credentials is not None:
            problem = _cleartext_problem(relay)
            if problem:
                reader.problem(f"relays.{name}.username", problem)
        relays[name] = relay

    senders: list[SenderRule] = []
    for pattern, table in reader.table(doc, "senders").items():
        if not isinstance(table, dict):
            reader.problem(f'senders."{pattern}"', f"expected a table, got {_type_name(table)}")
            continue
        rule = _sender(reader, pattern, table, relays)
        if rule is not None:
            senders.append(rule)
    if not senders and not reader.problems:
        reader.problem("senders", 'no sender is allowed: add a [senders."..."] entry')

    if _holds_inline_secret(doc):
        try:
            if _others_can_access(path):
                reader.problem("", f"holds a password but others can read it; chmod o-rw {path}")
        except OSError:
            pass

    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        path=path.absolute(),  # a daemon chdirs to / and reloads from here
        spool=spool,
        dispatch=dispatch,
        policy=policy,
        retry=retry,
        log=log,
        metrics=metrics,
        relays=relays,
        senders=tuple(senders),
    )


@dataclass(frozen=True, slots=True)
class Submission:
    """The few settings the sendmail shim needs, read by users who may not read secrets."""

    spool_path: Path
    local_domain: str | None
    max_message_size: int


def load_submission(path: Path) -> Submission:
    """Read only `[spool] path` and `[policy] local_domain` / `max_message_size`: an app user
    running pickupd-sendmail may read the config but not the password files it names (and
    need not: the daemon checks everything else). Raise ConfigError."""
    reader = _Reader(path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    spool = reader.table(doc, "spool")
    spool_path = Path(reader.get(spool, "spool.", "path", "/var/spool/pickupd", _string, "a path"))
    policy = reader.table(doc, "policy")
    submission = Submission(
        spool_path=spool_path if spool_path.is_absolute() else reader.dir / spool_path,
        local_domain=reader.get(policy, "policy.", "local_domain", None, _domain, ""),
        max_message_size=reader.get(policy, "policy.", "max_message_size", 25 * 1024**2, _size, ""),
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

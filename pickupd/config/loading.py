"""TOML -> frozen `Config`. Collects every problem as `file: key.path: problem`.

The section dataclasses below (and RelayConfig, SenderRule in routing.py) are the one table of
config keys: each field declared with `setting(default, converter, expected, help)` is
a key (see keys.py).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pickupd.auth.logins import Credentials, Login, OAuth2Login, RefreshTokenSource, Secret
from pickupd.auth.owners import Owner
from pickupd.config import keys as s
from pickupd.config.keys import Reader, setting
from pickupd.config.limits import LimitsConfig, read_limits
from pickupd.config.logins import others_can_access
from pickupd.config.metrics import MetricsConfig, read_metrics
from pickupd.config.routing import (
    RelayConfig,
    SenderRule,
    is_loopback,
    named_tables,
    read_relay,
    read_sender,
)
from pickupd.config.secrets import inline_secrets
from pickupd.errors import ConfigError
from pickupd.message.priority import MailClass
from pickupd.spool.disk import IoMode

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
    "keep_fixed",
    "load",
    "load_submission",
]

DEFAULT_CONFIG_PATH = "/etc/pickupd/pickupd.toml"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    """`[spool]`"""

    path: Path = setting(
        Path("/var/spool/pickupd"),
        s.pathname,
        "the root of pickup/, active/, deferred/, hold/, failed/ and sent/ (one filesystem)",
    )
    keep_sent: bool = setting(
        False,
        s.boolean,
        "keep relayed messages in sent/ with their .json",
    )
    claim_lease: float = setting(
        600.0,
        s.positive_duration,
        "a claim not renewed this long (its host is gone) may be taken over by another host",
    )
    io: IoMode = setting(
        "auto",
        s.choice("auto", "loop", "threads"),
        'where claims, reads and moves run: "threads" on a network file system (NFS), so a'
        ' slow server stalls no session; "auto" tells by the file system',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchConfig:
    """`[dispatch]`"""

    concurrency: int = setting(
        8,
        s.int_range(1, 1000),
        "messages relayed at the same time (by all workers together)",
    )
    workers: int = setting(
        0,
        s.int_range(0, 64),
        "dispatcher processes sharing the work; 0: one per CPU core, at most 4",
    )
    settle: float = setting(
        1.0,
        s.duration,
        "a .eml written straight into pickup/ is taken once unchanged this long",
    )
    rescan_interval: float = setting(
        30.0,
        s.positive_duration,
        "rescan pickup/ and deferred/ this often (deferred/: more seldom as it grows)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """`[policy]`"""

    max_recipients: int = setting(
        100,
        s.int_range(1, 100_000),
        "more recipients: failed/ with reason too_many_recipients",
    )
    max_message_size: int = setting(
        25 * 1024 * 1024, s.size, "larger messages: failed/ with reason too_large"
    )
    max_header_size: int = setting(
        64 * 1024, s.size, "a larger header section: failed/ as malformed"
    )
    check_header_from: bool = setting(
        True,
        s.boolean,
        "every From: address must match a [senders] entry too",
    )
    require_owners: bool = setting(
        False,
        s.boolean,
        "every [senders] entry must name its owners (the local users who may send as it)",
    )
    # Qualifies a bare local part ("root") in the envelope and From/To/Cc, as Postfix's myorigin.
    local_domain: str | None = setting(
        None, s.domain, "qualify bare names like root as root@local_domain (not set)"
    )
    highest_class: tuple[tuple[Owner, MailClass], ...] | None = setting(
        None,
        s.owner_classes,
        "by writer (users, @groups): the highest class under a limit their files may"
        " have (not set: as marked)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """`[retry]`"""

    schedule: tuple[float, ...] = setting(
        (60.0, 300.0, 900.0, 3600.0, 7200.0, 14400.0),
        s.schedule,
        "wait after the 1st, 2nd, 3rd ... failed attempt; the last value repeats",
    )
    max_age: float = setting(
        5 * 86400.0,
        s.positive_duration,
        "give up after this long: failed/ with reason expired",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """`[log]`"""

    level: str = setting(
        "info",
        s.choice("debug", "info", "warning", "error"),
        "debug | info | warning | error",
    )
    format: Literal["json", "console"] = setting(
        "json",
        s.choice("json", "console"),
        '"json": one JSON object per line (journald); "console": text for people',
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyConfig:
    """`[notify]`: failure feedback to the apps, by a command and by a report mail."""

    on_failed: tuple[str, ...] | None = setting(
        None,
        s.command,
        "run for each message that lands in failed/: the sidecar JSON on stdin (not set)",
    )
    on_deferred_after: float | None = setting(
        None,
        s.positive_duration,
        "also run on_failed's command, once, for a message still deferred this long (not set)",
    )
    hook_timeout: float = setting(
        30.0,
        s.positive_duration,
        "a hook still running after this is killed",
    )
    report_to: str | None = setting(
        None, s.address, "mail a report of failed messages to this address (not set)"
    )
    report_from: str | None = setting(
        None, s.address, "the report's sender: must be allowed by a [senders] entry"
    )
    report_interval: float = setting(
        3600.0,
        s.positive_duration,
        "at most one report this often; failures in between are batched",
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
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    relays: Mapping[str, RelayConfig] = field(default_factory=dict)
    senders: tuple[SenderRule, ...] = ()

    def logins(self) -> list[tuple[str, Login]]:
        """Each login the file holds, with its key path (`relays.x`, `senders."a@b"`)."""
        found = [(f"relays.{r.name}", r.credentials) for r in self.relays.values()]
        found += [(f'senders."{s.pattern}"', s.credentials) for s in self.senders]
        return [(where, login) for where, login in found if login is not None]

    def refresh_sources(self) -> list[RefreshTokenSource]:
        """The stored refresh tokens its OAuth2 logins use."""
        sources = (login.source for _, login in self.logins() if isinstance(login, OAuth2Login))
        return [source for source in sources if isinstance(source, RefreshTokenSource)]

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


def keep_fixed(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` as a running process can take it on reload: the keys it cannot change without a
    restart keep their old values; returns it and those keys that changed (to warn about)."""
    fixed = {
        "spool.path": (old.spool.path, new.spool.path),
        "dispatch.concurrency": (old.dispatch.concurrency, new.dispatch.concurrency),
        "dispatch.workers": (old.dispatch.workers, new.dispatch.workers),
        "metrics": (old.metrics, new.metrics),
        # The ledger (the spool's, or a store's connection and password) is opened once.
        "limits": (old.limits, new.limits),
    }
    changed = [key for key, (before, after) in fixed.items() if before != after]
    kept = dataclasses.replace(
        new,
        spool=dataclasses.replace(new.spool, path=old.spool.path),
        dispatch=dataclasses.replace(
            new.dispatch, concurrency=old.dispatch.concurrency, workers=old.dispatch.workers
        ),
        metrics=old.metrics,
        limits=old.limits,
    )
    return kept, changed


def config_path(cli_value: str | None) -> Path:
    """`-c FILE`, else `$PICKUPD_CONFIG`, else the default path."""
    return Path(cli_value or os.environ.get("PICKUPD_CONFIG") or DEFAULT_CONFIG_PATH)


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
    reader.unknown(doc, "", set(SECTIONS) | {"limits", "relays", "senders"})
    sections: dict[str, Any] = {"spool": _spool(reader, doc)}
    for name, section in SECTIONS.items():
        if name not in ("spool", "metrics"):
            sections[name] = section(**reader.values(reader.table(doc, name), f"{name}.", section))
    sections["metrics"] = read_metrics(reader, doc)
    sections["limits"] = read_limits(reader, doc)

    relays: dict[str, RelayConfig] = {}
    for name, table in named_tables(reader, doc, "relays").items():
        relay = read_relay(reader, name, table)
        if relay is not None:
            relays[name] = relay
    senders: list[SenderRule] = []
    for pattern, table in named_tables(reader, doc, "senders").items():
        rule = read_sender(reader, pattern, table, relays)
        if rule is not None:
            senders.append(rule)
    if not senders and not reader.problems:
        reader.problem("senders", 'no sender is allowed: add a [senders."..."] entry')
    if sections["policy"].require_owners:
        for rule in senders:
            if rule.owners is None:
                reader.problem(
                    f'senders."{rule.pattern}".owners',
                    "required by policy.require_owners: the local users who may send as it",
                )
    notify: NotifyConfig = sections["notify"]
    if (notify.report_to is None) != (notify.report_from is None):
        missing = "report_from" if notify.report_from is None else "report_to"
        reader.problem(f"notify.{missing}", "report_to and report_from go together")
    elif notify.report_from is not None and not any(r.matches(notify.report_from) for r in senders):
        reader.problem("notify.report_from", f"{notify.report_from} matches no [senders] entry")

    if _holds_inline_secret(doc):
        try:
            if others_can_access(path):
                reader.problem("", f"holds a secret but others can read it; chmod o-rw {path}")
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
    max_header_size: int = 65536


def load_submission(path: Path) -> Submission:
    """Read only `[spool] path` and `[policy] local_domain`, `max_message_size` and
    `max_header_size`: an app user running pickupd-sendmail or pickupd drop may read the
    config but not the secrets it names (and need not: the daemon checks everything else).
    Raise ConfigError."""
    reader = Reader(path)
    doc = _parse(path)
    spool, policy = reader.table(doc, "spool"), reader.table(doc, "policy")
    submission = Submission(
        spool_path=reader.file(str(reader.value(spool, "spool.", SpoolConfig, "path"))),
        local_domain=reader.value(policy, "policy.", PolicyConfig, "local_domain"),
        max_message_size=reader.value(policy, "policy.", PolicyConfig, "max_message_size"),
        max_header_size=reader.value(policy, "policy.", PolicyConfig, "max_header_size"),
    )
    if reader.problems:
        raise ConfigError(reader.problems)
    return submission


def _holds_inline_secret(doc: Mapping[str, Any]) -> bool:
    """A password, a client secret (relays, senders), the store's or the metrics' password,
    written in the config itself."""
    return bool(inline_secrets(doc))

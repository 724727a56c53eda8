"""`[limits]`: where the quota ledger is kept. Without `store`, a file in the spool that every
process on it shares; with `store = "redis://..."`, a Redis that a fleet shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pickupd.auth.logins import Secret
from pickupd.config import keys as s
from pickupd.config.keys import Reader, expecting, setting
from pickupd.config.logins import PASSWORD_KEYS, read_secret
from pickupd.config.routing import is_loopback
from pickupd.errors import Invalid

__all__ = ["LimitsConfig", "read_limits", "shown_url"]


@expecting('a URL like "redis://host:6379/0" or "rediss://host:6380/0"')
def _store_url(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise Invalid('expected "redis://host:6379/0" or "rediss://host:6380/0"')
    in_query = {name.lower() for name in parse_qs(parts.query, keep_blank_values=True)}
    if parts.password or "password" in in_query:
        # (redis-py takes ?password= too: it would pass the clear-text rule unseen.)
        raise Invalid("a password does not go in the URL: use password_file (or password_env)")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """`[limits]` (the password is read apart, as a relay's is)."""

    store: str | None = setting(
        None,
        _store_url,
        'a Redis the fleet shares, "redis://host:6379/0" or "rediss://..." (not set: a file'
        " in the spool)",
    )
    ca_file: Path | None = setting(
        None, s.pathname, "with rediss://: CA certificates to verify Redis with"
    )
    hosts: int = setting(
        1,
        s.int_range(1, 10_000),
        "while the store is down, each host takes 1/hosts of every limit",
    )
    wait: float = setting(
        0.1,
        s.positive_duration,
        "a store that has not answered in this long counts as down",
    )
    password: Secret | None = None


def read_limits(reader: Reader, doc: Mapping[str, Any]) -> LimitsConfig:
    table = reader.table(doc, "limits")
    values = reader.values(table, "limits.", LimitsConfig, set(PASSWORD_KEYS))
    if values["ca_file"] is not None:
        values["ca_file"] = reader.file(values["ca_file"])
        if not values["ca_file"].is_file():
            reader.problem("limits.ca_file", f"{values['ca_file']} does not exist")
    password = None
    if any(key in table for key in PASSWORD_KEYS):
        password = read_secret(reader, table, "limits.", "password")
        if values["store"] is None:
            reader.problem("limits.password", "a password needs a store")
    store = values["store"]
    if store and password is not None and store.startswith("redis://"):
        host = urlsplit(store).hostname or ""
        if not is_loopback(host):
            reader.problem(
                "limits.store",
                f"the password would go in clear to {host}: use rediss:// (TLS)",
            )
    return LimitsConfig(password=password, **values)


def shown_url(url: str) -> str:
    """The store's URL as logs show it (without a user's name or password, if it had any)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

"""Where a config keeps its secrets, and who else can read them: `pickupd check`, run as
root, fails when anyone but root and the service's user may read a secret the service needs
(a password file, a client secret or key, a service account, a refresh token), or a config
that holds one inline. The drop group's apps are the users this is for: one that could read
another sender's password would log in as that sender. POSIX only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pickupd.auth.exposure import Account, accounts, can_read, readers

__all__ = ["INLINE_KEYS", "SECRET_FILE_KEYS", "exposure", "inline_secrets", "secret_files"]

# Files whose content is a secret (client_certificate_file is public: not here).
SECRET_FILE_KEYS = (
    "password_file",
    "client_secret_file",
    "client_key_file",
    "service_account_file",
    "refresh_token_file",
    "basic_auth_password_file",
    "tls_key_file",
)
INLINE_KEYS = ("password", "client_secret", "basic_auth_password")


def _tables(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each table that may hold a login, with its key path's prefix."""
    for section, quote in (("relays", False), ("senders", True)):
        tables = doc.get(section)
        if isinstance(tables, dict):
            for name, table in tables.items():
                if isinstance(table, dict):
                    shown = f'"{name}"' if quote else name
                    yield f"{section}.{shown}.", table
    for section in ("limits", "metrics"):
        table = doc.get(section)
        if isinstance(table, dict):
            yield f"{section}.", table


def secret_files(doc: Mapping[str, Any], base: Path) -> list[tuple[str, Path]]:
    """(key path, file) of every secret file the config names (relative to `base`)."""
    return [
        (prefix + key, base / table[key])
        for prefix, table in _tables(doc)
        for key in SECRET_FILE_KEYS
        if isinstance(table.get(key), str)
    ]


def inline_secrets(doc: Mapping[str, Any]) -> list[str]:
    """The key paths of secrets written in the config itself."""
    return [prefix + key for prefix, table in _tables(doc) for key in INLINE_KEYS if key in table]


def exposure(config: Path, service: str, drop_gid: int | None) -> list[str] | None:
    """One line per secret (or config holding one) that a user other than root and `service`
    may read, or that `service` may not; naming them, and the drop group's among them. None
    if there are secrets but no user `service` to judge them for."""
    import grp
    import pwd

    doc = tomllib.loads(config.read_text(encoding="utf-8"))
    places = secret_files(doc, config.parent)
    inline = inline_secrets(doc)
    if inline:
        places.append((inline[0], config))
    if not places:
        return []
    everyone = accounts()
    user = next((a for a in everyone if a.name == service), None)
    if user is None:
        return None
    others = [a for a in everyone if a.uid not in (0, user.uid)]
    drop = grp.getgrgid(drop_gid).gr_name if drop_gid is not None else ""
    service_gid = pwd.getpwnam(service).pw_gid
    group = grp.getgrgid(service_gid).gr_name
    problems = []
    for key, path in places:
        if not path.exists():
            continue  # loading the config says so
        if not can_read(user, path):
            problems.append(f"{config}: {key}: {service} cannot read {path}")
        found = readers(path, others)
        if not found:
            continue
        if path == config:
            what = f"the config holds a secret and {_who(found, drop_gid, drop)} can read it"
            fix = f"keep it in a file of its own ({key}_file) that only {service} may read"
        else:
            what = f"{_who(found, drop_gid, drop)} can read {path}"
            fix = f"chown root:{group} {path} && chmod 640 {path}, no ACL entries"
            if any(service_gid in a.gids for a in found):  # a member of the service's group
                fix += f", and group {group} for {service} alone"
        problems.append(f"{config}: {key}: {what}: only root and {service} may; {fix}")
    return problems


def _who(readers: list[Account], drop_gid: int | None, drop: str) -> str:
    names = ", ".join(a.name for a in readers[:4]) + (" ..." if len(readers) > 4 else "")
    in_drop = sum(1 for a in readers if drop_gid is not None and drop_gid in a.gids)
    if in_drop:
        return f"{len(readers)} user(s) ({names}; {in_drop} of the drop group {drop})"
    return f"{len(readers)} user(s) ({names})"

"""Logins for relays: a username with its password, read from the config, a file or the
environment. Secrets never print themselves, and a secret file others can read is refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import Reader, string, type_name

__all__ = [
    "CREDENTIAL_KEYS",
    "Credentials",
    "Secret",
    "others_can_access",
    "read_credentials",
    "read_secret",
]

CREDENTIAL_KEYS = frozenset({"username", "password", "password_file", "password_env"})


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


def read_credentials(reader: Reader, table: Mapping[str, Any], prefix: str) -> Credentials | None:
    """Read username + one of password / password_file / password_env."""
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

"""How a config key is declared and read: `setting()` on a dataclass field, the converters,
and the reader that collects every problem with its `file: key.path`.

A section of the config is a frozen dataclass whose fields are declared with `setting(...)`:
the field's name is the key, and the metadata holds its converter, the words of the error
when a value does not convert and its help text. How its default is written in TOML (`shown`)
is derived from the default itself, so each default is written once. Config loading,
`pickupd init`, `pickupd check` and the documentation test all read this one table.

A converter raises `Invalid` (or TypeError / ValueError): with a text, that text is the
problem shown; without one, the converter's "expected ..." words are. Those words belong to
the converter (`expecting`), derived from its range where it has one (`int_range(1, 1000)`:
"an integer from 1 to 1000"), so they cannot disagree with what it takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from pickupd.auth.owners import Owner, parse_owner
from pickupd.errors import Invalid
from pickupd.message.priority import MailClass
from pickupd.units import (
    Limit,
    Rate,
    format_duration,
    format_size,
    parse_duration,
    parse_limit,
    parse_rate,
    parse_size,
)

__all__ = [
    "Key",
    "Reader",
    "address",
    "boolean",
    "choice",
    "command",
    "domain",
    "duration",
    "expected",
    "expecting",
    "https_url",
    "int_range",
    "keys",
    "limits",
    "listen",
    "mail_class",
    "owner_classes",
    "pathname",
    "positive_duration",
    "rate",
    "schedule",
    "setting",
    "size",
    "string",
    "type_name",
]

T = TypeVar("T")
Convert = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Key:
    """One config key: what converts it, what the error says it expected, and its help."""

    name: str
    convert: Convert
    expected: str
    help: str
    shown: str  # the default as written in TOML ("" when unset by default)
    default: Any


def setting(default: Any, convert: Convert, help: str) -> Any:
    """A dataclass field that is a config key (see the module docstring)."""
    meta = {"convert": convert, "help": help}
    return field(default=default, metadata=meta)


# What each converter takes, as its error says it ("expected <this>, got ...").
_EXPECTED: dict[Convert, str] = {}


def expecting(text: str) -> Callable[[T], T]:
    """Register what a converter takes, in the words of its error (a decorator)."""

    def register(convert: T) -> T:
        _EXPECTED[convert] = text  # type: ignore[index]
        return convert

    return register


def expected(convert: Convert) -> str:
    """What `convert` takes, as a problem says it."""
    return _EXPECTED.get(convert, "a valid value")


def refused(convert: Convert) -> Invalid:
    """The error of a converter whose value sits inside another's (an item of an array):
    its own words, since the reader would say the outer key's."""
    return Invalid(f"expected {expected(convert)}")


def shown(default: Any, convert: Convert) -> str:
    """A default as TOML writes it ("" for None: the key is unset by default)."""
    if default is None:
        return ""
    return _inline(_AS_TOML.get(convert, _plain)(default))


def _inline(value: Any) -> str:
    """A value as an inline TOML value, on one line."""
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    return tomli_w.dumps({"k": value}).partition("=")[2].strip()


def _plain(value: Any) -> Any:
    if isinstance(value, Rate):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def keys(section: type) -> Iterator[Key]:
    """The config keys a section's dataclass declares, in order."""
    for item in dataclasses.fields(section):
        if "convert" in item.metadata:
            meta = item.metadata
            yield Key(
                item.name,
                meta["convert"],
                expected(meta["convert"]),
                meta["help"],
                shown(item.default, meta["convert"]),
                item.default,
            )


def type_name(value: object) -> str:
    """A TOML value as an error message shows it."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


class Reader:
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
            self.problem(prefix + key, f"expected a table, got {type_name(value)}")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                near = difflib.get_close_matches(key, sorted(known), 1)
                what = "unknown key" if prefix else "unknown section"
                self.problem(
                    f"{prefix}{key}", what + (f' (did you mean "{near[0]}"?)' if near else "")
                )

    def get(
        self,
        table: Mapping[str, Any],
        prefix: str,
        key: str,
        default: T,
        convert: Callable[[Any], T],
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        said = f"expected {expected(convert)}, got {type_name(value)}"
        try:
            return convert(value)
        except Invalid as exc:
            self.problem(prefix + key, str(exc) or said)
        except (TypeError, ValueError):
            self.problem(prefix + key, said)
        return default

    def values(
        self,
        table: Mapping[str, Any],
        prefix: str,
        section: type,
        extra: Collection[str] = frozenset(),
    ) -> dict[str, Any]:
        """Every key `section` declares, read from `table` (defaults where absent); unknown
        keys are problems unless in `extra` (keys the caller reads itself)."""
        declared = list(keys(section))
        self.unknown(table, prefix, {k.name for k in declared} | set(extra))
        return {k.name: self.get(table, prefix, k.name, k.default, k.convert) for k in declared}

    def value(self, table: Mapping[str, Any], prefix: str, section: type, name: str) -> Any:
        """One key `section` declares, read from `table` (its default where absent)."""
        (key,) = (k for k in keys(section) if k.name == name)
        return self.get(table, prefix, name, key.default, key.convert)

    def file(self, value: str) -> Path:
        """A path from the file: relative ones are relative to the config's folder."""
        path = Path(value)
        return path if path.is_absolute() else self.dir / path


# -- converters: raise Invalid, with the problem's text or without (see the module docstring) --


def int_range(low: int, high: int) -> Callable[[Any], int]:
    @expecting(f"an integer from {low} to {high}")
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid()
        return value

    return convert


@expecting("true or false")
def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid()
    return value


@expecting("a non-empty string")
def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid()
    return value


@expecting("a path")
def pathname(value: Any) -> str:
    """A file's or a folder's path (relative ones: to the config's folder, as the reader
    resolves them)."""
    if not isinstance(value, str) or not value:
        raise Invalid()
    return value


@expecting('a duration like "30s" or "5m"')
def duration(value: Any) -> float:
    if not isinstance(value, str):
        raise Invalid()
    return parse_duration(value)


@expecting('a duration greater than zero, like "30s"')
def positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise refused(positive_duration)  # also inside an array (schedule)
    return seconds


@expecting('a non-empty array of durations like ["1m", "5m"]')
def schedule(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid()
    return tuple(positive_duration(item) for item in value)


@expecting('a size like 26214400 or "25MiB"')
def size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Invalid()
    return parse_size(value)


@expecting('a rate like "30/min"')
def rate(value: Any) -> Rate:
    if not isinstance(value, str):
        raise Invalid()
    return parse_rate(value)


@expecting('an array like ["30 messages/min", "10000 recipients/day"]')
def limits(value: Any) -> tuple[Limit, ...]:
    """An array of limits: ["30 messages/min", "10000 recipients/day", "3 connections"]."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid()
    return tuple(parse_limit(item) for item in value)


@expecting('a non-empty array like ["billing", "@finance", "uid:1234"]')
def owners(value: Any) -> tuple[Owner, ...]:
    """An array of local users, @groups and uids: ["billing", "@finance", "uid:1234"]."""
    if not isinstance(value, list) or not value:
        raise Invalid()
    found = []
    for item in value:
        try:
            found.append(parse_owner(item))
        except Invalid as exc:
            raise Invalid(f"{item!r}: {exc}") from None
    return tuple(dict.fromkeys(found))


@expecting('"urgent", "normal" or "bulk"')
def mail_class(value: Any) -> MailClass:
    """ "urgent", "normal" or "bulk" (message/priority.py)."""
    if not isinstance(value, str):
        raise refused(mail_class)  # also inside a table (owner_classes)
    try:
        return MailClass.named(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


@expecting('a table like {"newsletter" = "bulk", "@webapps" = "normal"}')
def owner_classes(value: Any) -> tuple[tuple[Owner, MailClass], ...]:
    """A table of writers and the highest class their files may have:
    {"newsletter" = "bulk", "@webapps" = "normal"}."""
    if not isinstance(value, dict) or not value:
        raise Invalid()
    found = []
    for item, named in value.items():
        try:
            found.append((parse_owner(item), mail_class(named)))
        except Invalid as exc:
            raise Invalid(f"{item!r}: {exc}") from None
    return tuple(found)


@expecting('an https:// URL, like "https://host/path"')
def https_url(value: Any) -> str:
    """An https:// base URL, without a trailing slash."""
    if not isinstance(value, str) or not re.fullmatch(r"https://[^/\s?#]+(/[^\s?#]*)?", value):
        raise Invalid()
    return value.rstrip("/")


@expecting('a domain name like "example.com"')
def domain(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value
    ):
        raise Invalid()
    return value.lower()


@expecting('"host:port", like "127.0.0.1:9464" or "[::1]:9464"')
def listen(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise Invalid()
    host, colon, port = value.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid()
    return host, int(port)


@expecting('an array like ["/usr/local/bin/cmd", "--flag"]')
def command(value: Any) -> tuple[str, ...]:
    """A command as an array (run without a shell): ["/path/cmd", "arg"]."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(part, str) and part for part in value)
    ):
        raise Invalid()
    return tuple(value)


@expecting('an address like "ops@example.com"')
def address(value: Any) -> str:
    """One mail address (addr-spec), like "ops@example.com"."""
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", value):
        raise Invalid()
    return value


def choice(*options: str) -> Callable[[Any], str]:
    @expecting("one of " + ", ".join(f'"{o}"' for o in options))
    def convert(value: Any) -> str:
        if value not in options:
            near = difflib.get_close_matches(str(value), options, 1)
            hint = f' (did you mean "{near[0]}"?)' if near else ""
            raise Invalid(
                "expected one of " + ", ".join(f'"{o}"' for o in options)
                + f", got {type_name(value)}{hint}"
            )  # fmt: skip
        return str(value)

    return convert


def _listen_as_toml(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# How a converter's typed value goes back into TOML (others: as it is).
_AS_TOML: dict[Convert, Callable[[Any], Any]] = {
    duration: format_duration,
    positive_duration: format_duration,
    schedule: lambda value: [format_duration(item) for item in value],
    size: format_size,
    listen: _listen_as_toml,
    limits: lambda value: [str(item) for item in value],
    mail_class: lambda value: value.value,
    owner_classes: lambda value: {owner.shown: named.value for owner, named in value},
}

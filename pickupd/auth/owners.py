"""Who may send as a sender: the local users that own the files dropped for it.

A `[senders."..."]` entry's `owners = ["billing", "@finance", "uid:1234", 0]` names users,
groups (`@name`) and numeric uids (`uid:NNN` or a bare number, for a deleted user or a
container's). The writer of a message is the owner of the file as claimed (fstat on the
descriptor its bytes are read from), recorded in its sidecar at the first claim. Root is a
user like any other: list it (`"root"`) for cron's mail to go. Postfix has the same check in
`local_login_sender_maps`, enforced by its setgid postdrop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pickupd.errors import Invalid

__all__ = ["Owner", "allows", "describe_owners", "describe_uid", "parse_owner", "user_name"]


@dataclass(frozen=True, slots=True)
class Owner:
    """One entry of `owners`: a user (by uid) or a group (by gid), and how it was written."""

    kind: Literal["user", "group"]
    id: int
    shown: str  # "billing", "@finance", "uid:1234"


def parse_owner(value: object) -> Owner:
    """An `owners` entry; Invalid (the caller adds the key path) if it names nobody."""
    if os.name != "posix":
        raise Invalid("owners are local users and groups: POSIX only (Windows files have none)")
    import grp
    import pwd

    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Owner("user", value, f"uid:{value}")
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a user name, @group, uid:NNN or a uid number")
    text = value.strip()
    if text.startswith("uid:") and text[4:].isdigit():
        return Owner("user", int(text[4:]), f"uid:{int(text[4:])}")
    if text.startswith("@"):
        try:
            return Owner("group", grp.getgrnam(text[1:]).gr_gid, text)
        except KeyError:
            raise Invalid(f"no such group {text[1:]!r} (@name is a group)") from None
    try:
        return Owner("user", pwd.getpwnam(text).pw_uid, text)
    except KeyError:
        raise Invalid(
            f"no such user {text!r} (a uid that has no name here: write it uid:NNN)"
        ) from None


def allows(owners: Iterable[Owner], uid: int) -> bool:
    """Whether the file owner `uid` is one of `owners` (a user, or a member of a group:
    its primary group or a supplementary one, as the system's group database says now)."""
    import grp
    import pwd

    owners = tuple(owners)
    if any(o.kind == "user" and o.id == uid for o in owners):
        return True
    groups = [o.id for o in owners if o.kind == "group"]
    if not groups:
        return False
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return False  # no name, so no supplementary groups; a uid is listed as uid:NNN
    for gid in groups:
        if entry.pw_gid == gid:
            return True
        with contextlib.suppress(KeyError):
            if entry.pw_name in grp.getgrgid(gid).gr_mem:
                return True
    return False


def user_name(uid: int) -> str | None:
    """The user name of `uid`, None if it has none here."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def describe_uid(uid: int, name: str | None = None) -> str:
    """`www-data (uid 33)`, or `uid:33` for a uid with no name."""
    name = name if name is not None else user_name(uid)
    return f"{name} (uid {uid})" if name else f"uid:{uid}"


def describe_owners(owners: Iterable[Owner]) -> str:
    """The owners as the config writes them: `billing, @finance`."""
    return ", ".join(o.shown for o in owners)

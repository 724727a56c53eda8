"""Who can read a file: its owner, its group's members, everyone, and the users and groups
its POSIX ACL names. `pickupd check`, run as root, asks it of every secret the service needs:
only root and the service's user may read one (an app of the drop group that could would
log in as any sender it likes). POSIX only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["READ", "SEARCH", "Account", "accounts", "can_read", "readers"]

# <linux/posix_acl_xattr.h>: a version, then (tag, perm, id) entries; perm is rwx as 4, 2, 1.
_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
READ, SEARCH = 0o4, 0o1


@dataclass(frozen=True, slots=True)
class _Acl:
    """A file's access rules: its mode, or its POSIX ACL where it has one."""

    owner: int  # uid
    group: int  # gid
    owner_perm: int
    group_perm: int
    other_perm: int
    mask: int = 0o7
    users: tuple[tuple[int, int], ...] = ()  # named users: (uid, perm)
    groups: tuple[tuple[int, int], ...] = ()  # named groups: (gid, perm)


@dataclass(frozen=True, slots=True)
class Account:
    """A local user as far as file access goes: its uid and every group it is in."""

    name: str
    uid: int
    gids: frozenset[int]


def accounts() -> list[Account]:
    """Every user of the host's user database, with its primary and supplementary groups."""
    import grp
    import pwd

    members: dict[str, set[int]] = {}
    for group in grp.getgrall():
        for name in group.gr_mem:
            members.setdefault(name, set()).add(group.gr_gid)
    return [
        Account(
            entry.pw_name, entry.pw_uid, frozenset({entry.pw_gid, *members.get(entry.pw_name, ())})
        )
        for entry in pwd.getpwall()
    ]


def _rules(path: Path) -> _Acl:
    """`path`'s mode, with its POSIX ACL where it has one (os.stat errors propagate)."""
    st = os.stat(path)
    mode = st.st_mode
    rules = _Acl(st.st_uid, st.st_gid, (mode >> 6) & 7, (mode >> 3) & 7, mode & 7)
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:  # no ACL, or a file system without them
        return rules
    users, groups, mask = [], [], 0o7
    group_perm = rules.group_perm
    for offset in range(_ACL_HEADER.size, len(raw) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(raw, offset)
        if tag == _USER:
            users.append((ident, perm))
        elif tag == _GROUP:
            groups.append((ident, perm))
        elif tag == _GROUP_OBJ:
            group_perm = perm
        elif tag == _MASK:
            mask = perm
    return replace(
        rules, group_perm=group_perm, mask=mask, users=tuple(users), groups=tuple(groups)
    )


def _allows(rules: _Acl, account: Account, want: int) -> bool:
    """POSIX.1e access: the owner's entry, a named user's, else the groups' (any that
    matches may grant), else other's; entries but the owner's and other's go through the
    mask."""
    if account.uid == rules.owner:
        return bool(rules.owner_perm & want)
    for uid, perm in rules.users:
        if uid == account.uid:
            return bool(perm & rules.mask & want)
    matched = False
    for gid, perm in ((rules.group, rules.group_perm), *rules.groups):
        if gid in account.gids:
            matched = True
            if perm & rules.mask & want:
                return True
    return False if matched else bool(rules.other_perm & want)


def can_read(account: Account, path: Path, seen: dict[Path, _Acl] | None = None) -> bool:
    """Whether `account` may read `path`: its permissions, and each folder above letting it
    through. Root may read anything. `seen`: the rules already read (judging many accounts,
    each file and folder is read once)."""
    if account.uid == 0:
        return True
    seen = {} if seen is None else seen

    def rules(of: Path) -> _Acl:
        if of not in seen:
            seen[of] = _rules(of)
        return seen[of]

    try:
        for folder in reversed(path.absolute().parents):
            if not _allows(rules(folder), account, SEARCH):
                return False
        return _allows(rules(path), account, READ)
    except OSError:
        return False


def readers(path: Path, among: Iterable[Account]) -> list[Account]:
    """The accounts in `among` that may read `path` (its rules read once)."""
    seen: dict[Path, _Acl] = {}
    return [account for account in among if can_read(account, path, seen)]

"""Who may do what in the pickup folder: like Postfix's maildrop (1730 postfix:postdrop),
pickup/, pickup/tmp/ and pickup/new/ are writable by the drop group but not readable, and
sticky. A user can drop mail (create a file, rename their own from tmp/ to new/) but can
never list, read, rename or delete another user's waiting mail; files are written 0600.
pickupd, the folders' owner, reads what users drop with CAP_DAC_READ_SEARCH (the unit gives
it) or as root.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = [
    "DROP_FILE_MODE",
    "DROP_FOLDERS",
    "DROP_GROUP",
    "DROP_MODE",
    "SERVICE_USER",
    "drop_folders",
    "loose",
    "make_folder",
    "not_allowed",
]

# The service's user, and the group of the apps that drop mail (Postfix's postfix and
# postdrop): two groups with two jobs. The drop group may write into pickup/ and read the
# config; the secrets are for the service's user (and its own group) alone.
SERVICE_USER = "pickupd"
DROP_GROUP = "pickupdrop"
# The mode of pickup/ and its Maildir folders: owner rwx, group wx (drop, no listing), sticky.
DROP_MODE = 0o1730
# A dropped file: its writer's alone (pickupd reads it by its capability).
DROP_FILE_MODE = 0o600
# The folders under pickup/ that writers use (cur/ only so Maildir clients find a Maildir).
DROP_FOLDERS = ("", "tmp", "new", "cur")


def drop_folders(pickup: Path) -> list[Path]:
    """pickup/ and its Maildir folders, as paths."""
    return [pickup / name if name else pickup for name in DROP_FOLDERS]


def make_folder(folder: Path, mode: int) -> None:
    """Create `folder` with exactly `mode` (mkdir's is cut by the umask and drops the sticky
    bit); one that exists is left as it is."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir()
        os.chmod(folder, mode)


def loose(pickup: Path) -> list[str]:
    """One line per drop folder that lets writers read or remove each other's files (a
    folder others may list, or write without the sticky bit); missing folders say nothing."""
    found: list[str] = []
    if os.name != "posix":  # Windows folders have ACLs, not these bits
        return found
    for folder in drop_folders(pickup)[:3]:  # cur/ is never used
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            continue
        said = []
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            said.append("writers can list it (and read what they can open)")
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            said.append("writers can rename or delete each other's files (no sticky bit)")
        if said:
            found.append(
                f"{folder} is mode {stat.S_IMODE(mode):04o}: {'; '.join(said)}:"
                f" chmod {DROP_MODE:04o} it (pickupd init and the shipped tmpfiles do)"
            )
    return found


def not_allowed(root: Path, doing: str) -> str:
    """The one line for a caller who may not do `doing` ("write into <pickup>"): the group
    to join, `root`'s (the spool's own: the caller may not even look inside it)."""
    import grp
    import pwd

    try:
        group = grp.getgrgid(os.stat(root).st_gid).gr_name
    except (OSError, KeyError):
        return f"may not {doing}: ask for the right to drop mail there"
    try:
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        me = f"uid {os.getuid()}"
    return (
        f"{me} may not {doing}: join group {group}, the spool's drop group"
        f" (as root: usermod -aG {group} {me}; then log in again)"
    )

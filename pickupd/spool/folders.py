"""The spool's folders: scan, claim, read, finish, census. Only the spool/ package creates,
renames and removes message files: this module for the dispatcher's moves, moves.py for the
operator's, recovery.py and stranded.py for what a crash or a full disk leaves.

The folders are the state machine (pickup -> active -> deferred | failed | sent). A message is
wherever its `.eml` is; the `.json` sidecar follows it and is written first, so a crash at any
point leaves each message in exactly one folder. A deferred message's due time is the mtime of
its sidecar, so scanning deferred/ needs no JSON parsing.

Nothing pickupd relies on is kept in a file a writer owns: a dropped file stays its writer's
inode (rename keeps it), and a writer who kept a descriptor open may still set its mtime. So a
claim's lease is the mtime of its process's lock file, a due time the mtime of the sidecar, and
the writer's uid is read at the claim and recorded in the sidecar: all pickupd's own files in
folders only pickupd can open.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pickupd import ids
from pickupd.errors import NotAFile, SpoolLocked
from pickupd.spool.access import DROP_FILE_MODE, DROP_MODE, drop_folders, make_folder
from pickupd.spool.files import (
    BINARY,
    PRIVATE,
    SAFE,
    Read,
    TooLarge,
    Unsafe,
    atomic_write,
    file_kind,
    fsync_dir,
    maildir_name,
    printable,
    read_fd,
    read_limited,
    try_lock,
    write_then_rename,
)
from pickupd.spool.sidecar import Sidecar

__all__ = [
    "LEFTOVER_AGE",
    "TMP_MAX_AGE",
    "Candidate",
    "Claimed",
    "Later",
    "Origin",
    "Spool",
    "claim_id",
    "entries",
    "is_drop",
    "is_folder",
    "lock_path",
    "message_id",
    "older",
    "unlink",
]


class Origin(enum.Enum):
    """Where a candidate was found: pickup/new/, pickup/ itself (a `.eml` a writer dropped),
    deferred/, or active/ (a claim a process left behind, taken back at start)."""

    NEW = "new"
    EML = "eml"
    DEFERRED = "deferred"
    RECOVERED = "recovered"

    @property
    def queued(self) -> bool:
        """It has been in the queue before: its sidecar is in deferred/."""
        return self in (Origin.DEFERRED, Origin.RECOVERED)


# Maildir: files in tmp/ older than this were abandoned by their writer and may be removed.
TMP_MAX_AGE = 36 * 3600.0
# Orphaned sidecars and temp files of atomic writes older than this are leftovers.
LEFTOVER_AGE = 3600.0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file that looks like a message waiting to be claimed."""

    path: Path
    source: str
    origin: Origin
    id: str | None = None  # known for deferred and recovered messages
    # A deferred message whose due time (this) lay beyond the horizon: taken now instead.
    clamped_from: float | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message this process owns: its file is in active/ under a name only we use."""

    id: str
    path: Path
    source: str
    origin: Origin
    claimed_at: float
    sidecar: Sidecar | None  # None for a message seen for the first time
    owner: int | None = None  # the writer's uid (auth/owners.py); None: no uids (Windows)


@dataclass(frozen=True, slots=True)
class Later:
    """Nothing to take yet: come back at `at` (a direct .eml still settling, a deferred
    message not yet due)."""

    at: float


def _owner_token() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


# Windows has no uids (st_uid is always 0): no owner there, and no owners check.
POSIX = os.name == "posix"


def _every(name: str) -> bool:
    """Every file is this process's (one dispatcher; workers.owns where there are several)."""
    return True


class Spool:
    """One spool root. Several processes may share it; each claims under its own owner token."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pickup = root / "pickup"
        self.new = self.pickup / "new"
        self.tmp = self.pickup / "tmp"
        self.active = root / "active"
        self.deferred = root / "deferred"
        self.failed = root / "failed"
        self.sent = root / "sent"
        self.hold = root / "hold"  # put aside by an operator: nothing here is sent
        self.owner = _owner_token()
        self._host = self.owner.rpartition("-")[0]
        self._lock_fd: int | None = None

    # -- layout -------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create missing folders (pickup/ is a Maildir root: tmp, new, cur), the drop folders
        with DROP_MODE, the others private; existing ones are left as they are."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in drop_folders(self.pickup):
            make_folder(folder, DROP_MODE)
        for folder in (self.active, self.deferred, self.failed, self.sent, self.hold):
            make_folder(folder, 0o700)

    @property
    def lock_path(self) -> Path:
        """Our lock file: locked while we run, and its mtime is the lease of all our claims."""
        return lock_path(self, self.owner)

    def lock(self) -> None:
        """Hold a lock file for our owner token: while it is locked our claims are not stale.
        Its mtime starts our claims' lease (a reused pid may find an old file)."""
        path = self.lock_path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | PRIVATE, 0o600)
        if not try_lock(fd):
            os.close(fd)
            raise SpoolLocked(f"{path} is locked by another process")
        os.utime(fd)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- finding work ---------------------------------------------------------------------------

    def scan_pickup(
        self, now: float, settle: float, mine: Callable[[str], bool], stray: Callable[[str], None]
    ) -> Iterator[Candidate | Later]:
        """Yield candidates from pickup/new/ and settled pickup/*.eml files whose name is
        `mine` (asked as the scan reaches each file: a worker's share may change meanwhile).
        For a direct .eml not yet unchanged for `settle`, yields `Later` with the time it
        will be. Each other file in pickup/ (never to be taken) is told to `stray`."""
        for entry in entries(self.new):
            if not is_drop(entry.name, maildir=True):
                continue
            if is_folder(entry):  # never taken, whoever's share it is
                stray(f"new/{entry.name}/")
            elif mine(entry.name):
                yield Candidate(Path(entry.path), f"new/{entry.name}", Origin.NEW)
        for entry in entries(self.pickup):
            name = entry.name
            if not is_drop(name, maildir=False):
                if _stray_file(entry):
                    stray(name)
            elif is_folder(entry):
                stray(f"{name}/")
            elif mine(name):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                ready = st.st_mtime + settle
                if stat.S_ISREG(st.st_mode) and ready > now:
                    yield Later(ready)
                else:
                    yield Candidate(Path(entry.path), name, Origin.EML)

    def strays(self) -> list[str]:
        """The files in pickup/ that will never be taken (an app's `mail.txt`)."""
        return sorted(e.name for e in entries(self.pickup) if _stray_file(e))

    def deferred_times(
        self, now: float, horizon: float = float("inf"), mine: Callable[[str], bool] = _every
    ) -> Iterator[tuple[str, float]]:
        """(id, due time) of each message in deferred/ (of `mine`), in folder order. The due
        time is the sidecar's mtime (the one truth; its next_attempt says the same for people).
        One further ahead than `horizon` seconds cannot come from pickupd (a clock jump, an
        edit): it is given as due `now` (the taker logs it as clamped)."""
        for entry in entries(self.deferred):
            msg_id = message_id(entry.name)
            if msg_id is None or not mine(entry.name):
                continue
            due = self.due_time(msg_id, now)
            yield msg_id, now if due > now + horizon else due

    def due_time(self, msg_id: str, now: float) -> float:
        """When the deferred message `msg_id` is due: its sidecar's mtime (pickupd's own file;
        the .eml is its writer's, who may still hold it open). Without a sidecar: `now`."""
        try:
            return os.stat(self.deferred / f"{msg_id}.json", follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return now

    def set_due(self, msg_id: str, due: float) -> bool:
        """Make the deferred message `msg_id` due at `due`; False if its sidecar is gone."""
        try:
            os.utime(self.deferred / f"{msg_id}.json", (due, due), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    # -- claiming and reading -----------------------------------------------------------------

    def claim(self, candidate: Candidate) -> Claimed | None:
        """Atomically rename the candidate into active/; None if another process was first.
        NotAFile if it is a directory (put back). The writer is the file's owner now, unless
        the sidecar recorded one at an earlier claim (the one that counts, for ever)."""
        msg_id = candidate.id or ids.new()
        target = self.active / f"{msg_id}.{self.owner}"
        try:
            os.rename(candidate.path, target)
        except FileNotFoundError:
            return None
        now = time.time()
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            # Swapped in after the scan: it goes back (our folders stay ours alone).
            os.rename(target, candidate.path)
            raise NotAFile(str(candidate.path))
        sidecar = None
        if candidate.origin.queued:
            sidecar = self.read_sidecar(self.deferred / f"{msg_id}.json")
        recorded = sidecar.owner_uid if sidecar is not None else None
        owner = recorded if recorded is not None else (st.st_uid if POSIX else None)
        return Claimed(
            msg_id, target, printable(candidate.source), candidate.origin, now, sidecar, owner
        )

    @staticmethod
    def read_sidecar(path: Path) -> Sidecar | None:
        try:
            return Sidecar.from_json(read_limited(path, 16 * 1024 * 1024))
        except (OSError, ValueError):
            return None

    @staticmethod
    def read(claimed: Claimed, limit: int) -> Read | Unsafe | TooLarge:
        """The message bytes; `Unsafe` if the file is not a plain file of its own (fstat of
        the descriptor they are read from); `TooLarge` if it is larger than `limit`."""
        try:
            fd = os.open(claimed.path, os.O_RDONLY | SAFE | BINARY)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Unsafe("is a symbolic link: not followed")
            return Unsafe(f"cannot be opened: {exc.strerror}")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Unsafe(f"is not a regular file ({file_kind(st.st_mode)})")
            if st.st_nlink > 1:
                return Unsafe(
                    "has other hard links: refused, it could expose a file we can read",
                    linked=True,
                )
            if st.st_size > limit:
                return TooLarge(st.st_size)
            data = read_fd(fd, limit + 1)
        finally:
            os.close(fd)
        return TooLarge(len(data)) if len(data) > limit else Read(data)

    # -- outcomes -------------------------------------------------------------------------------

    def finish_sent(self, claimed: Claimed, archive: Sidecar | None) -> None:
        """Delete the message, or archive it to sent/ with its sidecar when `archive` is given."""
        if archive is None:
            os.unlink(claimed.path)
        else:
            self._move_with_sidecar(claimed, self.sent, archive)
        self._drop_old_sidecar(claimed)

    def finish_deferred(self, claimed: Claimed, sidecar: Sidecar, due: float) -> None:
        """Move to deferred/ with its sidecar; it becomes due at `due` (the sidecar's mtime)."""
        self._move_with_sidecar(claimed, self.deferred, sidecar, due)

    def finish_failed(self, claimed: Claimed, sidecar: Sidecar) -> None:
        """Move to failed/ with its sidecar (which holds the reason)."""
        self._move_with_sidecar(claimed, self.failed, sidecar)
        self._drop_old_sidecar(claimed)

    def write_failed_copy(self, data: bytes, sidecar: Sidecar) -> None:
        """Write a copy of a message into failed/ (the recipients refused for good, when others
        of the same message are still to be tried)."""
        atomic_write(self.failed / f"{sidecar.id}.json", sidecar.to_json())
        atomic_write(self.failed / f"{sidecar.id}.eml", data)

    def _move_with_sidecar(
        self, claimed: Claimed, folder: Path, sidecar: Sidecar, due: float | None = None
    ) -> None:
        atomic_write(folder / f"{claimed.id}.json", sidecar.to_json(), mtime=due)
        os.rename(claimed.path, folder / f"{claimed.id}.eml")
        fsync_dir(folder)

    def _drop_old_sidecar(self, claimed: Claimed) -> None:
        # Also when it could not be read: an unreadable sidecar must not outlive its message.
        if claimed.origin.queued:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.deferred / f"{claimed.id}.json")

    def drop(self, data: bytes) -> Path:
        """Enqueue a message with the Maildir protocol: write it under pickup/tmp/, fsync, then
        rename it into pickup/new/ (where the dispatcher takes it) and fsync that folder.
        Returns its path in new/. Raises OSError if the spool cannot be written."""
        name = maildir_name()
        target = self.new / name
        # The writer's alone: the daemon reads it by its capability (spool/access.py).
        write_then_rename(self.tmp / name, target, data, os.O_EXCL, DROP_FILE_MODE, unlistable=True)
        return target

    def ids_in(self, folder: Path) -> list[str]:
        """The ids of the messages in deferred/, hold/, failed/ or sent/, oldest first."""
        found = (message_id(e.name) for e in entries(folder))
        return sorted((msg_id for msg_id in found if msg_id), key=ids.sort_key)


def entries(folder: Path) -> Iterator[os.DirEntry[str]]:
    """The entries of `folder`, streamed (a backlog of 100,000 files stays on disk)."""
    try:
        with os.scandir(folder) as listing:
            yield from listing
    except FileNotFoundError:
        return


def is_drop(name: str, *, maildir: bool) -> bool:
    """A name in pickup/new/ (`maildir`) or pickup/ that is a message waiting to be taken."""
    if name.startswith("."):
        return False
    return maildir or name.lower().endswith(".eml")


def is_stray(name: str) -> bool:
    """A name in pickup/ that pickupd ignores: not a drop (a dot file never is one), not its
    own tmp/ and new/."""
    return (
        name not in ("tmp", "new") and not name.startswith(".") and not is_drop(name, maildir=False)
    )


def _stray_file(entry: os.DirEntry[str]) -> bool:
    return is_stray(entry.name) and not is_folder(entry)


def is_folder(entry: os.DirEntry[str]) -> bool:
    """A directory (from the listing's d_type: no stat on most file systems)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def lock_path(spool: Spool, owner: str) -> Path:
    """The lock file of the process whose owner token is `owner`."""
    return spool.active / f".owner.{owner}"


def message_id(name: str) -> str | None:
    """The id of `<id>.eml` in deferred/, hold/, failed/ or sent/; None for other names."""
    return name[:-4] if name.endswith(".eml") and ids.is_valid(name[:-4]) else None


def claim_id(name: str) -> str | None:
    """The id of a claim `<id>.<owner>` in active/; None for lock files and strays."""
    msg_id, dot, owner = name.partition(".")
    return msg_id if dot and owner and ids.is_valid(msg_id) else None


def older(entry: os.DirEntry[str], now: float, age: float) -> bool:
    changed = mtime(entry)
    return changed is not None and now - changed > age


def unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def mtime(entry: os.DirEntry[str]) -> float | None:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None

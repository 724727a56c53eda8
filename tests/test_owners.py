"""Senders bound to the local user who dropped the file, and a spool that keeps local users
apart, with real users (useradd), real groups and `setpriv`: each user acts as that user
does, with the shell's own tools, umask 077. The daemon runs as root with one capability,
CAP_DAC_READ_SEARCH (its bounding set cut to it by setpriv), as the unit gives it to the
service's user: the owner of the folders, reading what users drop by that capability alone.
CI runs as root; the tests that need users say so and are skipped elsewhere."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Daemon, message, pickupd, relay_for
from smtpserver import SmtpServer

CHECKOUT = Path(__file__).resolve().parent.parent
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="useradd and setpriv need root (CI is root)"
)
# The daemon as the unit runs it: no capability but the one to read what users drop.
READER = ["setpriv", "--bounding-set=-all,+dac_read_search", "--inh-caps=-all"]
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
# A uid with no name on this machine (a deleted user, a container's).
GHOST = 4242424


@dataclass
class Users:
    """The local users and groups of a test: alice and bob (finance), mallory, all in the
    drop group; outsider in none."""

    drop: str
    finance: str
    alice: str
    bob: str
    mallory: str
    outsider: str

    def uid(self, name: str) -> int:
        import pwd

        return pwd.getpwnam(name).pw_uid

    def gid(self, name: str) -> int:
        import grp

        return grp.getgrnam(name).gr_gid


def as_user(user: str, script: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`script` (sh) run as `user` with its groups and umask 077, bounded in time."""
    become = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    return subprocess.run(
        [*become, "sh", "-c", f"umask 077; {script}"],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Real users and groups, removed after the module."""
    suffix = secrets.token_hex(3)
    made = Users(*(f"pk{role}{suffix}" for role in ("drop", "fin", "alice", "bob", "mal", "out")))
    for tool in ("useradd", "groupadd", "userdel", "groupdel", "setpriv"):
        assert shutil.which(tool), f"{tool} is needed (Debian's passwd and util-linux)"
    run = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        for group in (made.drop, made.finance):
            subprocess.run(["groupadd", group], check=True, timeout=30)
        for user, groups in (
            (made.alice, f"{made.drop},{made.finance}"),
            (made.bob, f"{made.drop},{made.finance}"),
            (made.mallory, made.drop),
            (made.outsider, ""),
        ):
            subprocess.run(
                [*run, *(["-G", groups] if groups else []), user], check=True, timeout=30
            )
        yield made
    finally:
        for user in (made.alice, made.bob, made.mallory, made.outsider):
            subprocess.run(["userdel", user], check=False, timeout=30, capture_output=True)
        for group in (made.drop, made.finance):
            subprocess.run(["groupdel", group], check=False, timeout=30, capture_output=True)


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder other users can reach (pytest's own tmp folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="pickupd-owners-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def shared_spool(
    folder: Path, server: SmtpServer, users: Users, senders: dict[str, object], **sections: object
) -> Daemon:
    """A daemon's config and a spool made as the shipped tmpfiles make it: the root 0710 and
    the drop folders 1730, group `users.drop`; the config readable by that group (for
    pickupd-sendmail), as the README installs it."""
    daemon = Daemon(folder / "d", {"main": relay_for(server)}, senders, **sections)
    (folder / "d").chmod(0o711)
    gid = users.gid(users.drop)
    os.chown(daemon.spool, -1, gid)
    daemon.spool.chmod(0o710)
    for name in ("", "tmp", "new", "cur"):
        path = daemon.spool / "pickup" / name
        os.chown(path, -1, gid)
        path.chmod(0o1730)
    os.chown(daemon.config_path, -1, gid)
    daemon.config_path.chmod(0o640)
    return daemon


def maildir_drop(user: str, spool: Path, data: bytes, name: str | None = None) -> str:
    """Drop `data` as `user` by the Maildir protocol, with sh and mv only; the file's name."""
    name = name or f"{secrets.token_hex(8)}.{user}"
    pickup = spool / "pickup"
    done = as_user(
        user, f'cat > "{pickup}/tmp/{name}" && mv "{pickup}/tmp/{name}" "{pickup}/new/{name}"', data
    )
    assert done.returncode == 0, done.stderr
    return name


@ROOT_ONLY
def test_a_writer_can_drop_but_never_list_read_rename_or_delete_anothers_mail(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """In a 1730 pickup folder, alice's waiting message (0600) is out of mallory's reach: she
    cannot list the folders, read it, rename it or delete it, though she can drop her own.
    The daemon, started afterwards with CAP_DAC_READ_SEARCH only, reads and sends it."""
    daemon = shared_spool(public, smtp_server, users, {"app@example.com": {"relay": "main"}})
    name = maildir_drop(users.alice, daemon.spool, message(subject="for alice's eyes"))
    waiting = daemon.spool / "pickup" / "new" / name
    assert waiting.stat().st_uid == users.uid(users.alice)
    assert stat.S_IMODE(waiting.stat().st_mode) == 0o600
    pickup = daemon.spool / "pickup"
    for attempt in (
        f'ls "{pickup}"',
        f'ls "{pickup}/new"',
        f'ls "{pickup}/tmp"',
        f'cat "{waiting}"',
        f'mv "{waiting}" "{pickup}/new/stolen"',
        f'mv "{waiting}" "{pickup}/tmp/stolen"',
        f'rm -f "{waiting}"',
        f'ln "{waiting}" "{pickup}/new/linked"',
    ):
        tried = as_user(users.mallory, attempt)
        assert tried.returncode != 0, f"mallory could: {attempt}"
        assert "ermission denied" in tried.stderr or "not permitted" in tried.stderr, tried.stderr
    assert waiting.exists() and sorted(p.name for p in (pickup / "new").iterdir()) == [name]
    maildir_drop(users.mallory, daemon.spool, message(subject="mallory's own"))  # she may drop

    daemon.start(wrap=READER)
    got = smtp_server.wait_for(2)
    assert {r.data.count(b"for alice's eyes") for r in got} == {0, 1}
    assert list((pickup / "new").iterdir()) == []
    daemon.stop()


@ROOT_ONLY
def test_without_the_capability_a_private_drop_cannot_be_read_and_fails_clearly(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """The control for the test above: the same daemon without CAP_DAC_READ_SEARCH cannot
    open alice's 0600 file, which goes to failed/ as unsafe_file saying so; nothing is sent."""
    daemon = shared_spool(public, smtp_server, users, {"app@example.com": {"relay": "main"}})
    maildir_drop(users.alice, daemon.spool, message())
    daemon.start(wrap=NO_CAPS)
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "unsafe_file" and "Permission denied" in failed["detail"]
    assert failed["owner_uid"] == users.uid(users.alice)
    assert smtp_server.received == []
    daemon.stop()


@ROOT_ONLY
def test_senders_go_only_from_their_owners_files(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """owners by name, by @group, by uid:NNN and root: each owner's file goes; another's goes
    to failed/ as sender_not_allowed naming both sides, also when only its From: is someone
    else's; the owner is in the sidecar, the claimed line, queue and show."""
    senders = {
        "billing@example.com": {"relay": "main", "owners": [users.alice]},
        "finance@example.com": {"relay": "main", "owners": [f"@{users.finance}"]},
        "ghost@example.com": {"relay": "main", "owners": [f"uid:{GHOST}"]},
        "root@example.com": {"relay": "main", "owners": ["root"]},
        "app@example.com": {"relay": "main"},
    }
    daemon = shared_spool(public, smtp_server, users, senders)
    daemon.start(wrap=READER)
    spool = daemon.spool
    maildir_drop(users.alice, spool, message(sender="billing@example.com", subject="alice bills"))
    maildir_drop(users.bob, spool, message(sender="finance@example.com", subject="bob, finance"))
    maildir_drop(users.mallory, spool, message(sender="billing@example.com", subject="forged"))
    # An envelope sender anyone may use, with someone else's author field.
    forged_from = message(sender="app@example.com", subject="forged from").replace(
        b"From: app@example.com", b"From: billing@example.com"
    )
    maildir_drop(
        users.mallory,
        spool,
        b"X-Sender: <app@example.com>\nX-Receiver: <bob@example.net>\n" + forged_from,
    )
    # Root is a user like any other: not listed for billing@, listed for root@.
    for name, sender, subject in (
        ("root-billing", "billing@example.com", "root bills"),
        ("root-cron", "root@example.com", "cron"),
    ):
        (spool / "pickup" / "tmp" / name).write_bytes(message(sender=sender, subject=subject))
        (spool / "pickup" / "tmp" / name).rename(spool / "pickup" / "new" / name)
    # A file whose owner has no name here (a container's uid).
    ghost = spool / "pickup" / "tmp" / "ghost"
    ghost.write_bytes(message(sender="ghost@example.com", subject="from a container"))
    os.chown(ghost, GHOST, -1)
    ghost.rename(spool / "pickup" / "new" / "ghost")
    stray = spool / "pickup" / "tmp" / "ghost-billing"
    stray.write_bytes(message(sender="billing@example.com", subject="container bills"))
    os.chown(stray, GHOST, -1)
    stray.rename(spool / "pickup" / "new" / "ghost-billing")

    got = smtp_server.wait_for(4)
    subjects = sorted(r.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for r in got)
    assert subjects == ["alice bills", "bob, finance", "cron", "from a container"], subjects
    failed = {s["source"]: s for s in daemon.wait_sidecars("failed", count=4)}
    assert {s["reason"] for s in failed.values()} == {"sender_not_allowed"}
    mallory = f"{users.mallory} (uid {users.uid(users.mallory)})"
    details = sorted(s["detail"] for s in failed.values())
    only = f"billing@example.com may be sent by {users.alice}; this file belongs to"
    assert details == sorted(
        [
            f"{only} {mallory}",
            f"From: {only} {mallory}",
            f"{only} root (uid 0)",
            f"{only} uid:{GHOST}",
        ]
    ), details
    by_owner = {(s.get("owner"), s["owner_uid"]) for s in failed.values()}
    assert by_owner == {(users.mallory, users.uid(users.mallory)), ("root", 0), (None, GHOST)}
    claimed = {e["owner"] for e in daemon.events("claimed")}
    assert f"{users.alice} (uid {users.uid(users.alice)})" in claimed and f"uid:{GHOST}" in claimed

    queue = pickupd("queue", "-c", str(daemon.config_path))
    assert f"(written by {mallory})" in queue.stdout and f"(written by uid:{GHOST})" in queue.stdout
    ghost_id = next(s["id"] for s in failed.values() if s["owner_uid"] == GHOST)
    shown = pickupd("show", ghost_id, "-c", str(daemon.config_path))
    assert f"written by uid:{GHOST}" in shown.stdout, shown.stdout
    daemon.stop()


@pytest.fixture(scope="module")
def public_pickupd() -> Iterator[Path]:
    """pickupd installed from this checkout into a venv other users can run (the test venv
    and the checkout may be root's alone): its bin/ folder."""
    # The system's Python: one under root's home (pyenv) is root's alone.
    system = Path("/usr/bin/python3")
    assert system.exists(), "a system python3 (Debian's) is needed for other users to run"
    folder = Path(tempfile.mkdtemp(prefix="pickupd-venv-", dir="/tmp"))
    folder.chmod(0o755)
    venv = folder / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    subprocess.run([*pip, "install", "-q", str(CHECKOUT)], check=True, timeout=600)
    yield venv / "bin"
    shutil.rmtree(folder, ignore_errors=True)


@ROOT_ONLY
def test_sendmail_has_no_privileges_and_names_the_group_to_join(
    smtp_server: SmtpServer, users: Users, public: Path, public_pickupd: Path
) -> None:
    """pickupd-sendmail run by alice writes a file that is hers (0600), not pickupd's; one by
    a user outside the drop group gets one line that names the group to join."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"billing@example.com": {"relay": "main", "owners": [users.alice]}},
    )
    sendmail = public_pickupd / "pickupd-sendmail"
    assert not os.stat(sendmail).st_mode & (stat.S_ISUID | stat.S_ISGID)
    done = as_user(
        users.alice,
        f'"{sendmail}" -C "{daemon.config_path}" -t',
        message(sender="billing@example.com"),
    )
    assert done.returncode == 0, done.stderr
    (dropped,) = (daemon.spool / "pickup" / "new").iterdir()
    assert dropped.stat().st_uid == users.uid(users.alice)
    assert stat.S_IMODE(dropped.stat().st_mode) == 0o600

    refused = as_user(
        users.outsider,
        f'"{sendmail}" -C "{daemon.config_path}" -t',
        message(sender="billing@example.com"),
    )
    assert refused.returncode == 75, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"join group {users.drop}" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr

    daemon.start(wrap=READER)
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "billing@example.com"
    daemon.stop()


def test_check_and_start_warn_about_mixed_owners_and_a_loose_pickup_folder(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """An entry without owners beside entries with them, and a pickup folder writers may
    list (2770, the old tmpfiles'), are warned about by check and at start; with
    policy.require_owners the entry without owners is a config error naming its key."""
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    senders = {
        "billing@example.com": {"relay": "main", "owners": [me]},
        "app@example.com": {"relay": "main"},
    }
    daemon = make_daemon(smtp_server, senders=senders, start=False)
    (daemon.spool / "pickup" / "new").chmod(0o2770)
    check = pickupd("check", "-c", str(daemon.config_path))
    assert check.returncode == 0, check.stderr
    assert 'senders."app@example.com": no owners, while other entries have them' in check.stdout
    assert "pickup/new is mode 2770: writers can list it" in check.stdout, check.stdout
    daemon.start()
    warned = [e["detail"] for e in daemon.events("config_warning")]
    assert any("no owners" in w for w in warned) and any("mode 2770" in w for w in warned)
    daemon.stop()

    daemon.write_config({**daemon.doc, "policy": {"require_owners": True}})
    strict = pickupd("check", "-c", str(daemon.config_path))
    assert strict.returncode == 78
    assert 'senders."app@example.com".owners: required by policy.require_owners' in strict.stderr

    daemon.write_config(
        {
            **daemon.doc,
            "senders": {"billing@example.com": {"relay": "main", "owners": ["nosuchuser-pk"]}},
        }
    )
    unknown = pickupd("check", "-c", str(daemon.config_path))
    assert unknown.returncode == 78
    assert (
        'senders."billing@example.com".owners' in unknown.stderr
        and "no such user" in unknown.stderr
    )

"""Secrets only the service can read (issue 22), with real users: `pickupd init` run as root
sets up the service's user and the drop group, and `pickupd check` run as root fails for a
secret (or a config holding one) that anyone but root and the service's user can read: by
its group, by everyone, or by an ACL entry. Each case is tried first as the app user would
try it (`cat` as that user), so the check is known to judge what the kernel does."""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from harness import pickupd
from test_owners import ROOT_ONLY, as_user, public_pickupd

from pickupd.auth.exposure import Account, accounts, can_read

__all__ = ["public_pickupd"]  # the fixture, shared with test_owners


@dataclass
class Host:
    """A host `pickupd init` set up: the service's user and the drop group (made by init),
    an app user in the drop group and one outside it; the config and the spool."""

    service: str
    drop: str
    app: str
    outsider: str
    config: Path
    spool: Path

    def init(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return pickupd(
            "init", "-c", str(self.config), "--spool", str(self.spool),
            "--user", self.service, "--group", self.drop, *extra,
        )  # fmt: skip

    def check(self) -> subprocess.CompletedProcess[str]:
        return pickupd("check", "-c", str(self.config), "--user", self.service)

    def relay_with(self, **login: str) -> None:
        """The config: one relay on loopback with `login`, one sender."""
        doc = {
            "spool": {"path": str(self.spool)},
            "relays": {"main": {"host": "127.0.0.1", "port": 2525, "security": "none", **login}},
            "senders": {"app@example.com": {"relay": "main"}},
        }
        self.config.write_text(tomli_w.dumps(doc))


@pytest.fixture
def host() -> Iterator[Host]:
    suffix = secrets.token_hex(3)
    # Not under pytest's folders: they are root's alone, and a host's /etc is not.
    folder = Path(tempfile.mkdtemp(prefix="pickupd-host-", dir="/tmp"))
    folder.chmod(0o755)
    made = Host(
        f"pksvc{suffix}",
        f"pkdrop{suffix}",
        f"pkapp{suffix}",
        f"pkout{suffix}",
        folder / "etc" / "pickupd.toml",
        folder / "spool",
    )
    try:
        done = made.init()
        assert done.returncode == 0, done.stderr
        subprocess.run(["useradd", "--no-create-home", "-G", made.drop, made.app], check=True)
        subprocess.run(["useradd", "--no-create-home", made.outsider], check=True)
        yield made
    finally:
        for user in (made.app, made.outsider, made.service):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        for group in (made.drop, made.service):
            subprocess.run(["groupdel", group], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@ROOT_ONLY
def test_init_sets_up_two_groups_with_two_jobs(host: Host) -> None:
    """The drop group may read the config and drop mail; the secrets' folder is the service's
    group's alone; the service's user is in the drop group (to read the config); run again,
    init changes nothing and says so."""
    import grp

    secrets_dir = host.config.parent / "secrets"
    assert grp.getgrgid(host.config.stat().st_gid).gr_name == host.drop
    assert host.config.stat().st_mode & 0o777 == 0o640
    assert grp.getgrgid(secrets_dir.stat().st_gid).gr_name == host.service
    assert secrets_dir.stat().st_mode & 0o777 == 0o750
    assert host.service in grp.getgrnam(host.drop).gr_mem
    assert as_user(host.app, f'cat "{host.config}" >/dev/null').returncode == 0
    assert as_user(host.app, f'ls "{secrets_dir}"').returncode != 0
    again = host.init()
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and ": now " not in again.stdout, again.stdout
    assert host.check().returncode == 0


@ROOT_ONLY
def test_check_fails_for_a_secret_an_app_can_read(host: Host) -> None:
    """A password file installed as the old README said (/etc/pickupd, 640, the apps'
    group): the app reads it with cat, and check fails naming it and the drop group; chown
    root:<service> fixes both. Readable by everyone, or by the service not at all: check
    says so too."""
    password = host.config.parent / "main.password"
    password.write_text("s3cret\n")
    os.chown(password, 0, _gid(host.drop))
    password.chmod(0o640)
    host.relay_with(username="relay", password_file=str(password))
    read = as_user(host.app, f'cat "{password}"')
    assert read.stdout == "s3cret\n", read.stderr  # the attack works
    failed = host.check()
    assert failed.returncode == 78, failed.stdout
    assert f"relays.main.password_file: 1 user(s) ({host.app}; 1 of the drop group" in (
        failed.stderr
    )
    assert f"only root and {host.service} may" in failed.stderr

    os.chown(password, 0, _gid(host.service))
    assert as_user(host.app, f'cat "{password}"').returncode != 0
    passed = host.check()
    assert passed.returncode == 0, passed.stderr

    password.chmod(0o644)  # refused when the config loads, as ssh and msmtp refuse it
    assert as_user(host.outsider, f'cat "{password}"').returncode == 0
    everyone = host.check()
    assert everyone.returncode == 78 and "read or written by others" in everyone.stderr

    kept = host.config.parent / "secrets" / "main.password"
    password.rename(kept)
    kept.chmod(0o640)
    host.relay_with(username="relay", password_file=str(kept))
    assert as_user(host.app, f'cat "{kept}"').returncode != 0
    assert host.check().returncode == 0

    kept.chmod(0o600)  # root's alone: the service cannot log in
    unreadable = host.check()
    assert unreadable.returncode == 78
    assert f"{host.service} cannot read {kept}" in unreadable.stderr


@ROOT_ONLY
def test_check_fails_for_an_acl_entry_that_lets_an_app_read(host: Host) -> None:
    """A secret `root:<service> 640` with an ACL entry for alice (what `setfacl -m u:alice:r`
    writes): she reads it, and check names her."""
    password = host.config.parent / "secrets" / "main.password"
    password.write_text("s3cret\n")
    os.chown(password, 0, _gid(host.service))
    password.chmod(0o640)
    host.relay_with(username="relay", password_file=str(password))
    assert host.check().returncode == 0
    app = _uid(host.app)
    # system.posix_acl_access: version 2; user::rw-, user:app:r--, group::r--, mask::r--,
    # other::--- (tag, perm, id).
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, app), (0x04, 4, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]  # fmt: skip
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(password, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.fail(f"this file system takes no POSIX ACL: {exc}")
    (host.config.parent / "secrets").chmod(0o755)
    read = as_user(host.app, f'cat "{password}"')
    assert read.stdout == "s3cret\n", read.stderr
    failed = host.check()
    assert failed.returncode == 78 and f"({host.app}; 1 of the drop group" in failed.stderr


@ROOT_ONLY
def test_check_fails_for_an_inline_secret_in_a_config_the_apps_read(host: Host) -> None:
    """An inline password in the config init made readable by the drop group (for their
    sendmail): check fails and says to keep it in a file of its own."""
    host.relay_with(username="relay", password="inline-s3cret")
    host.config.chmod(0o640)
    assert as_user(host.app, f'grep -c inline-s3cret "{host.config}"').stdout.strip() == "1"
    failed = host.check()
    assert failed.returncode == 78
    assert "relays.main.password: the config holds a secret and 1 user(s)" in failed.stderr
    assert "keep it in a file of its own (relays.main.password_file)" in failed.stderr


def test_can_read_agrees_with_the_kernel_for_the_current_user(tmp_path: Path) -> None:
    """For the user running the tests, can_read says what open() does, on files of every
    mode in folders that do and do not let it through."""
    me = next(a for a in accounts() if a.uid == os.geteuid())
    if me.uid == 0:
        me = Account("nobody-like", 65534, frozenset({65534}))
        assert not can_read(me, tmp_path / "missing")
        return
    for mode in (0o600, 0o640, 0o604, 0o000):
        path = tmp_path / f"f{mode:o}"
        path.write_text("x")
        path.chmod(mode)
        assert can_read(me, path) == os.access(path, os.R_OK), oct(mode)


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


@ROOT_ONLY
def test_an_app_drops_mail_without_reading_a_secret_and_is_told_what_is_not_its_own(
    host: Host, public_pickupd: Path
) -> None:
    """With a password file only the service may read: an app user's `pickupd drop` and
    `pickupd-sendmail` work (they read the spool's path and the policy, never a secret);
    `pickupd queue` and `pickupd check` say in one line that they need the service's rights."""
    password = host.config.parent / "secrets" / "main.password"
    password.write_text("s3cret\n")
    os.chown(password, 0, _gid(host.service))
    password.chmod(0o640)
    host.relay_with(username="relay", password_file=str(password))
    pickupd_bin = public_pickupd / "pickupd"
    message = "From: app@example.com\nTo: a@example.net\nSubject: x\n\nbody\n"
    dropped = as_user(host.app, f'"{pickupd_bin}" drop -c "{host.config}" -', message.encode())
    assert dropped.returncode == 0, dropped.stderr
    sent = as_user(
        host.app, f'"{public_pickupd}/pickupd-sendmail" -C "{host.config}" -t', message.encode()
    )
    assert sent.returncode == 0, sent.stderr
    for command in ("queue", "check"):
        told = as_user(host.app, f'"{pickupd_bin}" {command} -c "{host.config}"')
        assert told.returncode == 75, told.stderr
        (line,) = told.stderr.strip().splitlines()
        assert "run this as root" in line or "needs the service's rights" in line, line
        assert "Traceback" not in told.stderr

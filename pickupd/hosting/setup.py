"""The host as `pickupd init` sets it up when run as root, as Postfix keeps `postdrop` apart
from the `postfix` user: two groups with two jobs.

- the service's user (`pickupd`, with a group of its own), which alone reads the secrets:
  `<config dir>/secrets/` is `root:pickupd 0750`, a secret in it `root:pickupd 0640`;
- the drop group (`pickupdrop`) of the apps that send mail: it may write into the pickup
  folders (1730, never list them) and read the config (`root:pickupdrop 0640`), which
  therefore holds no secret (`pickupd check` fails if it does); the service's user is in it
  too, to read the config.

Every step is said, as done or as found already so: run again, it changes nothing. POSIX only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from pickupd.errors import SetupError
from pickupd.spool.access import DROP_MODE, drop_folders, make_folder
from pickupd.spool.folders import Spool

__all__ = ["CONFIG_MODE", "PRIVATE_MODE", "ROOT_MODE", "SECRETS_MODE", "prepare"]

CONFIG_MODE = 0o640  # root:<drop group>: the apps' sendmail reads the spool's path
SECRETS_MODE = 0o750  # root:<service group>: the secrets' folder
ROOT_MODE = 0o710  # the spool: the drop group may pass through to pickup/, not list it
PRIVATE_MODE = 0o700  # active/, deferred/, failed/, sent/, hold/: the service's alone


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise SetupError(f"{argv[0]} is needed to set up the host (Debian's passwd package)")
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _group(name: str, say: Callable[[str], None]) -> int:
    import grp

    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        _run(["groupadd", "--system", name])
        gid = grp.getgrnam(name).gr_gid
        say(f"made group {name} ({gid})")
        return gid
    say(f"group {name} ({gid}) is there")
    return gid


def _user(name: str, home: Path, drop: str, say: Callable[[str], None]) -> tuple[int, int]:
    """The (uid, gid) of the service's user, made (with a group of its own) if missing."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(name)
        say(f"user {name} ({entry.pw_uid}) is there")
    except KeyError:
        _group(name, say)
        _run(
            ["useradd", "--system", "--gid", name, "--home-dir", str(home), "--no-create-home",
             "--shell", "/usr/sbin/nologin", "--comment", "pickupd mail dispatcher", name]
        )  # fmt: skip
        entry = pwd.getpwnam(name)
        say(f"made user {name} ({entry.pw_uid}), group {name}: it alone reads the secrets")
    if name not in grp.getgrnam(drop).gr_mem:
        _run(["usermod", "--append", "--groups", drop, name])
        say(f"added {name} to group {drop} (to read the config)")
    return entry.pw_uid, entry.pw_gid


def _own(path: Path, uid: int, gid: int, mode: int, say: Callable[[str], None], what: str) -> None:
    import grp
    import pwd

    st = os.lstat(path)
    if (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode):
        say(f"{path}: {what}, as it should be")
        return
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)
    owner, group = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name
    say(f"{path}: {what}: now {owner}:{group} {mode:04o}")


def prepare(
    config: Path, spool_root: Path, service: str, drop: str, say: Callable[[str], None]
) -> None:
    """Set up users, groups, the config's and the secrets' modes, and the spool. The config
    file must exist. Raises SetupError or OSError."""
    drop_gid = _group(drop, say)
    uid, gid = _user(service, spool_root, drop, say)
    _own(config.parent, 0, 0, 0o755, say, "the config's folder")
    _own(config, 0, drop_gid, CONFIG_MODE, say, f"the config, readable by group {drop}")
    secrets = config.parent / "secrets"
    make_folder(secrets, SECRETS_MODE)
    _own(secrets, 0, gid, SECRETS_MODE, say, f"the secrets' folder, for {service}")
    spool = Spool(spool_root)
    spool.ensure()
    _own(spool.root, uid, drop_gid, ROOT_MODE, say, "the spool")
    for folder in drop_folders(spool.pickup):
        _own(folder, uid, drop_gid, DROP_MODE, say, f"{drop} may drop, never list")
    for folder in (spool.active, spool.deferred, spool.failed, spool.sent, spool.hold):
        _own(folder, uid, gid, PRIVATE_MODE, say, f"{service}'s alone")

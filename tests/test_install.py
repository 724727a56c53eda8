"""The manual's systemd install steps (docs/install.md, from a checkout), followed line by
line into a fresh root: the virtualenv under /opt/pickupd built from this checkout, the links,
sysusers and tmpfiles,
the config, `pickupd check --connect` against a real SMTP server, the unit installed and
verified by `systemd-analyze verify` with the installed pickupd, and one message through
the installed commands.

Every absolute path of a step is moved under the root (`/opt/pickupd` -> `<root>/opt/
pickupd`); the few steps that need the machine's running systemd or its package mirror are
named below with the reason, and any other line the page gains is run: a step the test
cannot follow fails it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomli_w
from harness import message
from smtpserver import SmtpServer

CHECKOUT = Path(__file__).resolve().parent.parent
PAGE = CHECKOUT / "docs" / "install.md"
# Steps not run here, with why: each is the machine's business, not the install's.
NOT_RUN = {
    "apt-get install": "the package mirror; python3 -m venv is here already",
    "systemctl": "a running systemd (the unit is verified instead)",
    "journalctl": "a running systemd",
    "usermod -aG pickupdrop www-data": "a user of the machine's own (test_owners makes theirs)",
}
# The top folders a step may write under: moved into the root.
_TOPS = ("opt", "usr", "etc", "var")


def readme_steps() -> list[str]:
    """The commands of the page's systemd section, comments and blank lines dropped."""
    text = PAGE.read_text()
    section = text.split("### systemd", 1)[1].split("### Without systemd", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    steps = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [step for step in steps if step and not step.startswith("#")]


def rooted(step: str, root: Path) -> str:
    """`step` with each absolute path under one of _TOPS moved under `root`."""
    return re.sub(rf"(?<![\w.])/(?=(?:{'|'.join(_TOPS)})/)", f"{root}/", step)


def test_the_manuals_install_steps_work_in_a_fresh_root(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze and shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("the steps run as root (chown to the pickupd user); CI runs as root")
    root = tmp_path / "root"
    # A fresh machine's folders (a Debian system has them all).
    for folder in ("usr/lib/sysusers.d", "usr/lib/tmpfiles.d", "usr/local/bin", "usr/sbin"):
        (root / folder).mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    ran, skipped = [], []
    config = root / "etc/pickupd/pickupd.toml"
    for step in readme_steps():
        if any(step.startswith(prefix) for prefix in NOT_RUN):
            skipped.append(step)
            continue
        command = rooted(step, root)
        if step.startswith("systemd-sysusers") or " systemd-sysusers" in step:
            command = command.replace("systemd-sysusers", f"systemd-sysusers --root={root}")
        if step.startswith("systemd-tmpfiles"):
            command = command.replace("systemd-tmpfiles", f"systemd-tmpfiles --root={root}")
        # The group is the root's (sysusers made it there), not the machine's: the install
        # runs without it, and the target gets the root's gid of that name afterwards.
        named = re.search(r" -g (\S+) ", command) if command.startswith("install") else None
        group = (named.group(1), Path(command.split()[-1])) if named else None
        command = re.sub(r" -g \S+ ", " ", command)
        if step.startswith("pickupd check"):
            _edit_config(config, root, smtp_server)  # "then edit it"
            command = command.replace("pickupd check", f"{root}/usr/local/bin/pickupd check", 1)
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"{step}\n-> {command}\n{done.stdout}{done.stderr}"
        if group:
            os.chown(group[1], -1, _gid(root, group[0]))
        ran.append((step, done.stdout))
    assert {s.split()[0] for s in skipped} <= {p.split()[0] for p in NOT_RUN}
    assert any("--connect" in step and ": ok:" in out for step, out in ran), ran

    # The venv and the links, as the unit and the shell will use them.
    pickupd = root / "opt/pickupd/bin/pickupd"
    assert pickupd.is_file() and os.access(pickupd, os.X_OK)
    for link in ("usr/local/bin/pickupd", "usr/local/bin/pickupd-sendmail", "usr/sbin/sendmail"):
        assert (root / link).resolve().parent == pickupd.parent, link
    # Two groups with two jobs: the apps' (drop mail, read the config), the service's
    # (the secrets).
    spool = root / "var/spool/pickupd"
    drop = _gid(root, "pickupdrop")
    assert (spool / "pickup/new").is_dir() and spool.stat().st_gid == drop
    for folder in ("pickup", "pickup/tmp", "pickup/new"):  # drop, never list
        assert (spool / folder).stat().st_mode & 0o7777 == 0o1730, folder
        assert (spool / folder).stat().st_gid == drop
    assert config.stat().st_gid == drop and config.stat().st_mode & 0o777 == 0o640
    secrets = root / "etc/pickupd/secrets"
    assert (
        secrets.stat().st_gid == _gid(root, "pickupd") and secrets.stat().st_mode & 0o777 == 0o750
    )
    assert "pickupd" in _members(root, "pickupdrop")  # to read the config

    # The installed unit: what it names exists once the steps are done, and it verifies with
    # the root's paths (systemd-analyze checks that ExecStart's program is there).
    unit = (root / "etc/systemd/system/pickupd.service").read_text()
    start = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert start and (root / start.group(1).lstrip("/")) == pickupd
    docs = re.search(r"^Documentation=(.*)$", unit, re.M)
    assert docs, "the unit has no Documentation="
    for uri in docs.group(1).split():
        assert uri.startswith("file:///"), uri
        assert (root / uri.removeprefix("file:///")).is_file(), f"{uri} is not installed"
    check_unit = tmp_path / "pickupd.service"
    check_unit.write_text(unit.replace(start.group(1), str(pickupd)))
    verified = subprocess.run(
        [analyze, "verify", str(check_unit)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr

    # One message through the installed commands: the sendmail link, then a run.
    sent = subprocess.run(
        [str(root / "usr/sbin/sendmail"), "-C", str(config), "-t"],
        input=message(to="installed@example.net"),
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    once = subprocess.run(
        [str(root / "usr/local/bin/pickupd"), "run", "--once", "-c", str(config)],
        capture_output=True,
        timeout=120,
    )
    assert once.returncode == 0, once.stderr
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["installed@example.net"]


def _edit_config(config: Path, root: Path, server: SmtpServer) -> None:
    """What the operator's edit leaves: one relay (here the test's SMTP server), one sender,
    the spool the tmpfiles made."""
    doc = {
        "spool": {"path": str(root / "var/spool/pickupd")},
        "relays": {
            "main": {"host": "127.0.0.1", "port": server.port, "security": "none"},
        },
        "senders": {"app@example.com": {"relay": "main"}},
    }
    mode, gid = config.stat().st_mode & 0o777, config.stat().st_gid
    config.write_bytes(tomli_w.dumps(doc).encode())
    os.chown(config, -1, gid)
    config.chmod(mode)


def _gid(root: Path, name: str) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no group {name} in {root}/etc/group")


def _members(root: Path, name: str) -> list[str]:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return [member for member in fields[3].split(",") if member]
    raise AssertionError(f"no group {name} in {root}/etc/group")

"""The Debian packages, built by the one command (packaging/deb/build.py) and installed with
dpkg into a copy of this machine: an overlay of / in a mount namespace of its own, whose
changes are thrown away at the end (the machine's own dpkg database, users and MTA are never
touched). There: the host set up as `pickupd init` does, the installed `pickupd check` and
`systemd-analyze verify` on the installed unit, the man pages, pickupd-mta refused beside
another MTA and taking /usr/sbin/sendmail once there is none, one message from an app user
through the installed sendmail and a run as the unit runs it, an upgrade over itself that
keeps the config and the spool, remove, and purge with and without mail left in the spool;
and the README's "A first real message", word for word, on a fresh copy."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from harness import message
from smtpserver import SmtpServer, TestCA

CHECKOUT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or sys.platform != "linux",
    reason="dpkg, a mount namespace and useradd need root on Linux (CI is root)",
)


# The service as its unit runs it: its user, and the one capability (to read the apps' drops).
AS_THE_UNIT = (
    "setpriv --reuid=pickupd --regid=pickupd --init-groups"
    " --inh-caps=+dac_read_search --ambient-caps=+dac_read_search"
)


class Root:
    """A copy-on-write root of this machine: / under an overlay, in a mount namespace that
    lives as long as a `sleep` in it; each command runs chrooted there."""

    def __init__(self, work: Path) -> None:
        self.upper, self.work, self.path = work / "upper", work / "work", work / "root"
        for folder in (self.upper, self.work, self.path):
            folder.mkdir(parents=True)
        # unshare execs sleep in the new namespace (no fork): killing it ends the namespace,
        # and with it every mount made there.
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "3600"]
        )
        # Nothing may be mounted before the holder is in its own namespace: entered too
        # soon, nsenter would mount on this machine.
        ours, deadline = os.readlink("/proc/self/ns/mnt"), time.monotonic() + 10
        while os.readlink(f"/proc/{self._holder.pid}/ns/mnt") == ours:
            assert time.monotonic() < deadline, "unshare did not make a mount namespace"
            time.sleep(0.01)
        layers = f"lowerdir=/,upperdir={self.upper},workdir={self.work}"
        self._enter("mount", "-t", "overlay", "overlay", "-o", layers, str(self.path))
        for system in ("proc", "dev", "sys"):
            self._enter("mount", "--rbind", f"/{system}", str(self.path / system))
        # No /run/systemd/system here: the maintainer scripts see a host without systemd.
        self._enter("mount", "-t", "tmpfs", "tmpfs", str(self.path / "run"))

    def _enter(self, *command: str) -> None:
        nsenter = ["nsenter", "-t", str(self._holder.pid), "-m", *command]
        subprocess.run(nsenter, check=True, capture_output=True, timeout=60)

    def sh(self, script: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """`script` run by sh as root in the root, bounded in time."""
        command = ["nsenter", "-t", str(self._holder.pid), "-m", "chroot", str(self.path)]
        done = subprocess.run(
            [*command, "sh", "-c", script],
            input=stdin,
            capture_output=True,
            timeout=300,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )

    def ok(self, script: str, stdin: bytes | None = None) -> str:
        """`script`'s output; the test fails, with what it said, if it fails."""
        done = self.sh(script, stdin)
        assert done.returncode == 0, f"{script}\n{done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    def close(self) -> None:
        self._holder.kill()
        self._holder.wait(30)
        shutil.rmtree(self.upper.parent)  # fails if a mount outlived the namespace


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """pickupd and pickupd-mta, built from this checkout by the README's command."""
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, str(CHECKOUT / "packaging/deb/build.py"), "--out", str(out)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    (pickupd,) = out.glob("pickupd_*.deb")
    (mta,) = out.glob("pickupd-mta_*.deb")
    return pickupd, mta


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Root]:
    made = Root(tmp_path / "overlay")
    try:
        yield made
    finally:
        made.close()


def test_the_packages_install_send_upgrade_remove_and_purge(
    debs: tuple[Path, Path], root: Root, smtp_server: SmtpServer
) -> None:
    pickupd, mta = debs
    # As the manual says: apt-get, from the file (its dependencies are the machine's).
    said = root.ok(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {pickupd}")
    assert "pickupd: no running systemd" in said  # and what to do instead
    # The host, as `pickupd init` sets it up: two groups with two jobs.
    assert root.ok("id -nG pickupd").split() == ["pickupd", "pickupdrop"]
    stat = "stat -c '%U:%G %a'"
    assert root.ok(f"{stat} /etc/pickupd/pickupd.toml").strip() == "root:pickupdrop 640"
    assert root.ok(f"{stat} /etc/pickupd/secrets").strip() == "root:pickupd 750"
    assert root.ok(f"{stat} /var/spool/pickupd/pickup/new").strip() == "pickupd:pickupdrop 1730"
    assert root.ok("readlink /usr/bin/pickupd").strip() == "/opt/pickupd/bin/pickupd"
    # The installed tools work: the starter config checks, the unit verifies, the man pages
    # render.
    root.ok("pickupd check")
    verified = root.sh("systemd-analyze verify /lib/systemd/system/pickupd.service")
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    for page in ("man8/pickupd.8", "man8/pickupd-sendmail.8", "man5/pickupd.toml.5"):
        shown = root.ok(f"MANWIDTH=80 man -l /usr/share/man/{page}.gz")
        assert "SEE ALSO" in shown, page
    assert "concurrency" in root.ok("MANWIDTH=80 man -l /usr/share/man/man5/pickupd.toml.5.gz")
    assert root.sh("test -f /usr/share/doc/pickupd/docs/operations.md").returncode == 0

    # pickupd-mta never replaces another MTA's sendmail in silence: refused beside one.
    others = root.ok("dpkg-query -W -f '${Package} ${Provides}\\n'").splitlines()
    mtas = [line.split()[0] for line in others if "mail-transport-agent" in line]
    if mtas:
        refused = root.sh(f"dpkg -i {mta}")
        assert refused.returncode != 0 and "conflicts with" in refused.stderr, refused.stderr
        assert "pickupd" not in root.ok("readlink -f /usr/sbin/sendmail")
        # apt-get would take the other MTA away first, and says so (simulated here).
        plan = root.ok(f"apt-get install -s {mta}")
        assert all(f"Remv {other} " in plan for other in mtas), plan
        # In this copy only: the other MTA goes, as `apt-get install` would do it.
        root.ok(f"dpkg --remove --force-depends {' '.join(mtas)}")
    root.ok(f"dpkg -i {mta}")
    assert root.ok("readlink -f /usr/sbin/sendmail").strip() == "/opt/pickupd/bin/pickupd-sendmail"

    # The operator's edit: the test's SMTP server as the relay, one sender.
    config = {
        "relays": {"main": {"host": "127.0.0.1", "port": smtp_server.port, "security": "none"}},
        "senders": {"app@example.com": {"relay": "main"}},
    }
    edited = tomli_w.dumps(config).encode()
    root.ok("cat > /etc/pickupd/pickupd.toml", edited)  # its owner and mode stay
    root.ok("useradd --no-create-home --groups pickupdrop webapp")
    # One message, as an app in the drop group sends it, through the installed sendmail;
    # then a run as the unit runs it (its user, the one capability).
    app = "setpriv --reuid=webapp --regid=webapp --init-groups"
    root.ok(f"{app} /usr/sbin/sendmail -t", message(to="packaged@example.net"))
    root.ok(f"{AS_THE_UNIT} pickupd run --once")
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["packaged@example.net"]

    # A message left waiting, then an upgrade over itself: the config and the spool stay.
    root.ok(f"{app} /usr/sbin/sendmail -t", message(to="waiting@example.net"))
    waiting = root.ok("ls /var/spool/pickupd/pickup/new").split()
    assert len(waiting) == 1
    root.ok(f"dpkg -i {pickupd}")
    assert root.ok("cat /etc/pickupd/pickupd.toml").encode() == edited
    assert root.ok("ls /var/spool/pickupd/pickup/new").split() == waiting
    assert root.ok(f"{stat} /etc/pickupd/pickupd.toml").strip() == "root:pickupdrop 640"

    # Remove keeps the config and the spool; the virtualenv goes whole. (Mail clients such as
    # bsd-mailx depend on an MTA, which pickupd-mta was: removing it leaves them without.)
    root.ok("dpkg --remove --force-depends pickupd-mta pickupd")
    assert root.sh("test -e /opt/pickupd").returncode != 0
    assert root.ok("cat /etc/pickupd/pickupd.toml").encode() == edited
    assert root.ok("ls /var/spool/pickupd/pickup/new").split() == waiting

    # Purge with mail left: the config goes, the spool stays, and purge says so.
    purged = root.ok("dpkg --purge pickupd")
    assert "purge kept /var/spool/pickupd with the 1 message(s)" in purged, purged
    assert root.sh("test -e /etc/pickupd").returncode != 0
    assert root.ok("ls /var/spool/pickupd/pickup/new").split() == waiting

    # Installed again, the mail taken away by hand, then purged: nothing is left.
    root.ok(f"dpkg -i {pickupd}")
    root.ok("rm /var/spool/pickupd/pickup/new/*")
    purged = root.ok("dpkg --purge pickupd")
    assert "kept" not in purged, purged
    for gone in ("/etc/pickupd", "/var/spool/pickupd", "/opt/pickupd", "/var/lib/pickupd"):
        assert root.sh(f"test -e {gone}").returncode != 0, gone


def test_the_machine_is_untouched_by_the_package_test() -> None:
    """The overlay kept every change to itself: this machine has no pickupd package."""
    with contextlib.suppress(FileNotFoundError):
        status = Path("/var/lib/dpkg/status").read_text()
        assert "\nPackage: pickupd\n" not in status
    assert not Path("/opt/pickupd/bin/pickupd").exists() or Path("/opt/pickupd").is_symlink()


# The README's first-message steps not run here, with why.
NOT_RUN = {
    "apt-get install python3-venv": "the package mirror; python3 -m venv is here already",
    "python3 packaging/deb/build.py": "done once for the module (the debs fixture, same command)",
    "systemctl": "a running systemd: the service is run here as its unit runs it",
    "journalctl": "a running systemd",
}


def readme_first_message() -> tuple[list[str], str]:
    """The shell steps and the config of the README's "A first real message"."""
    readme = (CHECKOUT / "README.md").read_text()
    section = readme.split("## A first real message", 1)[1].split("\n## ", 1)[0]
    steps = []
    for block in section.split("```sh\n")[1:]:
        for line in block.split("```", 1)[0].splitlines():
            step = line.split("  #", 1)[0].strip()
            if step and not step.startswith("#"):
                steps.append(step)
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    return steps, toml


def test_the_readmes_first_message_steps_work_in_a_copy_of_the_machine(
    debs: tuple[Path, Path], root: Root, smtp_factory: Callable[..., SmtpServer], test_ca: TestCA
) -> None:
    """Word for word, as a newcomer on a fresh Debian follows them: the package installed
    with apt-get, the README's relay (the test's STARTTLS server, with AUTH, in place of
    smtp.example.com), the secret, check --connect, one message through pickupd-sendmail,
    the queue before and after the service's run."""
    server = smtp_factory(security="starttls", users={"app@example.com": "the password"})
    steps, toml = readme_first_message()
    ca = debs[0].parent / "test-ca.pem"
    shutil.copyfile(test_ca.ca_file, ca)
    relay = f'host = "127.0.0.1"\nport = {server.port}\nca_file = "{ca}"'
    config = toml.replace('host = "smtp.example.com"', relay)
    assert config != toml, "the README's relay has no host line to point at the test server"
    ran = []
    for step in steps:
        if any(step.startswith(prefix) for prefix in NOT_RUN):
            continue
        command = step.replace("./dist/", f"{debs[0].parent}/")
        if step.startswith("apt-get install"):
            command = command.replace("apt-get install", "apt-get install -y -q", 1)
        if step.startswith("install -m 640 -g pickupd /dev/null /etc/pickupd/secrets/"):
            root.ok("cat > /etc/pickupd/pickupd.toml", config.encode())  # the operator's edit
        said = root.ok(f"DEBIAN_FRONTEND=noninteractive {command}")
        ran.append(step)
        if step.startswith("pickupd check --connect"):
            assert ": ok:" in said, said
        if step.startswith("pickupd queue"):  # before the service's run here: it waits
            assert re.search(r"^  pickup +1 ", said, re.M), said
    assert any("pickupd-sendmail" in step for step in ran), ran
    # What `systemctl restart pickupd` runs: the service as its unit runs it.
    root.ok(f"{AS_THE_UNIT} pickupd run --once")
    (received,) = server.wait_for(1)
    assert received.rcpt_tos == ["you@example.net"]
    assert received.username == "app@example.com"
    queue = root.ok("pickupd queue")
    assert "Nothing deferred, held or failed." in queue, queue
    assert re.search(r"^  pickup +0$", queue, re.M), queue

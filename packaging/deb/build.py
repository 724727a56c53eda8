"""Build pickupd's Debian packages from this checkout, with one command:

    python3 packaging/deb/build.py [--out dist]

- `pickupd_<version>-1_<arch>.deb`: a virtualenv under /opt/pickupd with pickupd and the
  versions of its dependencies it is tested with (Debian 12's own are too old for some,
  and several are not packaged at all), links `/usr/bin/pickupd` and
  `/usr/sbin/pickupd-sendmail`, the systemd unit, sysusers and tmpfiles files, the starter
  config as a conffile, the man pages, the README and the manual. Installing it sets the
  host up as `pickupd init` does (it runs it); upgrading keeps the config and the spool and
  restarts the service; removing keeps both; purging removes the config, the secrets and
  /var/lib/pickupd, and the spool only when no mail is left in it (else it says so).
- `pickupd-mta_<version>-1_all.deb`: `/usr/sbin/sendmail` for programs that expect one, as
  Debian's MTAs provide it: it conflicts with every other `mail-transport-agent`, so
  installing it never silently replaces another MTA's sendmail (msmtp-mta's way).

What dh-virtualenv does, without its build dependencies (debhelper and the rest): the
virtualenv is made in a staging folder, then its scripts' `#!` lines and its own paths are
moved to /opt/pickupd; no `.pyc` is shipped (they would name the staging folder), the
postinst compiles them. Needs python3-venv and dpkg-deb, and the package index for pip.
The Python that runs this is the one the package depends on (its minor version: the
virtualenv's compiled modules are built for it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV = "/opt/pickupd"
MAINTAINER = "pickupd maintainers <pickupd@localhost>"
SUMMARY = "pickup-folder mail dispatcher: relays mail that apps drop as files"
DESCRIPTION = """\
 Applications drop finished e-mails as files into a folder and return at once;
 pickupd notices each file within milliseconds, checks its sender against an
 allow-list (it is never an open relay), relays it over SMTP or Microsoft Graph
 with that sender's own credentials, retries what failed for a transient reason
 and moves what failed for good to failed/ with the reason beside it."""


def run(*command: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def version() -> str:
    """pickupd's version, as the package's (Debian revision 1)."""
    for line in (CHECKOUT / "pickupd" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'") + "-1"
    raise SystemExit("build.py: no __version__ in pickupd/__init__.py")


def venv(stage: Path) -> None:
    """The virtualenv, made in `stage` and moved to /opt/pickupd."""
    target = stage / VENV.lstrip("/")
    run(sys.executable, "-m", "venv", target)
    pip: list[str | Path] = [target / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    pip.append("-q")
    run(*pip, "install", "--no-cache-dir", "--no-warn-script-location", CHECKOUT)
    run(*pip, "uninstall", "-y", "pip", "setuptools")
    for cache in list(target.rglob("__pycache__")):
        shutil.rmtree(cache)
    old, new = str(target).encode(), VENV.encode()
    for path in [*(target / "bin").iterdir(), target / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if old in data:
                path.write_bytes(data.replace(old, new))
    # pip records where pickupd came from (this checkout): nothing the host needs.
    for found in target.glob("lib/python*/site-packages/pickupd-*.dist-info/direct_url.json"):
        found.unlink()


def install(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def manpages(stage: Path) -> None:
    for page in sorted((CHECKOUT / "man").iterdir()):
        section = page.suffix.lstrip(".")
        target = stage / f"usr/share/man/man{section}/{page.name}.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.GzipFile(target, "wb", 9, mtime=0) as out:  # reproducible: no time inside
            out.write(page.read_bytes())


def files(stage: Path, python: Path) -> None:
    """Everything but the virtualenv."""
    (stage / "usr/bin").mkdir(parents=True)
    (stage / "usr/sbin").mkdir(parents=True)
    os.symlink(f"{VENV}/bin/pickupd", stage / "usr/bin/pickupd")
    os.symlink(f"{VENV}/bin/pickupd-sendmail", stage / "usr/sbin/pickupd-sendmail")
    systemd = CHECKOUT / "systemd"
    install(systemd / "pickupd.service", stage / "lib/systemd/system/pickupd.service")
    install(systemd / "pickupd.sysusers", stage / "usr/lib/sysusers.d/pickupd.conf")
    install(systemd / "pickupd.tmpfiles", stage / "usr/lib/tmpfiles.d/pickupd.conf")
    # The conffile: the starter `pickupd init` writes (a relay on localhost:25), which a
    # service can start with; the example with every key goes to the docs.
    starter = run(
        python,
        "-c",
        "import sys; from pathlib import Path; from pickupd.cli.init import starter_config;"
        " sys.stdout.write(starter_config(Path('/etc/pickupd/pickupd.toml'),"
        " Path('/var/spool/pickupd')))",
        capture_output=True,
    ).stdout
    (stage / "etc/pickupd").mkdir(parents=True)
    (stage / "etc/pickupd/pickupd.toml").write_text(starter)
    (stage / "etc/pickupd/pickupd.toml").chmod(0o640)  # root:pickupdrop once the group is
    doc = stage / "usr/share/doc/pickupd"
    install(CHECKOUT / "README.md", doc / "README.md")
    shutil.copytree(CHECKOUT / "docs", doc / "docs")
    install(CHECKOUT / "etc/pickupd.toml", doc / "examples/pickupd.toml")
    shutil.copytree(CHECKOUT / "etc/prometheus", doc / "examples/prometheus")
    shutil.copytree(CHECKOUT / "etc/grafana", doc / "examples/grafana")
    install(HERE / "copyright", doc / "copyright")
    manpages(stage)


def control(stage: Path, fields: dict[str, str], scripts: list[str], conffiles: list[str]) -> None:
    debian = stage / "DEBIAN"
    debian.mkdir()
    size = sum(p.lstat().st_size for p in stage.rglob("*") if not p.is_dir()) // 1024 + 1
    fields = {**fields, "Installed-Size": str(size)}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items() if k != "Description")
    (debian / "control").write_text(text + f"Description: {fields['Description']}\n")
    for script in scripts:
        install(HERE / script, debian / script, 0o755)
    if conffiles:
        (debian / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    sums = []
    for path in sorted(stage.rglob("*")):
        if path.is_file() and not path.is_symlink() and "DEBIAN" not in path.parts:
            relative = path.relative_to(stage)
            if f"/{relative}" not in conffiles:
                sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {relative}\n")
    (debian / "md5sums").write_text("".join(sums))


def build(stage: Path, out: Path, name: str) -> Path:
    deb = out / name
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb, capture_output=True)
    return deb


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CHECKOUT / "dist", help="default: dist/")
    args = parser.parse_args(argv)
    out: Path = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    ver = version()
    arch = run("dpkg", "--print-architecture", capture_output=True).stdout.strip()
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(prefix="pickupd-deb-") as work:
        stage = Path(work) / "pickupd"
        print(f"building pickupd {ver} for {arch} ({python}): the virtualenv from the index")
        venv(stage)
        files(stage, stage / VENV.lstrip("/") / "bin" / "python")
        fields = {
            "Package": "pickupd",
            "Version": ver,
            "Architecture": arch,
            "Maintainer": MAINTAINER,
            "Section": "mail",
            "Priority": "optional",
            # The virtualenv's modules are built for this Python; useradd, for the users.
            "Depends": f"{python}, passwd",
            "Suggests": "pickupd-mta",
            "Description": f"{SUMMARY}\n{DESCRIPTION}",
        }
        scripts = ["postinst", "prerm", "postrm"]
        control(stage, fields, scripts, ["/etc/pickupd/pickupd.toml"])
        built = [build(stage, out, f"pickupd_{ver}_{arch}.deb")]

        mta = Path(work) / "pickupd-mta"
        (mta / "usr/sbin").mkdir(parents=True)
        (mta / "usr/lib").mkdir(parents=True)
        os.symlink("pickupd-sendmail", mta / "usr/sbin/sendmail")
        os.symlink("../sbin/sendmail", mta / "usr/lib/sendmail")
        (mta / "usr/share/man/man8").mkdir(parents=True)
        os.symlink("pickupd-sendmail.8.gz", mta / "usr/share/man/man8/sendmail.8.gz")
        install(HERE / "copyright", mta / "usr/share/doc/pickupd-mta/copyright")
        fields = {
            "Package": "pickupd-mta",
            "Version": ver,
            "Architecture": "all",
            "Maintainer": MAINTAINER,
            "Section": "mail",
            "Priority": "optional",
            "Depends": f"pickupd (= {ver})",
            # As Debian's MTAs: one /usr/sbin/sendmail on a host, never replaced in silence.
            "Provides": "mail-transport-agent",
            "Conflicts": "mail-transport-agent",
            "Replaces": "mail-transport-agent",
            "Description": "sendmail for pickupd: /usr/sbin/sendmail into its pickup folder\n"
            " /usr/sbin/sendmail is pickupd-sendmail: programs that send mail through\n"
            " sendmail drop it into pickupd's pickup folder.",
        }
        control(mta, fields, [], [])
        built.append(build(mta, out, f"pickupd-mta_{ver}_all.deb"))
    for deb in built:
        print(f"built {deb} ({deb.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

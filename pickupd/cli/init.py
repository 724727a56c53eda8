"""`pickupd init`: a commented starter config and a spool with safe modes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import tomli_w

from pickupd.cli.common import EX_CONFIG, EX_OK, EX_USAGE, add_command
from pickupd.config import keys as s
from pickupd.config.keys import keys
from pickupd.config.loading import DEFAULT_CONFIG_PATH, SECTIONS, SpoolConfig, config_path
from pickupd.errors import CommandError
from pickupd.spool.access import DROP_MODE, drop_folders
from pickupd.spool.folders import Spool

__all__ = ["register", "starter_config"]

# Apps in the group drop into pickup/ but never list it (DROP_MODE, spool/access.py); the rest
# of the spool belongs to the service user alone. The root is traversable by the group.
PRIVATE_MODE = 0o700
ROOT_MODE = 0o710
CONFIG_MODE = 0o640

_HEADER = """\
# pickupd configuration, written by `pickupd init`.
# Every key is described in etc/pickupd.toml of pickupd's source and in its README.
# After editing, check it and test the relay login (no mail is sent):
#     pickupd check -c {path}
#     pickupd check -c {path} --connect
#
# The relay below is a mail server on this host (port 25, no TLS, no login). For a
# provider, use for example:
#     [relays.main]
#     host = "smtp.example.com"
#     port = 587                      # STARTTLS, required and verified
#     username = "relay@example.com"
#     password_file = "/etc/pickupd/main.password"   # chmod 600
#
# Microsoft 365 with OAuth2 (app-only; each sender logs in as its own mailbox; see the
# README, "Microsoft 365, step by step"):
#     [relays.m365]
#     provider = "microsoft365"
#     auth = "oauth2"
#     tenant = "contoso.onmicrosoft.com"
#     client_id = "00000000-0000-0000-0000-000000000000"
#     client_secret_file = "/etc/pickupd/m365.secret"   # chmod 640, group pickupd
#     rate = "30/min"
# Google Workspace with OAuth2 (a service account with domain-wide delegation):
#     [relays.google]
#     provider = "google"
#     auth = "oauth2"
#     service_account_file = "/etc/pickupd/google-sa.json"
# Then test the login, no mail sent: pickupd check --connect --mailbox you@your.domain
#
# Senders: only these envelope senders are relayed (pickupd is never an open relay).
# Add one [senders."address"] or [senders."*@domain"] entry per sender.
#
# Every other key is below with its default, commented out: uncomment to change it.

"""


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `pickupd init`."""
    init = add_command(
        commands,
        "init",
        _init,
        help="write a starter config and create the spool with safe modes",
        description="Writes a commented starter config (refusing to overwrite one unless "
        "--force) and creates the spool: pickup/ writable by the apps' group (setgid), "
        "everything else private to the user running pickupd. Then prints the next steps.",
    )
    default_spool = SpoolConfig().path
    init.add_argument(
        "--spool",
        metavar="DIR",
        type=Path,
        default=default_spool,
        help=f"the spool root (default: {default_spool})",
    )
    init.add_argument(
        "--group",
        metavar="GROUP",
        help="the group the apps that drop mail run in (default: your primary group)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing config")


# How a key unset by default is shown, commented out: a value of its own kind.
_EXAMPLES: dict[object, str] = {
    s.command: '["/usr/local/bin/on-failed", "--json"]',
    s.positive_duration: '"1h"',
    s.duration: '"1h"',
    s.address: '"ops@example.com"',
    s.listen: '"127.0.0.1:9464"',
    s.domain: '"example.com"',
}


def starter_config(path: Path, spool_root: Path) -> str:
    """The text `pickupd init` writes: a loopback relay, one sender, the spool, and every
    other key of the plain sections commented out with its default and help."""
    lines = [_HEADER.format(path=path).rstrip("\n"), ""]
    for name, section in SECTIONS.items():
        lines.append(f"[{name}]")
        if name == "spool":
            lines.append(tomli_w.dumps({"path": str(spool_root)}).rstrip("\n"))
        for key in keys(section):
            if name == "spool" and key.name == "path":
                continue
            shown = key.shown or _EXAMPLES.get(key.convert, '"..."')
            line = f"# {key.name} = {shown}"
            lines.append(f"{line.ljust(43)} # {key.help}")  # at least one space before "#"
        lines.append("")
    doc = {
        "relays": {"main": {"host": "localhost", "port": 25, "security": "none"}},
        "senders": {"app@example.com": {"relay": "main"}},
    }
    return "\n".join(lines) + tomli_w.dumps(doc)


def _init(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    spool_root = args.spool.absolute()
    gid: int | None = None  # Windows: no POSIX groups; folder ACLs are the operator's
    if sys.platform != "win32":
        import grp

        try:
            gid = grp.getgrnam(args.group).gr_gid if args.group else os.getgid()
        except KeyError:
            raise CommandError(EX_USAGE, f"pickupd init: no group named {args.group!r}") from None
    if path.exists() and not args.force:
        raise CommandError(EX_USAGE, f"pickupd init: {path} exists; --force overwrites it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CONFIG_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(starter_config(path, spool_root))
        os.chmod(path, CONFIG_MODE)
        _make_spool(Spool(spool_root), gid)
    except OSError as exc:
        where = exc.filename or path
        raise CommandError(EX_CONFIG, f"pickupd init: {where}: {exc.strerror or exc}") from None
    group = "of the apps" if gid is None else _group_name(gid)
    default = "" if str(path) == DEFAULT_CONFIG_PATH else f" -c {path}"
    print(
        f"wrote {path}\n"
        f"created {spool_root}: pickup/ writable by group {group} (setgid), the rest private\n"
        "next:\n"
        f"  1. edit {path}: your relay and the senders your apps use\n"
        f"  2. pickupd check{default} --connect     (validates it, tests the relay login)\n"
        f"  3. pickupd run{default}                 (or: systemctl enable --now pickupd)\n"
        f"  4. apps (in group {group}) drop mail into {spool_root / 'pickup'}/ or use"
        " pickupd-sendmail"
    )
    return EX_OK


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def _make_spool(spool: Spool, gid: int | None) -> None:
    spool.ensure()
    if gid is None:
        return
    os.chmod(spool.root, ROOT_MODE)
    os.chown(spool.root, -1, gid)
    for folder in drop_folders(spool.pickup):
        os.chown(folder, -1, gid)
        os.chmod(folder, DROP_MODE)
    for folder in (spool.active, spool.deferred, spool.failed, spool.sent, spool.hold):
        os.chmod(folder, PRIVATE_MODE)

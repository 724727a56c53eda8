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
from pickupd.config.limits import LimitsConfig
from pickupd.config.loading import DEFAULT_CONFIG_PATH, SECTIONS, SpoolConfig, config_path
from pickupd.errors import CommandError, SetupError
from pickupd.hosting.setup import CONFIG_MODE, PRIVATE_MODE, ROOT_MODE, prepare
from pickupd.spool.access import DROP_GROUP, DROP_MODE, SERVICE_USER, drop_folders
from pickupd.spool.folders import Spool

__all__ = ["register", "starter_config"]

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
#     password_file = "/etc/pickupd/secrets/main.password"   # root:pickupd 640
#
# Microsoft 365 with OAuth2 (app-only; each sender logs in as its own mailbox; see the
# README, "Microsoft 365, step by step"):
#     [relays.m365]
#     provider = "microsoft365"
#     auth = "oauth2"
#     tenant = "contoso.onmicrosoft.com"
#     client_id = "00000000-0000-0000-0000-000000000000"
#     client_secret_file = "/etc/pickupd/secrets/m365.secret"   # root:pickupd 640
# Google Workspace with OAuth2 (a service account with domain-wide delegation):
#     [relays.google]
#     provider = "google"
#     auth = "oauth2"
#     service_account_file = "/etc/pickupd/secrets/google-sa.json"   # root:pickupd 640
# Then test the login, no mail sent: pickupd check --connect --mailbox you@your.domain
#
# Secrets go in files of their own under secrets/ beside this file, never in it: the apps
# that drop mail (group pickupdrop) read this file; only root and pickupd read secrets/.
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
        help="write a starter config and set up the spool (as root: the whole host)",
        description="Writes a commented starter config (an existing one is kept unless "
        "--force) and creates the spool: the pickup folders 1730, where the apps' group may "
        "drop mail but never list it, everything else private. Run as root, it sets up the "
        "host: the service's user (pickupd, with a group of its own: it alone reads the "
        "secrets), the drop group of the apps (pickupdrop: it may drop mail and read the "
        "config, never a secret), a secrets/ folder beside the config, and every mode. It "
        "says what it did; run again, it changes nothing. Then prints the next steps.",
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
        help=f"the drop group: the apps that send mail (default: as root {DROP_GROUP}, made"
        " if missing; else your primary group)",
    )
    init.add_argument(
        "--user",
        metavar="NAME",
        default=SERVICE_USER,
        help=f"as root: the service's user, made if missing (default: {SERVICE_USER})",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing config")


# Keys unset by default whose kind (a string) says too little: an example of their own.
_BY_NAME: dict[str, str] = {
    "store": '"redis://127.0.0.1:6379/0"',
    "ca_file": '"/etc/pickupd/redis-ca.pem"',
    "tls_cert_file": '"/etc/pickupd/metrics.crt"',
    "tls_key_file": '"/etc/pickupd/secrets/metrics.key"',
    "basic_auth_user": '"prometheus"',
    "basic_auth_password_file": '"/etc/pickupd/secrets/metrics.password"',
    "basic_auth_password_env": '"PICKUPD_METRICS_PASSWORD"',
}
# How a key unset by default is shown, commented out: a value of its own kind.
_EXAMPLES: dict[object, str] = {
    s.command: '["/usr/local/bin/on-failed", "--json"]',
    s.positive_duration: '"1h"',
    s.duration: '"1h"',
    s.address: '"ops@example.com"',
    s.listen: '"127.0.0.1:9464"',
    s.domain: '"example.com"',
    s.owner_classes: '{"newsletter" = "bulk"}',
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
            shown = key.shown or _BY_NAME.get(key.name) or _EXAMPLES.get(key.convert, '"..."')
            line = f"# {key.name} = {shown}"
            lines.append(f"{line.ljust(43)} # {key.help}")  # at least one space before "#"
        lines.append("")
    # [limits] is read apart from SECTIONS (its password is a secret), but belongs here too.
    lines.append("[limits]")
    for key in keys(LimitsConfig):
        shown = key.shown or _BY_NAME.get(key.name) or _EXAMPLES.get(key.convert, '"..."')
        lines.append(f"{f'# {key.name} = {shown}'.ljust(43)} # {key.help}")
    password = '# password_file = "/etc/pickupd/secrets/redis.password"'
    lines.append(f"{password.ljust(43)} # the store's password (root:pickupd 640)")
    lines.append("")
    doc = {
        "relays": {"main": {"host": "localhost", "port": 25, "security": "none"}},
        "senders": {"app@example.com": {"relay": "main"}},
    }
    return "\n".join(lines) + tomli_w.dumps(doc)


def _init(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    spool_root = args.spool.absolute()
    root = sys.platform != "win32" and os.geteuid() == 0
    gid: int | None = None  # Windows: no POSIX groups; folder ACLs are the operator's
    if sys.platform != "win32" and not root:
        import grp

        try:
            gid = grp.getgrnam(args.group).gr_gid if args.group else os.getgid()
        except KeyError:
            raise CommandError(EX_USAGE, f"pickupd init: no group named {args.group!r}") from None
    try:
        if path.exists() and not args.force:
            print(f"kept {path} (it exists; --force writes a new one)")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CONFIG_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(starter_config(path, spool_root))
            print(f"wrote {path}")
        if root:
            group = args.group or DROP_GROUP
            prepare(path, spool_root, args.user, group, lambda line: print(f"  {line}"))
        else:
            os.chmod(path, CONFIG_MODE)
            if gid is not None:
                os.chown(path, -1, gid)  # the apps' sendmail reads the spool's path there
            _make_spool(Spool(spool_root), gid)
            group = "of the apps" if gid is None else _group_name(gid)
            print(f"made {spool_root}: group {group} may drop into pickup/ (1730), never list")
    except SetupError as error:
        raise CommandError(EX_CONFIG, f"pickupd init: {error}") from None
    except OSError as exc:
        where = exc.filename or path
        raise CommandError(EX_CONFIG, f"pickupd init: {where}: {exc.strerror or exc}") from None
    default = "" if str(path) == DEFAULT_CONFIG_PATH else f" -c {path}"
    secrets = path.parent / "secrets"
    print(
        "next:\n"
        f"  1. edit {path}: your relay and the senders your apps use; a password goes in a"
        f" file of {secrets}/ ({'root:' + args.user + ' ' if root else ''}640), never in"
        " the config\n"
        f"  2. pickupd check{default} --connect     (validates it, tests the relay login)\n"
        f"  3. pickupd run{default}                 (or: systemctl enable --now pickupd)\n"
        f"  4. apps (in group {group}) drop mail into {spool_root / 'pickup'}/ or use"
        " pickupd-sendmail" + (f": usermod -aG {group} www-data (each app user)" if root else "")
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

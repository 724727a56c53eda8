"""`pickupd check [--connect]`: validate the config; with --connect, EHLO, STARTTLS and AUTH
against every relay, no mail sent.

One probe per relay and login it is used with (the relay's own login, each sender entry's own
login, or none), all at once, each bounded by the relay's timeout. An OAuth2 login first gets
a token from its source, then logs in with AUTH XOAUTH2 as the mailbox (for a `*@domain`
entry, the one given with --mailbox; without it, the token and the relay's TLS are checked,
not the login). Every probe prints one line: ok with what the server offered, or the failure
in words an operator can act on (DNS, refused, timeout, TLS, certificate, STARTTLS not
offered, AUTH 535, token endpoint unreachable, invalid_client ...).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from pickupd.auth.health import read_health
from pickupd.auth.logins import (
    Credentials,
    Login,
    MicrosoftSource,
    OAuth2Login,
    RefreshTokenSource,
    TokenSource,
    XOAuth2,
    bind,
)
from pickupd.auth.tokencache import per_mailbox
from pickupd.cli.common import EX_CONFIG, EX_OK, EX_USAGE, add_command, load_config
from pickupd.config.advice import advice
from pickupd.config.limits import shown_url
from pickupd.config.loading import Config, RelayConfig
from pickupd.config.routing import GRAPH_PRESET, MAILBOX_PRESETS, RELAY_PRESETS
from pickupd.config.secrets import exposure
from pickupd.errors import CommandError, SessionError
from pickupd.limits.ledger import FILE as LEDGER_FILE
from pickupd.smtp.pool import Pool
from pickupd.smtp.transaction import describe_error
from pickupd.spool.access import SERVICE_USER
from pickupd.units import Limit, format_duration

__all__ = ["Probe", "ProbeResult", "probe_all", "probes", "register"]

# Exit code when a probe failed (the config itself was fine).
EX_PROBE_FAILED = 1


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `check`."""
    check = add_command(
        commands,
        "check",
        _check,
        help="validate the config: exit 0 if good, 78 with one line per problem if not",
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="then connect to every relay with every login (token, EHLO, STARTTLS, AUTH;"
        " no mail is sent) and print one line each: exit 0 only if all are ok",
    )
    check.add_argument(
        "--mailbox",
        metavar="ADDR",
        help="with --connect: the mailbox an OAuth2 login of a *@domain entry logs in as",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        default=SERVICE_USER,
        help="run as root: the service's user, who alone (with root) may read the secrets"
        f" and must be able to (default: {SERVICE_USER})",
    )


def _check(args: argparse.Namespace) -> int:
    if args.mailbox and not args.connect:
        raise CommandError(EX_USAGE, "pickupd check: --mailbox is for --connect: give both")
    config = load_config(args.config)
    problems = unwritable_tokens(config, args.user)
    warnings = advice(config)
    if os.name == "posix" and os.geteuid() == 0:
        # Judged as the service's user would meet them, and every other user of the host.
        try:
            drop_gid: int | None = (config.spool.path / "pickup").stat().st_gid
        except OSError:
            drop_gid = None
        exposed = exposure(config.path, args.user, drop_gid)
        if exposed is None and args.user != SERVICE_USER:
            problems.append(f"pickupd check: --user {args.user}: no such user")
        elif exposed is None:
            # No service user here (pickupd runs as root, or is not installed yet): then
            # only root may read a secret.
            exposed = exposure(config.path, "root", drop_gid)
        problems += exposed or []
    if problems:
        raise CommandError(EX_CONFIG, "\n".join(problems))
    entries = "entry" if len(config.senders) == 1 else "entries"
    print(
        f"{config.path}: ok: {len(config.relays)} relay(s), {len(config.senders)} sender"
        f" {entries}, spool {config.spool.path}"
    )
    for line in limit_lines(config):
        print(line)
    for line in warnings:
        print(f"warning: {line}")
    if not args.connect:
        return EX_OK
    results = asyncio.run(probe_all(probes(config, args.mailbox)))
    for result in results:
        print(result.line())
    stored = _probe_store(config)
    return EX_OK if all(result.ok for result in results) and stored else EX_PROBE_FAILED


def _probe_store(config: Config) -> bool:
    """With a `[limits] store`: one line saying whether pickupd can use it (True if so)."""
    store = config.limits.store
    if store is None:
        return True
    from pickupd.limits.store import probe  # imports redis-py

    try:
        said = asyncio.run(probe(config.limits))
    except SessionError as error:
        print(f"limits.store {shown_url(store)}: FAILED: {error}")
        return False
    print(f"limits.store {shown_url(store)}: {said}")
    return True


def unwritable_tokens(config: Config, service: str = SERVICE_USER) -> list[str]:
    """A refresh_token_file whose folder the service's user cannot write: a rotated token
    could not be saved (the write-back is a new file renamed over the old), and the next
    start would use a spent one."""
    if os.name != "posix":
        return []
    import pwd  # POSIX only

    user: str | None = None
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(service).pw_name
    found = []
    for where, login in config.logins():
        source = login.source if isinstance(login, OAuth2Login) else None
        if isinstance(source, RefreshTokenSource):
            folder = source.refresh_token_file.parent
            if not _may_write(folder, user):
                who = user or pwd.getpwuid(os.geteuid()).pw_name
                found.append(
                    f"{config.path}: {where}.refresh_token_file: {who} cannot write {folder},"
                    " so a rotated token could not be saved; keep it under /var/lib/pickupd"
                    " (the unit's StateDirectory=)"
                )
    return found


def _may_write(folder: Path, user: str | None) -> bool:
    import grp
    import pwd

    if user is None:
        return os.access(folder, os.W_OK | os.X_OK)
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    try:
        st = folder.stat()
    except OSError:
        return False
    if st.st_uid == entry.pw_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o3 == 0o3


def limit_lines(config: Config) -> list[str]:
    """The provider limits in force, each marked where a preset set it, and the ledger."""
    lines = []

    def shown(
        limits: tuple[Limit, ...] | None, preset: tuple[Limit, ...], provider: str | None
    ) -> str:
        return ", ".join(
            f"{limit} ({provider}'s)" if limit in preset else str(limit) for limit in limits or ()
        )

    for relay in config.relays.values():
        provider = relay.provider
        if relay.limits:
            preset = RELAY_PRESETS.get(provider or "", ())
            lines.append(
                f"limits: relays.{relay.name}.limits (all its mail):"
                f" {shown(relay.limits, preset, provider)}"
            )
        if relay.mailbox_limits:
            preset = MAILBOX_PRESETS.get(provider or "", ())
            if relay.transport == "graph":
                preset, provider = GRAPH_PRESET, "graph"
            lines.append(
                f"limits: relays.{relay.name}.mailbox_limits (each login):"
                f" {shown(relay.mailbox_limits, preset, provider)}"
            )
    for rule in config.senders:
        if rule.limits:
            lines.append(f'limits: senders."{rule.pattern}".limits: {shown(rule.limits, (), None)}')
    if lines:
        store = config.limits.store
        lines.append(
            f"limits: kept in {shown_url(store)}, {config.limits.hosts} host(s) sharing it"
            if store
            else f"limits: kept in {config.spool.path / LEDGER_FILE} (this host's processes)"
        )
    return lines


@dataclass(frozen=True, slots=True)
class Probe:
    """One relay with one login, and who uses it (for the line printed). `token_only`: an
    OAuth2 login with no mailbox to log in as; its token and the relay are checked."""

    relay: RelayConfig
    login: Credentials | XOAuth2 | None
    used_by: str
    token_only: TokenSource | None = None
    sender: str | None = None  # tried at MAIL FROM (then RSET): what the server will say

    def label(self) -> str:
        relay = self.relay
        who = f" as {self.login.username}" if self.login is not None else ""
        where = relay.graph_url if relay.transport == "graph" else f"{relay.host}:{relay.port}"
        return f"{relay.name} ({self.used_by}{who}) {where}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found: ok and what the server offered, or the failure in words."""

    probe: Probe
    ok: bool
    text: str

    def line(self) -> str:
        return f"{self.probe.label()}: {'ok' if self.ok else 'FAILED'}: {self.text}"


def probes(config: Config, mailbox: str | None = None) -> list[Probe]:
    """Every relay with every login it is used with, each once."""
    found: dict[tuple[str, object], Probe] = {}

    def add(relay: RelayConfig, login: Login | None, used_by: str, address: str | None) -> None:
        if isinstance(login, OAuth2Login) and not login.username and address is None:
            probe = Probe(relay, None, used_by, token_only=login.source)
            found.setdefault((relay.name, login.source), probe)
            return
        bound = bind(login, address or "")
        found.setdefault((relay.name, bound), Probe(relay, bound, used_by, sender=address))

    for rule in config.senders:
        relay = config.relays[rule.relay]
        address = None if rule.pattern.startswith("*@") else rule.pattern
        if address is None and mailbox and rule.matches(mailbox):
            address = mailbox
        if rule.credentials is not None:
            add(relay, rule.credentials, f'senders."{rule.pattern}" login', address)
        else:
            used_by = "relay login" if relay.credentials else "no login"
            add(relay, relay.credentials, used_by, address)
    for relay in config.relays.values():
        if not any(key[0] == relay.name for key in found):
            used_by = "relay login" if relay.credentials else "no login"
            add(relay, relay.credentials, used_by, mailbox)
    return sorted(found.values(), key=lambda p: (p.relay.name, p.used_by, p.label()))


async def probe_all(todo: list[Probe]) -> list[ProbeResult]:
    """Run every probe at once; one result each, in the order given."""
    pool = Pool()
    return list(await asyncio.gather(*(_probe(pool, probe) for probe in todo)))


async def _probe(pool: Pool, probe: Probe) -> ProbeResult:
    result = await _try(pool, probe)
    source = probe.token_only or (probe.login.source if isinstance(probe.login, XOAuth2) else None)
    if not isinstance(source, RefreshTokenSource):
        return result
    return ProbeResult(probe, result.ok, f"{result.text}; {token_health(source, time.time())}")


def token_health(source: RefreshTokenSource, now: float) -> str:
    """How a stored refresh token is doing, as `check --connect` says it."""
    health = read_health(source.refresh_token_file)
    age = "age unknown" if health.issued is None else f"{_ago(now - health.issued)} old"
    worked = f"last worked {_ago(now - health.worked)} ago" if health.worked else "never worked"
    said = f"refresh token {age}, {worked}"
    if health.refused:
        said += ", REFUSED (invalid_grant): a person must sign in again"
    return said


def _ago(seconds: float) -> str:
    return format_duration(max(0.0, round(seconds)))


async def _try_graph(pool: Pool, probe: Probe) -> ProbeResult:
    """A Graph relay: an app-only token for Graph's scope, and the application permissions
    it carries; what only sending can prove is said, not guessed."""
    login = probe.login
    source = probe.token_only or (login.source if isinstance(login, XOAuth2) else None)
    if not isinstance(source, MicrosoftSource):
        return ProbeResult(probe, False, 'a Graph relay logs in with auth = "oauth2" (Microsoft)')
    source = dataclasses.replace(source, scope=f"{probe.relay.graph_url}/.default")
    try:
        token = await pool.tokens.get(source, "")
    except SessionError as exc:
        return ProbeResult(probe, False, _explain(exc))
    said = (
        f"token acquired for {source.scope} ({source.describe()}, expires in"
        f" {round(token.expires_at - time.time())} s)"
    )
    roles = _roles(token.value.reveal())
    if roles is not None and "Mail.Send" not in roles:
        shown = ", ".join(roles) or "none"
        return ProbeResult(
            probe, False, f"{said}, but its roles ({shown}) lack Mail.Send: add the"
            " application permission Mail.Send and grant admin consent",
        )  # fmt: skip
    if roles is not None:
        said += ", with the application permission Mail.Send"
    return ProbeResult(
        probe, True, f"{said}; not provable without sending: that each mailbox exists and"
        " is in the app's RBAC for Applications scope (a first message says so)",
    )  # fmt: skip


def _roles(token: str) -> list[str] | None:
    """The `roles` claim of a JWT access token, read without checking it (what Microsoft
    says the app was granted; the token is Graph's to verify); None if it is no JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return [str(role) for role in claims.get("roles", [])]
    except (IndexError, ValueError, AttributeError, TypeError):
        return None


async def _try(pool: Pool, probe: Probe) -> ProbeResult:
    relay = probe.relay
    if relay.transport == "graph":
        return await _try_graph(pool, probe)
    got = ""
    try:
        # A token that serves every mailbox can be had without one; a Google or command
        # token is per mailbox, and there is none to ask for.
        if probe.token_only is not None and not per_mailbox(probe.token_only):
            token = await pool.tokens.get(probe.token_only, "")
            expires_in = round(token.expires_at - time.time())
            got = f"token acquired ({probe.token_only.describe()}, expires in {expires_in} s), "
        # connect: TCP, greeting, STARTTLS or TLS, EHLO, AUTH; the relay's timeout applies
        # to each step, and this bounds the whole.
        smtp = await asyncio.wait_for(pool.connect(relay, probe.login), relay.timeout * 4)
    except (aiosmtplib.SMTPException, SessionError, OSError, TimeoutError) as exc:
        return ProbeResult(probe, False, _explain(exc))
    try:
        offered = _offered(smtp, relay, probe.login)
        if probe.token_only is not None:
            offered += (
                ", XOAUTH2 offered" if "xoauth2" in smtp.server_auth_methods else ", NO XOAUTH2"
            )
            offered += "; login not tried: no mailbox (check --connect --mailbox ADDR)"
        ok = probe.token_only is None or "xoauth2" in smtp.server_auth_methods
        if probe.login is None and "auth" in smtp.esmtp_extensions:
            offered += "; AUTH offered, no login configured"
        if ok and probe.sender is not None:
            # What the server will do with this sender, without sending anything.
            try:
                await asyncio.wait_for(smtp.mail(probe.sender), relay.timeout)
            except aiosmtplib.SMTPResponseException as exc:
                refused = f"MAIL FROM:<{probe.sender}> refused: {exc.code} {exc.message}"
                return ProbeResult(probe, False, f"{got}{offered}; {refused}")
            await asyncio.wait_for(smtp.rset(), relay.timeout)
            offered += f"; MAIL FROM:<{probe.sender}> accepted (then RSET: nothing sent)"
        return ProbeResult(probe, ok, got + offered)
    finally:
        try:
            await asyncio.wait_for(smtp.quit(), relay.timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()


def _offered(smtp: aiosmtplib.SMTP, relay: RelayConfig, login: Credentials | XOAuth2 | None) -> str:
    parts = []
    ssl_object = smtp.get_transport_info("ssl_object")
    if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        how = "implicit TLS" if relay.security == "tls" else "STARTTLS"
        parts.append(f"{how} {ssl_object.version()}, certificate verified")
    else:
        parts.append("no TLS (security = none)")
    if isinstance(login, XOAuth2):
        parts.append(f"AUTH XOAUTH2 accepted for {login.username} ({login.source.describe()})")
    elif login is not None:
        parts.append(f"AUTH accepted for {login.username}")
    size = smtp.esmtp_extensions.get("size", "")
    if size:
        parts.append(f"SIZE {size}")
    for extension in ("8bitmime", "smtputf8", "pipelining"):
        if extension in smtp.esmtp_extensions:
            parts.append(extension.upper())
    return ", ".join(parts)


def _explain(exc: BaseException) -> str:
    """The failure in an operator's words: what went wrong, from the innermost cause."""
    cause: BaseException = exc
    while cause.__cause__ is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__
    if isinstance(cause, socket.gaierror):
        return f"DNS: the host name does not resolve ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (nothing listens on that port, or a firewall says no)"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {cause.verify_message} (ca_file, or the system store)"
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return describe_error(exc)[1]

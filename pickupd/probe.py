"""`pickupd check --connect`: EHLO, STARTTLS and AUTH against every relay, no mail sent.

One probe per relay and credential set it is used with (the relay's own login, each sender
entry's own login, or none), all at once, each bounded by the relay's timeout. Every probe
prints one line: ok with what the server offered, or the failure in words an operator can
act on (DNS, refused, timeout, TLS, certificate, STARTTLS not offered, AUTH 535 ...).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib

from .config import Config, Credentials, RelayConfig
from .pool import Pool
from .relay import describe_error

__all__ = ["Probe", "probes", "run"]


@dataclass(frozen=True, slots=True)
class Probe:
    """One relay with one credential set, and who uses it (for the line printed)."""

    relay: RelayConfig
    credentials: Credentials | None
    used_by: str


def probes(config: Config) -> list[Probe]:
    """Every relay with every credential set it is used with, each once."""
    found: dict[tuple[str, Credentials | None], Probe] = {}

    def add(relay: RelayConfig, credentials: Credentials | None, used_by: str) -> None:
        found.setdefault((relay.name, credentials), Probe(relay, credentials, used_by))

    for rule in config.senders:
        relay = config.relays[rule.relay]
        if rule.credentials is not None:
            add(relay, rule.credentials, f'senders."{rule.pattern}" login')
        else:
            add(relay, relay.credentials, "relay login" if relay.credentials else "no login")
    for relay in config.relays.values():
        if not any(key[0] == relay.name for key in found):
            add(relay, relay.credentials, "relay login" if relay.credentials else "no login")
    return sorted(found.values(), key=lambda p: (p.relay.name, p.used_by))


def run(config: Config) -> int:
    """Probe everything, print one line each; 0 if all are ok, else 1."""
    results = asyncio.run(_probe_all(probes(config)))
    for line in results:
        print(line)
    return 0 if all(": ok: " in line for line in results) else 1


async def _probe_all(todo: list[Probe]) -> list[str]:
    pool = Pool()
    return list(await asyncio.gather(*(_probe(pool, probe) for probe in todo)))


async def _probe(pool: Pool, probe: Probe) -> str:
    relay = probe.relay
    who = f" as {probe.credentials.username}" if probe.credentials else ""
    label = f"{relay.name} ({probe.used_by}{who}) {relay.host}:{relay.port}"
    try:
        # connect: TCP, greeting, STARTTLS or TLS, EHLO, AUTH; the relay's timeout applies
        # to each step, and this bounds the whole.
        smtp = await asyncio.wait_for(pool.connect(relay, probe.credentials), relay.timeout * 4)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return f"{label}: FAILED: {_explain(exc)}"
    try:
        return f"{label}: ok: {_offered(smtp, relay, probe.credentials)}"
    finally:
        try:
            await asyncio.wait_for(smtp.quit(), relay.timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()


def _offered(smtp: aiosmtplib.SMTP, relay: RelayConfig, credentials: Credentials | None) -> str:
    parts = []
    ssl_object = smtp.get_transport_info("ssl_object")
    if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        how = "implicit TLS" if relay.security == "tls" else "STARTTLS"
        parts.append(f"{how} {ssl_object.version()}, certificate verified")
    else:
        parts.append("no TLS (security = none)")
    if credentials is not None:
        parts.append(f"AUTH accepted for {credentials.username}")
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
    text = describe_error(exc)[1]
    if "STARTTLS" in text and "not supported" in text:
        return "STARTTLS not offered by the server (security = starttls requires it)"
    if isinstance(exc, aiosmtplib.SMTPException) and "AUTH" in str(exc) and "not" in str(exc):
        return f"AUTH not offered by the server ({exc})"
    return text

"""`pickupd check --connect`: the real command against real test servers (STARTTLS from a test
CA, AUTH), one line per relay and credential set, exit 0 only if all are ok."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
from harness import free_port, pickupd, tls_relay
from smtpserver import SmtpServer, TestCA

Factory = Callable[..., SmtpServer]


def check_connect(
    tmp_path: Path, relays: dict[str, Any], senders: dict[str, Any]
) -> tuple[int, str]:
    config = tmp_path / "pickupd.toml"
    doc = {"spool": {"path": str(tmp_path / "spool")}, "relays": relays, "senders": senders}
    config.write_text(tomli_w.dumps(doc))
    config.chmod(0o600)
    done = pickupd("check", "-c", str(config), "--connect")
    assert "Traceback" not in done.stderr, done.stderr
    validated, _, probes = done.stdout.partition("\n")
    assert validated.startswith(f"{config}: ok: "), done.stdout  # the config is checked first
    return done.returncode, probes


def test_every_relay_and_login_is_probed_without_sending_mail(
    smtp_factory: Factory, test_ca: TestCA, tmp_path: Path
) -> None:
    """check --connect logs in once per relay and login, sends no mail, prints no password."""
    server = smtp_factory(security="starttls", users={"relay": "pw-relay", "billing": "pw-bill"})
    relays = {"main": tls_relay(server, test_ca, username="relay", password="pw-relay")}
    senders = {
        "*@example.com": {"relay": "main"},
        "billing@example.com": {"relay": "main", "username": "billing", "password": "pw-bill"},
    }
    code, out = check_connect(tmp_path, relays, senders)
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert any(
        line.startswith(f'main (senders."billing@example.com" login as billing) {server.host}:')
        for line in lines
    ), out
    assert all(": ok: STARTTLS TLSv1." in line and "certificate verified" in line for line in lines)
    assert "AUTH accepted for relay" in out and "AUTH accepted for billing" in out
    assert server.received == [] and sorted(server.auth_attempts) == [
        ("billing", True),
        ("relay", True),
    ]
    assert "pw-" not in out


def test_failures_are_named(smtp_factory: Factory, test_ca: TestCA, tmp_path: Path) -> None:
    """check --connect names each failure: 535, certificate, no STARTTLS, refused, DNS."""
    authed = smtp_factory(security="starttls", users={"relay": "right"})
    plain = smtp_factory(security="none")  # offers no STARTTLS
    closed = free_port()
    relays = {
        "badpw": tls_relay(authed, test_ca, username="relay", password="wrong-secret"),
        "nocert": {**tls_relay(authed, test_ca), "ca_file": None},
        "notls": {"host": plain.host, "port": plain.port, "security": "starttls"},
        "refused": {"host": "127.0.0.1", "port": closed, "security": "none"},
        "nodns": {"host": "relay.example.invalid", "port": 25, "security": "none"},
    }
    relays["nocert"].pop("ca_file")
    senders = {f"{name}@example.com": {"relay": name} for name in relays}
    code, out = check_connect(tmp_path, relays, senders)
    assert code == 1
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines()}
    assert sorted(lines) == sorted(relays), out
    assert "FAILED: authentication failed: 535" in lines["badpw"]
    assert "FAILED: certificate not trusted" in lines["nocert"]
    assert "FAILED: STARTTLS not offered by the server" in lines["notls"]
    assert "FAILED: connection refused" in lines["refused"]
    assert "FAILED: DNS: the host name does not resolve" in lines["nodns"]
    assert "wrong-secret" not in out


def test_a_sender_without_a_login_on_an_auth_relay_is_not_ok(
    smtp_factory: Factory, test_ca: TestCA, tmp_path: Path
) -> None:
    """The probe tries MAIL FROM for each sender it can name, then RSET: a relay that wants
    AUTH refuses the sender without a login (530), so check --connect is not "ok" for it;
    the one with a login is accepted, and nothing is sent."""
    server = smtp_factory(security="starttls", users={"billing": "pw-bill"}, require_auth=True)
    relays = {"main": tls_relay(server, test_ca)}
    senders = {
        "app@example.com": {"relay": "main"},
        "billing@example.com": {"relay": "main", "username": "billing", "password": "pw-bill"},
    }
    code, probes = check_connect(tmp_path, relays, senders)
    lines = probes.splitlines()
    bare = next(line for line in lines if "no login" in line)
    assert ": FAILED: " in bare and "AUTH offered, no login configured" in bare
    assert "MAIL FROM:<app@example.com> refused: 530" in bare
    billing = next(line for line in lines if "billing" in line)
    assert ": ok: " in billing and "MAIL FROM:<billing@example.com> accepted" in billing
    assert code != 0 and server.received == []

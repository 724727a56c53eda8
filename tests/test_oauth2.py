"""OAuth2 logins end to end: the real `pickupd` process gets tokens through msal and
google-auth (their real code paths) from a real HTTPS token endpoint on loopback
(tests/tokenserver.py), and logs in with AUTH XOAUTH2 to a real SMTP server that checks each
token with the endpoint. Nothing is patched."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import (
    Daemon,
    drop_maildir,
    free_port,
    message,
    pickupd,
    scrape,
    tls_relay,
    wait_until,
)
from smtpserver import SmtpServer, TestCA
from tokenserver import CLIENT_SECRET, TokenServer

Factory = Callable[..., SmtpServer]


@dataclass
class Rig:
    """What an OAuth2 test works with: the test CA, the token endpoint, real daemons, a
    folder, and STARTTLS SMTP servers that check XOAUTH2 tokens with the endpoint."""

    ca: TestCA
    tokens: TokenServer
    make_daemon: Callable[..., Daemon]
    tmp: Path
    smtp_factory: Factory

    def server(self, **kwargs: Any) -> SmtpServer:
        return self.smtp_factory(security="starttls", oauth=self.tokens.valid, **kwargs)


@pytest.fixture
def rig(
    smtp_factory: Factory,
    test_ca: TestCA,
    token_server: TokenServer,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> Rig:
    """The parts of an OAuth2 test, together."""
    return Rig(test_ca, token_server, make_daemon, tmp_path, smtp_factory)


def private_file(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def m365(
    server: SmtpServer, ca: TestCA, tokens: TokenServer, tmp: Path, **extra: Any
) -> dict[str, Any]:
    """A Microsoft 365 app-only relay whose authority is the test endpoint."""
    return {
        **tls_relay(server, ca),
        "auth": "oauth2",
        "tenant": "contoso",
        "client_id": "app-id",
        "client_secret_file": private_file(tmp / "m365.secret", CLIENT_SECRET + "\n"),
        "authority": tokens.url,
        **extra,
    }


def start(daemon: Daemon, ca: TestCA) -> Daemon:
    """Start with the test CA trusted for HTTPS (requests' documented REQUESTS_CA_BUNDLE, as
    an operator with a private CA sets it in the unit's Environment=)."""
    return daemon.start(env={"REQUESTS_CA_BUNDLE": ca.ca_file})


def assert_no_secrets(daemon: Daemon, tokens: TokenServer, *outputs: str) -> None:
    """No access token, refresh token or client secret in the log, sidecars or output."""
    log = daemon.log_path.read_text() if daemon.log_path.exists() else ""
    seen = log + daemon.stderr() + "".join(outputs)
    for folder in ("deferred", "failed", "sent", "hold"):
        for path in daemon.files(folder, ".json"):
            with contextlib.suppress(FileNotFoundError):  # sent meanwhile
                seen += path.read_text()
    secrets = [CLIENT_SECRET, *tokens.issued, *tokens.refresh_tokens]
    assert not [s for s in secrets if s in seen]


def workers(daemon: Daemon) -> int:
    """How many dispatcher processes the daemon runs (its "ready" line says)."""
    return int(daemon.wait_event("ready")[0]["workers"])


def test_microsoft365_one_app_token_serves_every_mailbox_of_the_domain(rig: Rig) -> None:
    """msal gets one app-only token (per worker process: each keeps its own cache) for 20
    messages from two mailboxes of a *@domain entry; each message logs in as its own envelope
    sender, and sessions are reused."""
    server = rig.server()
    daemon = rig.make_daemon(
        relays={"m365": m365(server, rig.ca, rig.tokens, rig.tmp)},
        senders={"*@contoso.example": {"relay": "m365"}},
        start=False,
    )
    start(daemon, rig.ca)
    for n in range(10):
        drop_maildir(daemon.spool, message(sender="sales@contoso.example", subject=f"s{n}"))
        drop_maildir(daemon.spool, message(sender="billing@contoso.example", subject=f"b{n}"))
    got = server.wait_for(20, timeout=30)
    assert all(r.username == r.mail_from for r in got)
    assert {r.username for r in got} == {"sales@contoso.example", "billing@contoso.example"}
    grants = [grant for _, _, grant in rig.tokens.token_requests()]
    assert set(grants) == {"client_credentials"}
    assert 1 <= len(grants) <= workers(daemon)
    assert len(server.auth_attempts) == server.sessions  # one login per session
    assert_no_secrets(daemon, rig.tokens)


def test_one_mailbox_reuses_its_sessions(rig: Rig) -> None:
    """60 messages from one mailbox go over at most max_connections sessions in all (the
    worker processes share them out), each logged in once with its process's cached token."""
    server = rig.server()
    daemon = rig.make_daemon(
        relays={"m365": m365(server, rig.ca, rig.tokens, rig.tmp, max_connections=3)},
        senders={"*@contoso.example": {"relay": "m365"}},
        start=False,
    )
    for n in range(60):
        drop_maildir(daemon.spool, message(sender="sales@contoso.example", subject=f"s{n}"))
    start(daemon, rig.ca)
    server.wait_for(60, timeout=30)
    assert server.sessions <= 3 and len(server.auth_attempts) == server.sessions
    assert 1 <= len(rig.tokens.token_requests()) <= workers(daemon)


def test_a_revoked_token_is_dropped_and_the_login_retried_once(rig: Rig) -> None:
    """The relay refuses the cached token (535 5.7.3): pickupd asks msal for a fresh one and
    logs in again in the same session; the message is sent, not deferred."""
    server = rig.server()
    relay = m365(server, rig.ca, rig.tokens, rig.tmp, max_messages_per_connection=1)
    daemon = rig.make_daemon(
        relays={"m365": relay},
        senders={"app@contoso.example": {"relay": "m365"}},
        dispatch={"workers": 1},  # one token cache: the second message meets the revoked token
        start=False,
    )
    start(daemon, rig.ca)
    drop_maildir(daemon.spool, message(sender="app@contoso.example"))
    server.wait_for(1)
    rig.tokens.revoke_all()
    drop_maildir(daemon.spool, message(sender="app@contoso.example", subject="after"))
    server.wait_for(2)
    assert len(rig.tokens.token_requests()) == 2
    assert server.auth_attempts[-2:] == [
        ("app@contoso.example", False),
        ("app@contoso.example", True),
    ]
    assert daemon.events("deferred") == []
    assert_no_secrets(daemon, rig.tokens)


def refresh_relay(
    server: SmtpServer, ca: TestCA, tokens: TokenServer, tmp: Path, **extra: Any
) -> dict[str, Any]:
    """A relay whose login is a stored refresh token at the test endpoint."""
    return {
        **tls_relay(server, ca),
        "auth": "oauth2",
        "token_url": f"{tokens.url}/token",
        "client_id": "app-id",
        "client_secret_file": private_file(tmp / "client.secret", CLIENT_SECRET),
        "refresh_token_file": private_file(tmp / "refresh.token", tokens.new_refresh_token()),
        "username": "app@example.com",
        **extra,
    }


def test_tokens_are_refreshed_before_they_expire_and_rotation_is_kept(rig: Rig) -> None:
    """With 4-second tokens, a send in the token's second half still uses it and starts a
    refresh in the background; the refresh lands before expiry, no expired token is ever
    presented, and each rotated refresh token is written back with the file's mode."""
    rig.tokens.expires_in = 4
    server = rig.server()
    relay = refresh_relay(server, rig.ca, rig.tokens, rig.tmp, max_messages_per_connection=1)
    (rig.tmp / "refresh.token").chmod(0o640)
    daemon = rig.make_daemon(relays={"main": relay}, start=False)
    start(daemon, rig.ca)
    drop_maildir(daemon.spool, message(subject="first"))
    server.wait_for(1)
    (first, *_) = rig.tokens.token_requests()
    wait_until(lambda: __import__("time").time() > first[0] + 2.5, 5, "the token's second half")
    drop_maildir(daemon.spool, message(subject="second"))
    server.wait_for(2)
    requests = wait_until(lambda: len(r := rig.tokens.token_requests()) >= 2 and r, 5)
    assert requests[1][0] < first[0] + 4, "refreshed only after expiry"
    assert rig.tokens.presented_expired == 0
    stored = rig.tmp / "refresh.token"
    # The rotated one, still unused (written back just after the endpoint answered).
    wait_until(lambda: stored.read_text().strip() in rig.tokens.refresh_tokens, 5, "write-back")
    assert stat.S_IMODE(stored.stat().st_mode) == 0o640
    assert_no_secrets(daemon, rig.tokens)


def test_a_token_endpoint_that_is_down_refusing_or_slow_defers_then_the_mail_goes(rig: Rig) -> None:
    """The daemon defers, with a detail naming the token source and what went wrong, when
    the endpoint answers 500, answers invalid_client, or stalls past token_timeout (each
    logged as token_failed); once the endpoint is back, the retry sends the mail."""
    server = rig.server()
    relay = refresh_relay(server, rig.ca, rig.tokens, rig.tmp, token_timeout="1s")
    daemon = rig.make_daemon(relays={"main": relay}, start=False)
    start(daemon, rig.ca)
    for mode, said in (
        ("500", "server_error"),
        ("invalid_client", "invalid_client"),
        ("stall", "timed out"),
    ):
        rig.tokens.mode = mode
        drop_maildir(daemon.spool, message(subject=mode))
        # Any deferral under this mode (earlier messages are retried meanwhile too).
        wait_until(partial(_deferral_saying, daemon, said), 15, f"a deferral saying {said}")
    source = f"refresh token grant at {rig.tokens.url}/token"
    assert all(source in e["detail"] for e in daemon.events("deferred"))
    assert daemon.events("token_failed")
    rig.tokens.mode = "ok"
    got = server.wait_for(3, timeout=20)
    assert {r.username for r in got} == {"app@example.com"}
    assert_no_secrets(daemon, rig.tokens)


def _deferral_saying(daemon: Daemon, said: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events("deferred") if said in e["detail"]]


def service_account(tmp: Path, tokens: TokenServer) -> str:
    """A Google service account key file whose token_uri is the test endpoint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = "pickupd@project.iam.gserviceaccount.com"
    tokens.service_accounts[email] = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    doc = {
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": email,
        "client_id": "1234",
        "token_uri": f"{tokens.url}/token",
    }
    return private_file(tmp / "service-account.json", json.dumps(doc))


def test_google_service_account_gets_a_token_per_mailbox(rig: Rig) -> None:
    """google-auth signs a JWT-bearer grant with the mailbox as subject: one token per
    mailbox, each good only for that mailbox's login."""
    server = rig.server()
    relay = {
        **tls_relay(server, rig.ca),
        "auth": "oauth2",
        "service_account_file": service_account(rig.tmp, rig.tokens),
    }
    daemon = rig.make_daemon(
        relays={"google": relay},
        senders={"*@example.com": {"relay": "google"}},
        dispatch={"workers": 1},  # one process, one token cache: exactly one token a mailbox
        start=False,
    )
    start(daemon, rig.ca)
    for n in range(3):
        drop_maildir(daemon.spool, message(sender="a@example.com", subject=f"a{n}"))
        drop_maildir(daemon.spool, message(sender="b@example.com", subject=f"b{n}"))
    got = server.wait_for(6)
    assert all(r.username == r.mail_from for r in got)
    grants = [grant for _, _, grant in rig.tokens.token_requests()]
    assert grants == ["urn:ietf:params:oauth:grant-type:jwt-bearer"] * 2
    assert sorted(i.user or "" for i in rig.tokens.issued.values()) == [
        "a@example.com",
        "b@example.com",
    ]
    assert_no_secrets(daemon, rig.tokens)


def test_token_command_prints_the_token_and_its_failure_is_named(
    smtp_factory: Factory, test_ca: TestCA, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """token_command runs without a shell with the mailbox in $PICKUPD_MAILBOX, and none of
    the service's secrets in its environment (another login's password_env); its token
    logs in; a command that fails defers the mail with its exit status and stderr."""
    server = smtp_factory(
        security="starttls", oauth=lambda token, user: token == f"cmd-token-for-{user}"
    )
    seen = tmp_path / "command-env.txt"
    good = [
        sys.executable,
        "-c",
        "import os, sys; open(sys.argv[1], 'w').write(' '.join(sorted(os.environ)));"
        " print('cmd-token-for-' + os.environ['PICKUPD_MAILBOX'])",
        str(seen),
    ]
    bad = [sys.executable, "-c", "import sys; sys.exit('vault is sealed')"]
    relays = {
        "good": {**tls_relay(server, test_ca), "auth": "oauth2", "token_command": good},
        "bad": {**tls_relay(server, test_ca), "auth": "oauth2", "token_command": bad},
    }
    relays["secret"] = {**tls_relay(server, test_ca), "username": "u", "password_env": "PK_PW"}
    senders = {"app@example.com": {"relay": "good"}, "other@example.com": {"relay": "bad"}}
    daemon = make_daemon(relays=relays, senders=senders, start=False)
    daemon.start(env={"PK_PW": "hunter2"})
    drop_maildir(daemon.spool, message())
    drop_maildir(daemon.spool, message(sender="other@example.com"))
    (got,) = server.wait_for(1)
    assert got.username == "app@example.com"
    names = seen.read_text().split()
    assert "PICKUPD_MAILBOX" in names and "PATH" in names and "PK_PW" not in names, names
    (deferred, *_) = daemon.wait_event("deferred")
    assert "exited with status 1: vault is sealed" in deferred["detail"], deferred


def test_check_connect_gets_tokens_logs_in_and_names_what_is_wrong(rig: Rig) -> None:
    """check --connect acquires the token and logs in as each mailbox it knows (an exact
    sender, or --mailbox for a *@domain entry); a rejected client fails fast with the
    endpoint's words, and no secret is printed."""
    server = rig.server()
    daemon = rig.make_daemon(
        relays={"m365": m365(server, rig.ca, rig.tokens, rig.tmp)},
        senders={"*@contoso.example": {"relay": "m365"}, "ceo@contoso.example": {"relay": "m365"}},
        start=False,
    )
    env = {"REQUESTS_CA_BUNDLE": rig.ca.ca_file}
    config = str(daemon.config_path)
    plain = pickupd("check", "-c", config, "--connect", env=env)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "AUTH XOAUTH2 accepted for ceo@contoso.example" in plain.stdout
    assert "login not tried: no mailbox" in plain.stdout and "XOAUTH2 offered" in plain.stdout
    mailbox = pickupd(
        "check", "-c", config, "--connect", "--mailbox", "it@contoso.example", env=env
    )
    assert "AUTH XOAUTH2 accepted for it@contoso.example" in mailbox.stdout, mailbox.stdout
    assert server.received == []

    rig.tokens.mode = "invalid_client"
    refused = pickupd("check", "-c", config, "--connect", env=env, timeout=60)
    assert refused.returncode == 1
    assert "FAILED: microsoft365 token for client_id app-id (tenant contoso): invalid_client:" in (
        refused.stdout
    ), refused.stdout
    assert_no_secrets(daemon, rig.tokens, plain.stdout, mailbox.stdout, refused.stdout)


def test_check_connect_writes_a_rotated_refresh_token_back(rig: Rig) -> None:
    """check --connect spends the stored refresh token like the daemon does, so it keeps
    the rotated one: a second check (and the daemon after it) still logs in."""
    server = rig.server()
    daemon = rig.make_daemon(
        relays={"main": refresh_relay(server, rig.ca, rig.tokens, rig.tmp)}, start=False
    )
    stored = rig.tmp / "refresh.token"
    first = stored.read_text()
    env = {"REQUESTS_CA_BUNDLE": rig.ca.ca_file}
    for _ in range(2):
        done = pickupd("check", "-c", str(daemon.config_path), "--connect", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "AUTH XOAUTH2 accepted for app@example.com" in done.stdout
    assert stored.read_text() != first and stored.read_text().strip() in rig.tokens.refresh_tokens
    start(daemon, rig.ca)
    drop_maildir(daemon.spool, message())
    server.wait_for(1)


def test_check_connect_asks_no_per_mailbox_token_without_a_mailbox(rig: Rig) -> None:
    """A Google *@domain login has no mailbox to take a token for without --mailbox: the
    probe checks TLS and XOAUTH2 and asks the endpoint nothing; with --mailbox it logs in."""
    server = rig.server()
    relay = {
        **tls_relay(server, rig.ca),
        "auth": "oauth2",
        "service_account_file": service_account(rig.tmp, rig.tokens),
    }
    daemon = rig.make_daemon(
        relays={"google": relay}, senders={"*@example.com": {"relay": "google"}}, start=False
    )
    env = {"REQUESTS_CA_BUNDLE": rig.ca.ca_file}
    config = str(daemon.config_path)
    plain = pickupd("check", "-c", config, "--connect", env=env)
    assert plain.returncode == 0 and "login not tried: no mailbox" in plain.stdout, plain.stdout
    assert rig.tokens.token_requests() == []
    named = pickupd("check", "-c", config, "--connect", "--mailbox", "a@example.com", env=env)
    assert "AUTH XOAUTH2 accepted for a@example.com" in named.stdout, named.stdout


def test_an_idle_refresh_token_is_kept_alive_and_a_refused_one_is_told_once(rig: Rig) -> None:
    """With no mail at all, the daemon uses a refresh token idle for its keepalive (here 2 s,
    7 days by default), keeps the rotated one, and the metrics say when it last worked. When
    the endpoint answers AADSTS700082 (invalid_grant), refresh_token_refused is logged once
    with what to do, however often it is tried, the metric says refused and check --connect
    says so; a new token written to the file works at the next try, no restart."""
    server = rig.server()
    port = free_port()
    relay = refresh_relay(server, rig.ca, rig.tokens, rig.tmp, refresh_token_keepalive="2s")
    stored = rig.tmp / "refresh.token"
    old = time.time() - 3600
    os.utime(stored, (old, old))  # written an hour ago, never used since
    daemon = rig.make_daemon(
        relays={"main": relay}, metrics={"listen": f"127.0.0.1:{port}"}, start=False
    )
    started = time.time()
    start(daemon, rig.ca)
    label = f'{{file="{stored}"}}'
    wait_until(lambda: len(rig.tokens.token_requests()) >= 1, 5, "the keepalive's grant")
    metrics = wait_until(
        lambda: (
            (m := scrape(port)).get(f"pickupd_refresh_token_last_worked_seconds{label}", 0)
            > started
            and m
        ),
        5,
        "the last-worked metric",
    )
    assert metrics[f"pickupd_refresh_token_refused{label}"] == 0
    assert metrics[f"pickupd_refresh_token_age_seconds{label}"] < 60  # rotated: a new token
    wait_until(lambda: len(rig.tokens.token_requests()) >= 2, 6, "a second keepalive")
    # The rotated one kept (written back just after the endpoint answered).
    wait_until(lambda: stored.read_text().strip() in rig.tokens.refresh_tokens, 5, "write-back")
    assert server.received == [] and server.sessions == 0  # no mail, no SMTP

    rig.tokens.mode = "inactive"
    tried = len(rig.tokens.token_requests())
    wait_until(lambda: len(rig.tokens.token_requests()) >= tried + 3, 12, "three refused grants")
    (refused,) = daemon.events("refresh_token_refused")
    assert refused["file"] == str(stored) and "AADSTS700082" in refused["detail"]
    assert "a person must sign in again" in refused["action"]
    assert scrape(port)[f"pickupd_refresh_token_refused{label}"] == 1
    env = {"REQUESTS_CA_BUNDLE": rig.ca.ca_file}
    check = pickupd("check", "-c", str(daemon.config_path), "--connect", env=env)
    assert check.returncode == 1
    assert "REFUSED (invalid_grant): a person must sign in again" in check.stdout, check.stdout
    assert "last worked" in check.stdout

    rig.tokens.mode = "ok"
    stored.write_text(rig.tokens.new_refresh_token())  # the operator signed in again
    wait_until(
        lambda: scrape(port)[f"pickupd_refresh_token_refused{label}"] == 0, 6, "the new token"
    )
    drop_maildir(daemon.spool, message())
    server.wait_for(1)
    assert len(daemon.events("refresh_token_refused")) == 1
    assert_no_secrets(daemon, rig.tokens, check.stdout)


def test_a_microsoft365_password_login_is_warned_about_at_check_and_at_start(
    rig: Rig, tmp_path: Path
) -> None:
    """Basic auth for SMTP AUTH ends at Microsoft at the end of December 2026: a password
    login to smtp.office365.com gets a warning from check and in the log at start, naming the
    key path; an OAuth2 login to the same host does not."""
    server = rig.server()
    relay = {
        **tls_relay(server, rig.ca),
        "host": "smtp.office365.com",
        "username": "app@example.com",
        "password_file": private_file(tmp_path / "pw", "secret"),
    }
    daemon = rig.make_daemon(
        relays={"m365": relay}, senders={"app@example.com": {"relay": "m365"}}, start=False
    )
    check = pickupd("check", "-c", str(daemon.config_path))
    assert check.returncode == 0, check.stderr
    assert "warning:" in check.stdout and "relays.m365: logs in to Microsoft 365" in check.stdout
    assert "550 5.7.30" in check.stdout
    daemon.start()
    daemon.wait_event("config_warning")
    (warned,) = [e for e in daemon.events("config_warning") if "Microsoft" in e["detail"]]
    assert (
        "relays.m365: logs in to Microsoft 365 (smtp.office365.com) with a password"
        in (warned["detail"])
    )

    oauth = rig.make_daemon(
        relays={
            "m365": {**m365(server, rig.ca, rig.tokens, rig.tmp), "host": "smtp.office365.com"}
        },
        senders={"app@example.com": {"relay": "m365"}},
        start=False,
    )
    quiet = pickupd("check", "-c", str(oauth.config_path))
    assert quiet.returncode == 0 and "warning:" not in quiet.stdout, quiet.stdout

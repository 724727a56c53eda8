"""The intake, end to end: what apps drop (Maildir, a direct .eml, IIS and Exchange envelope
lines, hostile names, UTF-8 addresses) reaches the relay byte for byte, or fails without a
connection with its reason; the real `pickupd run` process, a real SMTP server, real folders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, drop_eml, drop_maildir, message, relay_for
from smtpserver import SmtpServer


def test_maildir_drop_is_relayed_byte_for_byte(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A Maildir drop reaches the server with the envelope from its headers, the bytes as
    dropped (LF turned into CRLF, 8-bit UTF-8 kept), Bcc removed, and leaves no file behind."""
    daemon = make_daemon(smtp_server)
    body = "Grüße, 東京 — ünïcödé body.\n"
    raw = message(
        to="Alice <alice@example.net>",
        extra="Cc: bob@example.net\nBcc: carol@example.net\n",
        body=body,
    )
    drop_maildir(daemon.spool, raw)
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["alice@example.net", "bob@example.net", "carol@example.net"]
    expected = raw.replace(b"Bcc: carol@example.net\n", b"").replace(b"\n", b"\r\n")
    assert got.data == expected
    assert "BODY=8BITMIME" in got.mail_options
    daemon.wait_event("sent")
    assert daemon.census() == {"pickup/new": 0, "active": 0, "deferred": 0, "failed": 0, "sent": 0}
    (claimed,) = daemon.events("claimed")
    (sent,) = daemon.events("sent")
    assert sent["id"] == claimed["id"] and sent["relay"] == "main" and sent["attempt"] == 1
    assert sent["code"] == 250 and sent["sender"] == "app@example.com"


def test_direct_eml_and_x_sender_format(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """An IIS/System.Net.Mail style .eml written straight into pickup/ is taken once settled;
    its X-Sender/X-Receiver lines give the envelope and are not relayed. It has no Date: and
    no Message-ID:, so pickupd adds both in front (the id its own, on the sender's domain),
    every other byte as dropped."""
    daemon = make_daemon(smtp_server)
    raw = (
        b"X-Sender: app@example.com\r\n"
        b"X-Receiver: one@example.net\r\nX-Receiver: two@example.net\r\n"
        b"From: App <app@example.com>\r\nTo: someone-else@example.net\r\n"
        b"Subject: iis\r\n\r\nbody\r\n"
    )
    drop_eml(daemon.spool, "iis-style.eml", raw)
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["one@example.net", "two@example.net"]
    daemon.wait_event("sent")
    (claimed,) = daemon.events("claimed")
    assert claimed["source"] == "iis-style.eml"
    added, dropped = got.data.split(b"From: App", 1)
    assert b"From: App" + dropped == raw.split(b"X-Receiver: two@example.net\r\n", 1)[1]
    date, message_id = added.decode().splitlines()
    assert date.startswith("Date: ") and date.endswith(" GMT")
    assert message_id == f"Message-ID: <{claimed['id']}@example.com>"
    assert daemon.census()["pickup/new"] == 0


def test_messages_already_waiting_are_taken_at_start(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Files dropped while pickupd was down are all sent when it starts, over a few reused
    sessions."""
    daemon = make_daemon(smtp_server, start=False)
    for n in range(20):
        drop_maildir(daemon.spool, message(subject=f"waiting {n}"))
    daemon.start()
    got = smtp_server.wait_for(20)
    assert len(got) == 20
    daemon.wait_event("sent", count=20)
    # Connection reuse: 20 messages, 8 workers, default max_connections 4; back to back, a
    # session needs no RSET after a completed transaction.
    assert smtp_server.sessions <= 4
    assert smtp_server.commands.count("RSET") == 0


def _refusal_cases(tmp: Path) -> list[tuple[str, bytes, dict[str, Any]]]:
    return [
        ("malformed", b"this is not\na message at all\n", {}),
        ("malformed", message(sender='"unbalanced <app@example.com>'), {}),
        ("malformed", message(sender="alice@example.org)<app@example.com>"), {}),
        ("no_sender", b"To: alice@example.net\nSubject: x\n\nbody\n", {}),
        ("sender_not_allowed", message(sender="mallory@evil.example"), {}),
        (
            "header_from_not_allowed",
            b"Sender: app@example.com\nFrom: ceo@bank.example\nTo: alice@example.net\n\nx\n",
            {},
        ),
        ("no_recipients", b"From: app@example.com\nSubject: nobody\n\nx\n", {}),
        ("too_many_recipients", message(to=", ".join(f"r{i}@example.net" for i in range(4))), {}),
        ("too_large", message(body="x" * 5000), {}),
    ]


def test_every_policy_reason_fails_without_connecting(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Each policy refusal lands in failed/ with its reason code and a readable detail, the
    original bytes kept, and no connection is ever made to the relay."""
    daemon = make_daemon(smtp_server, policy={"max_recipients": 3, "max_message_size": 4000})
    cases = _refusal_cases(daemon.dir)
    for _, raw, _ in cases:
        drop_maildir(daemon.spool, raw)
    sidecars = daemon.wait_sidecars("failed", len(cases))
    assert sorted(s["reason"] for s in sidecars) == sorted(reason for reason, _, _ in cases)
    for sidecar in sidecars:
        assert sidecar["detail"] and sidecar["history"][-1]["outcome"] == "failed"
        eml = daemon.spool / "failed" / f"{sidecar['id']}.eml"
        assert eml.read_bytes() in [raw for _, raw, _ in cases]
    assert smtp_server.sessions == 0
    failed = daemon.events("failed")
    assert len(failed) == len(cases) and all(e["reason"] for e in failed)


def test_unsafe_files_go_to_failed_without_being_read(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A symlink and a FIFO planted in the pickup folder go to failed/ as unsafe_file; the
    symlink's target is never read or sent, the FIFO does not block the daemon, and a normal
    message dropped after them is still relayed."""
    daemon = make_daemon(smtp_server)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(message(body="TOP SECRET\n"))
    os.symlink(secret, daemon.spool / "pickup" / "new" / "link")
    os.mkfifo(daemon.spool / "pickup" / "new" / "fifo")
    os.symlink(secret, daemon.spool / "pickup" / "linked.eml")
    drop_maildir(daemon.spool, message(subject="after the traps"))
    smtp_server.wait_for(1)
    sidecars = daemon.wait_sidecars("failed", 3)
    assert {s["reason"] for s in sidecars} == {"unsafe_file"}
    assert all(b"TOP SECRET" not in r.data for r in smtp_server.received)
    assert secret.exists()
    for sidecar in sidecars:
        assert os.path.lexists(daemon.spool / "failed" / f"{sidecar['id']}.eml")


def test_direct_eml_is_not_taken_while_its_writer_holds_it_open(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A writer that pauses longer than `settle` in the middle of a direct .eml: pickupd
    waits for it to close the file, then relays the whole message."""
    daemon = make_daemon(smtp_server, log={"level": "debug"})
    raw = message(body="first half\n" + "second half\n" * 10)
    path = daemon.spool / "pickup" / "slow-writer.eml"
    with path.open("wb") as handle:
        handle.write(raw[:60])
        handle.flush()
        # Seen on its events (not settled yet), then once settled, still open: not taken.
        daemon.scans(2)
        assert smtp_server.received == [] and path.exists()
        handle.write(raw[60:])
    (got,) = smtp_server.wait_for(1)
    assert got.data == raw.replace(b"\n", b"\r\n")


def test_hostile_file_names_are_relayed_and_shown_safely(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A Maildir name with a newline, a terminal escape and bytes that are not UTF-8 is
    relayed like any other; its `source` in the log is printable."""
    daemon = make_daemon(smtp_server, start=False)
    name = b"evil\nname\x1b[31m\xff"
    with open(os.path.join(os.fsencode(daemon.spool / "pickup" / "new"), name), "wb") as handle:
        handle.write(message(subject="hostile name"))
    daemon.start()
    smtp_server.wait_for(1)
    (claimed,) = daemon.wait_event("claimed")
    assert claimed["source"] == "new/evil?name?[31m\ufffd"


def test_smtputf8_addresses(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon]
) -> None:
    """A UTF-8 address is relayed with SMTPUTF8 when the server offers it; a server that does
    not gets no attempt at all: the message fails as rejected, saying why."""
    with_utf8 = smtp_factory(smtputf8=True)
    without = smtp_factory(smtputf8=False)
    relays = {"main": relay_for(with_utf8), "old": relay_for(without)}
    senders = {"app@example.com": {"relay": "main"}, "legacy@example.com": {"relay": "old"}}
    daemon = make_daemon(relays=relays, senders=senders)
    drop_maildir(daemon.spool, message(to="jürgen@bücher.example"))
    (got,) = with_utf8.wait_for(1)
    assert got.rcpt_tos == ["jürgen@bücher.example"] and "SMTPUTF8" in got.mail_options
    drop_maildir(daemon.spool, message(sender="legacy@example.com", to="jürgen@bücher.example"))
    (failed,) = daemon.wait_sidecars("failed")
    assert failed["reason"] == "rejected" and "SMTPUTF8" in failed["detail"]
    assert "MAIL" not in without.commands


@pytest.mark.parametrize("offers_dsn", [False, True])
def test_exchange_replay_envelope_lines_with_esmtp_parameters(
    smtp_factory: Callable[..., SmtpServer], make_daemon: Callable[..., Daemon], offers_dsn: bool
) -> None:
    """X-Sender / X-Receiver lines as Exchange's Replay folder writes them, with ESMTP
    parameters after the address and one folded: the file is relayed; RET/ENVID and
    NOTIFY/ORCPT go to a server that offers DSN and are dropped for one that does not."""
    server = smtp_factory(dsn=offers_dsn)
    daemon = make_daemon(server)
    raw = (
        b"X-Sender: <app@example.com> BODY=8BITMIME RET=HDRS ENVID=order-42\r\n"
        b"X-Receiver: <alice@example.net> NOTIFY=FAILURE,DELAY\r\n"
        b"\tORCPT=rfc822;alice@example.net\r\n"
        b"X-Receiver: <bob@example.net>\r\n"
        b"From: app@example.com\r\nTo: alice@example.net\r\nSubject: replay\r\n\r\nbody\r\n"
    )
    drop_maildir(daemon.spool, raw)
    (got,) = server.wait_for(1)
    assert got.rcpt_tos == ["alice@example.net", "bob@example.net"]
    dsn_mail = [o for o in got.mail_options if o.startswith(("RET=", "ENVID="))]
    if offers_dsn:
        assert dsn_mail == ["RET=HDRS", "ENVID=ORDER-42"]  # (aiosmtpd upper-cases them)
        assert got.rcpt_options == ["NOTIFY=FAILURE,DELAY", "ORCPT=RFC822;ALICE@EXAMPLE.NET"]
    else:
        assert dsn_mail == [] and got.rcpt_options == []
    assert b"X-Sender" not in got.data and b"BODY=" not in got.data


def test_lines_starting_with_a_dot_arrive_intact(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Dot-stuffing (RFC 5321 4.5.2): body lines ".", "..", ".x" and a last line without a
    newline reach the server exactly as dropped (with CRLF line ends)."""
    daemon = make_daemon(smtp_server)
    body = b".\n..\n.hidden\nend\n.\n.last"
    drop_maildir(daemon.spool, b"From: app@example.com\nTo: alice@example.net\n\n" + body)
    (got,) = smtp_server.wait_for(1)
    assert got.data.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n") + b"\r\n")

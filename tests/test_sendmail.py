"""The sendmail interface: real clients (bsd-mailx, a cron-like call) through pickupd-sendmail
into a spool that a real daemon relays to a real SMTP server."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Daemon, wait_until
from smtpserver import SmtpServer

SENDMAIL = str(Path(sys.executable).with_name("pickupd-sendmail"))
LOCAL = {"policy": {"local_domain": "example.com"}}
ANY_EXAMPLE = {"*@example.com": {"relay": "main"}}


def sendmail(
    daemon: Daemon, *args: str, stdin: bytes, program: str = SENDMAIL
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [program, "-C", str(daemon.config_path), *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_bsd_mailx_through_the_shim(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Debian's mailx calls `sendmail -i -t` with no From: the login name becomes the sender,
    qualified with local_domain, in the envelope and in the From: the relay sees."""
    mailx = shutil.which("bsd-mailx")
    assert mailx, (
        "bsd-mailx is needed (apt-get install bsd-mailx; tests/debian-packages.sh installs it)"
    )
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE, **LOCAL)
    wrapper = tmp_path / "sendmail-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec "{SENDMAIL}" -C "{daemon.config_path}" "$@"\n')
    wrapper.chmod(0o755)
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={wrapper}\n")
    env = {**os.environ, "MAILRC": str(mailrc)}
    subprocess.run(
        [mailx, "-s", "disk almost full", "-c", "ops@example.net", "bob@example.net"],
        input="Grüße: 93% used\n".encode(),
        env=env,
        timeout=30,
        check=True,
    )
    (got,) = smtp_server.wait_for(1)
    user = getpass.getuser()
    assert got.mail_from == f"{user}@example.com"
    assert got.rcpt_tos == ["bob@example.net", "ops@example.net"]
    assert f"From: {user}@example.com\r\n".encode() in got.data
    assert b"Subject: disk almost full\r\n" in got.data
    assert "Grüße: 93% used".encode() in got.data and b"X-Sender" not in got.data


def test_cron_like_call_with_local_domain(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Debian's cron: `sendmail -FCronDaemon -i -B8BITMIME -oem root` with From: root (Cron
    Daemon). Unknown-to-us flags are accepted; bare names are qualified."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE, **LOCAL)
    message = (
        b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@web1> backup\n"
        b"Content-Type: text/plain; charset=UTF-8\n\nbackup done\n.\nnot the end\n"
    )
    done = sendmail(daemon, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=message)
    assert done.returncode == 0, done.stderr
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "root@example.com" and got.rcpt_tos == ["root@example.com"]
    assert b"From: root@example.com (Cron Daemon)\r\nTo: root@example.com\r\n" in got.data
    assert b"\r\n.\r\nnot the end\r\n" in got.data.replace(b"\r\n..", b"\r\n.")  # -i: kept
    assert b"Message-ID: <" in got.data and b"Date: " in got.data


def test_bare_names_without_local_domain_fail_with_a_hint(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Without local_domain, cron's bare "root" is refused by the shim itself (65), with the
    daemon's own reason and hint: nothing is dropped that the daemon would refuse."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE)
    message = b"From: root (Cron Daemon)\nTo: root\nSubject: cron\n\nx\n"
    refused = sendmail(daemon, "-i", "root", stdin=message)
    assert refused.returncode == 65
    assert b"malformed message" in refused.stderr and b"[policy] local_domain" in refused.stderr
    assert list((daemon.spool / "pickup" / "new").iterdir()) == []


def test_dash_t_takes_to_cc_bcc_and_f_sets_the_sender(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """-t takes To/Cc/Bcc as recipients, -f sets the envelope sender, Bcc is not relayed."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE)
    message = (
        b"From: App <app@example.com>\nTo: a@example.net\nCc: b@example.net\n"
        b"Bcc: hidden@example.net\nSubject: t\n\nbody\n"
    )
    done = sendmail(daemon, "-t", "-f", "bounces@example.com", "-oi", stdin=message)
    assert done.returncode == 0, done.stderr
    (got,) = smtp_server.wait_for(1)
    assert got.mail_from == "bounces@example.com"
    assert got.rcpt_tos == ["a@example.net", "b@example.net", "hidden@example.net"]
    assert b"hidden@example.net" not in got.data and b"From: App <app@example.com>" in got.data


def test_lone_dot_ends_input_without_i(tmp_path: Path) -> None:
    """Without -i a line with a single dot ends the message (sendmail's default); the file
    reaches pickup/new/ by the Maildir protocol, nothing is left in tmp/."""
    daemon = Daemon(tmp_path, {"main": {"host": "localhost", "security": "none"}}, ANY_EXAMPLE)
    done = sendmail(daemon, "a@example.net", stdin=b"From: app@example.com\n\none\n.\ntwo\n")
    assert done.returncode == 0, done.stderr
    (path,) = daemon.files("pickup/new")
    data = path.read_bytes()
    assert data.startswith(b"X-Sender: <app@example.com>\nX-Receiver: <a@example.net>\n")
    assert data.endswith(b"\none\n") and b"two" not in data
    assert daemon.files("pickup/tmp") == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-bs"], "only -bm"),
        (["-bp"], "pickupd queue"),
        (["-Z", "a@example.net"], "unknown option -Z"),
        ([], "no recipients"),
        (["a@example.net", "-f"], "-f needs a value"),
        (['"unbalanced@example.net'], "bad address"),
        (["-f", "a@example.com, b@example.com", "x@example.net"], "give one address"),
    ],
)
def test_usage_errors_exit_64(tmp_path: Path, args: list[str], expected: str) -> None:
    """Each bad command line exits 64 with a one-line reason and drops nothing."""
    daemon = Daemon(tmp_path, {"main": {"host": "localhost", "security": "none"}}, ANY_EXAMPLE)
    done = sendmail(daemon, *args, stdin=b"From: app@example.com\n\nx\n")
    assert done.returncode == 64, done
    assert expected in done.stderr.decode()
    assert daemon.files("pickup/new") == []


def test_unwritable_spool_is_a_temporary_failure(tmp_path: Path) -> None:
    """A spool that cannot be written exits 75 (try again later), as sendmail does."""
    daemon = Daemon(tmp_path, {"main": {"host": "localhost", "security": "none"}}, ANY_EXAMPLE)
    shutil.rmtree(daemon.spool / "pickup")
    (daemon.spool / "pickup").write_text("not a folder")
    done = sendmail(daemon, "a@example.net", stdin=b"From: app@example.com\n\nx\n")
    assert done.returncode == 75, done
    assert b"cannot write into" in done.stderr
    bad_config = subprocess.run(
        [SENDMAIL, "-C", str(tmp_path / "missing.toml"), "a@example.net"],
        input=b"x",
        capture_output=True,
        timeout=30,
    )
    assert bad_config.returncode == 75 and b"cannot read config" in bad_config.stderr


def test_pickupd_sendmail_subcommand_is_the_same(tmp_path: Path) -> None:
    """`pickupd sendmail` behaves as pickupd-sendmail."""
    daemon = Daemon(tmp_path, {"main": {"host": "localhost", "security": "none"}}, ANY_EXAMPLE)
    pickupd = str(Path(sys.executable).with_name("pickupd"))
    done = subprocess.run(
        [pickupd, "sendmail", "-C", str(daemon.config_path), "-i", "a@example.net"],
        input=b"From: app@example.com\n\nx\n",
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: daemon.files("pickup/new"), 2)


def test_help_explains_the_flags() -> None:
    """--help prints the usage and the flags."""
    done = subprocess.run([SENDMAIL, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "usage: pickupd-sendmail" in done.stdout and "-t" in done.stdout


def test_a_leading_mbox_from_line_is_dropped(tmp_path: Path) -> None:
    """A leading mbox "From " line is not a header field: it is dropped."""
    daemon = Daemon(tmp_path, {"main": {"host": "localhost", "security": "none"}}, ANY_EXAMPLE)
    raw = b"From app@example.com Tue Nov 24 10:00:00 2026\nFrom: app@example.com\n\nx\n"
    assert sendmail(daemon, "-i", "a@example.net", stdin=raw).returncode == 0
    (path,) = daemon.files("pickup/new")
    assert b"From app@example.com Tue" not in path.read_bytes()
    assert b"\nFrom: app@example.com\n" in path.read_bytes()


def test_a_message_that_is_all_body_gets_the_shims_header(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`echo body | pickupd-sendmail -f app@example.com you@example.net`: the first line is
    not a header field, so it starts the body (Postfix's rule); the shim's From:, Date: and
    Message-ID: head the message, which arrives as dropped, body intact."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE)
    done = sendmail(daemon, "-f", "app@example.com", "you@example.net", stdin=b"body\nmore: x\n")
    assert done.returncode == 0, done.stderr
    (got,) = smtp_server.wait_for(1)
    head, _, body = got.data.partition(b"\r\n\r\n")
    assert body == b"body\r\nmore: x\r\n"
    assert head.startswith(b"From: app@example.com\r\nDate: ") and b"\r\nMessage-ID: <" in head
    assert daemon.events("failed") == []


def test_the_shim_refuses_what_the_daemon_would_and_control_characters_in_f(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A header line with a NUL is refused by the shim with the daemon's reason (65); -F with
    a newline (a Reply-To: smuggled in) is a usage error (64); nothing reaches pickup/."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE)
    raw = b"From: app@example.com\nTo: a@example.net\nX: a\0b\n\nx\n"
    bad = sendmail(daemon, "a@example.net", stdin=raw)
    assert bad.returncode == 65 and b"control character" in bad.stderr, bad.stderr
    injected = sendmail(
        daemon, "-F", "App\nReply-To: evil@example.net", "a@example.net", stdin=b"x\n"
    )
    assert injected.returncode == 64 and b"-F: control characters" in injected.stderr
    assert list((daemon.spool / "pickup" / "new").iterdir()) == []


def test_a_line_without_end_is_bounded_by_max_message_size(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """Without -i the shim reads by lines: 300 MB with no newline is refused (65) once past
    max_message_size (1 MB here), and the shim never holds more than about that."""
    daemon = make_daemon(smtp_server, senders=ANY_EXAMPLE, policy={"max_message_size": "1MB"})
    script = (
        "import resource, subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
        "chunk = b'x' * (1 << 20)\n"
        "try:\n"
        "    for _ in range(300):\n"
        "        p.stdin.write(chunk)\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "code = p.wait()\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, SENDMAIL, "-C", str(daemon.config_path), "a@example.net"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    code, peak_kib = map(int, done.stdout.split())
    print(f"pickupd-sendmail peak RSS on 300 MB without a newline: {peak_kib / 1024:.1f} MiB")
    assert code == 65 and peak_kib < 100 * 1024

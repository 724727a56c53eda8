"""The operator's queue tools, run as real commands against a spool a real daemon is using."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from harness import PICKUPD, Daemon, drop_maildir, message, pickupd
from smtpserver import SmtpServer

from pickupd.spool.sidecar import to_timestamp


def cli(daemon: Daemon, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`pickupd ARGS -c <the daemon's config>`, bounded in time."""
    text = stdin.decode() if stdin is not None else None
    return pickupd(*args, "-c", str(daemon.config_path), stdin=text)


def one_id(daemon: Daemon, folder: str) -> str:
    (sidecar,) = daemon.wait_sidecars(folder)
    return str(sidecar["id"])


def test_queue_shows_counts_and_each_message(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`pickupd queue` (text and --json) shows counts per folder and each waiting message."""
    daemon = make_daemon(smtp_server, retry={"schedule": ["1h"], "max_age": "1d"})
    smtp_server.fail_mail = "451 4.3.0 Try again later"
    drop_maildir(daemon.spool, message(to="bob@example.net"))
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    deferred = daemon.wait_sidecars("deferred")[0]
    failed = daemon.wait_sidecars("failed")[0]

    text = cli(daemon, "queue")
    assert text.returncode == 0, text.stderr
    assert f"{deferred['id']}  deferred" in text.stdout
    assert "app@example.com -> bob@example.net" in text.stdout
    assert "last: MAIL FROM: 451 4.3.0 Try again later (relay main)" in text.stdout
    assert f"{failed['id']}  failed" in text.stdout and "reason sender_not_allowed" in text.stdout

    doc = json.loads(cli(daemon, "queue", "--json").stdout)
    counts = {name: folder["count"] for name, folder in doc["folders"].items()}
    assert counts == {
        "pickup": 0,
        "active": 0,
        "deferred": 1,
        "hold": 0,
        "failed": 1,
        "sent": 0,
    }
    assert doc["folders"]["deferred"]["oldest_age_seconds"] >= 0
    rows = {row["id"]: row for row in doc["messages"]}
    assert rows[deferred["id"]]["last_reply"]["code"] == 451
    assert rows[deferred["id"]]["attempts"] == 1 and rows[deferred["id"]]["next_attempt"]
    assert rows[failed["id"]]["reason"] == "sender_not_allowed"


def test_retry_puts_failed_mail_back_and_the_daemon_sends_it(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A message rejected while the relay was misconfigured goes out after `pickupd retry`,
    at once: attempts count afresh and the history is kept."""
    daemon = make_daemon(smtp_server, spool={"keep_sent": True})
    smtp_server.fail_mail = "550 5.7.1 Relaying denied"
    drop_maildir(daemon.spool, message())
    msg_id = one_id(daemon, "failed")
    smtp_server.fail_mail = None

    done = cli(daemon, "retry", msg_id)
    assert done.returncode == 0, done.stderr
    assert f"{msg_id}: failed/ -> deferred/, due now" in done.stdout
    smtp_server.wait_for(1, timeout=3)
    (archived,) = daemon.wait_sidecars("sent")
    assert archived["id"] == msg_id and archived["attempts"] == 1
    assert [h["outcome"] for h in archived["history"]] == ["failed", "retried", "sent"]
    assert daemon.files("failed") == []


def test_retry_all_by_reason_and_unknown_ids(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`retry --all --reason` picks only that reason; unknown ids exit 66 with one line."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    drop_maildir(daemon.spool, message(to="nobody"))  # malformed: no domain
    daemon.wait_sidecars("failed", count=2)

    only = cli(daemon, "retry", "--all", "--reason", "malformed")
    assert only.returncode == 0 and "1 message put back" in only.stdout, only
    reasons = [s["reason"] for s in daemon.wait_sidecars("failed", count=2)]
    assert sorted(reasons) == ["malformed", "sender_not_allowed"]  # failed again, as it must

    unknown = cli(daemon, "retry", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "../../etc/passwd")
    assert unknown.returncode == 66
    assert "01ARZ3NDEKTSV4RRFFQ69G5FAV: no such message" in unknown.stderr
    assert "'../../etc/passwd': no such message" in unknown.stderr
    assert cli(daemon, "retry").returncode == 64
    assert cli(daemon, "retry", "--reason", "expired").returncode == 64


def deferred_for_an_hour(server: SmtpServer, make_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with one message deferred (451 once) and its next attempt an hour away."""
    daemon = make_daemon(server, retry={"schedule": ["1h"], "max_age": "1d"})
    server.fail_mail = "451 4.3.0 Try again later"
    server.fail_next = 1
    drop_maildir(daemon.spool, message())
    daemon.wait_sidecars("deferred")
    return daemon


def test_retry_id_makes_one_deferred_message_due(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`pickupd retry ID` of a deferred message makes that one due now (attempts go on);
    the running daemon sends it."""
    daemon = deferred_for_an_hour(smtp_server, make_daemon)
    (before,) = daemon.sidecars("deferred")
    done = cli(daemon, "retry", before["id"])
    assert done.returncode == 0 and f"{before['id']}: deferred/, made due now" in done.stdout
    smtp_server.wait_for(1, timeout=3)
    (sent,) = daemon.wait_event("sent")
    assert sent["id"] == before["id"] and sent["attempt"] == 2


def test_the_due_time_is_the_files_and_one_beyond_max_age_is_taken_now(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """The sidecar's mtime is the due time: `pickupd queue` shows it even when the sidecar's
    next_attempt was edited; an mtime beyond max_age (years ahead) is clamped to now with a
    warning, and the message is sent."""
    daemon = deferred_for_an_hour(smtp_server, make_daemon)
    (car,) = daemon.sidecars("deferred")
    path = daemon.spool / "deferred" / f"{car['id']}.json"
    due = os.stat(path).st_mtime
    assert due > time.time() + 600
    edited = {**car, "next_attempt": "2030-01-01T00:00:00.000+00:00"}
    path.write_text(json.dumps(edited))
    os.utime(path, (due, due))  # edited with its mtime kept
    listed = json.loads(cli(daemon, "queue", "--json").stdout)
    (row,) = listed["messages"]
    assert abs(to_timestamp(row["next_attempt"]) - due) < 0.01

    years = time.time() + 3 * 365 * 86400
    os.utime(path, (years, years))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)  # a reload rescans deferred/
    (clamped,) = daemon.wait_event("due_clamped", timeout=10)
    assert clamped["id"] == car["id"]
    smtp_server.wait_for(1, timeout=5)


def test_flush_makes_deferred_mail_due_now(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`pickupd flush` makes deferred mail due and the running daemon sends it at once."""
    daemon = deferred_for_an_hour(smtp_server, make_daemon)
    (before,) = daemon.sidecars("deferred")
    flushed = cli(daemon, "flush")
    assert flushed.returncode == 0 and "1 deferred message made due now" in flushed.stdout
    smtp_server.wait_for(1, timeout=3)
    assert daemon.wait_event("sent")[0]["id"] == before["id"]


def test_sigusr1_flushes_like_the_command(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """SIGUSR1 to the daemon does what `pickupd flush` does."""
    daemon = deferred_for_an_hour(smtp_server, make_daemon)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    assert daemon.wait_event("flushed")[0]["messages"] == 1
    smtp_server.wait_for(1, timeout=3)


def test_hold_and_release(smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]) -> None:
    """Held mail is not sent, not even by flush; released mail goes out at once."""
    daemon = make_daemon(smtp_server, retry={"schedule": ["1h"], "max_age": "1d"})
    smtp_server.fail_mail = "451 4.7.0 Temporary authentication failure"
    drop_maildir(daemon.spool, message(subject="one"))
    drop_maildir(daemon.spool, message(subject="two"))
    daemon.wait_sidecars("deferred", count=2)
    smtp_server.fail_mail = None

    held = cli(daemon, "hold", "--sender", "APP@example.com")
    assert held.returncode == 0 and "2 messages held" in held.stdout, held
    assert daemon.files("deferred") == []
    sidecars = daemon.wait_sidecars("hold", count=2)
    assert all(s["history"][-1]["outcome"] == "held" for s in sidecars)
    assert cli(daemon, "flush").stdout.startswith("0 deferred messages")
    queue = json.loads(cli(daemon, "queue", "--json").stdout)
    assert queue["folders"]["hold"]["count"] == 2

    first = str(sidecars[0]["id"])
    released = cli(daemon, "release", first)
    assert released.returncode == 0, released.stderr
    smtp_server.wait_for(1, timeout=3)
    assert len(daemon.files("hold", ".eml")) == 1
    assert cli(daemon, "release", "--all").returncode == 0
    smtp_server.wait_for(2, timeout=3)
    assert cli(daemon, "hold", first).returncode == 66  # sent: nothing to hold


def test_delete_asks_or_needs_yes(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`delete` refuses without --yes when not on a terminal, and deletes with it."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    msg_id = one_id(daemon, "failed")

    refused = cli(daemon, "delete", msg_id)  # stdin is not a terminal
    assert refused.returncode == 64 and "--yes" in refused.stderr
    assert len(daemon.files("failed")) == 2
    done = cli(daemon, "delete", "--yes", msg_id)
    assert done.returncode == 0 and f"{msg_id}: deleted from failed/" in done.stdout
    assert daemon.files("failed") == []
    assert cli(daemon, "delete", "--yes", msg_id).returncode == 66


def test_show_prints_sidecar_and_headers_only(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`show` prints the sidecar and the header section, never the body; ids any case."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(sender="intruder@example.org", body="SECRET BODY\n"))
    msg_id = one_id(daemon, "failed")
    shown = cli(daemon, "show", msg_id.lower())
    assert shown.returncode == 0, shown.stderr
    assert f"failed/{msg_id}.eml" in shown.stdout
    assert '"reason": "sender_not_allowed"' in shown.stdout
    assert "From: intruder@example.org" in shown.stdout
    assert "SECRET BODY" not in shown.stdout
    assert cli(daemon, "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV").returncode == 66


def test_drop_files_and_stdin(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """`drop` enqueues files and stdin with the Maildir protocol; the daemon relays them."""
    daemon = make_daemon(smtp_server)
    path = tmp_path / "one.eml"
    path.write_bytes(message(subject="from a file"))
    dropped = cli(daemon, "drop", str(path), "-", stdin=message(subject="from stdin"))
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.count(str(daemon.spool / "pickup" / "new")) == 2
    got = smtp_server.wait_for(2)
    subjects = sorted(r.data.split(b"Subject: ")[1].split(b"\r\n")[0] for r in got)
    assert subjects == [b"from a file", b"from stdin"]
    assert daemon.files("pickup/tmp") == []

    missing = cli(daemon, "drop", str(tmp_path / "nope.eml"))
    assert missing.returncode == 66 and "nope.eml" in missing.stderr

    # What the daemon would refuse as malformed is not enqueued: 65 and the reason.
    (tmp_path / "bad.eml").write_bytes(b"just a body line\n\nbody\n")
    bad = cli(daemon, "drop", str(tmp_path / "bad.eml"))
    assert bad.returncode == 65, bad.stderr
    assert "bad.eml: malformed: line 1 is not a header field: not enqueued" in bad.stderr
    assert list((daemon.spool / "pickup" / "new").iterdir()) == []


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    """A missing spool or a bad config is one line on stderr and exit 78, no traceback."""
    config = tmp_path / "pickupd.toml"
    config.write_text(
        f'[spool]\npath = "{tmp_path / "absent"}"\n[relays.m]\nhost = "localhost"\n'
        'security = "none"\n[senders."a@example.com"]\nrelay = "m"\n'
    )
    absent = pickupd("queue", "-c", str(config))
    assert absent.returncode == 78
    assert absent.stderr.strip().count("\n") == 0 and "does not exist" in absent.stderr
    config.write_text("[relays.m]\nport = 99999\n")
    bad = pickupd("queue", "-c", str(config))
    assert bad.returncode == 78 and "relays.m.port" in bad.stderr and "Traceback" not in bad.stderr


def test_init_writes_a_valid_config_and_a_safe_spool(tmp_path: Path) -> None:
    """`init` writes a config that `check` accepts and a spool with safe modes; run again it
    keeps the config (--force writes a new one). As root it also makes the service's user
    and the drop group (named here, and removed after: tests/test_secrets.py says more)."""
    import grp

    config = tmp_path / "etc" / "pickupd.toml"
    spool = tmp_path / "spool"
    args = ["init", "-c", str(config), "--spool", str(spool)]
    suffix = secrets.token_hex(3)
    service, drop = f"pkisvc{suffix}", f"pkidrop{suffix}"
    if os.geteuid() == 0:
        args += ["--user", service, "--group", drop]
    try:
        done = pickupd(*args)
        assert done.returncode == 0, done.stderr
        assert "next:" in done.stdout
        checked = pickupd("check", "-c", str(config), "--user", service)
        assert checked.returncode == 0, checked.stderr
        assert stat.S_IMODE(config.stat().st_mode) == 0o640
        group = grp.getgrnam(drop).gr_gid if os.geteuid() == 0 else os.getgid()
        assert config.stat().st_gid == group  # the apps' sendmail reads the spool's path

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(spool) == 0o710
        for sub in ("pickup", "pickup/tmp", "pickup/new", "pickup/cur"):
            assert mode(spool / sub) == 0o1730, sub  # drop, never list (Postfix's maildrop)
            assert (spool / sub).stat().st_gid == group
        assert "warning:" not in checked.stdout  # the spool init made is not loose
        for sub in ("active", "deferred", "hold", "failed", "sent"):
            assert mode(spool / sub) == 0o700, sub

        config.write_text(config.read_text() + "\n# mine\n")
        again = pickupd(*args)
        assert again.returncode == 0 and f"kept {config}" in again.stdout
        assert config.read_text().endswith("# mine\n")
        forced = pickupd(*args, "--force")
        assert forced.returncode == 0 and "# mine" not in config.read_text()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["userdel", service], check=False, capture_output=True)
            for name in (drop, service):
                subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_queue_into_head_ends_quietly(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """`pickupd queue | head -3` with 40 messages: no traceback; it ends as coreutils do
    when their reader goes away (128 + SIGPIPE)."""
    daemon = make_daemon(smtp_server)
    for n in range(40):
        drop_maildir(daemon.spool, message(sender="intruder@example.org", subject=f"q{n}"))
    daemon.wait_sidecars("failed", count=40)
    piped = subprocess.run(
        ["sh", "-c", '"$0" queue -c "$1" | head -3', PICKUPD,
         str(daemon.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert len(piped.stdout.splitlines()) == 3
    assert piped.stderr == "", piped.stderr
    # Without a shell in between, the reader's going away is seen by pickupd itself.
    proc = subprocess.Popen(
        [PICKUPD, "queue", "-c", str(daemon.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    # Gone before pickupd writes a byte (Python takes longer than this to start): reading a
    # line first let 40 messages' listing fit in the pipe's buffer, and no write ever failed.
    proc.stdout.close()
    code = proc.wait(30)
    assert proc.stderr.read() == b"" and code == 141


def test_show_escapes_a_hostile_header_and_caps_a_binary_file(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A Subject: with terminal escapes prints them as \\x1b (never raw); a file with no
    blank line is not dumped whole."""
    daemon = make_daemon(smtp_server)
    hostile = "\x1b]0;PWNED\x07\x1b[2J"
    drop_maildir(daemon.spool, message(sender="intruder@example.org", subject=hostile))
    msg_id = one_id(daemon, "failed")
    shown = cli(daemon, "show", msg_id)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "Subject: \\x1b]0;PWNED\\x07\\x1b[2J" in shown.stdout
    binary = daemon.spool / "failed" / f"{msg_id}.eml"
    binary.write_bytes(b"\x00\x01garbage\n" * 5000)
    shown = cli(daemon, "show", msg_id)
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) < 260 and "\x00" not in shown.stdout
    assert "no blank line ends the header section" in shown.stdout


def test_show_of_an_unsafe_file_says_what_it_is(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A symlink or a FIFO where a message should be: one line saying what it is, exit 65
    (not "no such message"), and nothing behind the link is read."""
    daemon = make_daemon(smtp_server)
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    msg_id = one_id(daemon, "failed")
    eml = daemon.spool / "failed" / f"{msg_id}.eml"
    secret = tmp_path / "secret"
    secret.write_text("Subject: SECRET\n")
    eml.unlink()
    eml.symlink_to(secret)
    shown = cli(daemon, "show", msg_id)
    assert shown.returncode == 65 and "is a symbolic link: not read" in shown.stderr
    assert "SECRET" not in shown.stdout
    eml.unlink()
    os.mkfifo(eml)
    shown = cli(daemon, "show", msg_id)
    assert shown.returncode == 65 and "is a fifo: not read" in shown.stderr


def test_a_file_not_named_eml_is_logged_once_and_counted_by_queue(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """A `mail.txt` in pickup/ is never taken: the daemon says so once per name (at start
    and when one arrives), and `pickupd queue` counts it, so an app waiting for nothing is
    seen."""
    daemon = make_daemon(smtp_server, start=False, log={"level": "debug"})
    (daemon.spool / "pickup" / "early.txt").write_bytes(message())
    daemon.start()
    daemon.wait_event("ignored_file", file="pickup/early.txt")
    (daemon.spool / "pickup" / "mail.txt").write_bytes(message())
    drop_maildir(daemon.spool, message(to="real@example.net"))
    smtp_server.wait_for(1)
    daemon.wait_event("ignored_file", file="pickup/mail.txt")
    daemon.scans(2)  # scans of pickup/ (a rescan every 2 s in the tests) meet both again
    logged = [e["file"] for e in daemon.events("ignored_file")]
    assert sorted(logged) == ["pickup/early.txt", "pickup/mail.txt"], logged
    assert "rename it to end in .eml" in daemon.events("ignored_file")[0]["detail"]
    assert (daemon.spool / "pickup" / "mail.txt").exists()  # left alone, not moved

    text = cli(daemon, "queue")
    assert text.returncode == 0, text.stderr
    assert "ignored        2  in pickup/, not messages (not *.eml): early.txt, mail.txt" in (
        text.stdout
    )
    doc = json.loads(cli(daemon, "queue", "--json").stdout)
    assert doc["ignored"] == ["early.txt", "mail.txt"]

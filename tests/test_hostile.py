"""A hostile writer in the drop group (issue 23), with real users (useradd, setpriv) and the
daemon as the unit runs it: root with only CAP_DAC_READ_SEARCH, two workers. Each test is an
attack that worked before, and what must hold now: no file sends as another sender, sends
twice, loops for ever, floods the log or burns the CPU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from harness import manual, message, wait_until
from smtpserver import SmtpServer
from test_owners import (
    READER,
    ROOT_ONLY,
    Users,
    as_user,
    maildir_drop,
    public,
    shared_spool,
    users,
)

__all__ = ["public", "users"]  # the fixtures, shared with test_owners

# A writer's own tool: the system's Python (the test venv may be root's alone).
PYTHON = "/usr/bin/python3"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its children still running (the workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@ROOT_ONLY
def test_a_quoted_local_part_never_sends_as_another_sender(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """alice@ is alice's alone, *@example.com mallory's: mallory's `"alice"@`, `"al\\ice"@`,
    `<"alice"@...>` in X-Sender and `ALICE@EXAMPLE.COM` all reach alice's entry and fail as
    sender_not_allowed; nothing goes out as alice but alice's own, and mallory's own goes."""
    senders: dict[str, object] = {
        "alice@example.com": {"relay": "main", "owners": [users.alice]},
        "*@example.com": {"relay": "main", "owners": [users.mallory]},
    }
    daemon = shared_spool(public, smtp_server, users, senders)
    daemon.start(wrap=READER)
    for spelled in ('"alice"@example.com', '"al\\ice"@example.com', "ALICE@EXAMPLE.COM"):
        forged = message(sender=spelled, subject=f"forged {spelled}")
        maildir_drop(users.mallory, daemon.spool, forged)
    envelope = b'X-Sender: <"alice"@example.com>\nX-Receiver: <bob@example.net>\n'
    maildir_drop(users.mallory, daemon.spool, envelope + message(sender="mallory@example.com"))
    maildir_drop(users.alice, daemon.spool, message(sender="alice@example.com", subject="real"))
    maildir_drop(users.mallory, daemon.spool, message(sender="mallory@example.com"))
    failed = daemon.wait_sidecars("failed", count=4)
    assert {f["reason"] for f in failed} == {"sender_not_allowed"}
    assert all(f["sender"].lower() == "alice@example.com" for f in failed), failed
    got = smtp_server.wait_for(2)
    assert sorted(r.mail_from for r in got) == ["alice@example.com", "mallory@example.com"]
    daemon.wait_event("sent", count=2)
    assert len(smtp_server.received) == 2
    daemon.stop()


# Run as the writer: drop a message by the Maildir protocol, keep the file open, and set its
# mtime to the epoch every 0.1 s (what a lease or a due time kept in the file would obey).
_TOUCHER = """
import os, sys, time
pickup, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(f"{pickup}/tmp/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, sys.stdin.buffer.read())
os.rename(f"{pickup}/tmp/{name}", f"{pickup}/new/{name}")
end = time.monotonic() + seconds
touched = 0
while time.monotonic() < end:
    try:
        os.utime(fd, (0, 0))
        touched += 1
    except OSError:
        pass
    time.sleep(0.1)
print(touched)
"""


@ROOT_ONLY
def test_a_writer_holding_its_file_open_cannot_make_a_live_claim_look_stale(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """mallory keeps her dropped file open and sets its mtime to 0 ten times a second while
    a slow relay takes 4 s to accept it, with a 2 s claim lease and two workers: the claim is
    never taken over (no lease_expired), the message arrives once, nothing is stranded."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"app@example.com": {"relay": "main"}},
        dispatch={"workers": 2},
        spool={"claim_lease": "2s"},
    )
    daemon.start(wrap=READER)
    smtp_server.slow_dot = 4.0
    pickup = daemon.spool / "pickup"
    script = f"{PYTHON} -c '{_TOUCHER}' {pickup} held.mallory 7"
    done = as_user(users.mallory, script, message(subject="held open"))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 30, "the writer could not touch its file"  # it did, all along
    (got,) = smtp_server.wait_for(1, timeout=15)
    assert b"held open" in got.data
    daemon.wait_event("sent")
    # A second copy would have been claimed while the first was still with the relay.
    smtp_server.slow_dot = 0.0
    maildir_drop(users.mallory, daemon.spool, message(subject="after"))
    smtp_server.wait_for(2, timeout=15)
    assert daemon.events("lease_expired") == [] and daemon.events("stranded") == []
    assert [r.data.count(b"held open") for r in smtp_server.received].count(1) == 1
    daemon.stop()


def _nested(depth: int) -> bytes:
    """A message whose one text part sits `depth` multiparts deep, with a 2,000-octet line."""
    head = (
        b"From: app@example.com\nTo: alice@example.net\nSubject: deep\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="b0"\n\n'
    )
    body = b"".join(
        b'--b%d\nContent-Type: multipart/mixed; boundary="b%d"\n\n' % (i - 1, i)
        for i in range(1, depth)
    )
    body += b"--b%d\nContent-Type: text/plain\n\n" % (depth - 1) + b"x" * 2000 + b"\n"
    body += b"".join(b"--b%d--\n" % i for i in range(depth - 1, -1, -1))
    return head + body


@ROOT_ONLY
def test_a_poison_file_is_refused_once_and_other_mail_flows(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """20 files of 3,000 nested multiparts with a long line (a RecursionError in re-encoding,
    retried for ever before) each go to failed/ once as malformed, saying why, with no
    internal_error; mallory's ordinary message behind them arrives."""
    daemon = shared_spool(public, smtp_server, users, {"app@example.com": {"relay": "main"}})
    for _ in range(20):
        maildir_drop(users.mallory, daemon.spool, _nested(3000))
    daemon.start(wrap=READER)
    maildir_drop(users.mallory, daemon.spool, message(subject="behind the poison"))
    failed = daemon.wait_sidecars("failed", count=20)
    assert {f["reason"] for f in failed} == {"malformed"}
    assert all("3000 multipart parts, more than 100" in f["detail"] for f in failed), failed[0]
    assert all(f["attempts"] == 1 for f in failed)
    (got,) = smtp_server.wait_for(1)
    assert b"behind the poison" in got.data
    assert daemon.events("internal_error") == []
    daemon.stop()


@ROOT_ONLY
def test_a_directory_in_the_pickup_folder_is_never_moved(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """mallory's 0777 directories in new/ and one named like a message in pickup/ stay where
    they are (nothing of hers inside pickupd's folders), each said once as ignored_file over
    several rescans; mail dropped beside them goes."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"app@example.com": {"relay": "main"}},
        dispatch={"rescan_interval": "200ms"},
        log={"level": "debug"},
    )
    pickup = daemon.spool / "pickup"
    made = as_user(
        users.mallory,
        f'mkdir -m 0777 "{pickup}/new/trap" "{pickup}/trap.eml" && echo x > "{pickup}/new/trap/f"',
    )
    assert made.returncode == 0, made.stderr
    daemon.start(wrap=READER)
    maildir_drop(users.mallory, daemon.spool, message(subject="beside"))
    smtp_server.wait_for(1)
    daemon.scans(5)  # five scans of pickup/ after the positive sign above
    said = sorted(e["file"] for e in daemon.events("ignored_file"))
    assert said == ["pickup/new/trap/", "pickup/trap.eml/"], said
    assert all("a directory" in e["detail"] for e in daemon.events("ignored_file"))
    assert (pickup / "new" / "trap" / "f").exists() and (pickup / "trap.eml").is_dir()
    for folder in ("active", "failed", "deferred"):
        assert [p for p in (daemon.spool / folder).iterdir() if not p.name.startswith(".")] == []
    daemon.stop()


@ROOT_ONLY
def test_hostile_entries_neither_flood_the_log_nor_burn_the_cpu(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """5,000 directories in new/ and a .eml whose mtime mallory keeps just short of settled:
    at most 1,000 ignored_file lines, no more on later rescans, and the service's CPU stays
    low (a scan of pickup/ is never back to back: before, 6.3 CPU-seconds per 10 s)."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"app@example.com": {"relay": "main"}},
        dispatch={"rescan_interval": "500ms", "settle": "1s"},
    )
    pickup = daemon.spool / "pickup"
    made = as_user(users.mallory, f'cd "{pickup}/new" && mkdir -m 0700 $(seq -f d%g 5000)')
    assert made.returncode == 0, made.stderr
    daemon.start(wrap=READER)
    maildir_drop(users.mallory, daemon.spool, message(subject="first"))
    smtp_server.wait_for(1, timeout=20)
    assert daemon.proc is not None
    keeper = (
        "import os, sys, time\n"
        "p = sys.argv[1]\n"
        "open(p, 'w').write('From: app@example.com\\\\nTo: a@example.net\\\\n\\\\nx\\\\n')\n"
        "end = time.monotonic() + 10\n"
        "while time.monotonic() < end:\n"
        "    t = time.time() - 0.99\n"
        "    os.utime(p, (t, t))\n"
        "    time.sleep(0.005)\n"
    )
    logged = len(daemon.events("ignored_file"))
    before = cpu_seconds(daemon.proc.pid)
    kept = as_user(users.mallory, f'{PYTHON} -c "{keeper}" "{pickup}/unsettled.eml"')
    assert kept.returncode == 0, kept.stderr
    used = cpu_seconds(daemon.proc.pid) - before
    print(f"service CPU over 10 s of a file kept unsettled beside 5,000 entries: {used:.2f} s")
    assert used < 2.0
    assert logged <= 1000 and len(daemon.events("ignored_file")) == logged
    daemon.stop()


@ROOT_ONLY
def test_a_writer_cannot_keep_a_failure_out_of_the_report(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """mallory's refused message carries a Message-ID like pickupd's own reports: it is still
    listed in the failure report (reports are known by their file's owner, pickupd itself)."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"reports@example.com": {"relay": "main"}},
        notify={
            "report_to": "ops@example.net",
            "report_from": "reports@example.com",
            "report_interval": "1s",
        },
    )
    daemon.start(wrap=READER)
    hidden = message(sender="mallory@elsewhere.example", message_id="<pickupd-report.x@e.x>")
    maildir_drop(users.mallory, daemon.spool, hidden)
    (failed,) = daemon.wait_sidecars("failed")
    (report,) = smtp_server.wait_for(1, timeout=15)
    assert report.rcpt_tos == ["ops@example.net"]
    assert failed["id"].encode() in report.data and b"mallory@elsewhere.example" in report.data
    daemon.stop()


@ROOT_ONLY
def test_a_put_back_keeps_the_writer_and_the_sender(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """A message put back at shutdown (the relay too slow to wait for) keeps in its sidecar
    the writer read at its claim and its sender: a later attempt checks the same owner."""
    daemon = shared_spool(
        public,
        smtp_server,
        users,
        {"billing@example.com": {"relay": "main", "owners": [users.alice]}},
        dispatch={"workers": 1},
    )
    daemon.start(wrap=READER)
    smtp_server.slow_dot = 30.0
    maildir_drop(users.alice, daemon.spool, message(sender="billing@example.com"))
    daemon.wait_event("claimed")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)  # drain ...
    daemon.wait_event("stopping")
    daemon.proc.send_signal(signal.SIGTERM)  # ... no: put back what is in flight, now
    daemon.proc.wait(timeout=40)
    (put_back,) = daemon.events("put_back")
    car = json.loads((daemon.spool / "deferred" / f"{put_back['id']}.json").read_text())
    assert car["owner_uid"] == users.uid(users.alice) and car["owner"] == users.alice
    assert car["sender"] == "billing@example.com"
    smtp_server.slow_dot = 0.0
    daemon.start(wrap=READER)
    wait_until(lambda: daemon.events("sent"), 15, "the put-back message sent")
    daemon.stop()


@ROOT_ONLY
def test_the_readmes_shell_recipe_is_safe_for_a_writer(
    smtp_server: SmtpServer, users: Users, public: Path
) -> None:
    """The README's shell recipe, run as alice word for word (the spool's path aside), drops a
    file only she can read, under a name nobody could have guessed: mallory's symlinks
    planted under the names of the old recipe (`$(date +%s).$$.$(hostname)`) catch nothing."""
    readme = manual()
    start = readme.index("spool=/var/spool/pickupd\nfile=")
    recipe = readme[start : readme.index("```", start)]
    daemon = shared_spool(public, smtp_server, users, {"app@example.com": {"relay": "main"}})
    recipe = recipe.replace("/var/spool/pickupd", str(daemon.spool))
    trap = public / "captured"
    now = int(time.time())
    tmp = daemon.spool / "pickup" / "tmp"
    plant = "; ".join(
        f'ln -s "{trap}" "{tmp}/{now + s}.{pid}.$(hostname)"' for s in range(3) for pid in (2, 3)
    )
    assert as_user(users.mallory, plant).returncode == 0
    done = as_user(users.alice, recipe)
    assert done.returncode == 0, done.stderr
    (dropped,) = (daemon.spool / "pickup" / "new").iterdir()
    assert dropped.stat().st_uid == users.uid(users.alice)
    assert dropped.stat().st_mode & 0o777 == 0o600 and dropped.name.startswith("msg.")
    assert not trap.exists()
    daemon.start(wrap=READER)
    (got,) = smtp_server.wait_for(1)
    assert b"Nothing to report." in got.data
    daemon.stop()

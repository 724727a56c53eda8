"""[notify]: failure feedback to the apps, with the real daemon: the on_failed command and
the report mail, through a real SMTP server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from harness import Daemon, drop_maildir, message, relay_for, wait_until
from smtpserver import SmtpServer

# A hook that records what it was given: one JSON file per run, named by a counter.
RECORDER = """
import json, os, sys, pathlib
out = pathlib.Path(sys.argv[1])
n = len(list(out.glob("*.json")))
record = {"stdin": json.loads(sys.stdin.read()), "env": {k: v for k, v in os.environ.items()
          if k.startswith("PICKUPD_")}}
(out / f"{n:04d}-{os.getpid()}.json").write_text(json.dumps(record))
"""


def runs(folder: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_on_failed_runs_once_per_failed_message_with_its_sidecar(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Each message that lands in failed/ runs the hook once, with the sidecar JSON on stdin
    and PICKUPD_ID / PICKUPD_REASON / PICKUPD_EVENT in the environment."""
    out = tmp_path / "hook-runs"
    out.mkdir()
    hook = [sys.executable, "-c", RECORDER, str(out)]
    daemon = make_daemon(smtp_server, notify={"on_failed": hook})
    for n in range(3):
        drop_maildir(daemon.spool, message(sender="intruder@example.org", subject=f"x{n}"))
    drop_maildir(daemon.spool, message())
    smtp_server.wait_for(1)
    failed = {s["id"]: s for s in daemon.wait_sidecars("failed", count=3)}
    wait_until(lambda: len(runs(out)) >= 3, 10, "three hook runs")
    # A stopped daemon has finished (or killed) every hook it started: a second run of any
    # of them would show by now.
    assert daemon.stop() == 0
    recorded = runs(out)
    assert len(recorded) == 3
    for record in recorded:
        env = record["env"]
        assert isinstance(env, dict) and isinstance(record["stdin"], dict)
        assert env["PICKUPD_REASON"] == "sender_not_allowed" and env["PICKUPD_EVENT"] == "failed"
        assert record["stdin"] == failed[env["PICKUPD_ID"]]


def test_a_hanging_hook_is_killed_and_delivery_goes_on(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A hook that never ends is killed at hook_timeout (logged); mail keeps flowing meanwhile."""
    pidfile = tmp_path / "hook.pid"
    hang = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    daemon = make_daemon(smtp_server, notify={"on_failed": hang, "hook_timeout": "2s"})
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 10, "the hook"))
    drop_maildir(daemon.spool, message(subject="still flowing"))
    smtp_server.wait_for(1, timeout=1.5)  # while the hook still hangs
    (timeout,) = daemon.wait_event("hook_timeout", timeout=10)
    assert timeout["seconds"] == 2.0
    wait_until(lambda: not _alive(pid), 5, "the hook to be gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent reaps it).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_a_long_deferral_runs_the_hook_once(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """on_deferred_after: a message still deferred after that long runs the hook once
    (PICKUPD_EVENT=deferred), however many attempts follow."""
    out = tmp_path / "hook-runs"
    out.mkdir()
    hook = [sys.executable, "-c", RECORDER, str(out)]
    smtp_server.fail_mail = "451 4.3.0 Try again later"
    daemon = make_daemon(smtp_server, notify={"on_failed": hook, "on_deferred_after": "1s"})
    drop_maildir(daemon.spool, message())
    daemon.wait_event("deferred", count=6, timeout=15)  # well past 1 s at 300 ms a try
    wait_until(lambda: runs(out), 5, "the deferral hook")
    (record,) = runs(out)
    env = record["env"]
    assert isinstance(env, dict) and env["PICKUPD_EVENT"] == "deferred"
    (sidecar,) = daemon.sidecars("deferred")
    assert sidecar["deferred_notice"] and sidecar["id"] == env["PICKUPD_ID"]


def test_report_batches_failures_into_one_mail_to_report_to(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon]
) -> None:
    """50 failures make one report mail to report_to, from report_from, listing all 50;
    nothing goes back to the senders of the failed mail."""
    senders = {"app@example.com": {"relay": "main"}, "reports@example.com": {"relay": "main"}}
    notify = {
        "report_to": "ops@example.net",
        "report_from": "reports@example.com",
        "report_interval": "2s",
    }
    daemon = make_daemon(smtp_server, senders=senders, notify=notify)
    for n in range(50):
        drop_maildir(daemon.spool, message(sender=f"intruder{n}@example.org"))
    failed = daemon.wait_sidecars("failed", count=50, timeout=20)
    (report,) = smtp_server.wait_for(1, timeout=15)
    assert report.rcpt_tos == ["ops@example.net"] and report.mail_from == "reports@example.com"
    text = report.data.decode()
    assert "Subject: pickupd: 50 failed messages on" in text
    assert all(sidecar["id"] in text for sidecar in failed)
    # A stopped daemon has queued any report it still had pending (into pickup/, unsent):
    # the one report is all there was.
    assert daemon.stop() == 0
    assert daemon.census()["pickup/new"] == 0
    assert len(smtp_server.received) == 1
    assert daemon.events("report_queued")[0]["messages"] == 50


def test_a_hook_sees_no_secret_of_the_service(
    smtp_server: SmtpServer, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The service's environment holds a sender's password (password_env): the on_failed
    hook gets PATH, the locale and its PICKUPD_* variables, never that password (or anything
    else of the service's environment)."""
    dump = tmp_path / "hook-env.json"
    hook = [
        sys.executable,
        "-c",
        "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))",
        str(dump),
    ]
    relays = {
        "main": relay_for(smtp_server),
        "billing": relay_for(smtp_server, username="billing", password_env="PK_BILLING_PASSWORD"),
    }
    senders = {
        "app@example.com": {"relay": "main"},
        "billing@example.com": {"relay": "billing"},
    }
    daemon = make_daemon(relays=relays, senders=senders, notify={"on_failed": hook}, start=False)
    daemon.start(env={"PK_BILLING_PASSWORD": "hunter2-billing", "PK_UNRELATED": "x"})
    drop_maildir(daemon.spool, message(sender="intruder@example.org"))
    daemon.wait_sidecars("failed")
    wait_until(dump.exists, 10, "the hook's run")
    wait_until(lambda: dump.read_text().endswith("}"), 10, "the hook's dump written")
    env = json.loads(dump.read_text())
    assert "hunter2-billing" not in dump.read_text()
    assert "PK_BILLING_PASSWORD" not in env and "PK_UNRELATED" not in env
    assert env["PICKUPD_REASON"] == "sender_not_allowed" and "PATH" in env

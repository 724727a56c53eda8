"""What operators plug in, tested with the real tools: the alert rules in etc/prometheus/
with promtool (its syntax check and the unit tests beside the rules), and the Grafana
dashboard in etc/grafana/ against a real Prometheus scraping a real pickupd: every panel's
query must return data."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from harness import Daemon, drop_maildir, free_port, message, wait_until
from prometheusserver import Prometheus, promtool
from redisserver import RedisServer
from smtpserver import SmtpServer, TestCA
from test_oauth2 import refresh_relay
from tokenserver import TokenServer

ETC = Path(__file__).resolve().parent.parent / "etc"
RULES = ETC / "prometheus" / "pickupd.rules.yml"
DASHBOARD = ETC / "grafana" / "pickupd.json"


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    """`promtool check rules` and `promtool test rules`: each alert fires on the series
    that should raise it, with its labels and words, and not on its quiet twin."""
    checked = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 12 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool(), "test", "rules", "pickupd.rules.test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULES.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert of the rules has a test of its own.
    alerts = {
        line.split(":", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if "- alert:" in line
    }
    tests = (RULES.parent / "pickupd.rules.test.yml").read_text()
    assert alerts and all(f"alertname: {name}" in tests for name in alerts), alerts


def panel_queries() -> list[tuple[str, str]]:
    """(title, expr) of each panel of the dashboard, with $instance as "All" (.*)."""
    doc = json.loads(DASHBOARD.read_text())
    found = []
    for panel in doc["panels"]:
        for target in panel["targets"]:
            found.append((panel["title"], target["expr"].replace("$instance", ".*")))
    variable = doc["templating"]["list"][0]["query"]["query"]
    metric = variable.removeprefix("label_values(").split(",")[0]
    found.append(("the instance variable", f"group by (instance) ({metric})"))
    return found


def test_every_dashboard_panel_returns_data_from_a_running_pickupd(
    smtp_factory: Callable[..., SmtpServer],
    test_ca: TestCA,
    token_server: TokenServer,
    redis_server: RedisServer,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """A pickupd with what a real one meets: a refresh-token login, a daily limit shared
    through Redis, a relay that is down (suspended), a bounce and a throttling reply. Debian's
    Prometheus scrapes it every second; each panel's query (as Grafana sends it) returns a
    number."""
    server = smtp_factory(security="starttls", oauth=token_server.valid)
    server.fail_rcpt["bounce@example.net"] = "550 5.1.1 no such user"
    server.fail_rcpt["slow@example.net"] = (
        "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
    )
    main = refresh_relay(server, test_ca, token_server, tmp_path, limits=["1000 recipients/day"])
    down = {"host": "127.0.0.1", "port": free_port(), "security": "none", "suspend_after": 1}
    port = free_port()
    daemon = make_daemon(
        relays={"main": main, "down": down},
        senders={"app@example.com": {"relay": "main"}, "ops@example.com": {"relay": "down"}},
        metrics={"listen": f"127.0.0.1:{port}"},
        limits={"store": redis_server.url},
        retry={"schedule": ["1h"], "max_age": "1d"},
        start=False,
    )
    daemon.start(env={"REQUESTS_CA_BUNDLE": test_ca.ca_file})
    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"]).start()
    try:
        wait_until(lambda: prometheus.query("up == 1"), 20, "the first scrape")
        # A rate needs a counter Prometheus has seen before it grew: one send first.
        drop_maildir(daemon.spool, message(to="first@example.net"))
        server.wait_for(1)
        seen = "pickupd_send_duration_seconds_count"
        wait_until(lambda: prometheus.query(seen), 20, "the first send, scraped")
        for n in range(3):
            drop_maildir(daemon.spool, message(to=f"user{n}@example.net"))
        drop_maildir(daemon.spool, message(to="bounce@example.net"))
        drop_maildir(daemon.spool, message(sender="ops@example.com"))
        server.wait_for(4)
        daemon.wait_event("failed")
        daemon.wait_event("relay_suspended")
        drop_maildir(daemon.spool, message(to="slow@example.net"))
        daemon.wait_event("relay_throttled")
        deadline = time.monotonic() + 60
        for title, expr in panel_queries():
            result: list[dict[str, Any]] = wait_until(
                partial(_numbers, prometheus, expr),
                max(1.0, deadline - time.monotonic()),
                f"data for the panel {title!r}: {expr}",
            )
            assert result, title
    finally:
        prometheus.stop()


def _numbers(prometheus: Prometheus, expr: str) -> list[dict[str, Any]]:
    """The series of an instant query that hold a number (NaN is no data for a panel)."""
    result = prometheus.query(expr)
    return [series for series in result if not math.isnan(float(series["value"][1]))]

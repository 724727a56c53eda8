"""The one list of log events (pickupd/events.py) against the code and the README: every
event the code logs is listed, every listed one is logged, and the README names each."""

from __future__ import annotations

import ast
from pathlib import Path

from harness import manual

from pickupd.events import EVENTS

PACKAGE = Path(__file__).parent.parent / "pickupd"
_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
# Calls whose event is a variable, and the events it may be (each site says which).
_CHOSEN = {"quota_spent", "tenant_limited", "put_back", "waiting", "relay_auth_failed"}
_CHOSEN |= {"token_failed"}
# The service's start and end, named by its role (roles.py: Role.ready_event, stopped_event).
_CHOSEN |= {"ready", "worker_ready", "stopped", "worker_stopped"}


def _names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _names(node.body) + _names(node.orelse)
    return []


def logged() -> tuple[set[str], int]:
    """The event names the code passes to a logger as literals, and how many calls pass a
    variable instead."""
    found: set[str] = set()
    variable = 0
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LEVELS
                and "log" in ast.unparse(node.func.value)
                and node.args
            ):
                names = _names(node.args[0])
                found.update(names)
                variable += not names
    return found, variable


def test_every_event_the_code_logs_is_listed_and_every_listed_one_is_logged() -> None:
    """The code logs no event missing from events.EVENTS, and EVENTS holds none it never
    logs (the few calls that choose among events are accounted for)."""
    found, variable = logged()
    assert variable == 5, "a call logs a variable event: add its events to _CHOSEN"
    assert found | _CHOSEN == set(EVENTS), (
        sorted((found | _CHOSEN) - set(EVENTS)),
        sorted(set(EVENTS) - found - _CHOSEN),
    )


def test_the_readme_names_every_event() -> None:
    """The README's log reference names each event (as `name`)."""
    readme = manual()
    logs = readme[readme.index("## Logs") : readme.index("## Metrics")]
    missing = [name for name in EVENTS if f"`{name}`" not in logs]
    assert not missing, missing

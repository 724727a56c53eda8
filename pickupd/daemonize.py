"""`pickupd run --daemon`: classic detach with python-daemon and a locked pidfile."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["detached"]


def detached(pidfile: Path, log_file: Path | None) -> contextlib.AbstractContextManager[object]:
    """A context that, entered, detaches this process; raise PickupdError (one line) if
    another process holds `pidfile`."""
    raise NotImplementedError("pickupd run --daemon: being built")

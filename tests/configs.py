"""The one config builder for unit tests: relay "m" and the senders app@example.com and
*@corp.example, with whatever sections a test gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pickupd.config.loading import Config, RelayConfig, SenderRule

__all__ = ["unit_config"]


def unit_config(
    path: Path = Path("t.toml"), *, host: str = "h", port: int = 25, **sections: Any
) -> Config:
    """A Config as `load` would build it, without a file (sections by name: policy=...)."""
    return Config(
        path=path,
        relays={"m": RelayConfig(name="m", host=host, port=port)},
        senders=(
            SenderRule(pattern="app@example.com", relay="m"),
            SenderRule(pattern="*@corp.example", relay="m"),
        ),
        **sections,
    )

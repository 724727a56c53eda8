"""What every subcommand shares: exit codes (sysexits.h), the --config help, loading the config."""

from __future__ import annotations

import sys

from .config import DEFAULT_CONFIG_PATH, Config, config_path, load
from .errors import ConfigError

__all__ = [
    "CONFIG_HELP",
    "EX_CONFIG",
    "EX_NOINPUT",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_USAGE",
    "load_or_exit_code",
]

# sysexits.h, as sendmail and Postfix use them.
EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66  # no such message (or input file)
EX_TEMPFAIL = 75
EX_CONFIG = 78
CONFIG_HELP = f"config file (default: $PICKUPD_CONFIG or {DEFAULT_CONFIG_PATH})"


def load_or_exit_code(path_arg: str | None) -> Config | int:
    """The config named by `-c` (or its defaults), or EX_CONFIG after printing one line per
    problem to stderr."""
    try:
        return load(config_path(path_arg))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG

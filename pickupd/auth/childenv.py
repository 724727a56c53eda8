"""The environment of the commands pickupd runs ([notify] on_failed, token_command): a few
variables every program expects, never the rest of the service's. The service's environment
holds secrets (`password_env`, `client_secret_env`, systemd's credentials): a hook or a token
command must not read another sender's password from it.
"""

from __future__ import annotations

import os

__all__ = ["PASSED", "child_env"]

# What a command may need to run at all: where programs are, the locale, the time zone, a
# temp folder, who it runs as, the CA bundle and proxies for its own HTTPS calls.
PASSED = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)


def child_env(**own: str) -> dict[str, str]:
    """The environment for a command: PASSED and LC_* from ours, then its `own` variables."""
    passed = {
        name: value
        for name, value in os.environ.items()
        if name in PASSED or name.startswith("LC_")
    }
    return {**passed, **own}

"""Warnings about a config that loads but will hurt later: `pickupd check` prints them and
`pickupd run` logs them at start (`config_warning`), one line each with the key path.
"""

from __future__ import annotations

from pickupd.auth.logins import Credentials
from pickupd.config.loading import Config
from pickupd.config.routing import PROVIDERS
from pickupd.spool.access import loose

__all__ = ["advice"]

# Microsoft turns Basic authentication for SMTP AUTH off by default for existing tenants at
# the end of December 2026; the server then answers 550 5.7.30 (limits/replies.py).
_MICROSOFT_HOSTS = (PROVIDERS["microsoft365"], ".outlook.com", ".office365.com")


def advice(config: Config) -> list[str]:
    """One line per thing to mend, naming the file and the key path."""
    lines = []
    for rule in config.senders:
        relay = config.relays[rule.relay]
        login = rule.credentials or relay.credentials
        if isinstance(login, Credentials) and _is_microsoft(relay.host):
            where = f'senders."{rule.pattern}"' if rule.credentials else f"relays.{relay.name}"
            lines.append(
                f"{config.path}: {where}: logs in to Microsoft 365 ({relay.host}) with a"
                " password: Microsoft turns Basic authentication for SMTP AUTH off by default"
                " at the end of December 2026 (550 5.7.30); give it an OAuth2 login"
                ' (auth = "oauth2", README: "OAuth2 logins")'
            )
    owned = [rule.pattern for rule in config.senders if rule.owners is not None]
    if owned and len(owned) < len(config.senders):
        open_to_all = [f'senders."{r.pattern}"' for r in config.senders if r.owners is None]
        lines.append(
            f"{config.path}: {', '.join(open_to_all)}: no owners, while other entries have"
            " them: any local writer may send as it (give it owners, or set"
            " policy.require_owners = true to make this an error)"
        )
    lines += [f"{config.path}: spool.path: {line}" for line in loose(config.spool.path / "pickup")]
    if config.metrics.open_to_others and config.metrics.listen is not None:
        host, port = config.metrics.listen
        lines.append(
            f"{config.path}: metrics.listen: {host}:{port} shows the sender logins and their"
            " usage to anyone who reaches it: listen on 127.0.0.1, or set basic_auth_user"
            " (with tls_cert_file)"
        )
    return list(dict.fromkeys(lines))


def _is_microsoft(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == _MICROSOFT_HOSTS[0] or host.endswith(_MICROSOFT_HOSTS[1:])

"""`[metrics]`: the Prometheus endpoint, and who may read it. What it shows is not for
everyone: the sender logins (in `limit` labels), their usage and the relays' health. So it
listens on loopback by choice, and where it must listen wider it can ask for basic auth and
serve TLS (as Prometheus's own web config does); a password never goes in clear to another
host, as with SMTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pickupd.auth.logins import Secret
from pickupd.config import keys as s
from pickupd.config.keys import Reader, setting
from pickupd.config.logins import read_secret, secret_keys
from pickupd.config.routing import is_loopback

__all__ = ["MetricsConfig", "read_metrics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """`[metrics]`: a Prometheus endpoint, off unless `listen` is set."""

    listen: tuple[str, int] | None = setting(
        None, s.listen, 'serve /metrics on "host:port" (not set: off)'
    )
    tls_cert_file: Path | None = setting(
        None, s.pathname, "serve HTTPS with this certificate (PEM; with tls_key_file)"
    )
    tls_key_file: Path | None = setting(
        None, s.pathname, "the certificate's private key (PEM; a secret)"
    )
    basic_auth_user: str | None = setting(
        None,
        s.string,
        "ask scrapers for this user and basic_auth_password_file's password (not set: anyone)",
    )
    basic_auth_password_file: Path | None = setting(
        None, s.pathname, "the basic auth password (a secret; or _env)"
    )
    basic_auth_password_env: str | None = setting(
        None, s.string, "instead of _file: an environment variable holding the password"
    )
    # Read apart, as a relay's password is (never shown).
    basic_auth_password: Secret | None = None

    @property
    def tls(self) -> tuple[Path, Path] | None:
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return self.tls_cert_file, self.tls_key_file

    @property
    def open_to_others(self) -> bool:
        """Listening beyond loopback with nothing asked of a scraper."""
        return (
            self.listen is not None
            and not is_loopback(self.listen[0])
            and self.basic_auth_password is None
        )


_PAIRS = (("tls_cert_file", "tls_key_file"), ("basic_auth_user", "basic_auth_password_file"))
_PASSWORD = secret_keys("basic_auth_password")


def read_metrics(reader: Reader, doc: Mapping[str, Any]) -> MetricsConfig:
    table = reader.table(doc, "metrics")
    values = reader.values(table, "metrics.", MetricsConfig)
    for key in ("tls_cert_file", "tls_key_file"):
        if values[key] is not None:
            values[key] = reader.file(values[key])
            if not values[key].is_file():
                reader.problem(f"metrics.{key}", f"{values[key]} does not exist")
    for first, second in _PAIRS:
        given = [key for key in (first, second) if key in table]
        if second == "basic_auth_password_file" and "basic_auth_password_env" in table:
            given.append(second)
        if len(given) == 1:
            missing = second if given[0] == first else first
            reader.problem(f"metrics.{missing}", f"{first} and {second} go together")
    password = None
    if "basic_auth_user" in table and any(key in table for key in _PASSWORD):
        # Kept as the Secret below, not as where it came from.
        values["basic_auth_password_file"] = values["basic_auth_password_env"] = None
        password = read_secret(reader, table, "metrics.", "basic_auth_password")
        listen = values["listen"]
        if listen is not None and values["tls_key_file"] is None and not is_loopback(listen[0]):
            reader.problem(
                "metrics.basic_auth_user",
                f"the password would go in clear to scrapers of {listen[0]}: set tls_cert_file"
                " and tls_key_file (or listen on loopback)",
            )
    return MetricsConfig(basic_auth_password=password, **values)

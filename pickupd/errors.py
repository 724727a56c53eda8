"""The exception tree. Expected results are values (see outcome.py); these are for the rest."""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "AuthNotOffered",
    "CommandError",
    "ConfigError",
    "PickupdError",
    "SessionError",
    "SpoolWriteError",
    "StartTLSNotOffered",
    "TLSHandshakeFailed",
]


class PickupdError(Exception):
    """Base of every error pickupd raises on purpose."""


class ConfigError(PickupdError):
    """The configuration is unusable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CommandError(PickupdError):
    """A command cannot go on: `cli.main` prints `message` (one line each) to stderr and
    exits with `exit_code` (sysexits.h)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class SessionError(PickupdError):
    """An SMTP session cannot be used as configured; `kind` is the metrics label."""

    kind = "protocol"


class StartTLSNotOffered(SessionError):
    """security = "starttls" and the server does not offer STARTTLS: never send in clear."""

    kind = "tls"

    def __init__(self) -> None:
        super().__init__("STARTTLS not offered by the server (security = starttls requires it)")


class TLSHandshakeFailed(SessionError):
    """STARTTLS was accepted but the handshake did not complete (no common protocol
    version or cipher, or the server gave up)."""

    kind = "tls"

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"TLS handshake failed: {cause}")


class AuthNotOffered(SessionError):
    """Credentials are configured and the server offers no AUTH we can use."""

    kind = "auth"

    def __init__(self, offered: str) -> None:
        super().__init__(
            f"AUTH not offered by the server{f' (it offers {offered})' if offered else ''}"
        )


class SpoolWriteError(PickupdError):
    """A claimed message could not be moved to its folder (a full disk, most often): it stays
    in active/ under our claim, and `resume()` does the rest of what was to be done."""

    def __init__(self, msg_id: str, resume: Callable[[], None], cause: OSError) -> None:
        super().__init__(f"cannot write to the spool: {cause.strerror or cause}")
        self.msg_id = msg_id
        self.resume = resume
        self.cause = cause

"""The exception tree. Expected results are values (see outcome.py); these are for the rest."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

from pickupd.outcome import SessionFault

__all__ = [
    "AddressError",
    "AuthNotOffered",
    "CommandError",
    "ConfigError",
    "ConnectionsBusy",
    "DaemonError",
    "EndpointError",
    "Invalid",
    "Malformed",
    "MessageError",
    "NotAFile",
    "NotRegular",
    "PickupdError",
    "ProtocolError",
    "SessionError",
    "SetupError",
    "SpoolLocked",
    "SpoolWriteError",
    "StaleSession",
    "StartTLSNotOffered",
    "TLSHandshakeFailed",
    "TokenError",
    "TooLong",
    "WatchError",
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


class Invalid(PickupdError, ValueError):
    """A value that does not convert (a config value, a duration, a sidecar): the text, when
    there is one, says what was expected. A ValueError too, so converters may raise either."""


class SessionError(PickupdError):
    """An SMTP session cannot be used as configured; `kind` is the metrics label."""

    kind = SessionFault.PROTOCOL


class StartTLSNotOffered(SessionError):
    """security = "starttls" and the server does not offer STARTTLS: never send in clear."""

    kind = SessionFault.TLS

    def __init__(self) -> None:
        super().__init__("STARTTLS not offered by the server (security = starttls requires it)")


class TLSHandshakeFailed(SessionError):
    """STARTTLS was accepted but the handshake did not complete (no common protocol
    version or cipher, or the server gave up)."""

    kind = SessionFault.TLS

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"TLS handshake failed: {cause}")


class AuthNotOffered(SessionError):
    """Credentials are configured and the server offers no AUTH we can use."""

    kind = SessionFault.AUTH

    def __init__(self, offered: str) -> None:
        super().__init__(
            f"AUTH not offered by the server{f' (it offers {offered})' if offered else ''}"
        )


class ConnectionsBusy(SessionError):
    """A mailbox's connections limit is held in full (by this host or others of the fleet)
    for longer than the relay's timeout: the message waits, without an attempt."""

    kind = SessionFault.CONNECTIONS


class TokenError(SessionError):
    """No OAuth2 access token from a source (named by `source`): `misconfigured` when the
    endpoint (or the file) says the login itself is wrong, so retrying will not help."""

    kind = SessionFault.TOKEN

    def __init__(
        self, source: str, text: str, *, misconfigured: bool = False, code: str = ""
    ) -> None:
        super().__init__(f"{source}: {text}")
        self.misconfigured = misconfigured
        self.code = code  # the endpoint's OAuth2 error ("invalid_grant"), "" if none
        # A stored refresh token was refused for the first time since it last worked: the
        # one failure that is told to the operator as such (auth/health.py).
        self.refused_now = False


class MessageError(PickupdError):
    """A dropped message cannot be read as mail: the parser turns it into a Refusal."""


class AddressError(MessageError):
    """An address field that the RFC 5322 grammar does not allow (the text says where)."""


class TooLong(MessageError):
    """A header line cannot be folded under 998 octets."""


class Malformed(MessageError):
    """A dropped file the parser does not take as a message: the text says where (a field's
    label, a line's number); envelope.parse() turns it into Refusal(MALFORMED)."""


class StaleSession(PickupdError):
    """A reused SMTP session turned out closed at MAIL, before anything was handed over: the
    transaction is made again on a new session (smtp/transaction.py)."""


class NotRegular(PickupdError, OSError):
    """A file that must be a regular file is not (a FIFO, a device, a directory): read
    nothing from it. An OSError too (EINVAL, with the path), so a caller that handles a
    failed read handles this one."""

    def __init__(self, path: str) -> None:
        OSError.__init__(self, errno.EINVAL, "not a regular file", path)


class WatchError(PickupdError, OSError):
    """The folders cannot be watched (inotify: out of instances or watches, a folder gone):
    `folder` is the one that failed ("" for inotify itself). An OSError too, with its errno."""

    def __init__(self, error: int, call: str, folder: str = "") -> None:
        OSError.__init__(self, error, f"{call}: {os.strerror(error)}", folder or None)
        self.folder = folder


class DaemonError(PickupdError):
    """`run --daemon` cannot detach as asked: the pidfile is held, or a file cannot be
    opened (`path`). A temporary failure (75): another pickupd runs, or a folder is missing."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class EndpointError(PickupdError):
    """The metrics endpoint cannot serve as `[metrics]` says (`key`): a configuration error
    (78)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"metrics.{key}: {problem}")
        self.key = key
        self.problem = problem


class NotAFile(PickupdError):
    """A candidate for a claim turned out to be a directory (`path`): never moved into
    pickupd's folders (its writer could then write inside them); it was put back."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is a directory")
        self.path = path


class SetupError(PickupdError):
    """A step of `pickupd init`'s setup of the host failed (hosting/setup.py): one line."""


class SpoolLocked(PickupdError):
    """Another `pickupd run` holds the spool's lock."""


class ProtocolError(PickupdError):
    """A line between the main process and a worker process that is not a message."""


class SpoolWriteError(PickupdError):
    """A claimed message could not be moved to its folder (a full disk, most often): it stays
    in active/ under our claim, and `await resume()` does the rest of what was to be done
    (each move where the spool's disk says, what follows it on the loop)."""

    def __init__(self, msg_id: str, resume: Callable[[], Awaitable[None]], cause: OSError) -> None:
        super().__init__(f"cannot write to the spool: {cause.strerror or cause}")
        self.msg_id = msg_id
        self.resume = resume
        self.cause = cause

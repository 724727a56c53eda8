"""Microsoft Graph's answers to `sendMail`, as a Delivery the recorder already knows.

    202                          sent (Graph accepted it; it delivers, and saves a copy in the
                                 mailbox's Sent Items)
    429, 503, 504 + Retry-After  the mailbox is throttled: pause it at least that long (every
                                 process and host that shares the ledger), no attempt counted
    401                          the token is no good: dropped, one more try with a fresh one
                                 (client.py); a second 401 defers, as a login that failed
    403 ErrorSendAsDenied,       failed: the app may not send as this mailbox
        ErrorAccessDenied
    404 ErrorInvalidUser,        failed: no such mailbox, or not one Graph can send from
        MailboxNotEnabledForRESTAPI
    413, ErrorMessageSizeExceeded failed as too_large
    400 (others)                 failed, with Graph's message
    other 5xx, resets, timeouts  deferred, on the retry schedule

Graph's error body is `{"error": {"code": "...", "message": "..."}}`; its code and message
are what the sidecar and the log show, with what to fix where pickupd knows it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pickupd.outcome import Delivery, SessionFault, every, session_failed

__all__ = ["FIXES", "THROTTLED", "delivery", "error_of", "retry_after"]

THROTTLED = frozenset({429, 503, 504})
# When Graph throttles without saying how long (it always should): a pause this long.
DEFAULT_RETRY_AFTER = 30.0

# Graph's error code -> what the operator does about it.
FIXES = {
    "ErrorSendAsDenied": "grant the app the Mail.Send application permission and include this"
    " mailbox in its RBAC for Applications scope (README: Microsoft 365 through Graph)",
    "ErrorAccessDenied": "grant the app the Mail.Send application permission (admin consent)"
    " and include this mailbox in its RBAC for Applications scope",
    "ErrorInvalidUser": "no such mailbox in the tenant: check the sender (or the relay's username)",
    "MailboxNotEnabledForRESTAPI": "the mailbox is not an Exchange Online mailbox Graph can"
    " send from (on-premises, unlicensed or inactive)",
}


def error_of(body: bytes) -> tuple[str, str]:
    """(code, message) of a Graph error body ("", its first 200 characters if it is none)."""
    try:
        doc = json.loads(body)
        error = doc["error"]
        return str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", body[:200].decode("utf-8", "replace")


def retry_after(headers: Mapping[str, str]) -> float:
    """Seconds from a Retry-After header (delta-seconds); the default when absent or odd."""
    try:
        return max(1.0, float(headers.get("retry-after", "")))
    except ValueError:
        return DEFAULT_RETRY_AFTER


def delivery(
    relay: str,
    recipients: Sequence[str],
    status: int,
    body: bytes,
    headers: Mapping[str, str],
) -> Delivery:
    """What Graph's answer `status` means for the message to `recipients`."""
    if status == 202:
        return Delivery(relay, sent=tuple(recipients), code=202, text="202 accepted by Graph")
    code, message = error_of(body)
    fix = FIXES.get(code)
    said = f"Graph {status}{' ' + code if code else ''}: {message}" + (f"; {fix}" if fix else "")
    if status in THROTTLED:
        wait = retry_after(headers)
        text = f"{said} (Retry-After {wait:g} s)"
        return Delivery(relay, deferred=every(recipients, 451, text), code=451, text=text,
                        retry_after=wait)  # fmt: skip
    if status == 413 or code == "ErrorMessageSizeExceeded":
        return Delivery(relay, rejected=every(recipients, 552, said), code=552, text=said,
                        too_large=True)  # fmt: skip
    if 400 <= status < 500 and status != 401:
        return Delivery(relay, rejected=every(recipients, 550, said), code=550, text=said)
    return session_failed(
        relay, recipients, 451, said, SessionFault.AUTH if status == 401 else None
    )

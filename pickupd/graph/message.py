"""The copy of a message that goes to Microsoft Graph, and what Graph would do with it.

Graph takes a MIME message's recipients from its header fields, not from an envelope: so the
copy gets a `Bcc:` field naming exactly the envelope recipients that To: and Cc: do not (the
message as relayed has no Bcc: of its own: envelope.py cuts it out). A To: or Cc: address
that is not an envelope recipient (a pickup file whose X-Receiver: lines are narrower than
its header) would be delivered by Graph: such a message is refused, never sent.

The request body is the base64 of the message; Graph refuses a request over 4 MB, so a
message over about 3 MB is refused before it is sent, naming the limit.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from pickupd.message.envelope import header_addresses
from pickupd.outcome import Reason, Refusal

__all__ = ["REQUEST_LIMIT", "for_graph"]

# Microsoft Graph's limit on a request's body (the base64 of the message).
REQUEST_LIMIT = 4 * 1024 * 1024


def for_graph(data: bytes, recipients: Sequence[str]) -> bytes | Refusal:
    """The request body for `data` to `recipients` (base64, with the Bcc: Graph needs), or
    why it may not go through Graph."""
    envelope = {address.lower() for address in recipients}
    named = header_addresses(data, ("to", "cc"))
    beyond = sorted({address for address in named if address.lower() not in envelope})
    if beyond:
        return Refusal(
            Reason.RECIPIENTS_MISMATCH,
            f"To:/Cc: name {', '.join(beyond)}, not envelope recipients: Microsoft Graph"
            " delivers to every address of the header, so this message would reach them",
        )
    shown = {address.lower() for address in named}
    hidden = [address for address in recipients if address.lower() not in shown]
    if hidden:
        data = b"Bcc: " + ", ".join(hidden).encode() + b"\r\n" + data
    size = 4 * -(-len(data) // 3)
    if size > REQUEST_LIMIT:
        return Refusal(
            Reason.TOO_LARGE,
            f"{len(data)} bytes: {size} as base64, over Microsoft Graph's request limit of"
            f" {REQUEST_LIMIT} bytes (about 3 MB of message); send it through an SMTP relay",
        )
    return base64.b64encode(data)

"""Pure policy: an envelope and the config in force -> the sender's rule, or a refusal.

Checked before any connection is made: a message that fails it is never relayed.
"""

from __future__ import annotations

from pickupd.auth.owners import allows, describe_owners, describe_uid
from pickupd.config.loading import Config, SenderRule
from pickupd.message.envelope import Envelope
from pickupd.message.priority import MailClass
from pickupd.outcome import Reason, Refusal

__all__ = ["check", "mail_class"]


def _not_owner(
    rule: SenderRule, address: str, owner: int | None, field: str | None = None
) -> Refusal | None:
    """A refusal if `rule` names owners and the file's owner is none of them."""
    if rule.owners is None or owner is None or allows(rule.owners, owner):
        return None
    where = f"{field}: " if field else ""
    return Refusal(
        Reason.SENDER_NOT_ALLOWED,
        f"{where}{address} may be sent by {describe_owners(rule.owners)}; this file belongs to"
        f" {describe_uid(owner)}",
    )


def check(
    envelope: Envelope, config: Config, size: int, owner: int | None = None
) -> SenderRule | Refusal:
    """Return the `[senders]` entry that allows this message, or why it may not be sent.
    `owner`: the uid that wrote the file (None where there are no uids: Windows)."""
    policy = config.policy
    if envelope.sender is None:
        return Refusal(Reason.NO_SENDER, "no envelope sender (X-Sender, Sender: or a single From:)")
    rule = config.sender_rule(envelope.sender)
    if rule is None:
        return Refusal(Reason.SENDER_NOT_ALLOWED, f"{envelope.sender} matches no [senders] entry")
    refused = _not_owner(rule, envelope.sender, owner)
    if refused is not None:
        return refused
    if policy.check_header_from:
        # What a mail client shows as the author ("on behalf of" for Sender:) must be allowed
        # too, or an allowed envelope could carry a spoofed one.
        for field, address in envelope.authors:
            author = config.sender_rule(address)
            if author is None:
                return Refusal(
                    Reason.HEADER_FROM_NOT_ALLOWED,
                    f"{field}: {address} matches no [senders] entry (envelope sender"
                    f" {envelope.sender} is allowed)",
                )
            refused = _not_owner(author, address, owner, field)
            if refused is not None:
                return refused
    if not envelope.recipients:
        return Refusal(Reason.NO_RECIPIENTS, "no recipient (X-Receiver, To:, Cc: or Bcc:)")
    if len(envelope.recipients) > policy.max_recipients:
        return Refusal(
            Reason.TOO_MANY_RECIPIENTS,
            f"{len(envelope.recipients)} recipients, more than max_recipients ="
            f" {policy.max_recipients}",
        )
    if size > policy.max_message_size:
        return Refusal(
            Reason.TOO_LARGE,
            f"{size} bytes, larger than max_message_size = {policy.max_message_size}",
        )
    return rule


def mail_class(
    envelope: Envelope, rule: SenderRule, config: Config, owner: int | None
) -> MailClass:
    """The message's class under a limit: the sender entry's `mail_class`, else what its
    fields mark, no higher than the entry's `highest_class` nor than `[policy]
    highest_class` allows its writer (the lowest of the writer's entries)."""
    found = (rule.mail_class or envelope.marked).capped(rule.highest_class)
    caps = config.policy.highest_class
    if caps and owner is not None and found is not MailClass.BULK:
        for who, highest in caps:
            if allows((who,), owner):
                found = found.capped(highest)
    return found

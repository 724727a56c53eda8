"""Which limits a message is under, and the ledger's names for them.

Two scopes, named for what the provider counts:
- the relay's account: `[relays.<name>] limits`, all mail through it (SES counts the account
  that logs in there; a relay without a login counts its host);
- the mailbox: `mailbox_limits` of the relay and `limits` of the sender's entry, per login
  (Microsoft 365 and Google count each mailbox; without a login, per sender entry).

Names are built from what the server sees (its host, the login), not from what this config
calls things, so every host of a fleet that sends as one mailbox counts in the same place.
All keys of one message share the relay's host as their `shard` (a Redis Cluster hash tag).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pickupd.auth.logins import Credentials, XOAuth2
from pickupd.config.loading import RelayConfig, SenderRule
from pickupd.limits.ledger import Need
from pickupd.units import Limit, merged

__all__ = ["Applies", "applies"]


@dataclass(frozen=True, slots=True)
class Applies:
    """What a message to `recipients` recipients is under."""

    needs: tuple[Need, ...]  # the counted limits, with what the message takes of each
    scopes: tuple[str, ...]  # whose pauses hold it: the account's, the mailbox's
    mailbox: str  # the ledger's name for the mailbox ("mailbox:host:user")
    account: str
    per_message: tuple[Limit, str] | None  # the smallest recipients/message, and where set
    connections: tuple[tuple[str, int, str], ...]  # (lease key, most, where set)
    shard: str

    def describe(self, needs: Sequence[Need] | None = None) -> str:
        """The limits, as the config names them."""
        return ", ".join(f"{n.scope}: {n.limit}" for n in (self.needs if needs is None else needs))


def applies(
    relay: RelayConfig,
    rule: SenderRule,
    login: Credentials | XOAuth2 | None,
    recipients: int,
) -> Applies:
    """The limits of `relay` and `rule` for one message, as the ledger books them."""
    shard = f"[{relay.host}]" if ":" in relay.host else relay.host.lower()
    user = login.username.lower() if login else f"sender {rule.pattern}"
    relay_login = relay.credentials
    account_user = getattr(relay_login, "username", "") if relay_login else ""
    account = f"account:{shard}:{account_user.lower()}" if account_user else f"account:{shard}"
    mailbox = f"mailbox:{shard}:{user}"
    where_relay = f"relays.{relay.name}.limits"
    where_mailbox = (
        f'senders."{rule.pattern}".limits'
        if rule.limits
        else f"relays.{relay.name}.mailbox_limits ({user})"
    )
    own = merged(relay.mailbox_limits or (), rule.limits or ())
    needs: list[Need] = []
    per_message: tuple[Limit, str] | None = None
    connections: list[tuple[str, int, str]] = []
    for scope, where, limits in (
        (account, where_relay, relay.limits or ()),
        (mailbox, where_mailbox, own),
    ):
        for limit in limits:
            if limit.unit == "per_message":
                if per_message is None or limit.amount < per_message[0].amount:
                    per_message = (limit, where)
            elif limit.unit == "connections":
                connections.append((f"{scope}/connections", limit.amount, where))
            else:
                amount = 1 if limit.unit == "messages" else recipients
                key = f"{scope}/{limit.unit}/{limit.window:g}"
                needs.append(Need(key, limit, amount, where, shard))
    return Applies(
        needs=tuple(needs),
        scopes=(account, mailbox),
        mailbox=mailbox,
        account=account,
        per_message=per_message,
        connections=tuple(connections),
        shard=shard,
    )

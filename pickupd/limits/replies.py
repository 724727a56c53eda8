"""Provider replies classified by how far they reach: one table, from the reply to a scope (the
mailbox or the account behind the relay) and a pause, which the ledger shares with every
process and host that uses it.

A pause holds mail back without an attempt: it waits in deferred/ until the pause ends. A
"spent" reply (a daily quota used up) pauses its scope for a day instead of having each of its
messages retried on the normal schedule, and the message that got it waits too, even though
the reply was 5xx: the mail is fine, the mailbox is not.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pickupd.outcome import Delivery, RecipientResult

__all__ = [
    "PAUSE_FIRST",
    "PAUSE_MAX",
    "SPENT",
    "TABLE",
    "Kind",
    "Rule",
    "as_deferred",
    "classify",
    "explained",
    "is_throttling",
]

PAUSE_FIRST = 10.0
PAUSE_MAX = 300.0
SPENT = 86400.0  # a daily quota rolls over within a day
TENANT = 3600.0


class Kind(enum.Enum):
    """What a reply means for its scope."""

    THROTTLED = "throttled"  # too fast: pause, 10 s at first, doubling up to 5 min
    CONNECTIONS = "connections"  # too many sessions at once: pause new ones, as THROTTLED
    SPENT = "spent"  # a quota is used up: pause for a day, alert
    TENANT = "tenant"  # the tenant's rate: pause the account for an hour
    OAUTH2 = "oauth2"  # this login must use OAuth2: nothing to wait for; say so


@dataclass(frozen=True, slots=True)
class Rule:
    """Replies with a code in `codes` whose text matches `text`."""

    codes: range
    text: re.Pattern[str]
    scope: str  # "mailbox" or "account"
    kind: Kind
    says: str  # for the log and the sidecar

    def matches(self, reply: RecipientResult) -> bool:
        return reply.code in self.codes and bool(self.text.search(reply.text))


def _rule(codes: range, text: str, scope: str, kind: Kind, says: str) -> Rule:
    return Rule(codes, re.compile(text, re.IGNORECASE), scope, kind, says)


_4XX, _5XX, _ANY = range(400, 500), range(500, 600), range(400, 600)
TABLE: tuple[Rule, ...] = (
    _rule(_ANY, r"\b4\.3\.2\b.*concurrent connections", "mailbox", Kind.CONNECTIONS,
          "the mailbox has too many connections open (Microsoft 365: 3)"),
    _rule(_5XX, r"SubmissionQuotaExceeded", "mailbox", Kind.SPENT,
          "the mailbox's daily recipient quota is spent (Microsoft 365: 10,000 a day)"),
    _rule(_5XX, r"\b5\.4\.5\b.*daily user sending limit", "mailbox", Kind.SPENT,
          "the user's daily sending limit is spent (Google: 2,000 messages a day)"),
    _rule(_5XX, r"\b5\.4\.5\b.*daily smtp relay limit", "account", Kind.SPENT,
          "the relay's daily limit is spent (Google SMTP relay)"),
    _rule(_4XX, r"daily message quota exceeded", "account", Kind.SPENT,
          "the account's 24-hour quota is spent (Amazon SES)"),
    _rule(_4XX, r"throttling failure|peak smtp relay limit", "account", Kind.THROTTLED,
          "the account is sending too fast"),
    _rule(_5XX, r"\b5\.7\.23[23]\b", "account", Kind.TENANT,
          "the tenant's external recipient rate is exceeded (Microsoft 365)"),
    _rule(_ANY, r"\b5\.7\.30\b|basic authentication is (not supported|disabled)", "mailbox",
          Kind.OAUTH2, "this login needs OAuth2: the provider no longer takes a password"
          " (see the README, \"OAuth2 logins\")"),
)  # fmt: skip
# Other replies that say "you are sending too fast", as opposed to "try later, I am broken".
_THROTTLING = re.compile(
    r"throttl|rate[ -]?limit|too many (messages|mails|connections|recipients)|sending rate"
    r"|slow down|\b4\.7\.(28|500)\b",
    re.IGNORECASE,
)


def is_throttling(code: int | None, text: str) -> bool:
    """True for a transient reply that asks us to send more slowly."""
    return code is not None and 400 <= code < 500 and bool(_THROTTLING.search(text))


def classify(delivery: Delivery) -> tuple[Rule, RecipientResult] | None:
    """The first rule any reply of `delivery` matches (the attempt's own reply included)."""
    replies: Iterable[RecipientResult] = (*delivery.deferred, *delivery.rejected)
    if delivery.code:
        replies = (*replies, RecipientResult("", delivery.code, delivery.text))
    replies = tuple(replies)
    for rule in TABLE:
        for reply in replies:
            if rule.matches(reply):
                return rule, reply
    for reply in delivery.deferred:
        if is_throttling(reply.code, reply.text):
            return _GENERIC, reply
    return None


_GENERIC = Rule(_4XX, _THROTTLING, "account", Kind.THROTTLED, "the relay asked to slow down")


def explained(delivery: Delivery, says: str) -> Delivery:
    """The replies of `delivery`, prefixed with what they mean."""

    def told(results: tuple[RecipientResult, ...]) -> tuple[RecipientResult, ...]:
        return tuple(dataclasses.replace(r, text=f"{says}: {r.text}") for r in results)

    return dataclasses.replace(
        delivery, deferred=told(delivery.deferred), rejected=told(delivery.rejected)
    )


def as_deferred(delivery: Delivery, says: str) -> Delivery:
    """A quota refusal: the mail is fine, the mailbox is not. Its recipients wait."""
    told = explained(delivery, says)
    return dataclasses.replace(told, deferred=told.deferred + told.rejected, rejected=())

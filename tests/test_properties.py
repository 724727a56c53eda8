"""Property-based tests (hypothesis) of the one header parser and the policy: parse never
raises, and no header set, however odd, gets relayed with an author the allow-list does not
match, not as pickupd reads it and not as a second, lenient parser (Python's email package,
standing in for a mail client) reads the bytes pickupd would relay."""

from __future__ import annotations

import email
import email.policy
import email.utils

from configs import unit_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pickupd import policy
from pickupd.message import addresses, envelope
from pickupd.outcome import Refusal

CONFIG = unit_config()
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces an attacker would combine: allowed and forbidden addresses, display names, quotes,
# comments, brackets, encoded words, group syntax, odd whitespace and separators.
ADDRESSES = st.sampled_from(
    [
        "app@example.com",
        "APP@Example.COM",
        "boss@corp.example",
        "ceo@evil.example",
        "app@example.com.evil.example",
        "app@corp.example.evil",
        "evil@[127.0.0.1]",
        '"app@example.com"@evil.example',
        "app%example.com@evil.example",
        "root",
        "<>",
        "",
    ]
)
PIECES = st.sampled_from(
    [
        " ",
        "\t",
        ", ",
        ";",
        ":",
        '"',
        '"App" ',
        "(comment)",
        "(app@example.com)",
        "<",
        ">",
        "=?utf-8?q?app=40example.com?= ",
        "Team: ",
        "\\",
        "@",
        ".",
        "\r\n ",
        "\x00",
        "é",
    ]
)
VALUES = st.lists(st.one_of(ADDRESSES, PIECES), min_size=1, max_size=6).map("".join)
FIELDS = st.sampled_from(
    [
        "From",
        "Sender",
        "Resent-From",
        "Resent-Sender",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "X-Sender",
        "X-Receiver",
        "Subject",
        "from",
        "FROM ",
    ]
)
HEADERS = st.lists(st.tuples(FIELDS, VALUES), min_size=1, max_size=6)


def allowed(address: str) -> bool:
    return CONFIG.sender_rule(address) is not None


@SETTINGS
@given(st.binary(max_size=3000))
def test_parse_never_raises_on_any_bytes(raw: bytes) -> None:
    """Any bytes at all give an Envelope or a Refusal, never an exception."""
    assert isinstance(envelope.parse(raw), envelope.Envelope | Refusal)


@SETTINGS
@given(HEADERS, st.booleans())
def test_no_header_set_relays_an_author_the_allow_list_does_not_match(
    headers: list[tuple[str, str]], crlf: bool
) -> None:
    """Whatever the header fields: if the policy lets the message go, its envelope sender
    and every author field (From, Sender, Resent-From, Resent-Sender) match the allow-list,
    and a lenient parser reading the relayed bytes finds no other author either."""
    eol = "\r\n" if crlf else "\n"
    text = "".join(f"{name}: {value}{eol}" for name, value in headers) + eol + "body" + eol
    raw = text.encode("utf-8", "surrogateescape")
    parsed = envelope.parse(raw)
    if isinstance(parsed, Refusal):
        return
    decision = policy.check(parsed, CONFIG, len(raw))
    if isinstance(decision, Refusal):
        return
    assert parsed.sender is not None and allowed(parsed.sender)
    assert all(allowed(address) for _, address in parsed.authors)
    relayed = email.message_from_bytes(parsed.data, policy=email.policy.compat32)
    for name in ("From", "Sender", "Resent-From", "Resent-Sender"):
        for value in relayed.get_all(name, []):
            for _, address in email.utils.getaddresses([str(value)]):
                if "@" in address:
                    assert allowed(address), (name, value, parsed)


WORDS = st.sampled_from(["App", "Bench", "x", "O'Neil", "a-b", "Z_9", "{it}", "~", "#1"])
SPECS = st.sampled_from(
    ["app@example.com", "a.b@c.d", "x+tag@sub.example.org", "o'neil@example.com", "-@-"]
)
SPACE = st.sampled_from(["", " ", "\t", "  "])


@SETTINGS
@given(st.lists(WORDS, max_size=4), SPECS, SPACE, SPACE, SPACE, st.booleans())
def test_the_fast_path_reads_simple_addresses_as_the_full_parser_does(
    words: list[str], spec: str, before: str, between: str, after: str, angle: bool
) -> None:
    """`Name <addr>` and bare `addr` values, taken by regular expressions without the
    tokenizer, give exactly what the full RFC 5322 parser gives; so does `<>`."""
    if angle or words:
        value = f"{before}{' '.join(words)}{between}<{spec}>{after}"
    else:
        value = f"{before}{spec}{after}"
    full = addresses._Parser(value).addresses("end")
    assert addresses.qualify(value, None) == (full, None)
    null = f"{before}<{between}>{after}"
    assert addresses.is_null(null)
    assert [t.kind for t in addresses._tokenize(null)] == ["<", ">", "end"]
    assert not addresses.is_null(value)

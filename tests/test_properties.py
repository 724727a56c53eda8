"""Property-based tests (hypothesis) of the one header parser and the policy: parse never
raises, and no header set, however odd, gets relayed with an author the allow-list does not
match, not as pickupd reads it and not as a second, lenient parser (Python's email package,
standing in for a mail client) reads the bytes pickupd would relay."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils

from configs import unit_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pickupd import policy
from pickupd.config.loading import SenderRule
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


# ---- One canonical form: no spelling of an address reaches another entry's rule.

ALICE_AND_DOMAIN = dataclasses.replace(
    CONFIG,
    senders=(
        SenderRule(pattern="alice@example.com", relay="m"),
        SenderRule(pattern="*@example.com", relay="m"),
    ),
)
LOCAL_CHARS = st.sampled_from(list('aliceALICE.+-_ "\\@(),é'))
LOCALS = st.text(LOCAL_CHARS, min_size=1, max_size=8)


def _quoted(local: str, escape: list[bool]) -> str:
    """`local` as a quoted-string, each character escaped where `escape` says (and where it
    must be: `"` and `\\`)."""
    out = []
    for char, wanted in zip(local, escape + [False] * len(local), strict=False):
        out.append(f"\\{char}" if wanted or char in '"\\' else char)
    return '"' + "".join(out) + '"'


def _mixed_case(text: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if flip else c.lower()
        for c, flip in zip(text, flips + [False] * len(text), strict=False)
    )


@SETTINGS
@given(
    LOCALS,
    st.lists(st.booleans(), max_size=8),
    st.lists(st.booleans(), max_size=11),
    st.sampled_from(["{a}", "<{a}>", "Alice <{a}>", '"A, B" <{a}>', "{a} (c)", "x\r\n <{a}>"]),
    st.sampled_from(["From", "X-Sender"]),
)
def test_every_spelling_of_an_address_reaches_only_the_entry_its_canonical_form_names(
    local: str, escape: list[bool], flips: list[bool], shape: str, field: str
) -> None:
    """A local part written quoted, with quoted-pairs or as a dot-atom, a domain in any case,
    inside any display form: the envelope sender is the one canonical address, and the rule
    that applies is the one that address names: `"alice"@`, `"al\\ice"@` and
    `alice@EXAMPLE.com` reach alice's entry, never the domain's; anything else never reaches
    alice's."""
    domain = _mixed_case("example.com", flips)
    spelled = f"{_quoted(local, escape)}@{domain}"
    value = shape.format(a=spelled)
    if field == "X-Sender":
        if shape != "<{a}>":
            return
        raw = f"X-Sender: {value}\r\nX-Receiver: <b@example.net>\r\n\r\nbody\r\n".encode()
    else:
        raw = f"From: {value}\r\nTo: b@example.net\r\n\r\nbody\r\n".encode()
    parsed = envelope.parse(raw)
    content_ok = "\\" not in local and '"' not in local  # (both fine, but tested below)
    if isinstance(parsed, Refusal):
        return
    assert parsed.sender is not None
    sender_local, _, sender_domain = parsed.sender.rpartition("@")
    assert sender_domain == "example.com"
    # The canonical form reads back as itself: parsing it again changes nothing.
    assert envelope.parse_address_list(parsed.sender) == [parsed.sender]
    rule = ALICE_AND_DOMAIN.sender_rule(parsed.sender)
    assert rule is not None
    is_alice = local.lower() == "alice"
    assert (rule.pattern == "alice@example.com") == is_alice, (value, parsed.sender)
    if is_alice or (content_ok and addresses._DOT_ATOM.fullmatch(local)):
        assert sender_local == local  # a dot-atom in its content is written without quotes

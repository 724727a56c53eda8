"""Tests for pickupd.envelope: the envelope and the relayed bytes of a dropped mail file."""

from __future__ import annotations

import pytest

from pickupd.message.envelope import AddressError, Envelope, parse, parse_address_list
from pickupd.outcome import Reason, Refusal


def envelope(raw: bytes) -> Envelope:
    result = parse(raw)
    assert isinstance(result, Envelope), result
    return result


def refusal(raw: bytes, max_header_size: int = 65536) -> str:
    result = parse(raw, max_header_size=max_header_size)
    assert isinstance(result, Refusal), result
    assert result.reason is Reason.MALFORMED
    assert result.detail.isprintable(), result.detail
    return result.detail


# ---- plain messages


def test_plain_from_to_cc_bcc() -> None:
    """From gives the sender; To, Cc and Bcc give the recipients; the Bcc line is not relayed."""
    raw = (
        b"From: Alice <alice@example.com>\r\n"
        b"To: bob@example.com, Carol <carol@example.com>\r\n"
        b"Cc: dave@example.com\r\n"
        b"Bcc: eve@example.com\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Hello\r\n"
    )
    env = envelope(raw)
    assert env.sender == "alice@example.com"
    assert env.header_from == ("alice@example.com",)
    assert env.recipients == (
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
        "eve@example.com",
    )
    assert env.data == raw.replace(b"Bcc: eve@example.com\r\n", b"")
    assert env.message_id is None


def test_repeated_recipient_headers_and_case_insensitive_duplicates() -> None:
    """Every To/Cc occurrence counts, and A@X after a@x is a duplicate: the first spelling wins
    (its domain in lower case: the canonical form)."""
    raw = b"From: a@x\r\nTo: Bob@Example.com\r\nTo: c@x\r\nCc: bob@example.COM, C@X, d@x\r\n\r\n"
    assert envelope(raw).recipients == ("Bob@example.com", "c@x", "d@x")


def test_sender_header_takes_precedence() -> None:
    """Sender: is the envelope sender even when From: has a single address."""
    env = envelope(b"From: a@x\r\nSender: secretary@x\r\nTo: b@y\r\n\r\nhi\r\n")
    assert env.sender == "secretary@x"
    assert env.header_from == ("a@x",)


def test_several_from_addresses_without_sender() -> None:
    """A From: with two authors and no Sender: leaves the sender unknown (None)."""
    env = envelope(b"From: a@x, b@x\r\nTo: c@y\r\n\r\n")
    assert env.sender is None
    assert env.header_from == ("a@x", "b@x")


def test_several_from_addresses_with_sender() -> None:
    """With several authors, Sender: names the envelope sender."""
    env = envelope(b"From: a@x, b@x\r\nSender: b@x\r\nTo: c@y\r\n\r\n")
    assert env.sender == "b@x"


def test_null_sender() -> None:
    """`<>` in From:, Sender: or X-Sender: is the null sender: None, not malformed."""
    assert envelope(b"From: <>\r\nTo: b@y\r\n\r\n").sender is None
    assert envelope(b"From: <>\r\nTo: b@y\r\n\r\n").header_from == ()
    assert envelope(b"From: a@x\r\nSender: <> (bounce)\r\nTo: b@y\r\n\r\n").sender is None
    assert envelope(b"X-Sender: <>\r\nX-Receiver: b@y\r\n\r\n").sender is None


def test_no_from_and_empty_to() -> None:
    """Without From: the sender is None; an empty To: adds nothing and is not an error."""
    env = envelope(b"To:\r\nCc: \r\nSubject: x\r\n\r\n")
    assert (env.sender, env.recipients, env.header_from) == (None, (), ())


def test_message_id() -> None:
    """message_id is the first Message-ID value, stripped (folding included)."""
    env = envelope(b"Message-ID:\r\n <1@x>  \r\nMessage-ID: <2@x>\r\n\r\n")
    assert env.message_id == "<1@x>"


def test_folded_address_header() -> None:
    """Addresses may be folded over several lines wherever whitespace is allowed."""
    env = envelope(b"From: a@x\r\nTo: Bob\r\n <bob@y>,\r\n\tcarol@y (the\r\n boss)\r\n\r\n")
    assert env.recipients == ("bob@y", "carol@y")


# ---- the IIS / System.Net.Mail pickup format


PICKUP = (
    b"X-Sender: app@example.com\r\n"
    b"X-Receiver: <bob@example.com>\r\n"
    b"x-receiver: hidden@example.com\r\n"
    b"MIME-Version: 1.0\r\n"
    b"From: Shop <shop@example.com>\r\n"
    b"To: someone-else@example.com\r\n"
    b"Bcc: also-hidden@example.com\r\n"
    b"X-Sender: later@example.com\r\n"
    b"Subject: order\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_pickup_format_gives_envelope_and_is_removed() -> None:
    """Leading X-Sender/X-Receiver lines are the envelope; To/Bcc add no one; they are cut out."""
    env = envelope(PICKUP)
    assert env.sender == "app@example.com"
    assert env.recipients == ("bob@example.com", "hidden@example.com")
    assert env.header_from == ("shop@example.com",)
    assert env.data == (
        b"MIME-Version: 1.0\r\n"
        b"From: Shop <shop@example.com>\r\n"
        b"To: someone-else@example.com\r\n"
        b"X-Sender: later@example.com\r\n"
        b"Subject: order\r\n"
        b"\r\n"
        b"body\r\n"
    )


def test_pickup_receiver_list_and_lf_endings() -> None:
    """An X-Receiver may hold a list; the format is recognised with LF line endings too."""
    env = envelope(b"x-sender: a@x\nX-RECEIVER: b@y, c@y\nX-Receiver: B@Y\n\nbody\n")
    assert env.recipients == ("b@y", "c@y")
    assert env.data == b"\r\nbody\r\n"


def test_late_x_sender_is_an_ordinary_header() -> None:
    """X-Sender/X-Receiver after other headers are ignored for the envelope and relayed as is."""
    raw = b"From: a@x\r\nTo: b@y\r\nX-Sender: evil@z\r\nX-Receiver: \xff<evil@z\r\n\r\n"
    env = envelope(raw)
    assert (env.sender, env.recipients, env.data) == ("a@x", ("b@y",), raw)


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (
            b"X-Sender: a@x\r\nX-Sender: b@x\r\nX-Receiver: c@y\r\n\r\n",
            "more than one X-Sender: header",
        ),
        (b"X-Receiver: c@y\r\nTo: d@y\r\n\r\n", "no X-Sender: header"),
        (b"X-Sender: a@x\r\nTo: d@y\r\n\r\n", "no X-Receiver: header"),
        (b"X-Sender: a@x, b@x\r\nX-Receiver: c@y\r\n\r\n", "X-Sender: more than one address"),
        (b"X-Sender: a@x\r\nX-Receiver:\r\n\r\n", "X-Receiver: no address"),
        (b"X-Sender: a@x\r\nX-Receiver: <>\r\n\r\n", "X-Receiver: empty <>"),
        (b"X-Sender: a@x\r\nX-Receiver: c@y\r\nTo: d@y)\r\n\r\n", "To: unbalanced parenthesis"),
    ],
)
def test_bad_pickup_envelope(raw: bytes, detail: str) -> None:
    """A leading X-Sender/X-Receiver block that is not one sender plus receivers is refused."""
    assert refusal(raw) == detail


# ---- Bcc removal and byte fidelity


def test_bcc_with_continuation_lines_removed() -> None:
    """Every Bcc: field goes, folded continuation lines included; the rest stays as is."""
    raw = (
        b"From: a@x\r\n"
        b"Bcc: one@y,\r\n"
        b"  two@y\r\n"
        b"To: t@y\r\n"
        b"bcc: three@y,\r\n"
        b"\tfour@y (folded)\r\n"
        b"Subject: s\r\n"
        b"\r\n"
        b"Bcc: not-a-header@y\r\n"
    )
    env = envelope(raw)
    assert env.recipients == ("one@y", "two@y", "t@y", "three@y", "four@y")
    assert env.data == b"From: a@x\r\nTo: t@y\r\nSubject: s\r\n\r\nBcc: not-a-header@y\r\n"


def test_lf_line_endings_become_crlf() -> None:
    """Bare LF line endings, in headers and body, are turned into CRLF."""
    env = envelope(b"From: a@x\nTo: b@y\n\nline 1\nline 2\n")
    assert env.data == b"From: a@x\r\nTo: b@y\r\n\r\nline 1\r\nline 2\r\n"


def test_mixed_line_endings_become_crlf() -> None:
    """CRLF, lone LF and lone CR all become one CRLF each; CR LF is never doubled."""
    env = envelope(b"From: a@x\rTo: b@y\r\nSubject: s\n\r\na\rb\nc\r\n\n\r\rend")
    assert env.data == b"From: a@x\r\nTo: b@y\r\nSubject: s\r\n\r\na\r\nb\r\nc\r\n\r\n\r\n\r\nend"
    assert env.recipients == ("b@y",)


def test_utf8_headers_and_body_preserved() -> None:
    """UTF-8 in names, addresses, other headers and body passes byte for byte (RFC 6532)."""
    raw = (
        "From: Jörg Müller <jörg@bücher.example>\r\n"
        'To: "Zoë" <zoë@example.com>\r\n'
        "Subject: Grüße 🎉\r\n"
        "\r\n"
        "Héllo wörld 🎉\r\n"
    ).encode()
    env = envelope(raw)
    assert env.sender == "jörg@bücher.example"
    assert env.recipients == ("zoë@example.com",)
    assert env.data == raw


def test_eight_bit_body_and_other_headers_preserved() -> None:
    """Non-UTF-8 bytes in the body or in an unrelated header are relayed untouched."""
    raw = b"From: a@x\r\nTo: b@y\r\nSubject: caf\xe9\r\n\r\n\x00\x80\xff caf\xe9\r\n"
    assert envelope(raw).data == raw


def test_no_blank_line_and_no_final_newline() -> None:
    """A message that is only headers is fine; a missing final newline is not invented."""
    assert envelope(b"From: a@x\nTo: b@y").data == b"From: a@x\r\nTo: b@y"


def test_no_header_section() -> None:
    """A file that starts with an empty line has no headers: no sender, no recipients."""
    env = envelope(b"\nbody only\n")
    assert (env.sender, env.recipients, env.data) == (None, (), b"\r\nbody only\r\n")


# ---- malformed files


def test_empty_file() -> None:
    """An empty or whitespace-only file is malformed."""
    assert refusal(b"") == "empty file"
    assert refusal(b" \r\n\t\n") == "empty file"


def test_header_size_limit() -> None:
    """The header section (CRLF endings, up to the empty line) may not exceed the limit."""
    head = b"From: a@x\r\nTo: b@y\r\n"  # 20 bytes
    assert isinstance(parse(head + b"\r\n" + b"x" * 1000, max_header_size=20), Envelope)
    assert refusal(head + b"\r\nbody", max_header_size=19) == "header section larger than 19 bytes"
    big = b"From: a@x\r\nSubject: " + b"x" * 70000 + b"\r\n\r\n"
    assert refusal(big) == "header section larger than 65536 bytes"


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b" From: a@x\r\nTo: b@y\r\n\r\n", "line 1 starts with whitespace"),
        (b"From: a@x\r\nTo b@y\r\n\r\n", "line 2 is not a header field"),
        (b"From a@x Mon Jan  1 00:00:00 2024\nFrom: a@x\n\n", "line 1 is not a header field"),
        (b"From: a@x\r\nSubject : s\r\n\r\n", "line 2 is not a header field"),
        (b"From: a@x\r\n: no name\r\n\r\n", "line 2 is not a header field"),
        (b"From: a@x\r\nTo: b@y\r\n\x00bad: x\r\n\r\n", "line 3 is not a header field"),
        (b"From: a@x\r\nFrom: b@x\r\nTo: c@y\r\n\r\n", "more than one From: header"),
        (b"From: a@x\r\nSender: a@x\r\nsender: b@x\r\n\r\n", "more than one Sender: header"),
        (b"From: a@x\r\nSender: a@x, b@x\r\n\r\n", "Sender: more than one address"),
        (b"From: a@x\r\nSender:\r\n\r\n", "Sender: no address"),
        (b"From: J\xf6rg <a@x>\r\nTo: b@y\r\n\r\n", "From: invalid UTF-8"),
        (b"From: a@x\r\nCc: \xff@y\r\n\r\n", "Cc: invalid UTF-8"),
        (b'From: "a@x\r\nTo: b@y\r\n\r\n', "From: unbalanced quote"),
        (b"From: a@x\r\nTo: b\x01@y\r\n\r\n", "To: control character '\\x01'"),
        (b"From: a@x\r\nBcc: b@y,,c@y\r\n\r\n", "Bcc: empty element in list"),
    ],
)
def test_malformed_files(raw: bytes, detail: str) -> None:
    """Broken header lines, ambiguous senders and bad address headers are refused."""
    assert refusal(raw) == detail


# ---- addresses


MALFORMED_ADDRESSES = [
    # CVE-2023-27043 (CPython issue #102988): a valid address followed by junk.
    "alice@example.org(<bob@example.org>",
    "alice@example.org)<bob@example.org>",
    "alice@example.org<<bob@example.org>",
    "alice@example.org><bob@example.org>",
    "alice@example.org@<bob@example.org>",
    "alice@example.org;<bob@example.org>",
    "alice@example.org:<bob@example.org>",
    "alice@example.org.<bob@example.org>",
    'alice@example.org"<bob@example.org>',
    "alice@example.org[<bob@example.org>",
    "alice@example.org]<bob@example.org>",
    "alice@example.org\\<bob@example.org>",
    "alice@example.org<bob@example.org>",
    "alice@example.org, <bob@evil",
    # unbalanced
    '"alice@example.org',
    "(alice@example.org",
    "alice@example.org)",
    "<alice@example.org",
    "alice@example.org>",
    "a@[192.0.2.1",
    "Alice <alice@example.org> (comment",
    # controls
    "alice@example.org\r\n bob@example.org",
    "alice\x00@example.org",
    "ali\x07ce@example.org",
    "(\x1b[31m) alice@example.org",
    "alice@example.org\x7f",
    '"\x01"@example.org',
    # grammar
    "alice bob@example.org",
    "alice@example.org bob@example.org",
    "<alice@example.org> <bob@example.org>",
    "alice",
    "@example.org",
    "alice@",
    "<>",
    "<@route.example:alice@example.org>",
    "alice@example.org,,bob@example.org",
    "alice@example.org,",
    ",alice@example.org",
    "alice@.example.org",
    "alice@example.org.",
    "alice@example..org",
    "alice.@example.org",
    ".alice@example.org",
    "al..ice@example.org",
    "alice . smith@example.org",
    '""@example.org',
    "a@[]",
    "team: alice@example.org",
    "team: sub: alice@example.org;;",
    "alice@example.org;",
    "alice\\@example.org",
]


@pytest.mark.parametrize("value", MALFORMED_ADDRESSES)
def test_malformed_address(value: str) -> None:
    """Each value is refused by parse_address_list and makes the whole file MALFORMED."""
    with pytest.raises(AddressError):
        parse_address_list(value)
    detail = refusal(b"From: a@x\r\nTo: " + value.encode() + b"\r\n\r\n")
    assert detail.startswith("To: ")


VALID_ADDRESSES = [
    ("alice@example.org", ["alice@example.org"]),
    ('"Alice Liddell" <alice@example.org>', ["alice@example.org"]),
    ("Alice Liddell <alice@example.org>", ["alice@example.org"]),
    ("J. R. Smith <jrs@example.org>", ["jrs@example.org"]),
    ("<alice@example.org>", ["alice@example.org"]),
    ("alice@example.org (Alice)", ["alice@example.org"]),
    ("(Alice) alice@example.org", ["alice@example.org"]),
    ("(a (nested \\) comment) here) alice (x) @ (y) example.org", ["alice@example.org"]),
    ('"a \\" quote" <alice@example.org>', ["alice@example.org"]),
    ("=?utf-8?q?J=C3=B6rg?= <joerg@example.org>", ["joerg@example.org"]),
    ("Jörg Müller <jörg@bücher.example>", ["jörg@bücher.example"]),
    ('"quoted local"@example.org', ['"quoted local"@example.org']),
    ('"alice@example.org"@evil', ['"alice@example.org"@evil']),
    ("alice@[192.0.2.1]", ["alice@[192.0.2.1]"]),
    ("<alice@[IPv6:2001:db8::1]>", ["alice@[IPv6:2001:db8::1]"]),
    ("first.last+tag@sub.example.org", ["first.last+tag@sub.example.org"]),
    ("undisclosed-recipients:;", []),
    ("team: a@x, B <b@y>;, c@z", ["a@x", "b@y", "c@z"]),
    ("alice@example.org,<bob@example.org>", ["alice@example.org", "bob@example.org"]),
    (" a@x ,\tb@y , C <c@z> ", ["a@x", "b@y", "c@z"]),
    ("", []),
    ("  (nobody) ", []),
]


@pytest.mark.parametrize(("value", "expected"), VALID_ADDRESSES)
def test_valid_address(value: str, expected: list[str]) -> None:
    """Ordinary forms parse to the canonical addr-spec(s), comments and whitespace removed."""
    assert parse_address_list(value) == expected
    env = envelope(b"From: a@x\r\nTo: " + value.encode() + b"\r\n\r\n")
    assert list(env.recipients) == expected


def test_address_error_is_a_pickupd_error_with_a_printable_reason() -> None:
    """AddressError belongs to pickupd's one error tree, and its text escapes control
    characters."""
    from pickupd.errors import MessageError, PickupdError

    with pytest.raises(AddressError, match=r"control character '\\x1b'") as raised:
        parse_address_list("a\x1b@x")
    assert isinstance(raised.value, MessageError) and isinstance(raised.value, PickupdError)


@pytest.mark.parametrize(
    "value",
    ["app@example.com", " a.b+c@x-y.example ", "o'neil@example.com", "x@localhost", "a/b=c@d"],
)
def test_bare_address_fast_path_agrees_with_the_full_parser(value: str) -> None:
    """The fast path for a bare addr-spec returns exactly what the full parser returns."""
    from pickupd.message.addresses import _Parser

    assert parse_address_list(value) == _Parser(value).addresses("end") == [value.strip()]


# ---- [policy] local_domain: bare local parts qualified, strictness kept


@pytest.mark.parametrize(
    ("raw", "sender", "recipients", "relayed_head"),
    [
        (
            b"From: root (Cron Daemon)\nTo: root\n\nx\n",
            "root@example.com",
            ("root@example.com",),
            b"From: root@example.com (Cron Daemon)\r\nTo: root@example.com\r\n",
        ),
        (
            b'From: "Cron" <root>\nTo: a@b.example, bob\n\nx\n',
            "root@example.com",
            ("a@b.example", "bob@example.com"),
            b'From: "Cron" <root@example.com>\r\nTo: a@b.example, bob@example.com\r\n',
        ),
        (
            b"X-Sender: <www-data>\nX-Receiver: ops\nFrom: app@example.com\n\nx\n",
            "www-data@example.com",
            ("ops@example.com",),
            b"From: app@example.com\r\n",
        ),
    ],
)
def test_local_domain_qualifies_bare_names(
    raw: bytes, sender: str, recipients: tuple[str, ...], relayed_head: bytes
) -> None:
    """With local_domain, bare names are qualified in the envelope and in the relayed fields."""
    parsed = parse(raw, local_domain="example.com")
    assert isinstance(parsed, Envelope), parsed
    assert parsed.sender == sender and parsed.recipients == recipients
    assert parsed.data.startswith(relayed_head + b"\r\n")


@pytest.mark.parametrize(
    "value",
    [
        "John Smith",  # a display name without an address is not a bare local part
        "alice@example.org)<bob>",  # CVE-2023-27043 shapes stay malformed
        "<root",
        "root@",
        "root.",
        "ro ot",
    ],
)
def test_local_domain_keeps_the_parser_strict(value: str) -> None:
    """local_domain qualifies bare names only: every other malformed form is still refused."""
    raw = f"From: {value}\nTo: x@example.net\n\nx\n".encode()
    parsed = parse(raw, local_domain="example.com")
    assert isinstance(parsed, Refusal) and parsed.reason is Reason.MALFORMED, (value, parsed)


def test_local_domain_qualifies_what_a_mail_client_shows() -> None:
    """A quoted display name that looks like an address is a name: the address is <bob>."""
    parsed = parse(b'From: "alice@example.org" <bob>\n\nx\n', local_domain="example.com")
    assert isinstance(parsed, Envelope) and parsed.sender == "bob@example.com"


def test_without_local_domain_a_bare_name_names_the_setting() -> None:
    """Without local_domain a bare name is malformed, and the detail names the setting."""
    parsed = parse(b"From: root\nTo: a@example.net\n\nx\n")
    assert isinstance(parsed, Refusal) and parsed.reason is Reason.MALFORMED
    assert "[policy] local_domain" in parsed.detail


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (b"X-Sender: <a@x> FOO\x01\r\nX-Receiver: b@y\r\n", "control character"),
        (b"X-Sender: <a@x>BODY=8BITMIME\r\nX-Receiver: b@y\r\n", "no space after the address"),
        (b"X-Sender: <a@x> =x\r\nX-Receiver: b@y\r\n", "not an ESMTP parameter: '=x'"),
        (b"X-Sender: a@x\r\nX-Receiver: <b@y> NOTIFY=NEVER ?bad\r\n", "not an ESMTP parameter"),
    ],
)
def test_envelope_lines_with_bad_parameters_are_malformed(head: bytes, detail: str) -> None:
    """Parameters after an X-Sender / X-Receiver address must be ESMTP keyword[=value]."""
    assert detail in refusal(head + b"\r\nbody\r\n")


def test_envelope_lines_keep_dsn_parameters_only() -> None:
    """RET/ENVID of X-Sender and NOTIFY/ORCPT of each X-Receiver are kept (folded lines
    too); BODY, SIZE and others are dropped; the null sender <> takes parameters too."""
    parsed = envelope(
        b"X-Sender: <> RET=FULL BODY=8BITMIME SIZE=9\r\n"
        b"X-Receiver: <b@y> NOTIFY=NEVER\r\n ORCPT=rfc822;b@y\r\n"
        b"X-Receiver: c@y\r\n\r\nx\r\n"
    )
    assert parsed.sender is None and parsed.recipients == ("b@y", "c@y")
    assert parsed.dsn.mail == ("RET=FULL",)
    assert parsed.dsn.for_recipient("B@Y") == ("NOTIFY=NEVER", "ORCPT=rfc822;b@y")
    assert parsed.dsn.for_recipient("c@y") == ()

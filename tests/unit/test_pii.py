"""PII detection edges: every length a format allows, checksums, whole-span redaction."""

import time
import unicodedata
from typing import Any

import pytest

from routecache.router import pii
from routecache.router.pii import PiiValidator, find_pii, redact


def found(text: str, kinds: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    findings = find_pii(text) if kinds is None else find_pii(text, kinds)
    return [(f.kind, text[f.start : f.end]) for f in findings]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("IBAN DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX", "iban", "DE89 3704 0044 0532 0130 00"),
        ("IBAN DE89370400440532013000 BIC COBADEFFXXX", "iban", "DE89370400440532013000"),
        ("pay to DE89 3704 0044 0532 0130 00 EUR 120 today", "iban", "DE89 3704 0044 0532 0130 00"),
        ("card 4111 1111 1111 1111 12/25", "card", "4111 1111 1111 1111"),
        ("card 4111111111111111 123 is the CVV", "card", "4111111111111111"),
        ("amex 3782 8224 6310 005 12/25", "card", "3782 8224 6310 005"),
        ("amex 3782 822463 10005 12/25", "card", "3782 822463 10005"),  # as Amex prints it
    ],
)
def test_a_number_followed_by_more_words_or_digits_is_still_found(
    text: str, kind: str, value: str
) -> None:
    # Before: the greedy match took in the BIC, the currency or the expiry date, failed its
    # checksum, and the IBAN or card number went out unredacted.
    assert found(text) == [(kind, value)]


def test_a_list_of_small_numbers_is_not_cut_down_to_a_card() -> None:
    # Only groups of 3+ digits are retried shorter: a list gets one Luhn check, not one per cut.
    assert found("pick 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18", ("card",)) == []


def test_redaction_keeps_what_follows_the_number() -> None:
    redacted = PiiValidator().redact(
        "IBAN DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX, card 4111 1111 1111 1111 12/25"
    )
    assert redacted == "IBAN [REDACTED IBAN] BIC COBADEFFXXX, card [REDACTED CARD] 12/25"


def test_an_iban_whose_digits_pass_the_luhn_check_is_one_iban() -> None:
    # Before: cards were checked first, so about one spaced IBAN in ten was taken for a card
    # from its third character on, leaving "DE" and the last digits in clear.
    text = "pay to DE35 3704 0044 0532 0130 02 today"
    assert found(text) == [("iban", "DE35 3704 0044 0532 0130 02")]
    assert PiiValidator().redact(text) == "pay to [REDACTED IBAN] today"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("card 4222222222222 expires", "card", "4222222222222"),  # 13 digits, the shortest
        ("card 6222 0200 0000 0000 000 expires", "card", "6222 0200 0000 0000 000"),  # 19
        ("IBAN NO93 8601 1117 947 now", "iban", "NO93 8601 1117 947"),  # 15, the shortest
        (
            "IBAN RU84 0445 2522 5407 0281 0412 3456 7890 1 now",  # 33, the longest in use
            "iban",
            "RU84 0445 2522 5407 0281 0412 3456 7890 1",
        ),
        ("call +999 1234 5678 9012 now", "phone", "+999 1234 5678 9012"),  # 15, E.164's most
    ],
)
def test_the_shortest_and_longest_of_each_format_are_found(
    text: str, kind: str, value: str
) -> None:
    assert found(text) == [(kind, value)]


def test_a_phone_number_longer_than_e164_allows_is_not_one() -> None:
    assert found("call +99 1234 5678 9012 34 now", ("phone",)) == []


def test_an_iban_with_a_wrong_check_digit_is_not_an_iban() -> None:
    assert found("GB82 WEST 1234 5698 7654 32", ("iban",)) != []
    assert found("GB82 WEST 1234 5698 7654 33", ("iban",)) == []


@pytest.mark.parametrize("ssn", ["000-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"])
def test_numbers_never_issued_as_ssns_are_not_ssns(ssn: str) -> None:
    # Area 000, 666 or 9xx, group 00 and serial 0000 are never issued: such a number is some
    # other code, and redacting it would only damage the answer.
    assert found(f"ref {ssn}", ("ssn",)) == []


def test_redaction_covers_the_whole_email_address() -> None:
    text = "mail jane.doe+work@mail.example.co.uk."
    assert PiiValidator().redact(text) == "mail [REDACTED EMAIL]."


def test_redact_takes_findings_in_any_order() -> None:
    text = "a@b.io, then 4111 1111 1111 1111, then c@d.io"
    findings = find_pii(text)
    assert redact(text, reversed(findings)) == redact(text, findings)
    assert redact(text, findings).count("[REDACTED") == 3


def test_a_number_cut_shorter_must_still_be_card_length() -> None:
    # "4000 0000 0002" passes the Luhn check but has 12 digits: no card is that short.
    assert found("ref 4000 0000 0002 1234 567 ok", ("card",)) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("pay to de89 3704 0044 0532 0130 00 today", "de89 3704 0044 0532 0130 00"),
        ("iban: gb82west12345698765432.", "gb82west12345698765432"),
        ("IBAN DE89 3704 0044 0532 0130 00 is the account", "DE89 3704 0044 0532 0130 00"),
    ],
    ids=["lowercase spaced", "lowercase compact", "uppercase before words"],
)
def test_an_iban_in_lowercase_is_found_too(text: str, value: str) -> None:
    # Before: only capitals were matched, so an IBAN typed in lowercase went out in clear.
    assert found(text) == [("iban", value)]


def test_a_wrong_check_digit_in_lowercase_is_not_an_iban() -> None:
    assert found("gb82 west 1234 5698 7654 33", ("iban",)) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("order 987 4111 1111 1111 1111 shipped", "4111 1111 1111 1111"),
        ("order 12345 4111 1111 1111 1111 shipped", "4111 1111 1111 1111"),
        ("ref 2024 5500 0000 0000 0004 12/25", "5500 0000 0000 0004"),
    ],
    ids=["fits in one match", "runs past the first match", "and an expiry after it"],
)
def test_a_card_right_after_another_group_of_digits_is_found(text: str, value: str) -> None:
    # Before: the match began at the order number, failed the Luhn check with it, and only
    # shorter prefixes were tried, never the number without its first group.
    assert found(text) == [("card", value)]
    assert PiiValidator().redact(text) == text.replace(value, "[REDACTED CARD]")


@pytest.mark.parametrize("before", ["ref ab12", "room ab12 or", "ab12 is in"])
def test_an_iban_after_a_code_shaped_like_one_is_found(before: str) -> None:
    # The code's match runs on into the IBAN, over words no IBAN starts at ("or", "is in");
    # the IBAN is tried from its own first word.
    text = f"{before} de89 3704 0044 0532 0130 00"
    assert found(text) == [("iban", "de89 3704 0044 0532 0130 00")]


@pytest.mark.parametrize("text", ["values 62889 57670 750 6434", "values 2828 29640 2441 52176"])
def test_a_row_of_numbers_not_laid_out_like_a_card_is_not_cut_down_to_one(text: str) -> None:
    # Before: "62889 57670 750" passed the Luhn check as a shorter part of the row. Parts are
    # only tried where grouped as cards are written (fours, or Amex's 4-6-5).
    assert found(text, ("card",)) == []


def test_words_after_a_code_that_pass_mod_97_are_not_an_iban() -> None:
    # "ab12 his this he that" passes mod-97, but no IBAN has more letters than digits.
    assert found("see ab12 his this he that", ("iban",)) == []


@pytest.mark.parametrize(
    "text",
    ["tx 123454111111111111111 ok", "tx 622202000000000000012345 ok", "ref 123-45-6789-01"],
    ids=["card at the end of a longer number", "card at its start", "ssn in a longer code"],
)
def test_part_of_a_longer_number_is_not_a_card_or_an_ssn(text: str) -> None:
    # A hash or reference number holds every digit string: only a whole number is checked.
    assert found(text, ("card", "ssn")) == []


def test_an_email_whose_local_part_is_a_phone_number_is_one_email() -> None:
    # Emails are looked for before phone numbers, or "@example.com" would be left in clear.
    text = "write to 555-123-4567@example.com"
    assert PiiValidator().redact(text) == "write to [REDACTED EMAIL]"


def test_digits_joined_to_a_word_are_not_a_phone_number() -> None:
    assert found("ref X415 555 0132 ok", ("phone",)) == []


def test_a_letter_that_only_folds_to_ascii_does_not_break_the_iban_check() -> None:
    # The Kelvin sign folds to "k": matched case-insensitively, it reached int(c, 36), and the
    # ValueError failed the whole answer's validation.
    assert found("pay \u212ae89 3704 0044 0532 0130 00", ("iban",)) == []


@pytest.mark.parametrize(("kind", "word"), [("card", "1 "), ("iban", "ab12 cd34 ef ")])
def test_a_long_run_of_number_like_words_is_checked_once_per_word(
    monkeypatch: pytest.MonkeyPatch, kind: str, word: str
) -> None:
    # Validators run on the event loop: each match of the run walked the rest of it again,
    # so a 16 kB answer took seconds (quadratic in its length), stalling every tenant.
    checked = 0
    check = pii._passing_prefix

    def counted(*args: Any) -> tuple[int, int] | None:
        nonlocal checked
        checked += 1
        return check(*args)

    monkeypatch.setattr(pii, "_passing_prefix", counted)
    text = word * 600
    assert find_pii(text, (kind,)) == []
    assert checked <= len(text.split())


@pytest.mark.parametrize(
    "phone",
    ["01 23 45 67 89", "01.23.45.67.89", "06-12-34-56-78", "+33 1 23 45 67 89", "+33 612345678"],
)
def test_a_french_phone_number_is_found(phone: str) -> None:
    # Five pairs of digits, or +33 and one digit before them: the pattern took at most four
    # groups after a first of two or more digits, so these went out in clear.
    assert found(f"appelez le {phone} demain") == [("phone", phone)]


@pytest.mark.parametrize("numbers", ["10 20 30 40 50", "12 34 56 78 90", "1 234 567 890"])
def test_a_list_of_numbers_is_not_a_phone_number(numbers: str) -> None:
    # Only a national French number starts with 0: five pairs of digits are otherwise a list.
    assert found(f"the answer is {numbers} in order", ("phone",)) == []


def test_a_phone_number_written_as_a_plus_and_digits_alone_is_found() -> None:
    # E.164 as systems print it: the pattern needed a separator after the country code.
    assert found("call +14155550132 today") == [("phone", "+14155550132")]


@pytest.mark.parametrize(
    "text",
    [
        "00 01 02 03 04", "01 23-45 67.89", "mac 00.11.22.33.44.55", "grew by +250000000",
        "x = +1234567890.5",
    ],
)  # fmt: skip
def test_numbers_laid_out_like_a_phone_but_not_one_are_left_alone(text: str) -> None:
    # A hex dump, mixed separators, a signed number: none is a phone number, and redacting
    # one damages the answer. (Five pairs from 01-09 with one separator are a French number.)
    assert found(text, ("phone",)) == []


class _CountedReads(list[tuple[int, int]]):
    def __init__(self, spans: list[tuple[int, int]]) -> None:
        super().__init__(spans)
        self.reads = 0

    def __getitem__(self, index: Any) -> Any:
        self.reads += 1
        return super().__getitem__(index)

    def __iter__(self) -> Any:
        self.reads += len(self)
        return super().__iter__()


def test_a_finding_is_checked_for_overlap_against_its_neighbours_only() -> None:
    # Each finding was compared with every earlier one: a long answer of phone-like numbers
    # took time quadratic in their count, on the event loop (0.96 s for 90 kB).
    taken = _CountedReads([(i * 10, i * 10 + 5) for i in range(3000)])
    assert pii._overlaps(taken, (14_996, 14_999)) is False
    assert pii._overlaps(taken, (15_004, 15_006)) is True
    assert taken.reads < 60


def test_overlap_with_neighbours_agrees_with_comparing_every_finding() -> None:
    taken = [(i * 10, i * 10 + 5) for i in range(50)]
    for start in range(-3, 505):
        for length in (1, 3, 5, 7, 12):
            span = (start, start + length)
            every = any(span[0] < end and begin < span[1] for begin, end in taken)
            assert pii._overlaps(taken, span) is every, span


@pytest.mark.parametrize(
    "text",
    [
        "the gateway is 192.168.100.200 now", "the gateway is 172.16.254.10 now",
        "connect to 10.100.200.250:8080",
        "logged at 2026-11-27 14:46:05 UTC", "logged at 2026-11-27T14:46:05Z",
        "am 27.11.2026 14:46 Uhr", "version 1.2.3.4", "build 10.0.19041.1234",
        "sum 123 456 789 012", "that is 1 234 567 890 123 in all", "Summe 123.456.789.012",
    ],
    ids=["an IPv4 address", "an IPv4 address with two-digit parts", "an IPv4 address and port",
         "a timestamp", "an ISO timestamp",
         "a date and time", "a version", "a build number", "thousands grouped by spaces",
         "a number past a trillion", "thousands grouped by dots"],
)  # fmt: skip
def test_addresses_timestamps_versions_and_grouped_numbers_are_not_phone_numbers(
    text: str,
) -> None:
    # Before: an address, a timestamp's date and hour ("2026-11-27 14") and a number with
    # its thousands grouped were redacted as phone numbers, damaging the answer.
    assert found(text) == []


@pytest.mark.parametrize(
    "phone",
    ["012 345 678 901", "+34 912 345 678", "+1 415.555.0132", "415.555.0132", "020 7946 0958"],
)
def test_phone_numbers_grouped_like_numbers_or_addresses_are_still_found(phone: str) -> None:
    # A leading 0 (a trunk prefix) or a + makes groups of three a phone number, not thousands.
    assert found(f"call {phone} today") == [("phone", phone)]


def test_an_email_after_a_long_run_of_word_characters_is_found_whole() -> None:
    # The local part was `[...]+` tried from every character of a run: a 40 kB word took
    # seconds per answer on the event loop. It starts only where a run does now.
    run = "a" * 40_000
    assert found(run) == []
    assert found(f"{run} mail {'b' * 64}@example.com") == [("email", f"{'b' * 64}@example.com")]
    assert pii._DETECTORS["email"].pattern.match("john@example.com", 1) is None


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("call +4915112345678 now", "phone", "+4915112345678"),  # its digits pass Luhn
        ("call 1-800-555-0199 now", "phone", "1-800-555-0199"),
        ("call 1 415 555 0132 now", "phone", "1 415 555 0132"),
        ("mail jöhn@example.com now", "email", "jöhn@example.com"),
        ("mail user@münchen.de now", "email", "user@münchen.de"),
        ("mail почта@пример.рф now", "email", "почта@пример.рф"),
    ],
    ids=["an E.164 number, not a card", "a US number with its country code",
         "and spaced", "an email with an accent", "an email with an IDN domain",
         "an email in Cyrillic"],
)  # fmt: skip
def test_the_whole_finding_is_redacted_with_its_country_code_or_letters_beyond_ascii(
    text: str, kind: str, value: str
) -> None:
    # Before: "+[REDACTED CARD]", "1-[REDACTED PHONE]", "jö[REDACTED EMAIL]", or nothing.
    assert found(text) == [(kind, value)]
    assert PiiValidator().redact(text) == text.replace(value, f"[REDACTED {kind.upper()}]")


@pytest.mark.parametrize(
    "email", ["jöhn@münchen.de", "jöhn@example.com", "john@münchen.de", "josé@exämple.cafè"]
)
def test_an_email_in_decomposed_form_is_found_whole(email: str) -> None:
    # NFD writes "ö" as "o" + U+0308, a combining mark, which \w is not: the pattern stopped
    # at it, so "jöhn@münchen.de" went unredacted and "jöhn@example.com" kept "jö".
    decomposed = unicodedata.normalize("NFD", email)
    assert found(f"mail {decomposed} now") == [("email", decomposed)]
    assert PiiValidator().redact(f"mail {decomposed} now") == "mail [REDACTED EMAIL] now"


def test_a_long_word_of_letters_and_marks_is_scanned_once() -> None:
    # Marks are part of a word now: a run of them must not become a place to start again
    # (the quadratic scan the lookbehind prevents).
    run = "e\u0301" * 40_000
    started = time.perf_counter()
    assert found(f"{run} mail {run}@example.com") == [("email", f"{run}@example.com")]
    assert found(run + "\u0301" * 1000) == []
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "text",
    [
        "ref abc4111111111111111def", "hex 0x4111111111111111", "key_4111111111111111 ok",
        "id 7000000000000005", "id 9000000000000001",
        "id 1000000000000008", "id 0000000000000000",
    ],
    ids=["inside a word", "a hex number", "after an underscore", "no issuer starts with 7",
         "nor 9", "nor 1", "nor 0"],
)  # fmt: skip
def test_digits_in_a_word_or_with_no_card_issuers_first_digit_are_not_a_card(text: str) -> None:
    # Every card number starts with 2-6 (its issuer's range); a Luhn-valid id or sum does
    # not have to, and one in ten of them passed for a card.
    assert found(text, ("card",)) == []

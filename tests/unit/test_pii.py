"""PII detection edges: every length a format allows, checksums, whole-span redaction."""

import pytest

from routecache.router.pii import PiiValidator, find_pii


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

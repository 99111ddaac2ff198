"""PII in answers: emails, phone numbers, card numbers (Luhn-checked), IBANs (mod-97), US SSNs.

Detection is pattern-based with checksums where the format has one; a card number must also
start as issuers' do (2-6), yet about one long number in 18 (a sum, an id) still passes for one.
Redaction replaces each finding by a typed placeholder.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

from routecache.domain import ChatRequest, ValidatorResult


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


# Laid out as other numbers are written, with no + or ( to make them a phone number: an IPv4
# address (four dotted parts of 0-255, no leading zeros) or a number with its thousands grouped
# by spaces or dots ("123 456 789 012"; a leading 0, a trunk prefix, makes it a phone number).
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_NOT_A_PHONE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}|[1-9]\d{{0,2}}([ .])\d{{3}}(?:\1\d{{3}})+")


def _phone_valid(text: str) -> bool:
    digits = len(_digits(text))
    if not 9 <= digits <= 15 or ("+" not in text and "(" not in text and digits < 10):
        return False
    return _NOT_A_PHONE.fullmatch(text) is None


# One run of digits, groups of four with a shorter last one, or Amex's 4-6-5.
_CARD_LAYOUT = re.compile(r"\d+|\d{4}(?:[ -]\d{4})*(?:[ -]\d{1,4})?|\d{4}[ -]\d{6}[ -]\d{4,5}")


def _combining_marks() -> str:
    """The combining marks (Unicode category M) as the inside of a `re` character class (`re`
    has no \\p{M}; `regex` has, but backtracks through an address's domain labels in time
    quadratic in their number). Marks are only below U+20000 and among the variation
    selectors of U+E0100-E01EF: scanning those planes, not all 17, takes milliseconds."""
    ranges: list[str] = []
    for plane_start in (0x0, 0x10000, 0xE0000):
        chars = "".join(map(chr, range(plane_start, plane_start + 0x10000)))
        for run in regex.finditer(r"\p{M}+", chars):
            first, last = chr(plane_start + run.start()), chr(plane_start + run.end() - 1)
            ranges.append(f"{re.escape(first)}-{re.escape(last)}")
    return "".join(ranges)


_MARKS = _combining_marks()


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    confirm: Callable[[str], bool]
    # A greedy match can swallow what follows the number ("... 0130 00 BIC ...", "... 1111 12/25")
    # or what comes before it ("order 987 4111 ...") and so fail its checksum: `retry_shorter`
    # says which parts of it, cut at spaces, to try.
    retry_shorter: Callable[[str], bool] | None = None


_DETECTORS = {
    "card": _Detector(
        "card",
        # Not inside a word ("0x4111...", "abc4111...def") nor after a +: "+4915112345678" is
        # a phone number, though its digits pass the Luhn check.
        re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\w-])"),
        # Issuers' ranges start with 2-6 (Mastercard, Amex, Diners, JCB, Visa, Discover,
        # UnionPay): a Luhn check alone let one number in ten pass, any first digit.
        lambda s: 2 <= int(s[0]) <= 6 and luhn_valid(_digits(s)),
        # Only laid out as cards are written: a list or table of numbers ("1 2 3 ... 14",
        # "12345 678 9012 ...") would otherwise get a Luhn check for each part of it.
        lambda s: _CARD_LAYOUT.fullmatch(s) is not None,
    ),
    "iban": _Detector(
        "iban",
        # Either case: people type IBANs in lowercase too. Not re.IGNORECASE: it lets in
        # letters that only fold to ASCII (the Kelvin sign), which mod-97 cannot read.
        re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}\b"),
        # Every country's IBAN has more digits than letters; prose with a number in it
        # ("ab12 that was from") does not, and might pass mod-97 once in 97 tries.
        lambda s: iban_valid(s) and sum(c.isdigit() for c in s) > sum(c.isalpha() for c in s),
        lambda s: True,
    ),
    "ssn": _Detector(
        "ssn",
        re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
        lambda s: True,
    ),
    "email": _Detector(
        "email",
        # Started only where a run of local-part characters starts: tried from each character
        # of a long word, the match scanned the rest of it every time (quadratic; a 40 kB word
        # took seconds, on the event loop). Now each character is scanned from one start.
        # Letters beyond ASCII too ("jöhn@", "@münchen.de"): ASCII alone cut such an address
        # short, or missed it. With their combining marks: decomposed (NFD) text writes "ö" as
        # "o" + U+0308, which is no \w, and the address stopped there. The lookbehind has the
        # marks too, so a match still starts only where a run starts.
        re.compile(
            rf"(?<![\w{_MARKS}.%+-])[\w{_MARKS}.%+-]+@[\w{_MARKS}-]+(?:\.[\w{_MARKS}-]+)*"
            rf"\.[^\W\d_](?:[^\W\d_]|[{_MARKS}])+"
        ),
        lambda s: True,
    ),
    "phone": _Detector(
        "phone",
        # Needs a separator or a + so that a bare run of digits (a sum, an id) is not a phone.
        # Tried first: France's five pairs (0X or +33 X, then four pairs, one separator
        # throughout; five pairs from 00, or mixed, are a list or a dump) and a + with digits
        # alone (10 or more, or a signed number would be one: a 9-digit number written
        # compactly, +468123456, is missed). Never followed by ".5" (nor "...2671.2 miles"),
        # nor by ":46" (the date and hour of a timestamp, "2026-11-27 14:46:05"). A North
        # American number may lead with its country code and no + ("1-800-555-0199").
        re.compile(r"(?<![\w+])(?:(?:\+\d{1,3}[ .-]?\d|0[1-9])([ .-])\d{2}(?:\1\d{2}){3}"
                   r"|\+\d{1,3}[ .-]\d{6,12}|\+\d{10,15}"
                   r"|(?:\+\d{1,3}[ .-]?|1[ .-])?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}[ .-]\d{2,4}"
                   r"(?:[ .-]\d{2,4}){0,2})(?![\w-]|[.:]\d)"),
        _phone_valid,
    ),
}  # fmt: skip

# Checked in this order: an IBAN's digits must not be taken for a card number first (the
# IBAN's letters make it the stricter match), nor a card number's for a phone number.
PII_KINDS = ("iban", "card", "ssn", "email", "phone")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[Finding]:
    wanted = set(kinds)
    findings: list[Finding] = []
    taken: list[tuple[int, int]] = []  # sorted, never overlapping
    for kind in PII_KINDS:
        if kind not in wanted:
            continue
        detector = _DETECTORS[kind]
        tried: set[int] = set()
        for match in detector.pattern.finditer(text):
            span = _confirmed_span(detector, text, match, tried)
            if span and not _overlaps(taken, span):
                findings.append(Finding(kind, *span))
                bisect.insort(taken, span)
    return sorted(findings, key=lambda f: f.start)


def _overlaps(taken: list[tuple[int, int]], span: tuple[int, int]) -> bool:
    """Whether `span` overlaps one of `taken` (sorted, disjoint): only its neighbours can.
    Comparing with every earlier finding took time quadratic in their number."""
    at = bisect.bisect_left(taken, span)
    return (at > 0 and taken[at - 1][1] > span[0]) or (at < len(taken) and taken[at][0] < span[1])


def _confirmed_span(
    detector: _Detector, text: str, match: re.Match[str], tried: set[int]
) -> tuple[int, int] | None:
    """The match's span if it passes its check, else the longest passing part of it cut at
    spaces: first from its start, then from each later word (a card number right after an
    order number, "order 987 4111 1111 1111 1111", is matched from the order number on).

    `tried`: the starts earlier matches of this text already went on from. The walk from a
    start always ends the same way, and was either found or failed; walking it again for each
    match of a long run of numbers took time quadratic in the answer's length."""
    if detector.confirm(match.group()):
        return match.span()
    if (shorter_ok := detector.retry_shorter) is None:
        return None
    start, end = match.span()
    while start not in tried:
        tried.add(start)
        if span := _passing_prefix(detector, shorter_ok, text, start, end):
            return span
        # Matched again from the first later word where the pattern starts (prose before an
        # IBAN, "room ab12 or de89 ...", has words it cannot start at): the number there may
        # run on past this match.
        words = (m.end() for m in re.finditer(" ", text[start:end]))
        later = next(filter(None, (detector.pattern.match(text, start + w) for w in words)), None)
        if later is None:
            return None
        start, end = later.span()
    return None


def _passing_prefix(
    detector: _Detector, shorter_ok: Callable[[str], bool], text: str, start: int, end: int
) -> tuple[int, int] | None:
    """The longest text[start:cut], cut at a space (or at `end`), that passes the check."""
    cut = end
    while cut > start:
        candidate = text[start:cut]
        if (
            detector.pattern.fullmatch(text, start, cut)
            and shorter_ok(candidate)
            and detector.confirm(candidate)
        ):
            return start, cut
        cut = text.rfind(" ", start, cut)
    return None


def redact(text: str, findings: Iterable[Finding]) -> str:
    parts, last = [], 0
    for finding in sorted(findings, key=lambda f: f.start):
        parts += [text[last : finding.start], f"[REDACTED {finding.kind.upper()}]"]
        last = finding.end
    parts.append(text[last:])
    return "".join(parts)


class PiiValidator:
    """Fails an answer carrying personal data; `redact` makes a clean copy of it."""

    def __init__(self, kinds: Iterable[str] = PII_KINDS, name: str = "pii") -> None:
        self.name = name
        self._kinds = tuple(kinds)
        if unknown := set(self._kinds) - set(PII_KINDS):
            raise ValueError(f"unknown PII kind(s): {', '.join(sorted(unknown))}")

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        findings = find_pii(text, self._kinds)
        if not findings:
            return ValidatorResult(self.name, True)
        counts: dict[str, int] = {}
        for finding in findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        what = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return ValidatorResult(self.name, False, f"personal data found: {what}")

    def redact(self, text: str) -> str:
        return redact(text, find_pii(text, self._kinds))

"""Lone UTF-16 surrogates: text a Python str holds and JSON may escape ("\\ud83d", half of a
pair), but that no UTF-8 can carry. Where outside text enters, a lone surrogate is replaced
(answers, provider texts, events: they were paid for or must be logged) or refused with a
clear error (a caller's schema, a training file's prompt). And uncased_form: what the uncased
MiniLM sees of a text."""

from __future__ import annotations

import re
import unicodedata

import regex

# A str holds a surrogate pair whole, as one code point: every surrogate left in it is lone.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Nonspacing marks (accents, Arabic harakat, Hindi vowel signs such as the u of कुल, kana
# voicing marks once decomposed): the uncased MiniLM's tokenizer drops them from the text's NFD
# form (BertNormalizer's strip_accents), so the model and the verifier never see them.
_NONSPACING_MARKS = regex.compile(r"\p{Mn}+")


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def check_encodable(text: str, what: str = "prompt") -> None:
    """ValueError if `text` holds a lone surrogate, naming `what` it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate, not text ({exc})") from exc


def uncased_form(text: str, *, keep_marks: bool = False) -> str:
    """What the uncased MiniLM sees of `text`: casefolded, NFD, nonspacing marks dropped,
    white space collapsed. Texts of one form embed identically (cosine 1.0): "Wie zählen?",
    "wie zahlen?" and " WIE ZA\u0308HLEN? " are one request to the model. keep_marks: the
    form with the marks still in (whether two texts differ in marks only)."""
    # NFD before casefolding too: a canonical caseless match (Unicode 3.13), so a text's
    # composed and decomposed spellings fold alike.
    folded = unicodedata.normalize("NFD", unicodedata.normalize("NFD", text).casefold())
    if not keep_marks:
        folded = _NONSPACING_MARKS.sub("", folded)
    return " ".join(folded.split())

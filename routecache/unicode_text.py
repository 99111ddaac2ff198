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
# What the uncased MiniLM's tokenizer does to a text before its word pieces (BertNormalizer,
# then BertPreTokenizer), as patterns the `regex` module runs at C speed: uncased_form is
# called per semantic-hit candidate that is not ASCII (differ_only_in_marks).
_BERT_SPACES = str.maketrans(dict.fromkeys(
    "\t\n\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u202f\u205f\u3000", " "
))  # fmt: skip  # tab, line feed, return and every space separator (Zs) but " " itself
_BERT_DROPPED = regex.compile(r"[\x00\ufffd\p{Cc}\p{Cf}\p{Co}]+")  # after _BERT_SPACES
_BERT_CJK = regex.compile(
    "[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f"
    "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f]"
)
# Nonspacing marks (accents, Arabic harakat, Hindi vowel signs such as the u of कुल, kana
# voicing marks once decomposed): dropped from the NFD form (strip_accents).
_NONSPACING_MARKS = regex.compile(r"\p{Mn}+")
# BERT's punctuation: Unicode's, and every ASCII symbol ($, +, <, ^, `, |, ~ ...).
_BERT_PUNCTUATION = regex.compile(r"([\p{P}!-/:-@\[-`{-~])")


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def check_encodable(text: str, what: str = "prompt") -> None:
    """ValueError if `text` holds a lone surrogate, naming `what` it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate, not text ({exc})") from exc


def drop_nonspacing_marks(text: str) -> str:
    return _NONSPACING_MARKS.sub("", text)


def uncased_form(text: str, *, keep_marks: bool = False) -> str:
    """What the uncased MiniLM's tokenizer makes of `text` before its word pieces, words
    joined by one space: controls dropped, CJK characters spaced, nonspacing marks of the NFD
    form dropped, lower-cased one character at a time (BertNormalizer), split at white space
    and punctuation (BertPreTokenizer). Texts of one form embed identically (cosine 1.0):
    "Wie zählen?", "wie zahlen ?" and " WIE ZA\u0308HLEN? " are one request to the model.
    keep_marks: the form with the marks still in (whether two texts differ in marks only).
    tests/integration/test_onnx_embedder.py checks it against the packaged tokenizer."""
    spaced = text.translate(_BERT_SPACES)
    # Printable: no control, format or private-use character (U+FFFD is printable).
    if not spaced.isprintable() or "\ufffd" in spaced:
        spaced = _BERT_DROPPED.sub("", spaced)
    if spaced and max(spaced) >= "\u3400":  # below it, no CJK character to space
        spaced = _BERT_CJK.sub(r" \g<0> ", spaced)
    spaced = unicodedata.normalize("NFD", spaced)
    if not keep_marks:
        spaced = drop_nonspacing_marks(spaced)
    # One character at a time: str.lower() makes a word-final capital sigma the final form
    # (U+03C2), BERT the plain one (U+03C3).
    lowered = spaced.replace("\u03a3", "\u03c3").lower()
    return " ".join(_BERT_PUNCTUATION.sub(r" \1 ", lowered).split())

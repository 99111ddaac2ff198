"""Cheap signals about a (query, cached question) pair that the cross-encoder can miss.

Near-paraphrases that ask something else mostly differ in a few telling words: another number
("in 2016" / "in 2017"), a negation, another question word ("how" / "why"), or extra words that
narrow the question. These features are combined with the cross-encoder's score and the cosine
similarity by a small logistic model (routecache.cache.hit_policy).
"""

from __future__ import annotations

import math
import re
import unicodedata

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NEGATIONS = frozenset({"not", "no", "never", "without", "nobody", "nothing", "none"})
# Phones and word processors type a typographic quotation mark for the apostrophe, which NFKC
# leaves as it is: read as a word break, "don(U+2019)t" lost its "n't" and so its negation.
_APOSTROPHES = str.maketrans(dict.fromkeys("\u2018\u2019\u02bc", "'"))
_QUESTION_WORDS = ("what", "how", "why", "when", "where", "which", "who", "whom", "whose")

FEATURE_NAMES = (
    "cross_encoder",
    "cosine",
    "word_jaccard",
    "numbers_differ",
    "negation_differs",
    "question_word_differs",
    "length_log_ratio",
)


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES))


def _negated(words: list[str]) -> bool:
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def _question_word(words: list[str]) -> str:
    return next((w for w in words if w in _QUESTION_WORDS), "")


def lexical_features(query: str, cached: str) -> tuple[float, float, float, float, float]:
    """word Jaccard, numbers differ, negation differs, question word differs, |log length ratio|."""
    a, b = _words(query), _words(cached)
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    jaccard = len(set_a & set_b) / len(union) if union else 1.0
    numbers_differ = float(set(_NUMBER.findall(query)) != set(_NUMBER.findall(cached)))
    negation = float(_negated(a) != _negated(b))
    question = float(_question_word(a) != _question_word(b))
    ratio = abs(math.log((len(a) + 1) / (len(b) + 1)))
    return jaccard, numbers_differ, negation, question, ratio


def pair_features(query: str, cached: str, cross_encoder: float, cosine: float) -> list[float]:
    """The feature row, in FEATURE_NAMES order."""
    return [cross_encoder, cosine, *lexical_features(query, cached)]

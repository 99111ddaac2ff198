"""Cheap features of the prompt text, beside the neighbour features of its embedding.

The embedding is computed once by the service (the cache needs it too); these cost
microseconds. Only the request itself may be used: the
routing data's `subject` and `source` labels are not known to a router in service.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

TEXT_FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "digit_ratio",
    "log_numbers",
    "math_symbol_ratio",
    "multiple_choice",
)

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"\S+")
# Four options "A." .. "D." each at the start of a line: the shape of an MMLU-style question.
_OPTION = re.compile(r"^([A-D])[.)]\s", re.MULTILINE)
_MATH_SYMBOLS = "=+-*/^<>%$"


def _char_class(codes: list[int]) -> re.Pattern[str]:
    """A pattern matching one of `codes` (ascending), written as ranges."""
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return re.compile(
        "[" + "".join(re.escape(chr(lo)) + ("" if lo == hi else "-" + re.escape(chr(hi)))
                      for lo, hi in ranges) + "]"
    )  # fmt: skip


# What str.isdigit() counts (the trained models were fitted on it): decimal digits, and
# superscripts, circled digits and the like. The BMP's, found by a scan at import (a few ms),
# as one class: sre tests a class of BMP characters with one table lookup, but one holding a
# character past U+FFFF range by range, several times slower.
_BMP_DIGIT = _char_class([c for c in range(0x10000) if chr(c).isdigit()])
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _count_digits(text: str) -> int:
    """sum(c.isdigit() for c in text), at C speed: a 31k-character prompt took 4-7 ms on
    the event loop one character at a time. Characters past U+FFFF (emoji, mathematical
    digits) are rare: those few are tested one by one."""
    digits = len(_BMP_DIGIT.findall(text))
    if not text.isascii():
        digits += sum(c.isdigit() for c in _ASTRAL.findall(text))
    return digits


def text_features(text: str) -> npt.NDArray[np.float64]:
    """The cheap text features of one prompt, in the order of TEXT_FEATURE_NAMES."""
    chars = len(text)
    denominator = max(chars, 1)
    digits = _count_digits(text)
    symbols = sum(text.count(symbol) for symbol in _MATH_SYMBOLS)  # each a C scan
    options = {match.group(1) for match in _OPTION.finditer(text)}
    return np.array(
        [
            math.log1p(chars),
            math.log1p(len(_WORD.findall(text))),
            math.log1p(text.count("\n") + 1 if text else 0),
            digits / denominator,
            math.log1p(len(_NUMBER.findall(text))),
            symbols / denominator,
            1.0 if len(options) == 4 else 0.0,
        ],
        dtype=np.float64,
    )


def text_feature_matrix(texts: Sequence[str]) -> npt.NDArray[np.float64]:
    """text_features of many prompts, one row each (training and evaluation)."""
    out = np.zeros((len(texts), len(TEXT_FEATURE_NAMES)), dtype=np.float64)
    for row, text in enumerate(texts):
        out[row] = text_features(text)
    return out

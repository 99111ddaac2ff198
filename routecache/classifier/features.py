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
_MATH_SYMBOLS = frozenset("=+-*/^<>%$")


def text_features(text: str) -> npt.NDArray[np.float64]:
    """The cheap text features of one prompt, in the order of TEXT_FEATURE_NAMES."""
    chars = len(text)
    denominator = max(chars, 1)
    digits = sum(c.isdigit() for c in text)
    symbols = sum(c in _MATH_SYMBOLS for c in text)
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

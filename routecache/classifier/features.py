"""The classifier's input: the request embedding plus a few cheap features of the prompt text.

The embedding is computed once by the service (the cache needs it too), so only the text
features are computed here; they cost microseconds. Only the request itself may be used: the
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


def feature_names(embedding_dimension: int) -> list[str]:
    """Column names of `feature_matrix`, recorded with a trained model to detect drift."""
    return [f"emb_{i}" for i in range(embedding_dimension)] + list(TEXT_FEATURE_NAMES)


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


def feature_matrix(
    embeddings: npt.NDArray[np.floating], texts: Sequence[str]
) -> npt.NDArray[np.float64]:
    """Rows of [embedding, text features] for a batch of prompts (training and evaluation)."""
    if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not match {len(texts)} texts")
    extra = np.zeros((len(texts), len(TEXT_FEATURE_NAMES)), dtype=np.float64)
    for row, text in enumerate(texts):
        extra[row] = text_features(text)
    return np.hstack([embeddings.astype(np.float64, copy=False), extra])

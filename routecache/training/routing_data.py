"""The routing data format (shared/data/README.md), its holdout split and list-price costs.

Cost uses list prices (USD per million tokens, input/output): Mixtral-8x7B-Instruct 0.60/0.60,
GPT-4-1106-preview 10/30, with tokens = len(text) / 4. Output tokens: the recorded response of
the model the row is routed to where the row has one (GSM8K); otherwise (MMLU) 1 token, the
answer letter, assuming the prompt's "Answer:" suffix makes both models reply with a letter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.training.data_files import DataFileError, numbered_lines
from routecache.unicode_text import check_encodable


@dataclass(frozen=True)
class RoutingRow:
    prompt: str
    source: str
    weak_correct: bool
    strong_correct: bool
    weak_response: str | None = None
    strong_response: str | None = None


def read_routing_rows(paths: Sequence[Path]) -> list[RoutingRow]:
    """Rows of the routing JSONL format (shared/data/README.md); `subject` is not kept.

    Raises DataFileError naming the file (and line) that cannot be read or is not a row."""
    rows: list[RoutingRow] = []
    for path in paths:
        for number, line in numbered_lines(path):
            try:
                record = json.loads(line)
                rows.append(
                    RoutingRow(
                        prompt=_prompt(record),
                        source=str(record.get("source", "")),
                        weak_correct=_outcome(record, "weak_correct"),
                        strong_correct=_outcome(record, "strong_correct"),
                        weak_response=_text(record, "weak_response"),
                        strong_response=_text(record, "strong_response"),
                    )
                )
            # ValueError: not JSON, past Python's digits, or a lone surrogate (UnicodeEncodeError)
            except (ValueError, RecursionError, KeyError, TypeError) as exc:
                raise DataFileError(f"{path}:{number}: not a routing row ({exc})") from exc
    if not rows:
        raise DataFileError(f"no routing rows in {[str(p) for p in paths]}")
    return rows


def _outcome(record: dict[str, object], key: str) -> bool:
    """A recorded outcome: true or false (1 or 0). bool() read "false" or "no" as correct."""
    value = record[key]
    if isinstance(value, int) and value in (0, 1):  # a bool is an int
        return bool(value)
    raise TypeError(f"{key} must be true or false, not {value!r}")


def _prompt(record: dict[str, object]) -> str:
    """The prompt, as text: str() made a null prompt the prompt "None"."""
    value = record["prompt"]
    if not isinstance(value, str):
        raise TypeError(f"prompt must be text, not {value!r}")
    check_encodable(value)  # the hash split and the embedding cache could not encode it
    return value


def _text(record: dict[str, object], key: str) -> str | None:
    """A recorded response, or None: one that is not text failed the cost estimate later,
    with a traceback instead of the file and line."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{key} must be text, not {value!r}")


def files_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def outcomes(rows: Sequence[RoutingRow]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(cheap model right, strong model right) per row, as the router metrics take them."""
    weak = np.array([r.weak_correct for r in rows], dtype=bool)
    strong = np.array([r.strong_correct for r in rows], dtype=bool)
    return weak, strong


def holdout_mask(prompts: Sequence[str], fraction: float, seed: int) -> npt.NDArray[np.bool_]:
    """True for held-out prompts: a hash of seed and prompt, so duplicates stay together."""
    limit = fraction * 2**64
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") < limit
            for p in prompts
        ],
        dtype=bool,
    )


def require_both_sides(n_train: int, n_held: int) -> None:
    """DataFileError unless a split leaves rows to fit on and to score: fewer failed later,
    after the embedding, with an error from deep in the fit or the metrics."""
    if n_train < 2 or n_held < 2:
        raise DataFileError(
            f"need at least 2 training and 2 held-out rows, got {n_train} and {n_held} "
            "(more data, or another --holdout-fraction)"
        )


# (input, output) USD per million tokens.
CHEAP_PRICE = (0.60, 0.60)
STRONG_PRICE = (10.0, 30.0)
CHARS_PER_TOKEN = 4.0
ANSWER_ONLY_OUTPUT_TOKENS = 1.0


def request_cost(row: RoutingRow, strong: bool) -> float:
    """Estimated USD of answering one row with the strong or the cheap model."""
    response = row.strong_response if strong else row.weak_response
    input_tokens = len(row.prompt) / CHARS_PER_TOKEN
    output_tokens = (
        len(response) / CHARS_PER_TOKEN if response is not None else ANSWER_ONLY_OUTPUT_TOKENS
    )
    price_in, price_out = STRONG_PRICE if strong else CHEAP_PRICE
    return (input_tokens * price_in + output_tokens * price_out) / 1e6

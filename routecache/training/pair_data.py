"""Labelled question pairs (the shared qqp_*.jsonl format) and the split the verifier trains on.

The cross-encoder and the decision rule on top of it must not see the same pairs: the rule's
threshold is what keeps the false-hit budget, and a threshold fitted on pairs the encoder was
trained on would trust it far too much. Pairs are split by a hash of the cached question, as the
shared data itself is, so one question never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from routecache.training.data_files import DataFileError, numbered_lines


@dataclass(frozen=True, slots=True)
class LabelledPair:
    query: str
    cached: str
    duplicate: bool


class PairDataError(DataFileError):
    """A pairs file that does not follow the documented format."""


def load_pairs(path: Path, limit: int | None = None) -> list[LabelledPair]:
    pairs: list[LabelledPair] = []
    for number, line in numbered_lines(Path(path)):
        pairs.append(_parse(line, path, number))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise PairDataError(f"{path}: no pairs")
    return pairs


def _parse(line: str, path: Path, number: int) -> LabelledPair:
    try:
        row = json.loads(line)
        query, cached, duplicate = row["query"], row["cached"], row["duplicate"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:  # ValueError: JSON, digits
        raise PairDataError(f"{path}:{number}: expected query, cached, duplicate ({exc})") from exc
    if not isinstance(query, str) or not isinstance(cached, str) or not isinstance(duplicate, bool):
        raise PairDataError(f"{path}:{number}: query/cached must be strings, duplicate a bool")
    try:  # JSON may escape a lone UTF-16 surrogate, which no UTF-8 split hash can take
        query.encode("utf-8"), cached.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PairDataError(f"{path}:{number}: not valid Unicode ({exc.reason})") from exc
    return LabelledPair(query, cached, duplicate)


def in_holdout(pair: LabelledPair, holdout_fraction: float) -> bool:
    digest = hashlib.sha256(pair.cached.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < holdout_fraction


def split_pairs(
    pairs: Iterable[LabelledPair], holdout_fraction: float
) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """(fit, holdout): the encoder learns on `fit`; the decision rule is calibrated on `holdout`."""
    fit: list[LabelledPair] = []
    holdout: list[LabelledPair] = []
    for pair in pairs:
        (holdout if in_holdout(pair, holdout_fraction) else fit).append(pair)
    return fit, holdout


def normalised(text: str) -> str:
    """Case and spacing folded: Quora repeats many questions with only these differences."""
    return " ".join(text.casefold().split())


def duplicate_clusters(pairs: Iterable[LabelledPair]) -> dict[str, int]:
    """Cluster id of each (normalised) text, joining texts that labelled duplicates connect.

    Quora's labels are transitive in practice (A = B and B = C: C asks what A asks), so a cache
    hit on any member of the query's cluster answers the query's own question.
    """
    parent: dict[str, str] = {}

    def root(text: str) -> str:
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for pair in pairs:
        a, b = root(normalised(pair.query)), root(normalised(pair.cached))
        if pair.duplicate and a != b:
            parent[a] = b
    ids: dict[str, int] = {}
    return {text: ids.setdefault(root(text), len(ids)) for text in list(parent)}


def duplicate_share(pairs: Sequence[LabelledPair]) -> float:
    return sum(p.duplicate for p in pairs) / len(pairs) if pairs else 0.0

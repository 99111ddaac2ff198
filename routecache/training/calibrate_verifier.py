"""Fit the hit rule on held-out labelled pairs so the operator's false-hit budget holds.

1. Score each held-out pair: cosine of the embeddings, the shipped cross-encoder's logit, the
   lexical features.
2. A logistic model over those features gives a probability of "same question". Its scores for
   choosing thresholds are out-of-fold (each pair scored by a model that never saw it, folds
   grouped by cached question), so the thresholds are not fitted on the scores they are judged
   on; the model that ships is then fitted on all held-out pairs.
3. The cosine floor is the lowest similarity that still mattered: below it, the loosest budget
   loses at most `floor_loss` of its correct hits, and lookups there skip the verifier.
4. For each budget, the lowest threshold whose false-hit rate, at an upper confidence bound
   (Clopper-Pearson, one-sided), stays within the budget. The bound is the margin: an observed
   rate just under the budget on a few thousand pairs is too likely to be over it on the next.
5. Optionally, cache-mode lookups too: each held-out query against a full cache (its nearest
   entry among many cached questions, a hit right when the entry asks the query's question).
   A full cache offers near misses that a labelled pair never does, so each budget keeps the
   higher of the two thresholds and holds in both settings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.cache.hit_policy import BudgetThreshold, PolicyCalibration
from routecache.cache.pair_features import FEATURE_NAMES, pair_features
from routecache.training.data_files import DataFileError
from routecache.training.pair_data import LabelledPair

BUDGETS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)

Floats = npt.NDArray[np.float64]


class CalibrationError(DataFileError):
    """Held-out pairs too few, or of one kind, to fit the rule on; train-verifier says so in
    one line (it was an IndexError or one of sklearn's ValueErrors)."""


@dataclass(frozen=True)
class ScoredPairs:
    """Held-out pairs with everything the rule is fitted on."""

    rows: Floats  # one feature row per pair, FEATURE_NAMES order
    labels: npt.NDArray[np.bool_]
    groups: npt.NDArray[np.int64]  # cached question id: folds never split one question

    @property
    def cosine(self) -> Floats:
        return self.rows[:, FEATURE_NAMES.index("cosine")]


def score_pairs(
    pairs: Sequence[LabelledPair], cosines: Sequence[float], logits: Sequence[float]
) -> ScoredPairs:
    """Feature rows of labelled pairs, given each pair's cosine and cross-encoder logit."""
    texts = [(p.query, p.cached) for p in pairs]
    rows = np.array(
        [
            pair_features(q, c, float(logit), float(cos))
            for (q, c), logit, cos in zip(texts, logits, cosines, strict=True)
        ],
        dtype=np.float64,
    ).reshape(len(pairs), len(FEATURE_NAMES))  # no pairs: still rows of features, none of them
    return ScoredPairs(rows, *_labels_and_groups(pairs))


def _labels_and_groups(
    pairs: Sequence[LabelledPair],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Whether each pair is a duplicate, and its cached question's id (folds never split one)."""
    ids: dict[str, int] = {}
    groups = np.array([ids.setdefault(p.cached, len(ids)) for p in pairs], dtype=np.int64)
    return np.array([p.duplicate for p in pairs], dtype=bool), groups


def _fit_logistic(rows: Floats, labels: npt.NDArray[np.bool_]) -> tuple[Floats, float]:
    """Weights and bias on the raw features (standardisation folded in)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = rows.mean(axis=0), rows.std(axis=0) + 1e-9
    model = LogisticRegression(C=1.0, max_iter=1000).fit((rows - mean) / scale, labels)
    weights = model.coef_[0] / scale
    bias = float(model.intercept_[0] - (weights * mean).sum())
    return weights, bias


def out_of_fold(scored: ScoredPairs, folds: int = 5) -> Floats:
    from sklearn.model_selection import GroupKFold

    _check_calibratable(scored.labels, scored.groups, folds)
    out = np.zeros(len(scored.labels))
    for fit, held in GroupKFold(n_splits=folds).split(scored.rows, groups=scored.groups):
        if scored.labels[fit].all() or not scored.labels[fit].any():
            kind = "duplicates" if scored.labels[fit].all() else "non-duplicates"
            raise CalibrationError(
                f"a fold's pairs are all {kind}: the {len(scored.labels)} held-out pairs "
                f"need more of each kind{_MORE}"
            )
        weights, bias = _fit_logistic(scored.rows[fit], scored.labels[fit])
        out[held] = _probabilities(scored.rows[held], weights, bias)
    return out


_MORE = " (more pairs in --data, or a larger --holdout)"


def check_holdout(holdout: Sequence[LabelledPair], folds: int = 5) -> None:
    """Refuses held-out pairs the rule cannot be fitted on, before the hour of training that
    would end in the same refusal."""
    _check_calibratable(*_labels_and_groups(holdout), folds)


def _check_calibratable(
    labels: npt.NDArray[np.bool_], groups: npt.NDArray[np.int64], folds: int
) -> None:
    """Refuses pairs the folds cannot be made of, or a logistic model fitted on."""
    pairs, questions = len(labels), len(np.unique(groups))
    if questions < folds:
        raise CalibrationError(
            f"{pairs} held-out pairs on {questions} cached questions: calibration needs "
            f"{folds} or more{_MORE}"
        )
    if labels.all():
        raise CalibrationError(f"all {pairs} held-out pairs are duplicates{_MORE}")
    if not labels.any():
        raise CalibrationError(f"none of the {pairs} held-out pairs is a duplicate{_MORE}")


def _probabilities(rows: Floats, weights: Floats, bias: float) -> Floats:
    result: Floats = 1.0 / (1.0 + np.exp(-(rows @ weights + bias)))
    return result


def _recall_at(scores: Floats, labels: npt.NDArray[np.bool_], threshold: float) -> float:
    """Share of the positives whose score clears the threshold (NaN: never scored, never kept)."""
    kept = np.nan_to_num(scores, nan=-np.inf) >= threshold
    return float((kept & labels).sum() / max(1, labels.sum()))


def false_hit_upper_bound(false_hits: int, lookups: int, confidence: float) -> float:
    from scipy.stats import beta

    if false_hits >= lookups:
        return 1.0
    return float(beta.ppf(confidence, false_hits + 1, lookups - false_hits))


def threshold_for_budget(
    scores: Floats, labels: npt.NDArray[np.bool_], budget: float, confidence: float
) -> BudgetThreshold:
    """The lowest threshold whose false-hit rate's upper bound is within the budget."""
    order = np.argsort(-scores, kind="stable")
    ranked, truth = scores[order], labels[order]
    false_hits = np.cumsum(~truth)
    n = len(scores)
    threshold, recall = np.inf, 0.0  # no hits at all unless some threshold fits
    for k in range(len(ranked)):
        if k + 1 < len(ranked) and ranked[k + 1] == ranked[k]:
            continue  # a threshold takes all pairs with equal scores or none of them
        if np.isnan(ranked[k]):
            break
        if false_hit_upper_bound(int(false_hits[k]), n, confidence) > budget:
            break
        threshold = float(ranked[k])
        recall = float(truth[: k + 1].sum() / max(1, labels.sum()))
    return BudgetThreshold(budget, threshold, recall)


def cosine_floor(
    cosine: Floats, labels: npt.NDArray[np.bool_], accepted: npt.NDArray[np.bool_], loss: float
) -> float:
    """The highest floor that drops at most `loss` of the correct hits `accepted` made."""
    kept = np.sort(cosine[accepted & labels])
    if len(kept) == 0:
        return 1.0
    return float(kept[int(np.floor(loss * len(kept)))])


def calibrate(
    scored: ScoredPairs,
    budgets: Sequence[float] = BUDGETS,
    confidence: float = 0.99,
    floor_loss: float = 0.005,
    metadata: dict[str, object] | None = None,
    symmetric: bool = True,
    cache_lookups: ScoredPairs | None = None,
) -> PolicyCalibration:
    oof = out_of_fold(scored)
    loosest = threshold_for_budget(oof, scored.labels, max(budgets), confidence)
    floor = cosine_floor(scored.cosine, scored.labels, oof >= loosest.threshold, floor_loss)
    gated = np.where(scored.cosine >= floor, oof, np.nan)
    thresholds = tuple(
        threshold_for_budget(gated, scored.labels, b, confidence) for b in sorted(budgets)
    )
    weights, bias = _fit_logistic(scored.rows, scored.labels)
    extra: dict[str, object] = {}
    if cache_lookups is not None:
        thresholds, extra = _hold_in_cache_mode(
            thresholds, cache_lookups, weights, bias, floor, confidence, (gated, scored.labels)
        )
    return PolicyCalibration(
        cosine_floor=floor,
        weights=tuple(float(w) for w in weights),
        bias=bias,
        thresholds=thresholds,
        symmetric=symmetric,
        metadata={
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "calibration_pairs": len(scored.labels),
            "confidence": confidence,
            "floor_loss": floor_loss,
            **extra,
            **(metadata or {}),
        },
    )


def _hold_in_cache_mode(
    pairwise: tuple[BudgetThreshold, ...],
    lookups: ScoredPairs,
    weights: Floats,
    bias: float,
    floor: float,
    confidence: float,
    pairwise_scores: tuple[Floats, npt.NDArray[np.bool_]],
) -> tuple[tuple[BudgetThreshold, ...], dict[str, object]]:
    """Raise each budget's threshold where the cache-mode lookups need it higher.

    The lookups are scored by the final weights: they were fitted on the pairs, not on these
    lookups' candidates (only a query's own partner, when it is the nearest, appears in both).
    """
    probabilities = _probabilities(lookups.rows, weights, bias)
    gated = np.where(lookups.cosine >= floor, probabilities, np.nan)
    scores, labels = pairwise_scores
    merged: list[BudgetThreshold] = []
    cache_recall: dict[str, float] = {}
    for chosen in pairwise:
        cache = threshold_for_budget(gated, lookups.labels, chosen.max_false_hit_rate, confidence)
        threshold = max(chosen.threshold, cache.threshold)
        merged.append(
            BudgetThreshold(
                chosen.max_false_hit_rate, threshold, _recall_at(scores, labels, threshold)
            )
        )
        cache_recall[str(chosen.max_false_hit_rate)] = _recall_at(gated, lookups.labels, threshold)
    return tuple(merged), {
        "cache_mode_lookups": len(lookups.labels),
        "cache_mode_recall": cache_recall,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""When may a cached answer serve a new question? The decision rule of the semantic tier.

Two rules share one port. `CosinePolicy` is the classic semantic cache: serve when the cosine
similarity clears a threshold. `VerifiedPolicy` lets the operator state the false-hit rate they
accept instead: candidates under a cosine floor are misses at once (they never pay for the
verifier); the rest are re-read by a cross-encoder whose score, with the cosine and a few lexical
signals, goes through a logistic model to a probability of "same question". The probability must
clear the threshold calibrated for the tenant's budget on held-out labelled pairs
(routecache.training.calibrate_verifier), so the budget holds on traffic like those pairs.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from routecache.cache.pair_features import FEATURE_NAMES, pair_features

# How far under a threshold a similarity may fall and still clear it: a float32 unit vector
# dotted with itself is often 0.99999994, not 1, so at threshold 1 ("identical embeddings
# only", which the settings allow) an identical embedding would miss. Far below any
# difference between two texts that embed differently.
SIMILARITY_TOLERANCE = 1e-6


def clears(similarity: float, threshold: float) -> bool:
    """The similarity is at least the threshold, up to float32 rounding: every comparison of a
    similarity with a threshold, floor or penalised floor goes through here."""
    return similarity >= threshold - SIMILARITY_TOLERANCE


@dataclass(frozen=True, slots=True)
class HitRequirement:
    """What one request asks of a semantic hit: the tenant's cosine threshold and budget."""

    cosine_threshold: float
    max_false_hit_rate: float = 0.01


@dataclass(frozen=True, slots=True)
class HitVerdict:
    accept: bool
    similarity: float
    verifier_score: float | None = None  # probability the two ask the same; None: not verified


class HitPolicy(Protocol):
    def floor(self, requirement: HitRequirement) -> float:
        """Candidates below this cosine similarity are misses without further work."""
        ...

    def scores(
        self, pairs: Sequence[tuple[str, str]], similarities: Sequence[float]
    ) -> npt.NDArray[np.float64]:
        """The verifier's probability per pair; NaN where nothing was verified."""
        ...

    def decide(
        self,
        scores: npt.NDArray[np.float64],
        similarities: Sequence[float],
        requirement: HitRequirement,
    ) -> list[HitVerdict]: ...

    async def judge(
        self, query: str, cached: str, similarity: float, requirement: HitRequirement
    ) -> HitVerdict:
        """One lookup's verdict on its nearest candidate (the service's path)."""
        ...


class CosinePolicy:
    """Serve when the cosine similarity clears the tenant's threshold (GPTCache/RedisVL style)."""

    def floor(self, requirement: HitRequirement) -> float:
        return requirement.cosine_threshold

    def scores(
        self, pairs: Sequence[tuple[str, str]], similarities: Sequence[float]
    ) -> npt.NDArray[np.float64]:
        return np.full(len(pairs), np.nan)

    def decide(
        self,
        scores: npt.NDArray[np.float64],
        similarities: Sequence[float],
        requirement: HitRequirement,
    ) -> list[HitVerdict]:
        return [HitVerdict(clears(s, requirement.cosine_threshold), s) for s in similarities]

    async def judge(
        self, query: str, cached: str, similarity: float, requirement: HitRequirement
    ) -> HitVerdict:
        (verdict,) = self.decide(np.full(1, np.nan), [similarity], requirement)
        return verdict


class PairScorer(Protocol):
    def logits(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class BudgetThreshold:
    max_false_hit_rate: float
    threshold: float  # on the combined probability
    holdout_recall: float  # what this threshold kept on the calibration pairs, for reports


@dataclass(frozen=True)
class PolicyCalibration:
    """The fitted rule: logistic weights over FEATURE_NAMES, the floor, thresholds per budget."""

    cosine_floor: float
    weights: tuple[float, ...]
    bias: float
    thresholds: tuple[BudgetThreshold, ...]
    symmetric: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.weights) != len(FEATURE_NAMES):
            raise ValueError(f"expected {len(FEATURE_NAMES)} weights, got {len(self.weights)}")
        if not self.thresholds:
            raise ValueError("a calibration needs at least one budget threshold")

    def threshold_for(self, max_false_hit_rate: float) -> float:
        """The threshold of the largest calibrated budget not above the one asked for.

        A budget below every calibrated one gets no semantic hits at all: nothing measured says
        any threshold would keep it.
        """
        fitting = [t for t in self.thresholds if t.max_false_hit_rate <= max_false_hit_rate + 1e-12]
        if not fitting:
            return math.inf
        return max(fitting, key=lambda t: t.max_false_hit_rate).threshold

    def probabilities(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        z = rows @ np.asarray(self.weights, dtype=np.float64) + self.bias
        result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-z))
        return result

    def to_json(self) -> str:
        return json.dumps(
            {
                "features": list(FEATURE_NAMES),
                "cosine_floor": self.cosine_floor,
                "weights": list(self.weights),
                "bias": self.bias,
                "symmetric": self.symmetric,
                "thresholds": [
                    {
                        "max_false_hit_rate": t.max_false_hit_rate,
                        "threshold": t.threshold,
                        "holdout_recall": t.holdout_recall,
                    }
                    for t in self.thresholds
                ],
                "metadata": self.metadata,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> PolicyCalibration:
        raw = json.loads(text)
        if tuple(raw["features"]) != FEATURE_NAMES:
            raise ValueError(f"calibration features {raw['features']} do not match {FEATURE_NAMES}")
        return cls(
            cosine_floor=float(raw["cosine_floor"]),
            weights=tuple(float(w) for w in raw["weights"]),
            bias=float(raw["bias"]),
            symmetric=bool(raw["symmetric"]),
            thresholds=tuple(
                BudgetThreshold(
                    float(t["max_false_hit_rate"]),
                    float(t["threshold"]),
                    float(t["holdout_recall"]),
                )
                for t in sorted(raw["thresholds"], key=lambda t: t["max_false_hit_rate"])
            ),
            metadata=dict(raw.get("metadata", {})),
        )

    @classmethod
    def load(cls, path: Path) -> PolicyCalibration:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


class VerifiedPolicy:
    """Cosine floor, then the cross-encoder and the calibrated threshold for the budget."""

    def __init__(self, calibration: PolicyCalibration, scorer: PairScorer) -> None:
        self.calibration = calibration
        self._scorer = scorer

    def floor(self, requirement: HitRequirement) -> float:
        # A budget below every calibrated one can never hit (an infinite threshold): every
        # candidate is a miss at once, without a cross-encoder pass that could not change it.
        if math.isinf(self.calibration.threshold_for(requirement.max_false_hit_rate)):
            return math.inf
        return self.calibration.cosine_floor

    async def judge(
        self, query: str, cached: str, similarity: float, requirement: HitRequirement
    ) -> HitVerdict:
        # The cross-encoder pass is CPU work of a few milliseconds: keep it off the event loop.
        scores = await asyncio.to_thread(self.scores, [(query, cached)], [similarity])
        (verdict,) = self.decide(scores, [similarity], requirement)
        return verdict

    def scores(
        self, pairs: Sequence[tuple[str, str]], similarities: Sequence[float]
    ) -> npt.NDArray[np.float64]:
        """Probability that each pair asks the same question; NaN under the floor (not scored)."""
        out = np.full(len(pairs), np.nan)
        above = [i for i, s in enumerate(similarities) if clears(s, self.calibration.cosine_floor)]
        if not above:
            return out
        logits = self._scorer.logits([pairs[i] for i in above])
        rows = np.array(
            [
                pair_features(*pairs[i], float(logit), float(similarities[i]))
                for i, logit in zip(above, logits, strict=True)
            ],
            dtype=np.float64,
        )
        out[above] = self.calibration.probabilities(rows)
        return out

    def decide(
        self,
        scores: npt.NDArray[np.float64],
        similarities: Sequence[float],
        requirement: HitRequirement,
    ) -> list[HitVerdict]:
        threshold = self.calibration.threshold_for(requirement.max_false_hit_rate)
        verdicts: list[HitVerdict] = []
        for similarity, score in zip(similarities, scores, strict=True):
            if math.isnan(score):
                verdicts.append(HitVerdict(False, similarity))
            else:
                verdicts.append(HitVerdict(bool(score >= threshold), similarity, float(score)))
        return verdicts

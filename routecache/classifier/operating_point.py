"""From what an operator asks for (a strong-call share, a quality, a cost ceiling) to a threshold.

Training scores a held-out slice of labelled prompts and records, for strong fractions
0, 1, ..., 100 %, the threshold that sends that share strong and what it bought there: PGR
(fraction of the strong model's accuracy gap recovered), accuracy and cost relative to sending
everything strong. That curve travels in the artifact's metadata, so each model version maps an
operating point to its own threshold, and what the operator sets is what held-out data got.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.classifier import metrics
from routecache.domain import OperatingPoint

GRID_STEPS = 100
# Thresholds a curve may hold: routing scores lie in [-1, 1]; the point that sends nothing
# strong lies just above 1 (_threshold_sending).
THRESHOLD_RANGE = (-1.0, float(np.nextafter(1.0, np.inf)))


@dataclass(frozen=True)
class CurvePoint:
    threshold: float  # score >= threshold goes strong
    strong_fraction: float
    pgr: float
    accuracy: float
    cost_vs_all_strong: float


class OperatingCurve:
    def __init__(self, points: Sequence[CurvePoint]) -> None:
        if not points:
            raise ValueError("an operating curve needs at least one point")
        self.points = sorted(points, key=lambda p: p.strong_fraction)

    def threshold_for(self, point: OperatingPoint) -> float:
        """The threshold meeting the operating point on the held-out data it was fitted on."""
        if point.strong_fraction is not None:
            target = point.strong_fraction
            return min(self.points, key=lambda p: abs(p.strong_fraction - target)).threshold
        if point.quality is not None:
            # PGR is a ratio of sums rounded in floating point; reaching the target up to that
            # rounding counts, as in metrics.cpt, or the next (dearer) point would be picked.
            quality = point.quality - metrics.RATIO_TOLERANCE
            enough = [p for p in self.points if p.pgr >= quality]
            return (enough[0] if enough else self.points[-1]).threshold
        if point.cost_ratio is not None:
            # The cost ratio is rounded too (0.1 * 3 is 0.30000000000000004): a point within
            # the ceiling up to that rounding is affordable, or the next cheaper one is picked.
            ceiling = point.cost_ratio + metrics.RATIO_TOLERANCE
            affordable = [p for p in self.points if p.cost_vs_all_strong <= ceiling]
            return (affordable[-1] if affordable else self.points[0]).threshold
        raise ValueError("the operating point sets no target")

    def to_json(self) -> list[dict[str, float]]:
        return [asdict(p) for p in self.points]

    @classmethod
    def from_json(cls, records: Sequence[Mapping[str, Any]]) -> OperatingCurve:
        """Raises ValueError, TypeError or OverflowError for records that are not a list of
        curve points, or whose values are not finite or whose threshold no score can meet."""
        if isinstance(records, str | bytes) or not all(isinstance(r, Mapping) for r in records):
            raise ValueError(f"an operating curve is a list of points, not {records!r:.80}")
        points = [CurvePoint(**{k: float(v) for k, v in r.items()}) for r in records]
        # A hand-edited NaN would be picked by threshold_for and compare false with every
        # score: a tenant's traffic silently all cheap. Refused at load instead.
        for index, point in enumerate(points):
            for name, value in asdict(point).items():
                if not math.isfinite(value):
                    raise ValueError(f"operating_curve[{index}].{name} is {value}, not finite")
            if not THRESHOLD_RANGE[0] <= point.threshold <= THRESHOLD_RANGE[1]:
                raise ValueError(
                    f"operating_curve[{index}].threshold {point.threshold} lies outside the "
                    f"routing scores' range [-1, 1]"
                )
        return cls(points)


def fit_curve(
    scores: npt.ArrayLike,
    weak_correct: npt.ArrayLike,
    strong_correct: npt.ArrayLike,
    cost: Callable[[npt.NDArray[np.bool_]], float],
) -> OperatingCurve:
    """The curve of held-out `scores`; `cost(to_strong)` is the spend of one routing decision."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weak_correct, dtype=np.float64)
    g = np.asarray(strong_correct, dtype=np.float64)
    fractions, pgr = metrics.pgr_curve(s, w, g)
    _, accuracy = metrics.accuracy_curve(s, w, g)
    ranked = np.sort(s)[::-1]
    n = len(s)
    all_strong = cost(np.ones(n, dtype=bool))
    points = []
    for k in sorted({round(i * n / GRID_STEPS) for i in range(GRID_STEPS + 1)}):
        threshold = _threshold_sending(ranked, k)
        to_strong = s >= threshold
        # Tied scores all lie on one side of a threshold, so it may send more than k. Those it
        # sends are the top `sent` in score order: record what the threshold does, not k.
        sent = int(to_strong.sum())
        points.append(
            CurvePoint(
                threshold=threshold,
                strong_fraction=float(fractions[sent]),
                pgr=float(pgr[sent]),
                accuracy=float(accuracy[sent]),
                cost_vs_all_strong=cost(to_strong) / all_strong if all_strong else 1.0,
            )
        )
    return OperatingCurve(points)


def _threshold_sending(ranked: npt.NDArray[np.float64], k: int) -> float:
    """A threshold above which exactly the k highest of `ranked` (descending) lie, ties aside."""
    # Routing scores lie in [-1, 1]: above 1 nothing goes strong, at -1 everything does.
    if k == 0:
        return float(np.nextafter(max(float(ranked[0]), 1.0), np.inf))
    if k == len(ranked):
        return -1.0
    return float((ranked[k - 1] + ranked[k]) / 2)

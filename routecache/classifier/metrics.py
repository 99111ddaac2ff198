"""Router measures of DESIGN.md as pure numpy functions.

A router's `score` orders prompts (higher = send to the strong model); sending the top k of n
to the strong model gives one point of the curve at strong fraction x = k/n, for k = 0..n.
Tied prompts cross the cut together, as they do under a threshold (score >= t goes strong):
only the cuts between tie groups are measured, and inside a group the curve is the straight
line between its edges (what sending k of the group at random gives on average). So no
measure depends on the rows' order. PGR(x) = (acc(x) - acc_weak) / (acc_strong - acc_weak);
APGR is the trapezoid area under PGR over the n+1 points; CPT(p) the smallest x at a tie-group
edge with PGR >= p, a share some threshold sends.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

# PGR values and cost ratios are ratios of floating-point sums; a target met up to their
# rounding error (and no more) counts as met, wherever a curve value is compared with one.
RATIO_TOLERANCE = 1e-12

FloatArray = npt.NDArray[np.float64]


def _checked(
    score: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    s = np.asarray(score, dtype=np.float64).ravel()
    w = np.asarray(weak_correct, dtype=np.float64).ravel()
    g = np.asarray(strong_correct, dtype=np.float64).ravel()
    if not (len(s) == len(w) == len(g)) or len(s) == 0:
        raise ValueError(f"need equal, non-empty lengths, got {len(s)}, {len(w)}, {len(g)}")
    if np.isnan(s).any():
        raise ValueError("score contains NaN")
    return s, w, g


def _group_edges(ranked: FloatArray) -> npt.NDArray[np.intp]:
    """The cuts k (0..n) of descending `ranked` that split no tie: those a threshold makes."""
    inner = np.nonzero(ranked[:-1] != ranked[1:])[0] + 1
    return np.concatenate([[0], inner, [len(ranked)]])


def threshold_cuts(score: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Per cut k = 0..n, whether some threshold sends exactly the k highest-scored strong."""
    s = np.asarray(score, dtype=np.float64).ravel()
    cuts = np.zeros(len(s) + 1, dtype=bool)
    cuts[_group_edges(np.sort(s)[::-1])] = True
    return cuts


def accuracy_curve(
    score: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """(strong fractions k/n, accuracy when the k highest-scored prompts go strong), k = 0..n.

    Inside a tie group the accuracy is interpolated between the group's edges: any order of
    the tied rows would be arbitrary (their file order), and a threshold sends all or none.
    """
    s, w, g = _checked(score, weak_correct, strong_correct)
    n = len(s)
    order = np.argsort(-s, kind="stable")
    strong_prefix = np.concatenate([[0.0], np.cumsum(g[order])])
    weak_suffix = w.sum() - np.concatenate([[0.0], np.cumsum(w[order])])
    # At the edges the prefix holds whole groups, so its value is the same in any row order.
    accuracy = (strong_prefix + weak_suffix) / n
    cuts = np.arange(n + 1, dtype=np.float64)
    edges = _group_edges(s[order])
    return cuts / n, np.interp(cuts, edges, accuracy[edges])


def pgr_curve(
    score: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """(strong fractions, performance gap recovered) at the n+1 cut points."""
    fractions, accuracy = accuracy_curve(score, weak_correct, strong_correct)
    acc_weak, acc_strong = accuracy[0], accuracy[-1]
    gap = acc_strong - acc_weak
    if abs(gap) < RATIO_TOLERANCE:
        raise ValueError("the strong and weak models are equally accurate: PGR is undefined")
    return fractions, (accuracy - acc_weak) / gap


def apgr(score: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike) -> float:
    """Area under the PGR curve over strong fraction in [0, 1]; random routing gives ~0.5."""
    fractions, pgr = pgr_curve(score, weak_correct, strong_correct)
    return float(np.trapezoid(pgr, fractions))


def cpt(
    score: npt.ArrayLike,
    weak_correct: npt.ArrayLike,
    strong_correct: npt.ArrayLike,
    p: float,
) -> float:
    """Smallest strong fraction a threshold sends whose PGR reaches p (NaN if none does).

    Only tie-group edges count: a share inside a group is one no threshold produces (and the
    line across the group reaches p first at its far edge anyway, up to rounding)."""
    fractions, pgr = pgr_curve(score, weak_correct, strong_correct)
    reached = np.nonzero((pgr >= p - RATIO_TOLERANCE) & threshold_cuts(score))[0]
    return float(fractions[reached[0]]) if len(reached) else math.nan


def accuracy_at_fraction(
    score: npt.ArrayLike,
    weak_correct: npt.ArrayLike,
    strong_correct: npt.ArrayLike,
    fraction: float,
) -> float:
    """Accuracy when the round(fraction * n) highest-scored prompts go to the strong model
    (inside a tie group: the average over which of the tied prompts go)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    _, accuracy = accuracy_curve(score, weak_correct, strong_correct)
    n = len(accuracy) - 1
    return float(accuracy[math.floor(fraction * n + 0.5)])


def routed_accuracy(
    to_strong: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike
) -> float:
    """Accuracy of a concrete routing decision (e.g. score >= threshold)."""
    mask = np.asarray(to_strong, dtype=bool).ravel()
    _, w, g = _checked(mask.astype(np.float64), weak_correct, strong_correct)
    return float(np.where(mask, g, w).mean())


def router_summary(
    score: npt.ArrayLike, weak_correct: npt.ArrayLike, strong_correct: npt.ArrayLike
) -> dict[str, float]:
    """The headline measures reported by training and evaluation."""
    return {
        "apgr": apgr(score, weak_correct, strong_correct),
        "cpt50": cpt(score, weak_correct, strong_correct, 0.5),
        "cpt80": cpt(score, weak_correct, strong_correct, 0.8),
    }


def threshold_report(
    score: npt.ArrayLike,
    weak_correct: npt.ArrayLike,
    strong_correct: npt.ArrayLike,
    threshold: float,
) -> dict[str, float | None]:
    """Headline measures plus the outcome of routing score >= threshold to the strong model.

    JSON-ready: measures that are undefined on this slice (equal accuracies) are None.
    """
    s, w, g = _checked(score, weak_correct, strong_correct)
    to_strong = s >= threshold
    report: dict[str, float | None] = {
        "n": len(s),
        "weak_accuracy": float(w.mean()),
        "strong_accuracy": float(g.mean()),
        "strong_fraction": float(to_strong.mean()),
        "accuracy": routed_accuracy(to_strong, w, g),
    }
    try:
        summary = router_summary(s, w, g)
    except ValueError:  # PGR is undefined when both models are equally accurate
        summary = {"apgr": math.nan, "cpt50": math.nan, "cpt80": math.nan}
    report.update({k: v if math.isfinite(v) else None for k, v in summary.items()})
    return report

"""Fitting the hit rule: per-budget thresholds that hold on pairs they were not fitted on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routecache.cache.hit_policy import VerifiedPolicy
from routecache.cache.pair_features import FEATURE_NAMES
from routecache.training.calibrate_verifier import (
    ScoredPairs,
    calibrate,
    cosine_floor,
    false_hit_upper_bound,
    threshold_for_budget,
)
from routecache.training.pair_data import LabelledPair, PairDataError, load_pairs, split_pairs


def synthetic(n: int, seed: int) -> ScoredPairs:
    """Duplicates score higher on the cross-encoder and cosine; the rest overlap them."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.37
    rows = np.zeros((n, len(FEATURE_NAMES)))
    rows[:, 0] = np.where(labels, rng.normal(2.0, 2.0, n), rng.normal(-2.0, 2.0, n))
    rows[:, 1] = np.clip(
        np.where(labels, rng.normal(0.9, 0.05, n), rng.normal(0.8, 0.08, n)), -1, 1
    )
    rows[:, 2] = rng.random(n)
    return ScoredPairs(rows, labels, np.arange(n, dtype=np.int64))


def false_hit_rate(scored: ScoredPairs, probabilities: np.ndarray, floor: float, t: float) -> float:
    hits = (probabilities >= t) & (scored.cosine >= floor)
    return float((hits & ~scored.labels).sum() / len(scored.labels))


def test_upper_bound_is_above_the_observed_rate_and_tightens_with_more_lookups() -> None:
    assert false_hit_upper_bound(10, 1000, 0.9) > 0.01
    assert false_hit_upper_bound(100, 10000, 0.9) < false_hit_upper_bound(10, 1000, 0.9)
    assert false_hit_upper_bound(5, 5, 0.9) == 1.0


def test_threshold_keeps_the_upper_bound_within_the_budget() -> None:
    scored = synthetic(4000, seed=1)
    scores = 1 / (1 + np.exp(-scored.rows[:, 0]))
    chosen = threshold_for_budget(scores, scored.labels, 0.01, 0.9)
    hits = scores >= chosen.threshold
    false_hits = int((hits & ~scored.labels).sum())
    assert false_hit_upper_bound(false_hits, 4000, 0.9) <= 0.01
    # one step lower would break it: the threshold is the lowest that fits
    looser = scores >= np.max(scores[scores < chosen.threshold])
    assert false_hit_upper_bound(int((looser & ~scored.labels).sum()), 4000, 0.9) > 0.01
    assert 0 < chosen.holdout_recall < 1


def test_floor_drops_at_most_the_allowed_share_of_correct_hits() -> None:
    cosine = np.linspace(0.5, 1.0, 1000)
    labels = np.ones(1000, dtype=bool)
    floor = cosine_floor(cosine, labels, np.ones(1000, dtype=bool), loss=0.01)
    assert (cosine < floor).sum() <= 10


def test_calibrated_budgets_hold_on_fresh_pairs() -> None:
    rule = calibrate(synthetic(6000, seed=2), budgets=(0.005, 0.01, 0.02, 0.05))
    fresh = synthetic(20000, seed=3)
    probabilities = rule.probabilities(fresh.rows)
    for budget in (0.005, 0.01, 0.02, 0.05):
        rate = false_hit_rate(fresh, probabilities, rule.cosine_floor, rule.threshold_for(budget))
        assert rate <= budget, (budget, rate)
    assert rule.metadata["calibration_pairs"] == 6000


def near_misses(n: int, seed: int) -> ScoredPairs:
    """Cache-mode lookups: more wrong candidates that look right than labelled pairs have."""
    scored = synthetic(n, seed)
    rng = np.random.default_rng(seed + 100)
    wrong = ~scored.labels
    scored.rows[wrong, 0] += rng.normal(2.5, 1.0, n)[wrong]
    return scored


def test_cache_mode_lookups_raise_the_thresholds_until_the_budgets_hold_there_too() -> None:
    pairwise_only = calibrate(synthetic(6000, seed=5), budgets=(0.01, 0.05))
    both = calibrate(
        synthetic(6000, seed=5), budgets=(0.01, 0.05), cache_lookups=near_misses(6000, seed=6)
    )
    fresh = near_misses(20000, seed=7)
    probabilities = both.probabilities(fresh.rows)
    for budget in (0.01, 0.05):
        assert both.threshold_for(budget) > pairwise_only.threshold_for(budget)
        rate = false_hit_rate(fresh, probabilities, both.cosine_floor, both.threshold_for(budget))
        assert rate <= budget, (budget, rate)
    loose = false_hit_rate(
        fresh, probabilities, both.cosine_floor, pairwise_only.threshold_for(0.01)
    )
    assert loose > 0.01  # the pairwise threshold alone would break the budget in a full cache
    assert both.metadata["cache_mode_lookups"] == 6000
    assert set(both.metadata["cache_mode_recall"]) == {"0.01", "0.05"}


class ConstantScorer:
    def logits(self, pairs: object) -> np.ndarray:
        return np.zeros(len(pairs), dtype=np.float32)  # type: ignore[arg-type]


def test_the_service_policy_uses_the_fitted_weights() -> None:
    rule = calibrate(synthetic(3000, seed=4), budgets=(0.05,))
    policy = VerifiedPolicy(rule, ConstantScorer())
    scores = policy.scores([("a", "b")], [0.99])
    assert scores[0] == pytest.approx(
        float(rule.probabilities(np.array([[0.0, 0.99, 0.0, 0.0, 0.0, 0.0, 0.0]]))[0])
    )


def test_split_keeps_each_cached_question_on_one_side() -> None:
    pairs = [LabelledPair(f"q{i}", f"c{i % 50}", i % 3 == 0) for i in range(500)]
    fit, holdout = split_pairs(pairs, 0.2)
    assert {p.cached for p in fit}.isdisjoint({p.cached for p in holdout})
    assert len(fit) + len(holdout) == 500 and 0 < len(holdout) < 250
    assert split_pairs(pairs, 0.2) == (fit, holdout)


def test_load_pairs_names_the_bad_line(tmp_path: Path) -> None:
    good = {"query": "a", "cached": "b", "duplicate": True}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"query": "a"}) + "\n")
    with pytest.raises(PairDataError, match=r"pairs.jsonl:2"):
        load_pairs(path)
    path.write_text(json.dumps({**good, "duplicate": "yes"}) + "\n")
    with pytest.raises(PairDataError, match="bool"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(load_pairs(path)) == 2 and len(load_pairs(path, limit=1)) == 1

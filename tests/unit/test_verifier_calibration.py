"""Fitting the hit rule: per-budget thresholds that hold on pairs they were not fitted on."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from routecache.cache.hit_policy import PolicyCalibration, VerifiedPolicy
from routecache.cache.pair_features import FEATURE_NAMES
from routecache.training.calibrate_verifier import (
    CalibrationError,
    ScoredPairs,
    calibrate,
    cosine_floor,
    false_hit_upper_bound,
    file_sha256,
    out_of_fold,
    score_pairs,
    threshold_for_budget,
)
from routecache.training.pair_data import (
    LabelledPair,
    PairDataError,
    duplicate_share,
    load_pairs,
    split_pairs,
)


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


def test_upper_bound_is_the_one_sided_clopper_pearson_bound() -> None:
    # Closed forms of the exact bound: none of n false, 1 - (1 - c)^(1/n); all but one, c^(1/n).
    assert false_hit_upper_bound(0, 100, 0.9) == pytest.approx(1 - 0.1 ** (1 / 100))
    assert false_hit_upper_bound(9, 10, 0.9) == pytest.approx(0.9 ** (1 / 10))


def test_threshold_takes_a_tie_whole_and_reports_the_share_of_duplicates_kept() -> None:
    # 1000 lookups at confidence 0.5: no false hit fits a 0.001 budget, one does not. Ten
    # duplicates score 0.9; a duplicate and a non-duplicate tie at 0.8; the rest score 0.1.
    scores = np.array([0.9] * 10 + [0.8, 0.8] + [0.1] * 988)
    labels = np.array([True] * 11 + [False] * 989)
    chosen = threshold_for_budget(scores, labels, 0.001, 0.5)
    assert chosen.threshold == 0.9  # 0.8 would serve the tied non-duplicate too
    assert chosen.holdout_recall == pytest.approx(10 / 11)
    assert chosen.max_false_hit_rate == 0.001


def test_a_budget_no_threshold_fits_serves_nothing() -> None:
    scores = np.array([0.9] * 10 + [0.1] * 990)
    labels = np.arange(1000) < 10
    # Even no false hit at all has an upper bound of 0.0007 on 1000 lookups.
    chosen = threshold_for_budget(scores, labels, 0.0001, 0.5)
    assert (chosen.threshold, chosen.holdout_recall) == (np.inf, 0.0)


def test_unscored_pairs_never_set_the_threshold() -> None:
    # NaN: under the cosine floor, never verified, so never a hit whatever the threshold.
    chosen = threshold_for_budget(np.array([0.9, np.nan, np.nan]), np.ones(3, bool), 0.5, 0.5)
    assert chosen.threshold == 0.9
    assert chosen.holdout_recall == pytest.approx(1 / 3)


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


def test_floor_is_the_highest_that_keeps_within_the_loss() -> None:
    cosine = np.linspace(0.5, 1.0, 1000)
    labels = np.ones(1000, dtype=bool)
    floor = cosine_floor(cosine, labels, np.ones(1000, dtype=bool), loss=0.0105)
    assert (cosine < floor).sum() == 10  # 10.5 may go; an 11th would be too many
    # No correct hit to lose: nothing needs a lookup under any floor.
    assert cosine_floor(cosine, labels, np.zeros(1000, dtype=bool), loss=0.01) == 1.0


def test_score_pairs_rows_hold_each_pairs_own_scores_and_group_by_cached_question() -> None:
    pairs = [
        LabelledPair("how old is the moon", "age of the moon", True),
        LabelledPair("how far is the moon", "age of the moon", False),
        LabelledPair("best pizza in rome", "where to eat pizza in rome", True),
    ]
    scored = score_pairs(pairs, cosines=[0.9, 0.7, 0.8], logits=[3.0, -1.0, 2.0])
    np.testing.assert_allclose(scored.cosine, [0.9, 0.7, 0.8])
    np.testing.assert_allclose(scored.rows[:, FEATURE_NAMES.index("cross_encoder")], [3, -1, 2])
    assert scored.labels.tolist() == [True, False, True]
    assert scored.groups[0] == scored.groups[1] != scored.groups[2]


def out_of_fold_before_and_after_relabelling_one_question() -> tuple[Any, Any]:
    """Out-of-fold scores of 600 pairs, three per cached question, before and after the first
    question's three labels are flipped."""
    scored = synthetic(600, seed=8)
    grouped = ScoredPairs(scored.rows, scored.labels, np.arange(600, dtype=np.int64) // 3)
    flipped = grouped.labels.copy()
    flipped[:3] = ~flipped[:3]
    return out_of_fold(grouped), out_of_fold(ScoredPairs(grouped.rows, flipped, grouped.groups))


def test_out_of_fold_scores_never_see_their_own_cached_question() -> None:
    # Three pairs per cached question. Relabelling one question's pairs changes every model
    # except the one that scores that question: its scores stay as they were.
    before, after = out_of_fold_before_and_after_relabelling_one_question()
    np.testing.assert_allclose(after[:3], before[:3], rtol=1e-12)
    assert not np.allclose(after[3:], before[3:])


def test_the_shipped_weights_are_the_standardised_logistic_model_on_all_pairs() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scored = synthetic(2000, seed=9)
    rule = calibrate(scored, budgets=(0.05,))
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    reference.fit(scored.rows, scored.labels)
    fresh = synthetic(200, seed=10).rows
    np.testing.assert_allclose(
        rule.probabilities(fresh), reference.predict_proba(fresh)[:, 1], atol=1e-6
    )


@pytest.fixture(scope="module")
def cache_calibrated() -> tuple[ScoredPairs, ScoredPairs, PolicyCalibration]:
    pairs, lookups = synthetic(3000, seed=11), near_misses(3000, seed=12)
    rule = calibrate(
        pairs,
        budgets=(0.05, 0.01),
        confidence=0.95,
        floor_loss=0.05,
        metadata={"source": "qqp-holdout"},
        symmetric=False,
        cache_lookups=lookups,
    )
    return pairs, lookups, rule


def test_the_floor_drops_at_most_the_loss_of_the_loosest_budgets_correct_hits(
    cache_calibrated: tuple[ScoredPairs, ScoredPairs, PolicyCalibration],
) -> None:
    pairs, _, rule = cache_calibrated
    oof = out_of_fold(pairs)
    loosest = threshold_for_budget(oof, pairs.labels, 0.05, 0.95)
    correct = (oof >= loosest.threshold) & pairs.labels
    dropped = (correct & (pairs.cosine < rule.cosine_floor)).sum()
    # The highest such floor: one more dropped hit would exceed the loss.
    assert dropped == int(np.floor(0.05 * correct.sum())) > 0


def test_reported_recalls_are_what_each_threshold_keeps_above_the_floor(
    cache_calibrated: tuple[ScoredPairs, ScoredPairs, PolicyCalibration],
) -> None:
    pairs, lookups, rule = cache_calibrated
    oof = out_of_fold(pairs)
    probabilities = rule.probabilities(lookups.rows)
    for chosen in rule.thresholds:
        kept = (pairs.cosine >= rule.cosine_floor) & (oof >= chosen.threshold)
        assert chosen.holdout_recall == pytest.approx(kept[pairs.labels].mean())
        in_cache = (lookups.cosine >= rule.cosine_floor) & (probabilities >= chosen.threshold)
        recall = rule.metadata["cache_mode_recall"][str(chosen.max_false_hit_rate)]
        assert recall == pytest.approx(in_cache[lookups.labels].mean())


def test_calibration_records_its_settings(
    cache_calibrated: tuple[ScoredPairs, ScoredPairs, PolicyCalibration],
) -> None:
    _, _, rule = cache_calibrated
    assert rule.symmetric is False
    assert [t.max_false_hit_rate for t in rule.thresholds] == [0.01, 0.05]
    assert rule.metadata["source"] == "qqp-holdout"
    assert (rule.metadata["confidence"], rule.metadata["floor_loss"]) == (0.95, 0.05)
    assert rule.metadata["calibration_pairs"] == rule.metadata["cache_mode_lookups"] == 3000


def test_file_digest_covers_the_whole_file(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(5 * (1 << 19) + 7)  # two and a half 1 MiB blocks
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


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
    for unreadable in ("[" * 100_000, '{"query": ' + "9" * 5_000 + "}"):  # were tracebacks
        path.write_text(json.dumps(good) + "\n" + unreadable + "\n")
        with pytest.raises(PairDataError, match=r"pairs.jsonl:2"):
            load_pairs(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(load_pairs(path)) == 2 and len(load_pairs(path, limit=1)) == 1


def test_out_of_fold_scores_come_from_five_models_each_fitted_without_a_fifth() -> None:
    # Relabelling one cached question changes the four models fitted on it: only the pairs its
    # own fold holds, a fifth of them, keep their scores.
    before, after = out_of_fold_before_and_after_relabelling_one_question()
    assert int(np.isclose(after, before, rtol=1e-12, atol=0).sum()) == 600 // 5


def test_the_floor_counts_the_correct_hit_that_scores_exactly_the_loosest_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from routecache.training import calibrate_verifier

    # 100 duplicates, 900 others. The loosest budget's threshold is 0.8, the score of one
    # duplicate whose cosine is the lowest: a floor that keeps every correct hit keeps it too.
    labels = np.arange(1000) < 100
    oof = np.where(labels, 0.9, 0.1)
    oof[0] = 0.8
    rows = np.zeros((1000, len(FEATURE_NAMES)))
    rows[:, FEATURE_NAMES.index("cosine")] = np.where(labels, 0.9, 0.95)
    rows[0, FEATURE_NAMES.index("cosine")] = 0.5
    rows[:, FEATURE_NAMES.index("cross_encoder")] = np.where(labels, 3.0, -3.0)
    scored = ScoredPairs(rows, labels, np.arange(1000, dtype=np.int64))
    monkeypatch.setattr(calibrate_verifier, "out_of_fold", lambda scored: oof)
    rule = calibrate(scored, budgets=(0.05, 0.1), confidence=0.5, floor_loss=0.0)
    assert rule.cosine_floor == 0.5
    assert [t.threshold for t in rule.thresholds] == [0.8, 0.8]
    assert [t.holdout_recall for t in rule.thresholds] == [1.0, 1.0]


def test_cache_mode_recall_is_at_the_threshold_kept_when_the_pairs_need_it_higher() -> None:
    # Cache lookups whose wrong candidates all score far down: their own threshold is lower
    # than the pairs' one, which is the one kept, so their recall is what that one keeps.
    pairs = synthetic(3000, seed=11)
    lookups = synthetic(3000, seed=13)
    lookups.rows[~lookups.labels, 0] = -12.0
    rule = calibrate(pairs, budgets=(0.01,), confidence=0.95, cache_lookups=lookups)
    alone = calibrate(pairs, budgets=(0.01,), confidence=0.95)
    threshold = rule.threshold_for(0.01)
    assert threshold == alone.threshold_for(0.01)
    in_cache = (lookups.cosine >= rule.cosine_floor) & (
        rule.probabilities(lookups.rows) >= threshold
    )
    recall = rule.metadata["cache_mode_recall"]["0.01"]
    assert recall == pytest.approx(in_cache[lookups.labels].mean()) and recall < 0.95


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("\n  \n", "no pairs"),
        ('["a", "b", true]\n', r":1: expected query, cached, duplicate"),
        ('\n"just a string"\n', r":2: expected query, cached, duplicate"),
        ('{"query": "a", "cached": 3, "duplicate": true}\n', "must be strings"),
        ('{"query": null, "cached": "b", "duplicate": false}\n', "must be strings"),
        ('{"query": "a", "cached": "b", "duplicate": 1}\n', "duplicate a bool"),
        ('{"query": "a", "cached": "b\\ud800", "duplicate": true}\n', ":1: not valid Unicode"),
        ('{"query": "a\\udfff", "cached": "b", "duplicate": true}\n', ":1: not valid Unicode"),
    ],
    ids=[
        "no pairs",
        "a list",
        "a string",
        "cached a number",
        "query null",
        "duplicate 1",
        "a lone surrogate",
        "a lone surrogate in the query",
    ],
)
def test_load_pairs_refuses_what_is_not_a_pair(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PairDataError, match=rf"pairs\.jsonl.*{problem}"):
        load_pairs(path)


def test_load_pairs_keeps_each_field_in_its_place(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"query": "q1", "cached": "c1", "duplicate": True},
            {"query": "q2", "cached": "c2", "duplicate": False}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert load_pairs(path) == [LabelledPair("q1", "c1", True), LabelledPair("q2", "c2", False)]
    assert load_pairs(path, limit=1) == [LabelledPair("q1", "c1", True)]


def test_split_holds_out_about_the_fraction_asked_for() -> None:
    pairs = [LabelledPair(f"q{i}", f"c{i}", False) for i in range(2000)]
    _, holdout = split_pairs(pairs, 0.15)
    assert 0.12 < len(holdout) / 2000 < 0.18
    assert split_pairs(pairs, 0.15)[1] == holdout


def _too_few(n: int, questions: int, duplicates: int) -> ScoredPairs:
    """`n` synthetic pairs on `questions` cached questions, the first `duplicates` duplicates."""
    scored = synthetic(n, seed=3)
    labels = np.arange(n) < duplicates
    return ScoredPairs(scored.rows, labels, np.arange(n, dtype=np.int64) % questions)


@pytest.mark.parametrize(
    ("scored", "problem"),
    [
        (score_pairs([], [], []), "0 held-out pairs on 0 cached questions"),
        (_too_few(40, 4, 20), "40 held-out pairs on 4 cached questions"),
        (_too_few(40, 40, 40), "all 40 held-out pairs are duplicates"),
        (_too_few(40, 40, 0), "none of the 40 held-out pairs is a duplicate"),
        (_too_few(40, 40, 1), "a fold's pairs are all non-duplicates"),
    ],
    ids=["no pairs", "four questions", "all duplicates", "no duplicate", "one duplicate"],
)
def test_pairs_too_few_to_calibrate_on_are_refused_naming_the_problem(
    scored: ScoredPairs, problem: str
) -> None:
    # They failed with an IndexError (no pairs) or one of sklearn's ValueErrors: train-verifier
    # printed a traceback instead of its one-line error.
    with pytest.raises(CalibrationError, match=re.escape(problem)):
        calibrate(scored)


def test_score_pairs_of_no_pairs_has_a_row_width() -> None:
    assert score_pairs([], [], []).rows.shape == (0, len(FEATURE_NAMES))


def test_the_duplicate_share_is_of_the_pairs_given_and_none_of_no_pairs() -> None:
    pairs = [LabelledPair("q", "c", duplicate) for duplicate in (True, False, False, True)]
    assert duplicate_share(pairs) == 0.5
    assert duplicate_share([]) == 0.0

"""Router measures on hand-computed examples.

Four prompts, the cheap model right on the last two, the strong model right on all:
acc_weak = 0.5, acc_strong = 1.0, so PGR = (acc - 0.5) / 0.5.
"""

from __future__ import annotations

import numpy as np
import pytest

from routecache.classifier import metrics

WEAK = np.array([False, False, True, True])
STRONG = np.array([True, True, True, True])
PERFECT = np.array([4.0, 3.0, 2.0, 1.0])  # the two prompts the strong model fixes come first


def test_perfect_router_recovers_the_gap_by_half_the_traffic() -> None:
    fractions, pgr = metrics.pgr_curve(PERFECT, WEAK, STRONG)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(pgr, [0, 0.5, 1, 1, 1])
    assert metrics.apgr(PERFECT, WEAK, STRONG) == pytest.approx(0.75)
    assert metrics.cpt(PERFECT, WEAK, STRONG, 0.5) == pytest.approx(0.25)
    assert metrics.cpt(PERFECT, WEAK, STRONG, 0.8) == pytest.approx(0.5)
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 0.5) == pytest.approx(1.0)
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 0.25) == pytest.approx(0.75)


def test_reversed_router_wastes_the_strong_model_first() -> None:
    reversed_score = -PERFECT
    _, pgr = metrics.pgr_curve(reversed_score, WEAK, STRONG)
    np.testing.assert_allclose(pgr, [0, 0, 0, 0.5, 1])
    assert metrics.apgr(reversed_score, WEAK, STRONG) == pytest.approx(0.25)
    assert metrics.cpt(reversed_score, WEAK, STRONG, 0.5) == pytest.approx(0.75)
    assert metrics.cpt(reversed_score, WEAK, STRONG, 0.8) == pytest.approx(1.0)
    assert metrics.accuracy_at_fraction(reversed_score, WEAK, STRONG, 0.5) == pytest.approx(0.5)


def test_all_tied_scores_give_the_straight_line_in_any_row_order() -> None:
    tied = np.zeros(4)
    for weak, strong in ((WEAK, STRONG), (WEAK[::-1], STRONG[::-1])):
        np.testing.assert_allclose(metrics.pgr_curve(tied, weak, strong)[1], np.linspace(0, 1, 5))
    # Long enough for numpy's default (unstable) sort to reorder ties.
    many_weak = np.arange(200) >= 100
    _, pgr = metrics.pgr_curve(np.zeros(200), many_weak, np.ones(200, dtype=bool))
    np.testing.assert_allclose(pgr, np.linspace(0, 1, 201))


def test_pgr_exceeds_one_when_the_strong_model_loses_some_prompts() -> None:
    # Prompt 3: cheap right, strong wrong. acc_weak 0.5, acc_strong 0.75.
    strong = np.array([True, True, True, False])
    _, pgr = metrics.pgr_curve(PERFECT, WEAK, strong)
    np.testing.assert_allclose(pgr, [0, 1, 2, 2, 1])
    assert metrics.apgr(PERFECT, WEAK, strong) == pytest.approx(1.375)


def test_random_router_scores_about_one_half() -> None:
    rng = np.random.default_rng(7)
    n = 200_000
    weak = rng.random(n) < 0.65
    strong = rng.random(n) < 0.8
    score = rng.random(n)
    assert metrics.apgr(score, weak, strong) == pytest.approx(0.5, abs=0.02)
    assert metrics.cpt(score, weak, strong, 0.5) == pytest.approx(0.5, abs=0.03)
    assert metrics.cpt(score, weak, strong, 0.8) == pytest.approx(0.8, abs=0.03)


def test_threshold_report_routes_scores_at_or_above_the_threshold() -> None:
    report = metrics.threshold_report(PERFECT, WEAK, STRONG, threshold=3.0)
    assert report["n"] == 4
    assert report["strong_fraction"] == pytest.approx(0.5)
    assert report["accuracy"] == pytest.approx(1.0)
    assert report["apgr"] == pytest.approx(0.75)
    assert report["cpt80"] == pytest.approx(0.5)


def test_threshold_report_marks_pgr_undefined_as_none() -> None:
    report = metrics.threshold_report(PERFECT, STRONG, STRONG, threshold=3.0)
    assert report["apgr"] is None and report["cpt50"] is None
    assert report["accuracy"] == pytest.approx(1.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="equally accurate"):
        metrics.apgr(PERFECT, STRONG, STRONG)
    with pytest.raises(ValueError, match="lengths"):
        metrics.apgr(PERFECT[:3], WEAK, STRONG)
    with pytest.raises(ValueError, match="NaN"):
        metrics.apgr([np.nan, 1, 2, 3], WEAK, STRONG)
    with pytest.raises(ValueError, match="fraction"):
        metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 1.5)
    assert np.isnan(metrics.cpt(PERFECT, WEAK, STRONG, 1.5))


def test_tied_scores_cross_the_cut_together_whatever_their_row_order() -> None:
    # Two score levels, interleaved: no threshold splits a tie, so the measures must not
    # depend on which tied row happens to come first in the file.
    score = np.tile([1.0, 0.0], 10)
    rng = np.random.default_rng(3)
    weak = rng.random(20) < 0.4
    strong = rng.random(20) < 0.9
    order = rng.permutation(20)
    for measure in (metrics.apgr, metrics.router_summary):
        assert measure(score, weak, strong) == pytest.approx(
            measure(score[order], weak[order], strong[order])
        )
    np.testing.assert_allclose(
        metrics.pgr_curve(score, weak, strong)[1],
        metrics.pgr_curve(score[order], weak[order], strong[order])[1],
    )


def test_a_constant_scorer_is_a_straight_line_from_all_cheap_to_all_strong() -> None:
    # One tie group: the only cuts a threshold makes are all cheap and all strong, so PGR is
    # the line between them (APGR 0.5) and CPT any p > 0 needs everything strong.
    weak, strong = [0, 1, 1, 1], [1, 1, 1, 1]
    for w, g in ((weak, strong), (weak[::-1], strong[::-1])):
        fractions, pgr = metrics.pgr_curve([0.5] * 4, w, g)
        np.testing.assert_allclose(pgr, fractions)
        assert metrics.apgr([0.5] * 4, w, g) == pytest.approx(0.5)
        assert metrics.cpt([0.5] * 4, w, g, 0.8) == 1.0


def test_cpt_is_a_share_some_threshold_sends() -> None:
    # Scores 2, 1, 1, 0: thresholds send 0, 1, 3 or 4 prompts strong, never 2. Sending the
    # first tied row alone would recover the whole gap at 2/4; the tie recovers it at 3/4.
    score = [2.0, 1.0, 1.0, 0.0]
    weak, strong = [1, 0, 1, 1], [1, 1, 1, 1]
    assert metrics.cpt(score, weak, strong, 1.0) == 0.75
    _, pgr = metrics.pgr_curve(score, weak, strong)
    np.testing.assert_allclose(pgr, [0, 0, 0.5, 1, 1])  # the middle of the tie: on average


def test_cpt_counts_a_cut_point_whose_pgr_equals_p_despite_rounding() -> None:
    # acc_weak 1/3, acc_strong 1: PGR at 1/3 strong is (2/3 - 1/3) / (2/3) = 0.5 exactly, which
    # the floating-point division gives as 0.49999999999999994.
    weak, strong = np.array([False, False, True]), np.ones(3, dtype=bool)
    assert metrics.cpt([3.0, 2.0, 1.0], weak, strong, 0.5) == pytest.approx(1 / 3)


def test_summary_cpt50_and_cpt80_are_the_fractions_reaching_half_and_most_of_the_gap() -> None:
    # The cheap model fails all ten, the strong one gets all: PGR = k/10 at strong fraction k/10.
    weak, strong = np.zeros(10, dtype=bool), np.ones(10, dtype=bool)
    summary = metrics.router_summary(-np.arange(10.0), weak, strong)
    assert summary["cpt50"] == pytest.approx(0.5)
    assert summary["cpt80"] == pytest.approx(0.8)
    report = metrics.threshold_report(-np.arange(10.0), weak, strong, threshold=-3.0)
    assert (report["cpt50"], report["cpt80"]) == pytest.approx((0.5, 0.8))


def test_threshold_report_gives_each_models_own_accuracy() -> None:
    weak = np.array([False, True, True, True])  # 0.75
    strong = np.array([True, True, False, False])  # 0.5
    report = metrics.threshold_report(PERFECT, weak, strong, threshold=3.5)
    assert report["weak_accuracy"] == pytest.approx(0.75)
    assert report["strong_accuracy"] == pytest.approx(0.5)
    assert report["accuracy"] == pytest.approx(1.0)  # prompt 0 strong, the rest cheap


def test_pgr_is_defined_when_the_strong_model_is_the_less_accurate() -> None:
    # acc_weak 1.0, acc_strong 0.5: the gap is negative, not zero, so PGR is still defined.
    weak, strong = np.ones(4, dtype=bool), np.array([True, True, False, False])
    _, pgr = metrics.pgr_curve(PERFECT, weak, strong)
    np.testing.assert_allclose(pgr, [0, 0, 0, 0.5, 1])
    assert metrics.apgr(PERFECT, weak, strong) == pytest.approx(0.25)


def test_accuracy_at_fraction_rounds_to_the_nearest_cut_point() -> None:
    # 0.4 of 4 prompts is 1.6: the nearest cut point sends two prompts strong.
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 0.4) == pytest.approx(1.0)
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 0.1) == pytest.approx(0.5)


def test_accuracy_at_fraction_rounds_a_half_up_and_takes_both_ends() -> None:
    # 0.5 of 5 prompts is 2.5 cut points: half up sends three strong (round() would say two).
    perfect, weak, strong = [5.0, 4.0, 3.0, 2.0, 1.0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]
    assert metrics.accuracy_at_fraction(perfect, weak, strong, 0.5) == pytest.approx(1.0)
    assert metrics.accuracy_at_fraction(perfect, weak, strong, 0.3) == pytest.approx(0.8)
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 0.0) == pytest.approx(0.5)
    assert metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, 1.0) == pytest.approx(1.0)


def test_fractions_outside_zero_to_one_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        metrics.accuracy_at_fraction(PERFECT, WEAK, STRONG, -0.25)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.apgr([], [], [])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.routed_accuracy([], [], [])

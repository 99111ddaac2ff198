"""Labels from logged events, and operating points mapped to thresholds by the held-out curve."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from routecache.classifier import metrics
from routecache.classifier.operating_point import CurvePoint, OperatingCurve, fit_curve
from routecache.domain import OperatingPoint
from routecache.router.events import JsonlEventLog, SkippedLines
from routecache.training.data_files import DataFileError
from routecache.training.outcomes import EventLabel, labels_from_events, read_events


def _completion(response_id: str, prompt: str, **fields: object) -> dict[str, object]:
    base = {"response_id": response_id, "prompt": prompt, "cache_outcome": "miss",
            "tier": "cheap", "escalated": False}  # fmt: skip
    return {**base, **fields}


def test_events_yield_cheap_model_labels(tmp_path: Path) -> None:
    log = JsonlEventLog(tmp_path / "events.jsonl")
    log.emit("completion", _completion("r1", "cheap then thumbs up"))
    log.emit("completion", _completion("r2", "cheap then thumbs down"))
    log.emit("completion", _completion("r3", "escalated", escalated=True, tier="strong"))
    log.emit("completion", _completion("r4", "strong answer", tier="strong"))
    log.emit("completion", _completion("r5", "cache hit", cache_outcome="semantic"))
    log.emit("completion", _completion("r6", "no feedback"))
    log.emit("completion", _completion("r7", "graded later"))
    log.emit("feedback", {"response_id": "r1", "thumbs_up": True})
    log.emit("feedback", {"response_id": "r2", "thumbs_up": True})
    log.emit("feedback", {"response_id": "r2", "thumbs_up": False})  # the last rating wins
    log.emit("feedback", {"response_id": "r4", "thumbs_up": False})
    log.emit("feedback", {"response_id": "r5", "thumbs_up": False})
    log.emit("feedback", {"response_id": "unknown", "thumbs_up": False})
    log.emit("outcome", {"response_id": "r7", "correct": True})
    log.emit("outcome", {"prompt": "graded offline", "weak_correct": False, "strong_correct": True})
    log.close()
    labels = labels_from_events(read_events([tmp_path / "events.jsonl"]))
    assert sorted(labels, key=lambda label: label.prompt) == [
        EventLabel("cheap then thumbs down", weak_correct=False),
        EventLabel("cheap then thumbs up", weak_correct=True),
        EventLabel("escalated", weak_correct=False),
        EventLabel("graded later", weak_correct=True),
        EventLabel("graded offline", weak_correct=False, strong_correct=True),
    ]


def test_a_graded_response_that_also_names_its_prompt_is_still_rated_once_last_wins() -> None:
    # A grader's export may carry the prompt beside response_id + correct; that label came from
    # the logged completion but was kept apart, so the response got both a thumbs-up label and
    # the grader's "wrong".
    events: list[dict[str, Any]] = [
        {"kind": "completion", **_completion("r1", "what is 2 + 2")},
        {"kind": "feedback", "response_id": "r1", "thumbs_up": True},
        {"kind": "outcome", "response_id": "r1", "prompt": "what is 2 + 2", "correct": False},
    ]
    assert labels_from_events(events) == [EventLabel("what is 2 + 2", weak_correct=False)]


def test_graded_prompts_come_first_then_rated_responses_in_first_rated_order() -> None:
    events: list[dict[str, Any]] = [
        {"kind": "completion", **_completion("r1", "first rated")},
        {"kind": "completion", **_completion("r2", "second rated")},
        {"kind": "feedback", "response_id": "r1", "thumbs_up": True},
        {"kind": "feedback", "response_id": "r2", "thumbs_up": True},
        {"kind": "outcome", "prompt": "graded", "weak_correct": True},
        {"kind": "feedback", "response_id": "r1", "thumbs_up": False},  # re-rated, same place
    ]
    assert labels_from_events(events) == [
        EventLabel("graded", weak_correct=True),
        EventLabel("first rated", weak_correct=False),
        EventLabel("second rated", weak_correct=True),
    ]


def test_a_rating_of_an_escalated_answer_is_not_the_cheap_models_and_a_hit_is_no_label() -> None:
    # The user rated what the strong model answered after the cheap answer failed validation.
    events: list[dict[str, Any]] = [
        {"kind": "completion", **_completion("r1", "escalated", escalated=True)},
        {"kind": "feedback", "response_id": "r1", "thumbs_up": True},
        {"kind": "completion", **_completion("r2", "hit", escalated=True, cache_outcome="exact")},
    ]
    assert labels_from_events(events) == [EventLabel("escalated", weak_correct=False)]


def test_an_unstated_strong_grade_is_unknown_and_an_ungraded_outcome_no_label() -> None:
    events: list[dict[str, Any]] = [
        {"kind": "completion", **_completion("r1", "cheap answer")},
        {"kind": "outcome", "prompt": "graded cheap only", "weak_correct": True},
        {"kind": "outcome", "response_id": "r1", "comment": "no grade given"},
        {"kind": "outcome", "response_id": "never logged", "correct": False},
    ]
    # None, not False: a row without a strong outcome must not count as a strong failure.
    assert labels_from_events(events) == [
        EventLabel("graded cheap only", weak_correct=True, strong_correct=None)
    ]


def test_event_logs_are_read_in_order_across_files_and_non_object_lines_are_skipped(
    tmp_path: Path,
) -> None:
    # A rotated log: the completion in the older file, its rating in the newer one.
    older, newer = tmp_path / "events.1.jsonl", tmp_path / "events.jsonl"
    completion = {"kind": "completion", **_completion("r1", "split across logs")}
    older.write_text(json.dumps(completion) + '\n[1, 2]\n"a string"\n')
    newer.write_text(json.dumps({"kind": "feedback", "response_id": "r1", "thumbs_up": False}))
    events = read_events([older, newer])
    assert [e["kind"] for e in events] == ["completion", "feedback"]
    assert labels_from_events(events) == [EventLabel("split across logs", weak_correct=False)]


def test_an_event_logged_twice_is_read_once_across_files(tmp_path: Path) -> None:
    # An event the Redis sink wrote twice (exported twice) made two training labels; one given
    # in two files too. Events without an event_id (older logs) are read as they are.
    older, newer = tmp_path / "events.1.jsonl", tmp_path / "events.jsonl"
    rated = {"kind": "feedback", "response_id": "r1", "thumbs_up": False, "event_id": "e" * 32}
    plain = {"kind": "feedback", "response_id": "r2", "thumbs_up": True}
    older.write_text(json.dumps(rated) + "\n" + json.dumps(plain) + "\n")
    newer.write_text(json.dumps(rated) + "\n" + json.dumps(plain) + "\n")
    assert read_events([older, newer]) == [rated, plain, plain]


@pytest.mark.parametrize(
    "broken",
    ["{not json", "[" * 100_000, '{"n": ' + "9" * 5_000 + "}"],
    ids=["not JSON", "too deep", "too many digits"],
)
def test_a_torn_or_non_object_event_line_is_skipped_and_counted(
    tmp_path: Path, broken: str
) -> None:
    # Before: retrain stopped (exit 2) at a line a crash tore, which JsonlEventLog leaves in
    # place and export-events skips and counts; a line of JSON that is no object was dropped
    # without a word. (The last two were once a bare RecursionError / ValueError.)
    path = tmp_path / "events.jsonl"
    event = {"kind": "feedback", "thumbs_up": True}
    cut = json.dumps({"kind": "feedback", "prompt": "é"}, ensure_ascii=False).encode()[:-3]
    with path.open("wb") as log:
        log.write(f'{json.dumps(event)}\n{broken}\n[1, 2]\n"text"\n'.encode())
        log.write(cut + b"\n" + json.dumps(event).encode() + b"\n")
    skipped = SkippedLines()
    assert read_events([path], skipped) == [event, event]
    assert skipped.torn == 4


@pytest.mark.parametrize(
    "outcome",
    [
        {"prompt": "p", "weak_correct": "false"},
        {"prompt": "p", "weak_correct": True, "strong_correct": "no"},
        {"prompt": None, "weak_correct": True},
        {"response_id": "r1", "correct": "false"},
        {"response_id": "r1", "correct": None},
    ],
    ids=[
        "weak outcome as text",
        "strong outcome as text",
        "null prompt",
        "grade as text",
        "null grade",
    ],
)
def test_an_outcome_event_with_a_mistyped_grade_or_prompt_is_refused_with_its_line(
    tmp_path: Path, outcome: dict[str, object]
) -> None:
    # A grader's "false" was read by bool() as correct, a null prompt as the prompt "None":
    # wrong labels, silently trained on.
    path = tmp_path / "events.jsonl"
    completion = {"kind": "completion", **_completion("r1", "cheap answer")}
    path.write_text(json.dumps(completion) + "\n" + json.dumps({"kind": "outcome", **outcome}))
    with pytest.raises(ValueError, match=r"events\.jsonl:2: .* must be"):
        read_events([path])


@pytest.mark.parametrize("thumbs", [None, "false", 0], ids=["no rating", "text", "a number"])
def test_a_feedback_event_whose_rating_is_not_true_or_false_is_refused_with_its_line(
    tmp_path: Path, thumbs: object
) -> None:
    # bool() read a missing thumbs_up as a thumbs-down and "false" as a thumbs-up: a label
    # the cheap model never earned, trained on without a word.
    path = tmp_path / "events.jsonl"
    completion = {"kind": "completion", **_completion("r1", "cheap answer")}
    feedback: dict[str, object] = {"kind": "feedback", "response_id": "r1"}
    if thumbs is not None:
        feedback["thumbs_up"] = thumbs
    path.write_text(json.dumps(completion) + "\n" + json.dumps(feedback))
    with pytest.raises(ValueError, match=r"events\.jsonl:2: thumbs_up must be true or false"):
        read_events([path])


def test_an_outcome_event_may_grade_with_0_or_1_and_leave_the_strong_grade_null(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    outcome = {"kind": "outcome", "prompt": "p", "weak_correct": 0, "strong_correct": None}
    path.write_text(json.dumps(outcome))
    assert labels_from_events(read_events([path])) == [
        EventLabel("p", weak_correct=False, strong_correct=None)
    ]


def _write_events(path: Path, *events: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return path


@pytest.mark.parametrize("grades_first", [True, False], ids=["grades first", "log first"])
def test_labels_do_not_depend_on_the_order_of_the_event_files(
    tmp_path: Path, grades_first: bool
) -> None:
    # A rating or grade counted only if its completion had been read before it: `--events
    # grades.jsonl --events log.jsonl` gave no label, the other order three.
    grades = _write_events(
        tmp_path / "grades.jsonl",
        {"kind": "outcome", "response_id": "r1", "correct": True},
        {"kind": "feedback", "response_id": "r2", "thumbs_up": False},
        {"kind": "outcome", "response_id": "r2", "correct": True},  # re-graded: this one wins
        {"kind": "feedback", "response_id": "r3", "thumbs_up": False},
    )
    log = _write_events(
        tmp_path / "log.jsonl",
        *({"kind": "completion", **_completion(f"r{i}", f"P{i}")} for i in (1, 2, 3)),
    )
    paths = [grades, log] if grades_first else [log, grades]
    assert sorted(labels_from_events(read_events(paths)), key=lambda label: label.prompt) == [
        EventLabel("P1", weak_correct=True),
        EventLabel("P2", weak_correct=True),
        EventLabel("P3", weak_correct=False),
    ]


@pytest.mark.parametrize("prompt", [None, 7, "missing"], ids=["null", "a number", "missing"])
def test_a_completion_whose_prompt_is_not_text_is_refused_with_its_line(
    tmp_path: Path, prompt: object
) -> None:
    # A completion without its prompt ended retrain in a KeyError; a null one trained on the
    # prompt "None".
    completion: dict[str, Any] = {"kind": "completion", **_completion("r1", "cheap answer")}
    if prompt == "missing":
        del completion["prompt"]
    else:
        completion["prompt"] = prompt
    path = _write_events(
        tmp_path / "events.jsonl",
        {"kind": "completion", **_completion("r0", "a good one")},
        completion,
        {"kind": "feedback", "response_id": "r1", "thumbs_up": False},
    )
    with pytest.raises(DataFileError, match=r"events\.jsonl:2: prompt must be text"):
        read_events([path])


@pytest.mark.parametrize("kind", ["outcome", "completion"])
def test_a_prompt_with_a_lone_surrogate_is_refused_with_its_line(tmp_path: Path, kind: str) -> None:
    # JSON may escape half a UTF-16 pair: read as text, it ended retrain in a UnicodeEncodeError
    # from the embedding cache, where a routing row with it is refused with its file and line.
    event: dict[str, Any] = {"kind": kind, **_completion("r1", "cheap answer")}
    event.update(prompt="caf\ud800 question", weak_correct=False)
    path = _write_events(tmp_path / "events.jsonl", {"kind": "outcome", "prompt": "p"}, event)
    with pytest.raises(DataFileError, match=r"events\.jsonl:2: prompt .*surrogate"):
        read_events([path])


@pytest.mark.parametrize(
    "outcome",
    [
        {"prompt": "p", "correct": False},
        {"response_id": "r1", "weak_correct": False},
        {"response_id": "r1", "strong_correct": True},
        {"prompt": "p", "strong_correct": True},
        {"prompt": "p", "response_id": "r1", "weak_correct": True, "correct": False},
    ],
    ids=[
        "a prompt graded with correct",
        "a response graded with weak_correct",
        "a response graded with strong_correct",
        "a prompt with only its strong grade",
        "both shapes at once",
    ],
)
def test_an_outcome_event_in_neither_documented_shape_is_refused_with_its_line(
    tmp_path: Path, outcome: dict[str, object]
) -> None:
    # Each was dropped without a word: the grader's labels never trained anything.
    path = _write_events(
        tmp_path / "events.jsonl",
        {"kind": "completion", **_completion("r1", "cheap answer")},
        {"kind": "outcome", **outcome},
    )
    with pytest.raises(DataFileError, match=r"events\.jsonl:2: an outcome grades"):
        read_events([path])


def test_a_prompt_graded_twice_keeps_its_latest_grade_in_its_first_place() -> None:
    # Both grades were kept: the same prompt labelled failed and not failed.
    events: list[dict[str, Any]] = [
        {"kind": "outcome", "prompt": "regraded", "weak_correct": True, "strong_correct": True},
        {"kind": "outcome", "prompt": "graded once", "weak_correct": False},
        {"kind": "outcome", "prompt": "regraded", "weak_correct": False},
    ]
    assert labels_from_events(events) == [
        EventLabel("regraded", weak_correct=False),
        EventLabel("graded once", weak_correct=False),
    ]


def test_an_event_file_given_twice_is_read_once(tmp_path: Path) -> None:
    # `--events log.jsonl --events ./log.jsonl` (or a link to it) read every event twice.
    path = _write_events(
        tmp_path / "events.jsonl",
        {"kind": "outcome", "prompt": "graded", "weak_correct": False},
        {"kind": "completion", **_completion("r1", "escalated", escalated=True)},
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "latest.jsonl").symlink_to(path)
    again = [path, tmp_path / "sub" / ".." / "events.jsonl", tmp_path / "latest.jsonl"]
    assert read_events(again) == read_events([path])


@pytest.fixture()
def curve() -> OperatingCurve:
    rng = np.random.default_rng(0)
    n = 1000
    scores = rng.random(n)
    # The cheap model fails more often on high scores; the strong model is right 90% of the time.
    weak = rng.random(n) > scores
    strong = rng.random(n) < 0.9
    lengths = rng.integers(10, 100, n)
    return fit_curve(scores, weak, strong, lambda to_strong: float(lengths[to_strong].sum() + 1))


def test_a_target_strong_share_is_met_on_the_held_out_data(curve: OperatingCurve) -> None:
    for share in (0.0, 0.25, 0.5, 1.0):
        threshold = curve.threshold_for(OperatingPoint(strong_fraction=share))
        point = next(p for p in curve.points if p.threshold == threshold)
        assert point.strong_fraction == pytest.approx(share, abs=0.005)


def test_quality_and_cost_targets_pick_the_cheapest_and_best_points(
    curve: OperatingCurve,
) -> None:
    by_threshold = {p.threshold: p for p in curve.points}
    quality = by_threshold[curve.threshold_for(OperatingPoint(quality=0.8))]
    assert quality.pgr >= 0.8
    assert all(p.pgr < 0.8 for p in curve.points if p.strong_fraction < quality.strong_fraction)
    cost = by_threshold[curve.threshold_for(OperatingPoint(cost_ratio=0.3))]
    assert cost.cost_vs_all_strong <= 0.3
    assert all(p.cost_vs_all_strong > 0.3 for p in curve.points if p.pgr > cost.pgr)
    assert curve.threshold_for(OperatingPoint(quality=9.0)) == curve.points[-1].threshold
    assert curve.threshold_for(OperatingPoint(cost_ratio=0.0)) == curve.points[0].threshold


def test_a_target_met_exactly_picks_that_point() -> None:
    # (threshold, strong fraction, PGR, accuracy, cost vs all strong)
    curve = OperatingCurve(
        [CurvePoint(0.9, 0.0, 0.0, 0.6, 0.1), CurvePoint(0.5, 0.3, 0.7, 0.7, 0.4),
         CurvePoint(0.1, 1.0, 1.0, 0.8, 1.0)]
    )  # fmt: skip
    assert curve.threshold_for(OperatingPoint(quality=0.7)) == 0.5  # not the dearer 0.1
    assert curve.threshold_for(OperatingPoint(cost_ratio=0.4)) == 0.5  # not the worse 0.9


def test_the_curve_survives_json_and_operating_points_need_one_target(
    curve: OperatingCurve,
) -> None:
    again = OperatingCurve.from_json(json.loads(json.dumps(curve.to_json())))
    point = OperatingPoint(quality=0.5)
    assert again.threshold_for(point) == curve.threshold_for(point)
    with pytest.raises(ValueError, match="at least one point"):
        OperatingCurve.from_json([])
    with pytest.raises(ValueError, match="exactly one"):
        OperatingPoint()
    with pytest.raises(ValueError, match="exactly one"):
        OperatingPoint(strong_fraction=0.3, quality=0.5)


def test_a_curve_read_with_its_points_out_of_order_picks_the_same_thresholds(
    curve: OperatingCurve,
) -> None:
    # The metadata file may be rewritten by hand or by a tool that reorders the list: the
    # cheapest point meeting a target must still be the one of lowest strong share.
    shuffled = OperatingCurve.from_json(curve.to_json()[::-1])
    for point in (
        OperatingPoint(quality=0.5),
        OperatingPoint(cost_ratio=0.3),
        OperatingPoint(strong_fraction=0.25),
    ):
        assert shuffled.threshold_for(point) == curve.threshold_for(point)


def test_a_holdout_that_costs_nothing_routes_all_cheap_under_any_cost_ceiling() -> None:
    # 0 / 0 spend: each point costs what sending everything strong does, so a ceiling below
    # that is met only by the all-cheap point, not by whatever point came last.
    scores = np.linspace(1.0, 0.0, 10)
    curve = fit_curve(scores, np.arange(10) >= 5, np.ones(10, dtype=bool), lambda _: 0.0)
    assert {p.cost_vs_all_strong for p in curve.points} == {1.0}
    assert curve.threshold_for(OperatingPoint(cost_ratio=0.5)) == curve.points[0].threshold


def test_a_quality_reached_up_to_rounding_picks_the_cheapest_point_like_cpt() -> None:
    # Five cheap failures among ten prompts, each fixed by the strong model: in exact arithmetic
    # PGR at 2 strong calls is 2/5 = 0.4, in floating point 0.3999999999999999. The threshold
    # for quality 0.4 sent a third prompt strong, one more than metrics.cpt reports needing.
    scores = np.linspace(1.0, 0.0, 10)
    weak = np.arange(10) >= 5
    strong = np.ones(10, dtype=bool)
    curve = fit_curve(scores, weak, strong, lambda to_strong: float(to_strong.sum() + 1))
    threshold = curve.threshold_for(OperatingPoint(quality=0.4))
    assert (scores >= threshold).mean() == metrics.cpt(scores, weak, strong, 0.4) == 0.2


def _assert_each_point_records_its_routing(
    curve: OperatingCurve,
    scores: np.ndarray,
    weak: np.ndarray,
    strong: np.ndarray,
    cost: Callable[[np.ndarray], float],
) -> None:
    gap, all_strong = strong.mean() - weak.mean(), cost(np.ones(len(scores), dtype=bool))
    for p in curve.points:
        to_strong = scores >= p.threshold  # the service's rule
        assert to_strong.mean() == pytest.approx(p.strong_fraction)
        accuracy = metrics.routed_accuracy(to_strong, weak, strong)
        assert p.accuracy == pytest.approx(accuracy)
        assert p.pgr == pytest.approx((accuracy - weak.mean()) / gap)
        assert p.cost_vs_all_strong == pytest.approx(cost(to_strong) / all_strong)


def test_each_curve_point_records_what_routing_by_its_threshold_does() -> None:
    rng = np.random.default_rng(1)
    n = 200
    # Routing scores span [-1, 1]; the bounds themselves are included.
    scores = np.concatenate([[-1.0, 1.0], rng.uniform(-1.0, 1.0, n - 2)])
    weak = rng.random(n) > (scores + 1) / 2
    strong = rng.random(n) < 0.9
    lengths = rng.integers(10, 100, n)

    def cost(to_strong: np.ndarray) -> float:
        return float(10 * lengths[to_strong].sum() + lengths[~to_strong].sum())

    curve = fit_curve(scores, weak, strong, cost)
    _assert_each_point_records_its_routing(curve, scores, weak, strong, cost)
    # Share 0 and share 1 hold for any routing score, not only the held-out ones.
    assert curve.points[0].threshold > 1.0
    assert curve.points[-1].threshold == -1.0
    assert curve.points[-1].cost_vs_all_strong == 1.0


def test_a_small_holdout_meets_each_whole_percent_share_to_within_half_a_prompt() -> None:
    n = 199  # not a multiple of 100: the share nearest each percent must still be on the curve
    scores = np.linspace(1.0, -1.0, n)
    weak = np.arange(n) % 2 == 0
    curve = fit_curve(scores, weak, np.ones(n, dtype=bool), lambda to_strong: 1.0)
    for percent in range(101):
        threshold = curve.threshold_for(OperatingPoint(strong_fraction=percent / 100))
        sent = (scores >= threshold).mean()
        assert abs(sent - percent / 100) <= 1 / (2 * n) + 1e-12, percent


def test_tied_scores_record_the_share_their_threshold_really_sends() -> None:
    # Duplicate prompts score alike. A threshold between two tied scores is the tied score
    # itself and sends all of them strong, yet the curve recorded the share (and PGR) of only
    # the first k: asked for 30 % strong, the service sent 60 %.
    scores = np.array([0.5] * 6 + [0.1] * 4)
    weak = np.array([0, 1, 0, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    strong = np.ones(10, dtype=bool)

    def cost(to_strong: np.ndarray) -> float:
        return float(to_strong.sum() + 1)

    curve = fit_curve(scores, weak, strong, cost)
    _assert_each_point_records_its_routing(curve, scores, weak, strong, cost)
    threshold = curve.threshold_for(OperatingPoint(strong_fraction=0.3))
    assert (scores >= threshold).mean() in (0.0, 0.6)  # the shares these scores allow


def test_the_no_share_and_all_share_thresholds_hold_beyond_the_held_out_scores() -> None:
    # Held-out scores well inside [-1, 1]: a later request may score anywhere in it, and
    # share 0 must still send nothing strong, share 1 everything.
    scores = np.linspace(0.4, -0.4, 20)
    weak = np.arange(20) % 2 == 0
    curve = fit_curve(scores, weak, np.ones(20, dtype=bool), lambda to_strong: 1.0)
    assert curve.threshold_for(OperatingPoint(strong_fraction=0.0)) > 1.0
    assert curve.threshold_for(OperatingPoint(strong_fraction=1.0)) == -1.0


def test_a_cost_ceiling_met_up_to_rounding_keeps_that_point() -> None:
    # Ten prompts at 0.1 each: three strong cost 0.30000000000000004 / 1.0 in floating point,
    # which a ceiling of 0.3 must still admit (as a quality target allows for rounding).
    scores = np.linspace(0.9, -0.9, 10)
    curve = fit_curve(scores, np.zeros(10), np.ones(10), lambda m: sum(0.1 for x in m if x))
    assert curve.points[3].cost_vs_all_strong != 0.3
    threshold = curve.threshold_for(OperatingPoint(cost_ratio=0.3))
    assert (scores >= threshold).mean() == pytest.approx(0.3)


def test_one_shared_call_yields_one_label_and_older_logs_label_as_before() -> None:
    # Three identical requests shared one call (SingleFlight): the followers' completions say
    # "shared" and name the maker's entry. One failed cheap answer is one label, not three,
    # and thumbs-down from each caller on one shared answer is one label too (the last wins).
    shared = {"shared": True, "entry_id": "e1"}
    events: list[dict[str, Any]] = [
        {"kind": "completion", **_completion("r1", "escalated", escalated=True, entry_id="e1")},
        {"kind": "completion", **_completion("r2", "escalated", escalated=True, **shared)},
        {"kind": "completion", **_completion("r3", "rated", entry_id="e2")},
        {"kind": "completion", **_completion("r4", "rated", shared=True, entry_id="e2")},
        {"kind": "feedback", "response_id": "r4", "thumbs_up": False},
        {"kind": "feedback", "response_id": "r3", "thumbs_up": True},
        # Older logs (no "shared" field, no entry stored): one label per completion, as before.
        {"kind": "completion", **_completion("r5", "old", escalated=True)},
        {"kind": "completion", **_completion("r6", "old", escalated=True)},
    ]
    assert labels_from_events(events) == [
        EventLabel("escalated", weak_correct=False),
        EventLabel("rated", weak_correct=True),
        EventLabel("old", weak_correct=False),
        EventLabel("old", weak_correct=False),
    ]

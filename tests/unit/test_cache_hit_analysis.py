"""The notebook's building blocks on a handful of hand-written events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from routecache.analysis import cache_hits as ch
from routecache.analysis.export import events_frame, read_events, write_parquet
from routecache.errors import Unavailable, UpstreamError
from tests.fakes import count_shared_calls, eventually
from tests.unit.conftest import make_harness
from tests.unit.test_pipeline import ACME, json_request

T0 = 1_700_000_000.0


def completion(
    ts: float, rid: str, path: str, prompt: str, entry: str, **extra: Any
) -> dict[str, Any]:
    return {"kind": "completion", "ts": ts, "response_id": rid, "tenant": "acme", "path": path,
            "prompt": prompt, "entry_id": entry, "similarity": extra.pop("similarity", 0.0),
            "cost_usd": extra.pop("cost", 0.0), "saved_usd": extra.pop("saved", 0.0),
            "latency_ms": extra.pop("latency", 100.0), "escalated": extra.pop("escalated", False),
            "difficulty": 0.3, **extra}  # fmt: skip


EVENTS = [
    completion(T0, "r1", "cheap", "capital of France?", "e1", cost=0.01),
    completion(
        T0 + 1,
        "r2",
        "semantic_hit",
        "capital of Spain?",
        "e1",
        similarity=0.91,
        saved=0.01,
        latency=5.0,
    ),
    completion(
        T0 + 2,
        "r3",
        "exact_hit",
        "capital of France?",
        "e1",
        similarity=1.0,
        saved=0.01,
        latency=1.0,
    ),
    completion(T0 + 3, "r4", "strong", "prove it", "e2", cost=0.2, escalated=True),
    {
        "kind": "error",
        "ts": T0 + 4,
        "tenant": "acme",
        "path": "error",
        "prompt": "x",
        "latency_ms": 50.0,
        "failed_validators": ["json_schema"],
    },
    {
        "kind": "feedback",
        "ts": T0 + 5,
        "response_id": "r2",
        "thumbs_up": False,
        "correction": "Madrid",
    },
    {"kind": "feedback", "ts": T0 + 6, "response_id": "r3", "thumbs_up": True, "correction": ""},
]


def test_false_hit_review_pairs_the_question_with_the_cached_one() -> None:
    review = ch.false_hit_review(events_frame(EVENTS))
    assert review[["prompt", "cached_question", "correction"]].values.tolist() == [
        ["capital of Spain?", "capital of France?", "Madrid"]
    ]


def test_routing_vs_quality_and_latency_by_path() -> None:
    frame = events_frame(EVENTS)
    quality = ch.routing_vs_quality(frame)
    assert list(quality.index) == ["exact_hit", "semantic_hit", "cheap", "strong", "error"]
    assert quality.loc["semantic_hit", "thumbs_down"] == 1
    assert quality.loc["exact_hit", "approval"] == 1.0
    assert quality.loc["strong", "escalated"] == 1
    assert quality.loc["strong", "cost_usd"] == pytest.approx(0.2)
    latency = ch.latency_by_path(frame)
    assert latency.loc["error", "count"] == 1 and latency.loc["exact_hit", "p50_ms"] == 1.0


def test_savings_and_hit_rate_over_time() -> None:
    frame = events_frame(EVENTS)
    money = ch.savings(frame)
    assert money["spent_usd"].iloc[-1] == pytest.approx(0.21)
    assert money["saved_usd"].iloc[-1] == pytest.approx(0.02)
    rates = ch.hit_rate_over_time(frame, buckets=5)
    assert rates["requests"].sum() == 5
    hits = (rates["exact_hit_rate"] + rates["semantic_hit_rate"]) * rates["requests"]
    assert hits.sum() == pytest.approx(2)


def test_spend_includes_what_failed_requests_paid_and_old_error_events_count_nothing() -> None:
    refused = {"kind": "error", "ts": T0 + 10, "tenant": "acme", "reason": "failed_validation",
               "cost_usd": 0.03}  # fmt: skip
    old = {"kind": "error", "ts": T0 + 11, "tenant": "acme", "reason": "unavailable"}
    money = ch.savings(events_frame([*EVENTS, refused, old]))
    assert money["spent_usd"].iloc[-1] == pytest.approx(0.24)


@pytest.mark.parametrize(
    "events",
    [[], [EVENTS[-1]]],  # an empty log (or a --since past every event); feedback alone
    ids=["no events", "feedback only"],
)
def test_every_table_is_empty_not_an_error_when_no_request_was_logged(
    events: list[dict[str, Any]],
) -> None:
    frame = events_frame(events)
    assert len(ch.requests(frame)) == 0
    assert len(ch.hit_rate_over_time(frame)) == 0
    assert len(ch.hits_with_feedback(frame)) == 0
    assert len(ch.false_hit_review(frame)) == 0
    assert len(ch.savings(frame)) == 0
    assert len(ch.routing_vs_quality(frame)) == 0
    assert len(ch.latency_by_path(frame)) == 0


def test_a_response_rated_twice_counts_once_with_its_latest_rating() -> None:
    # Feedback may be sent again for the same response (a changed mind); each feedback event
    # was joined to the request, so the request was counted, and costed, once per rating.
    changed_mind = {"kind": "feedback", "ts": T0 + 7, "response_id": "r2", "thumbs_up": True,
                    "correction": ""}  # fmt: skip
    frame = events_frame([*EVENTS, changed_mind])
    quality = ch.routing_vs_quality(frame)
    assert quality["requests"].sum() == 5
    semantic = quality.loc["semantic_hit"]
    assert [semantic["requests"], semantic["thumbs_up"], semantic["thumbs_down"]] == [1, 1, 0]
    hits = ch.hits_with_feedback(frame)
    assert hits[["response_id", "feedback"]].values.tolist() == [["r2", "up"], ["r3", "up"]]
    assert len(ch.false_hit_review(frame)) == 0


def test_the_latest_rating_is_the_latest_by_time_and_savings_accrue_in_time_order() -> None:
    # Exports of several replicas concatenated (pd.concat) are not in time order.
    earlier = {"kind": "feedback", "ts": T0 + 4.5, "response_id": "r2", "thumbs_up": True,
               "correction": ""}  # fmt: skip
    frame = events_frame([*EVENTS, earlier]).iloc[::-1]
    hits = ch.hits_with_feedback(frame)
    assert dict(zip(hits["response_id"], hits["feedback"], strict=True)) == {
        "r2": "down",
        "r3": "up",
    }
    assert ch.savings(frame)["spent_usd"].tolist() == pytest.approx([0.01, 0.01, 0.01, 0.21, 0.21])


def test_each_path_counts_its_requests_once_and_a_pathless_error_counts_as_error() -> None:
    pathless = {"kind": "error", "ts": T0 + 8, "tenant": "acme", "prompt": "y"}  # no path field
    quality = ch.routing_vs_quality(events_frame([*EVENTS, pathless]))
    assert quality["requests"].to_dict() == {
        "exact_hit": 1, "semantic_hit": 1, "cheap": 1, "strong": 1, "error": 2,
    }  # fmt: skip


def test_hit_rates_are_per_kind_of_hit_and_empty_buckets_are_left_out() -> None:
    events = [
        completion(T0, "a", "exact_hit", "q", "e1"),
        completion(T0 + 1, "b", "semantic_hit", "q", "e1"),
        completion(T0 + 2, "c", "semantic_hit", "q", "e1"),
        completion(T0 + 3, "d", "cheap", "q", "e2"),
        completion(T0 + 400, "e", "exact_hit", "q", "e1"),  # a quiet spell, then one hit
    ]
    rates = ch.hit_rate_over_time(events_frame(events), buckets=4)  # 100 s buckets
    assert rates["requests"].tolist() == [4, 1]
    assert rates["exact_hit_rate"].tolist() == [0.25, 1.0]
    assert rates["semantic_hit_rate"].tolist() == [0.5, 0.0]


def test_hits_without_feedback_are_listed_as_none_and_kept_out_of_the_false_hit_review() -> None:
    unrated = completion(T0 + 7, "r5", "semantic_hit", "France's capital?", "e1", similarity=0.95)
    frame = events_frame([*EVENTS, unrated])
    hits = ch.hits_with_feedback(frame)
    assert hits[["response_id", "feedback"]].values.tolist() == [
        ["r2", "down"], ["r3", "up"], ["r5", "none"],
    ]  # fmt: skip
    assert ch.false_hit_review(frame)["prompt"].tolist() == ["capital of Spain?"]


def test_the_false_hit_review_lists_the_most_similar_first() -> None:
    closer = completion(T0 + 7, "r5", "semantic_hit", "France's capital?", "e1", similarity=0.95)
    thumbs_down = {"kind": "feedback", "ts": T0 + 8, "response_id": "r5", "thumbs_up": False,
                   "correction": ""}  # fmt: skip
    review = ch.false_hit_review(events_frame([*EVENTS, closer, thumbs_down]))
    assert review["similarity"].tolist() == [0.95, 0.91]


def test_the_false_hit_review_names_an_entrys_first_store_and_none_for_one_stored_elsewhere() -> (
    None
):
    restored = completion(T0 + 7, "r5", "cheap", "France: capital?", "e1")  # e1 written again
    # A hit on an entry another replica stored: its own prompt is not the cached question.
    elsewhere = completion(T0 + 8, "r6", "semantic_hit", "Rome?", "e9", similarity=0.9)
    thumbs_down = {"kind": "feedback", "ts": T0 + 9, "response_id": "r6", "thumbs_up": False,
                   "correction": ""}  # fmt: skip
    review = ch.false_hit_review(events_frame([*EVENTS, restored, elsewhere, thumbs_down]))
    assert review["prompt"].tolist() == ["capital of Spain?", "Rome?"]
    assert review["cached_question"].fillna("none").tolist() == ["capital of France?", "none"]


def test_hit_rates_of_requests_all_in_one_instant_are_one_bucket() -> None:
    events = [completion(T0, "a", "exact_hit", "q", "e1"), completion(T0, "b", "cheap", "q", "e2")]
    rates = ch.hit_rate_over_time(events_frame(events))
    assert rates[["requests", "exact_hit_rate"]].values.tolist() == [[2, 0.5]]


def test_latency_percentiles_per_path() -> None:
    events = [completion(T0 + n, f"r{n}", "cheap", "q", "e", latency=float(n)) for n in range(101)]
    latency = ch.latency_by_path(events_frame(events))
    row = latency.loc["cheap"]
    assert [row["count"], row["p50_ms"], row["p95_ms"], row["p99_ms"]] == [101, 50.0, 95.0, 99.0]


@pytest.mark.parametrize("exported", [False, True], ids=["jsonl", "parquet"])
def test_load_events_reads_the_log_or_its_parquet_export(tmp_path: Path, exported: bool) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(event) + "\n" for event in EVENTS))
    path = tmp_path / "events.parquet" if exported else log
    if exported:
        write_parquet(list(read_events(log)), path, str(log))  # export-events' parquet
    frame = ch.load_events(path)
    assert frame["kind"].tolist() == [event["kind"] for event in EVENTS]
    assert ch.routing_vs_quality(frame).loc["strong", "cost_usd"] == pytest.approx(0.2)


def test_a_failed_admin_call_is_no_request_and_an_error_of_an_older_log_is_one() -> None:
    # A failed Feedback, Invalidate or GetStats call writes an error event too; counted as a
    # request, it lowered every hit rate (routecache_requests_total leaves it out).
    failed_feedback = {"kind": "error", "ts": T0 + 8, "tenant": "acme", "path": "error",
                       "reason": "not_found", "admin": True}  # fmt: skip
    failed_request = {"kind": "error", "ts": T0 + 9, "tenant": "acme", "path": "error",
                      "reason": "unavailable", "admin": False}  # fmt: skip
    # EVENTS' error has no "admin" field (a log written before it existed): a request.
    frame = events_frame([*EVENTS, failed_feedback, failed_request])
    assert ch.routing_vs_quality(frame).loc["error", "requests"] == 2
    assert ch.hit_rate_over_time(frame)["requests"].sum() == 6
    assert len(ch.latency_by_path(frame)) == 5 and len(ch.savings(frame)) == 6


@pytest.mark.parametrize("exported", [False, True], ids=["jsonl", "parquet"])
def test_an_escalation_whose_strong_call_failed_is_counted(tmp_path: Path, exported: bool) -> None:
    # Before: routing_vs_quality read the top-level `escalated` alone, which an error event
    # never carries (its validation.escalated does), so an escalated request whose strong call
    # then failed was missed; GetStats and routecache_escalations_total count it.
    failed = {"kind": "error", "ts": T0 + 8, "tenant": "acme", "path": "error", "admin": False,
              "reason": "unavailable", "failed_validators": ["json_schema"],
              "validation": {"passed": False, "escalated": True, "results": []}}  # fmt: skip
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(event) + "\n" for event in [*EVENTS, failed]))
    path = tmp_path / "events.parquet" if exported else log
    if exported:
        write_parquet(list(read_events(log)), path, str(log))
    quality = ch.routing_vs_quality(ch.load_events(path))
    assert quality.loc["error", "escalated"] == 1
    assert quality.loc["strong", "escalated"] == 1  # its own escalated and validation alike
    assert quality["escalated"].sum() == 2


@pytest.mark.parametrize("exported", [False, True], ids=["jsonl", "parquet"])
def test_a_shared_calls_escalation_is_counted_once(tmp_path: Path, exported: bool) -> None:
    # Every request sharing a call copies its escalation into its event (`shared` true on all
    # but the maker's); GetStats and routecache_escalations_total count it once. Before: once
    # per request sharing it, answered or failed alike.
    validation = {"passed": False, "escalated": True, "results": []}
    shared = [completion(T0 + 8 + n, f"s{n}", "strong", "json?", "e9", escalated=True,
                         shared=n > 0) for n in range(3)]  # fmt: skip
    failed = [{"kind": "error", "ts": T0 + 11 + n, "tenant": "acme", "path": "error",
               "admin": False, "reason": "unavailable", "shared": n > 0,
               "validation": validation} for n in range(2)]  # fmt: skip
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(event) + "\n" for event in [*EVENTS, *shared, *failed]))
    path = tmp_path / "events.parquet" if exported else log
    if exported:
        write_parquet(list(read_events(log)), path, str(log))
    quality = ch.routing_vs_quality(ch.load_events(path))
    assert quality.loc["strong", "escalated"] == 2  # EVENTS' own, and the shared call's
    assert quality.loc["error", "escalated"] == 1
    assert quality.loc["strong", "requests"] == 4 and quality.loc["error", "requests"] == 3


@pytest.mark.parametrize("strong_fails", [False, True])
async def test_the_notebook_counts_a_shared_calls_escalation_as_getstats_does(
    strong_fails: bool,
) -> None:
    # Three identical requests share one call whose cheap answer is escalated (and whose strong
    # call then fails, with `strong_fails`): GetStats counts one escalation, so must the table.
    harness = make_harness()
    pipeline = harness.service.pipeline
    if strong_fails:
        harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
    harness.cheap.gate = gate = asyncio.Event()
    flight = count_shared_calls(pipeline)
    request = json_request("give me json about cats")
    tasks = [asyncio.create_task(pipeline.complete(request, ACME)) for _ in range(3)]
    await eventually(lambda: len(flight.arrived) == 3, "all three share the call")
    gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    if strong_fails:
        assert all(isinstance(result, Unavailable) for result in done)
    escalations = pipeline._stats.snapshot("acme").escalations
    assert escalations == 1 and harness.cheap.calls == ["give me json about cats"]
    quality = ch.routing_vs_quality(events_frame(list(harness.events.events)))
    assert quality["escalated"].sum() == escalations
    assert quality["requests"].sum() == 3
    await harness.service.aclose()


def test_the_notebooks_threshold_variable_is_documented_and_names_the_plotted_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: ROUTECACHE_SIMILARITY_THRESHOLD was read by the parameters cell alone, its default
    # the demo's 0.65 (cache.similarity_threshold is 0.9), and the line it draws said only
    # "threshold": a plot of a real log showed the demo's threshold as if it were the service's.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nbformat

    root = Path(__file__).resolve().parents[2]
    notebook = nbformat.read(root / "notebooks" / "cache_hit_analysis.ipynb", as_version=4)  # type: ignore[no-untyped-call]  # nbformat is untyped
    intro = notebook.cells[0].source
    operations = (root / "docs" / "operations.md").read_text(encoding="utf-8")
    for text in (intro, operations):
        assert "ROUTECACHE_SIMILARITY_THRESHOLD" in text and "similarity_threshold" in text
    monkeypatch.chdir(root / "notebooks")
    monkeypatch.setenv("ROUTECACHE_NOTEBOOK_EVENTS", "../tests/fixtures/demo_events.jsonl")
    monkeypatch.setenv("ROUTECACHE_SIMILARITY_THRESHOLD", "0.72")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    plt.close("all")
    namespace: dict[str, Any] = {}
    try:
        for cell in notebook.cells:
            if cell.cell_type == "code":
                exec(compile(cell.source, "notebook", "exec"), namespace)
        lines = [line for number in plt.get_fignums() for axes in plt.figure(number).axes
                 for line in axes.get_lines()]  # fmt: skip
    finally:
        plt.close("all")
    labelled = {str(line.get_label()): list(line.get_xdata()) for line in lines}  # type: ignore[arg-type]
    assert labelled["threshold 0.72 (ROUTECACHE_SIMILARITY_THRESHOLD)"][0] == pytest.approx(0.72)

"""The notebook's building blocks on a handful of hand-written events."""

from __future__ import annotations

from typing import Any

import pytest

from routecache.analysis import cache_hits as ch
from routecache.analysis.export import events_frame

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

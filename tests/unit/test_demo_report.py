"""The demo's traffic, its feedback on the hits and its summary: the all-strong baseline for
answers whose usage is not one strong call (cache hits report none, escalations add up every
call)."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from routecache.client import RouteCacheClient, chat_request
from routecache.router.demo import _send_feedback, build_traffic, demo_settings
from routecache.router.demo_report import (
    DemoResult,
    DemoTally,
    percentile,
    prompt_tokens,
    summarise,
    tally,
)
from routecache.router.messages import request_from_pb
from routecache.router.tokens import request_prompt_tokens
from routecache.v1 import routecache_pb2 as pb

STRONG_IN, STRONG_OUT = 10.0, 30.0  # USD per million tokens, the demo's strong model


def _result(request: pb.CompleteRequest, response: pb.CompleteResponse) -> DemoResult:
    return DemoResult("acme", "exact-repeat", "OK", 1.0, response, prompt_tokens(request))


def _exact_hit(request: pb.CompleteRequest, answer: str) -> DemoResult:
    response = pb.CompleteResponse(
        text=answer,
        cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_EXACT),
        usage=pb.Usage(),  # a hit reports 0 tokens and 0 USD
    )
    return _result(request, response)


def _baseline_tokens(result: DemoResult) -> str:
    """The summary's all-strong figure at 1000 USD per million tokens: tokens / 1000."""
    return summarise([result], 1.0, 1000.0, 1000.0).split(" vs ")[1].split(" USD")[0]


def test_prompt_tokens_counts_every_message_sent() -> None:
    request = chat_request("four", system="sys", history=[("user", "ab"), ("assistant", "c")])

    assert prompt_tokens(request) == math.ceil(len("sys\nab\nc\nfour") / 4)


@pytest.mark.parametrize(
    ("format_args", "sent"),
    [({"json_schema": '{"type": "object"}'}, 'four\n{"type":"object"}'),
     ({"json_schema": "{not json"}, "four\n{not json"),
     ({"json_object": True}, "four"), ({}, "four")],
    ids=["json_schema", "schema not JSON", "json_object", "text"],
)  # fmt: skip
def test_prompt_tokens_count_a_json_schema_sent_as_compact_json(
    format_args: dict[str, Any], sent: str
) -> None:
    # Only json_schema sends the model a schema; it counts as compact JSON.
    # The service refuses a schema that is not JSON, but the demo counts every request's prompt.
    request = chat_request("four", **format_args)

    assert prompt_tokens(request) == math.ceil(len(sent) / 4)


def test_all_strong_baseline_of_a_hit_estimates_prompt_tokens_from_the_prompt() -> None:
    # A long question with a short answer: the answer's length says nothing about the prompt.
    result = _exact_hit(chat_request("q" * 400), "a" * 8)

    text = summarise([result], 1.0, STRONG_IN, STRONG_OUT)

    baseline = (100 * STRONG_IN + 2 * STRONG_OUT) / 1e6  # 400 / 4 prompt, 8 / 4 completion
    assert f"vs {baseline:.4f} USD all-strong" in text
    assert baseline == pytest.approx(0.00106)


def test_all_strong_baseline_of_a_hit_counts_its_prompt_as_the_service_estimates_it() -> None:
    # The service (and the upstream it calls) count the messages joined by newlines: two
    # 4-character messages are 9 characters, 3 tokens, not 2.
    request = chat_request("b" * 4, system="a" * 4)
    sent = request_prompt_tokens(request_from_pb(request))

    assert sent == 3
    assert _baseline_tokens(_exact_hit(request, "c" * 4)) == f"{(sent + 1) / 1000:.4f}"


@pytest.mark.parametrize(
    "validation",
    [pb.ValidationReport(escalated=True),
     pb.ValidationReport(results=[pb.ValidatorResult(passed=False, action="retried")])],
    ids=["escalated", "retried"],
)  # fmt: skip
def test_all_strong_baseline_of_an_escalated_answer_counts_one_strong_call(
    validation: pb.ValidationReport,
) -> None:
    # The reported usage adds up the call that failed validation and the strong call that
    # answered; sent to the strong model at once, the request makes the second call only.
    request = chat_request("q" * 40, json_schema='{"type": "object"}')  # 15 tokens with the schema
    response = pb.CompleteResponse(
        text="a" * 20,
        tier=pb.TIER_STRONG,
        cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_MISS),
        usage=pb.Usage(prompt_tokens=15 + 15, completion_tokens=3 + 5),
        validation=validation,
    )

    assert _baseline_tokens(_result(request, response)) == f"{(15 + 5) / 1000:.4f}"


def test_latency_percentiles_are_nearest_rank_and_nan_for_no_values() -> None:
    values = [40.0, 10.0, 30.0, 20.0]

    assert [percentile(values, q) for q in (0, 30, 50, 99, 100)] == [10.0, 20.0, 20.0, 40.0, 40.0]
    assert math.isnan(percentile([], 50))


def _hit(tenant: str, kind: str, entry_id: str, similarity: float = 0.93,
         outcome: pb.CacheOutcome = pb.CACHE_OUTCOME_SEMANTIC, asked: str = "",
         original: str = "", response_id: str = "") -> DemoResult:  # fmt: skip
    """A cache hit that served entry_id (`<owner tenant>:<uuid hex>`); its response id the
    kind unless given."""
    cache = pb.CacheInfo(outcome=outcome, similarity=similarity, entry_id=entry_id)
    response = pb.CompleteResponse(response_id=response_id or kind, cache=cache)
    return DemoResult(tenant, kind, "OK", 1.0, response, 1, asked, original)


def _stored(tenant: str, kind: str, asked: str, entry_id: str) -> DemoResult:
    """A miss whose answer was stored as entry_id."""
    cache = pb.CacheInfo(outcome=pb.CACHE_OUTCOME_MISS, entry_id=entry_id)
    response = pb.CompleteResponse(tier=pb.TIER_CHEAP, cache=cache)
    return DemoResult(tenant, kind, "OK", 1.0, response, 1, asked)


def _summary_line(results: list[DemoResult], label: str) -> str:
    lines = summarise(results, 1.0, STRONG_IN, STRONG_OUT).splitlines()
    return next(line for line in lines if line.startswith(f"  {label}"))


def test_the_summary_counts_each_path_errors_escalations_and_hits_that_should_not_be() -> None:
    # Changed from counting hits by the call's kind: a cross-tenant hit is one that served
    # another tenant's entry, and every hit judged wrong (thumbs down) counts as one.
    def miss(tier: pb.Tier, escalated: bool = False) -> pb.CompleteResponse:
        return pb.CompleteResponse(
            tier=tier, cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_MISS),
            validation=pb.ValidationReport(escalated=escalated),
        )  # fmt: skip

    results = [
        DemoResult("acme", "first-ask", "OK", 1.0, miss(pb.TIER_CHEAP), 1),
        DemoResult("acme", "json", "OK", 1.0, miss(pb.TIER_STRONG, escalated=True), 1),
        DemoResult("acme", "first-ask", "UNAVAILABLE", 1.0, None, 1),
        _hit("globex", "other-tenant", "acme:1"),
        _hit("acme", "different-question", "acme:2"),
        DemoResult("acme", "other-tenant", "OK", 1.0, miss(pb.TIER_CHEAP), 1),
    ]

    lines = summarise(results, 1.0, STRONG_IN, STRONG_OUT).splitlines()

    assert lines[3:8] == [
        "  misses → cheap         2",
        "  misses → strong        1   (1 escalated by validators)",
        "  errors                 1",
        "  cross-tenant hits      1   (must be 0)",
        "  wrong hits             2   (another question's answer: thumbs down)",
    ]


def test_an_escalated_call_identical_requests_shared_is_one_escalation_in_the_tally() -> None:
    # /metrics counts an escalation once for a shared call; those that shared it carry the
    # maker's report (escalated) but paid nothing and saved its cost.
    def escalated(cost_usd: float, saved_usd: float) -> DemoResult:
        response = pb.CompleteResponse(
            tier=pb.TIER_STRONG, cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_MISS),
            validation=pb.ValidationReport(escalated=True),
            usage=pb.Usage(cost_usd=cost_usd, saved_usd=saved_usd),
        )  # fmt: skip
        return DemoResult("acme", "json", "OK", 1.0, response, 1)

    made, shared = escalated(0.5, 0.0), escalated(0.0, 0.5)

    assert tally([made, shared, shared]).escalated == 1
    assert tally([made, made]).escalated == 2


def test_a_cross_tenant_hit_is_one_that_served_another_tenants_entry_whatever_the_kind() -> None:
    # globex asking acme's prompts hits its own entry on a false match at a low threshold:
    # wrong, but no leak; an exact repeat served acme's entry would be one.
    own = _hit("globex", "other-tenant", "globex:1", 0.7)
    leaked = _hit("globex", "exact-repeat", "acme:1", 1.0, pb.CACHE_OUTCOME_EXACT)

    assert _summary_line([own], "cross-tenant hits") == "  cross-tenant hits      0   (must be 0)"
    assert _summary_line([own], "wrong hits").startswith("  wrong hits             1")
    assert _summary_line([own, leaked], "cross-tenant hits").startswith(
        "  cross-tenant hits      1"
    )


def test_a_paraphrase_or_repeat_hit_is_right_only_on_the_entry_its_original_stored() -> None:
    results = [
        _stored("acme", "first-ask", "q0", "acme:q0"),
        _stored("acme", "first-ask", "q1", "acme:q1"),
        _stored("globex", "other-tenant", "r0", "globex:r0"),
        _hit("acme", "paraphrase", "acme:q0", asked="p0", original="q0"),
        _hit("acme", "paraphrase", "acme:q1", asked="p0", original="q0"),
        _hit("acme", "exact-repeat", "acme:q0", 0.97, asked="Q1", original="q1"),
        _hit("globex", "exact-repeat", "globex:r0", 0.97, asked="R0", original="r0"),
        _hit("acme", "paraphrase", "acme:q1", asked="p2", original="q2"),
    ]

    assert _summary_line(results, "wrong hits").startswith("  wrong hits             3")


def test_the_tally_adds_up_errors_and_usage_and_an_exact_cross_tenant_hit_is_one_too() -> None:
    # The tally is what /metrics must agree with after the run; an exact hit on another
    # tenant's prompt is as much a leak as a semantic one.
    usage = pb.Usage(cost_usd=0.5, saved_usd=0.25, prompt_tokens=3, completion_tokens=4)
    answered = pb.CompleteResponse(
        tier=pb.TIER_CHEAP, cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_MISS), usage=usage
    )
    exact = pb.CompleteResponse(cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_EXACT))
    results = [
        DemoResult("acme", "first-ask", "OK", 1.0, answered, 3),
        DemoResult("acme", "first-ask", "OK", 1.0, answered, 3),
        DemoResult("acme", "first-ask", "DEADLINE_EXCEEDED", 1.0, None, 3),
        DemoResult("globex", "other-tenant", "OK", 1.0, exact, 3),
    ]
    # Served from acme's entry:
    exact.cache.entry_id = "acme:1"

    assert tally(results) == DemoTally(
        requests=4,
        exact_hits=1,
        semantic_hits=0,
        cheap=2,
        strong=0,
        errors=1,
        escalated=0,
        cost_usd=1.0,
        saved_usd=0.5,
        prompt_tokens=6,
        completion_tokens=8,
    )
    lines = summarise(results, 1.0, STRONG_IN, STRONG_OUT).splitlines()
    assert lines[6] == "  cross-tenant hits      1   (must be 0)"


def _asked(calls: list[Any], kind: str, tenant: str = "acme") -> list[str]:
    return sorted(c.request.messages[-1].content for c in calls
                  if c.kind == kind and c.tenant == tenant)  # fmt: skip


def test_the_traffic_asks_first_then_repeats_and_the_other_tenant_repeats_its_own_asks() -> None:
    recorded = [f"recorded {i}" for i in range(9)]
    questions = [{"question": f"q{i}", "paraphrase": f"p{i}", "same_meaning": i % 2 == 0}
                 for i in range(10)]  # fmt: skip

    first, second, third = build_traffic(recorded, questions, seed=1, n_recorded=6)

    asked = [p for p in _asked(first, "first-ask") if p.startswith("recorded")]
    assert len(asked) == 6 and set(asked) <= set(recorded)
    assert [p for p in _asked(first, "first-ask") if p not in asked] == [
        q["question"] for q in questions
    ]
    assert _asked(first, "json") == sorted(f"q{i}" for i in range(8))
    assert len(_asked(second, "exact-repeat")) == 3  # every other recorded prompt, reformatted
    assert {" ".join(p.split()) for p in _asked(second, "exact-repeat")} <= {
        p.upper() for p in asked
    }
    assert _asked(second, "paraphrase") == ["p0", "p2", "p4", "p6", "p8"]
    assert _asked(second, "different-question") == ["p1", "p3", "p5", "p7", "p9"]
    # A repeat or a paraphrase names the question whose stored answer it should hit.
    originals = {c.request.messages[-1].content: c.original for c in second if c.original}
    assert {p: o for p, o in originals.items() if p.startswith("p")} == {
        f"p{i}": f"q{i}" for i in range(0, 10, 2)
    }
    assert {o for p, o in originals.items() if not p.startswith("p")} <= set(asked)
    assert all(c.original == c.request.messages[-1].content for c in third)
    # The second tenant asks a third of acme's prompts (no hit: its own cache is empty), then
    # the same again (exact hits on its own entries).
    shared = _asked(second, "other-tenant", "globex")
    assert len(shared) == 2 and set(shared) <= set(asked)
    assert _asked(third, "exact-repeat", "globex") == shared
    assert len(third) == len(shared)


class FeedbackRecorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    async def feedback(self, response_id: str, *, thumbs_up: bool) -> None:
        self.sent.append((response_id, thumbs_up))


async def test_feedback_is_thumbs_up_on_the_same_words_or_the_originals_own_entry_only() -> None:
    # Changed: a paraphrase or a repeat is right on its original's own entry only, not by its
    # kind alone; the thumbs-down are the summary's wrong hits.
    results = [
        _stored("acme", "first-ask", "q0", "acme:q0"),  # no hit: no feedback
        DemoResult("acme", "first-ask", "UNAVAILABLE", 1.0, None, 1),
        _hit("acme", "exact hit", "acme:q1", 1.0, pb.CACHE_OUTCOME_EXACT),
        _hit("acme", "same words", "acme:q1", 0.99995),
        _hit("acme", "paraphrase", "acme:q0", 0.93, asked="p0", original="q0"),
        _hit("acme", "exact-repeat", "acme:q0", 0.97, asked="Q0", original="q0"),
        _hit(
            "acme",
            "paraphrase",
            "acme:q1",
            0.93,
            asked="p0",
            original="q0",
            response_id="paraphrase on another",
        ),
        _hit("acme", "different-question", "acme:q0", 0.93),
        _hit("acme", "other-tenant", "globex:q0", 0.95),
    ]
    client = FeedbackRecorder()
    clients = cast(dict[str, RouteCacheClient], {"acme": client})

    assert await _send_feedback(clients, results) == (4, 3)
    assert client.sent == [("exact hit", True), ("same words", True), ("paraphrase", True),
                           ("exact-repeat", True), ("paraphrase on another", False),
                           ("different-question", False), ("other-tenant", False)]  # fmt: skip
    assert _summary_line(results, "wrong hits").startswith("  wrong hits             3")


def test_the_demo_runs_on_the_embedded_default_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shell set up for a real deployment: the demo must neither write into its Redis nor
    # lose the metrics it reports, nor read its config file.
    monkeypatch.setenv("ROUTECACHE_CONFIG", "/nonexistent/routecache.toml")
    monkeypatch.setenv("ROUTECACHE_METRICS__ENABLED", "false")
    monkeypatch.setenv("ROUTECACHE_STORE__BACKEND", "redis")
    monkeypatch.setenv("ROUTECACHE_CACHE__EMBEDDER", "hash")
    settings = demo_settings("http://127.0.0.1:1/v1", {"acme": "ka"})
    assert settings.metrics.enabled and settings.store.backend == "memory"
    assert settings.cache.embedder == "minilm-onnx"
    assert [t.name for t in settings.tenants] == ["acme"]

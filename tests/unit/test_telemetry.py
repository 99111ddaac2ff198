"""What the pipeline reports to telemetry, and the Prometheus series it becomes."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from routecache.backends.storage import RedisStorage
from routecache.domain import (
    CacheControl,
    ChatRequest,
    GenerationParams,
    Message,
    RequestValidator,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tier,
)
from routecache.errors import FailedValidation, Unauthenticated, Unavailable, UpstreamError
from routecache.router.budget import Period
from routecache.router.metrics import MetricsServer, PrometheusTelemetry
from routecache.router.telemetry import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    error_reason,
)
from routecache.router.upstream.metered import MeteredUpstream
from tests.fakes import FakeUpstream, RecordingTelemetry
from tests.unit.conftest import KEYS, make_harness

ACME = KEYS["acme"]


def ask(prompt: str, *, json_mode: bool = False) -> ChatRequest:
    params = GenerationParams(
        response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT if json_mode else
                                       ResponseFormatType.TEXT)
    )  # fmt: skip
    return ChatRequest(messages=(Message(Role.USER, prompt),), params=params)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_each_path_is_reported_once_and_in_flight_returns_to_zero() -> None:
    harness = make_harness(score=0.2)
    pipeline, telemetry = harness.service.pipeline, harness.telemetry
    await pipeline.complete(ask("what is a cache"), ACME)  # cheap
    await pipeline.complete(ask("what is a cache"), ACME)  # exact hit
    await pipeline.complete(ask("what is a cache please"), ACME)  # semantic hit (hash embedder)
    strong = ChatRequest(
        (Message(Role.USER, "prove the riemann hypothesis"),), force_tier=Tier.STRONG
    )
    await pipeline.complete(strong, ACME)
    assert telemetry.completed == [
        ("acme", "cheap"), ("acme", "exact_hit"), ("acme", "semantic_hit"), ("acme", "strong"),
    ]  # fmt: skip
    assert telemetry.started == telemetry.ended == 4
    await harness.service.aclose()


async def test_failures_report_reason_and_failed_validators() -> None:
    harness = make_harness(score=0.9)  # strong first: no escalation possible
    pipeline, telemetry = harness.service.pipeline, harness.telemetry
    harness.strong.answer = lambda prompt, params: "not json"
    with pytest.raises(FailedValidation):
        await pipeline.complete(ask("give me json", json_mode=True), ACME)
    harness.strong.fail_with = UpstreamError("boom", retryable=False)
    with pytest.raises(Unavailable):
        await pipeline.complete(ask("anything else"), ACME)
    with pytest.raises(Unauthenticated, match="API key"):
        await pipeline.complete(ask("who am i"), "wrong-key")
    reasons = [(tenant, reason) for tenant, reason, _ in telemetry.failed]
    assert reasons == [
        ("acme", "failed_validation"), ("acme", "unavailable"), ("", "unauthenticated"),
    ]  # fmt: skip
    assert telemetry.failed[0][2] == ("json_schema",)
    assert telemetry.upstream[-1] == ("strong-model", "fatal")
    assert telemetry.started == telemetry.ended == 3
    kinds = [e["kind"] for e in harness.events.events]
    assert kinds.count("error") == 3
    await harness.service.aclose()


async def test_prometheus_series_follow_the_requests() -> None:
    prometheus = PrometheusTelemetry()
    harness = make_harness(score=0.2, telemetry=prometheus)
    pipeline, registry = harness.service.pipeline, prometheus.registry
    first = await pipeline.complete(ask("what is a cache"), ACME)
    await pipeline.complete(ask("what is a cache"), ACME)
    escalated = await pipeline.complete(ask("give me json", json_mode=True), ACME)  # to strong
    assert sample(registry, "routecache_requests_total", tenant="acme", path="cheap") == 1
    assert sample(registry, "routecache_requests_total", tenant="acme", path="exact_hit") == 1
    assert sample(registry, "routecache_requests_total", tenant="acme", path="strong") == 1
    assert sample(registry, "routecache_request_latency_seconds_count", path="exact_hit") == 1
    assert sample(registry, "routecache_escalations_total", tenant="acme") == 1
    assert sample(registry, "routecache_validator_failures_total", validator="json_schema") == 1
    assert sample(registry, "routecache_saved_usd_total", tenant="acme") == pytest.approx(
        first.usage.cost_usd
    )
    assert sample(registry, "routecache_upstream_latency_seconds_count", model="cheap-model") == 2
    assert sample(registry, "routecache_in_flight_requests") == 0
    assert sample(registry, "routecache_queue_depth", queue="embedding") == 0
    cost = sum(
        sample(registry, "routecache_cost_usd_total", tenant="acme", tier=tier)
        for tier in ("cheap", "strong")
    )
    assert cost == pytest.approx((await pipeline.admin.stats(ACME)).cost_usd)
    for kind in ("prompt", "completion"):  # the hit paid for no tokens
        tokens = sum(
            sample(registry, "routecache_tokens_total", tenant="acme", tier=tier, kind=kind)
            for tier in ("cheap", "strong")
        )
        paid = sum(getattr(done.usage, f"{kind}_tokens") for done in (first, escalated))
        assert tokens == paid > 0
    await harness.service.aclose()


async def test_prometheus_spend_counts_answers_refused_by_validation() -> None:
    # routecache_cost_usd_total carries the spend ledger's figure: refused answers were paid.
    prometheus = PrometheusTelemetry()
    harness = make_harness(score=0.9, telemetry=prometheus)  # strong first: no escalation
    harness.strong.answer = lambda prompt, params: "not json"
    with pytest.raises(FailedValidation) as refused:
        await harness.service.pipeline.complete(ask("give me json", json_mode=True), ACME)
    registry, error = prometheus.registry, refused.value
    cost = sample(registry, "routecache_cost_usd_total", tenant="acme", tier="strong")
    assert cost == pytest.approx(error.cost_usd) and cost > 0
    assert cost == pytest.approx((await harness.service.pipeline.admin.stats(ACME)).cost_usd)
    for kind in ("prompt", "completion"):
        tokens = sample(
            registry, "routecache_tokens_total", tenant="acme", tier="strong", kind=kind
        )
        assert tokens == getattr(error, f"{kind}_tokens") > 0
    await harness.service.aclose()


def test_watched_gauges_are_read_at_scrape_time() -> None:
    prometheus = PrometheusTelemetry()
    breaker = {"gpt-4": 0.0}
    up = {"redis": True}
    prometheus.watch_breaker("gpt-4", lambda: breaker["gpt-4"])
    prometheus.watch_dependency("redis", lambda: up["redis"])
    queue = {"embedding": 0.0}
    prometheus.watch_queue("embedding", lambda: queue["embedding"])
    registry = prometheus.registry
    assert sample(registry, "routecache_breaker_state", provider="gpt-4") == 0
    breaker["gpt-4"], up["redis"], queue["embedding"] = BREAKER_OPEN, False, 7
    assert sample(registry, "routecache_queue_depth", queue="embedding") == 7
    assert sample(registry, "routecache_breaker_state", provider="gpt-4") == BREAKER_OPEN
    assert registry.get_sample_value("routecache_dependency_up", {"dependency": "redis"}) == 0


def test_watched_counts_are_read_at_scrape_time_and_only_known_ones_are_taken() -> None:
    prometheus = PrometheusTelemetry()
    refusals = {"now": 0}
    prometheus.watch_count("redis_refusals", lambda: refusals["now"])
    assert sample(prometheus.registry, "routecache_redis_refusals_total") == 0
    refusals["now"] = 3
    assert sample(prometheus.registry, "routecache_redis_refusals_total") == 3
    # Named (so dashboards and alerts may use it) but without a sample until watched.
    assert prometheus.registry.get_sample_value("routecache_redis_failures_total") is None
    with pytest.raises(ValueError, match="unknown count"):
        prometheus.watch_count("redis_hiccups", lambda: 1)


async def test_redis_degraded_paths_are_counted_in_the_metrics() -> None:
    # Nothing listens on port 1: the service is built, never started; the link is marked down
    # and a refusal reported by hand, as a failed call and an out-of-memory answer would.
    prometheus = PrometheusTelemetry()
    harness = make_harness(
        telemetry=prometheus, store={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"},
        requests_per_second=100,
    )  # fmt: skip
    storage, registry = harness.service.storage, prometheus.registry
    assert isinstance(storage, RedisStorage)
    try:
        storage.link.refused(ResponseError("OOM command not allowed"))
        await storage.link.mark_down(ConnectionError("connection refused"))
        await harness.service.pipeline.complete(ask("asked while redis is down"), ACME)
        assert sample(registry, "routecache_redis_refusals_total") == 1
        assert sample(registry, "routecache_redis_failures_total") == 1
        assert sample(registry, "routecache_dependency_up", dependency="redis") == 0
        assert sample(registry, "routecache_rate_limit_fallbacks_total") == 1  # the one take
        assert sample(registry, "routecache_cache_bypassed_total") >= 1  # lookup and store
    finally:
        await harness.service.aclose()


def test_each_service_has_its_own_registry() -> None:
    one, two = PrometheusTelemetry(), PrometheusTelemetry()
    one.feedback("acme", thumbs_up=False, invalidated=True)
    assert sample(one.registry, "routecache_feedback_total", tenant="acme", rating="down") == 1
    assert sample(two.registry, "routecache_feedback_total", tenant="acme", rating="down") == 0


def test_error_reason_is_the_snake_case_class_name() -> None:
    assert error_reason(FailedValidation("x", report=None)) == "failed_validation"  # type: ignore[arg-type]
    assert error_reason(Unavailable("x")) == "unavailable"


async def test_validators_named_by_the_caller_do_not_mint_metric_series() -> None:
    prometheus = PrometheusTelemetry()
    harness = make_harness(score=0.2, telemetry=prometheus)
    pipeline, registry = harness.service.pipeline, prometheus.registry
    for i in range(3):
        flagged = RequestValidator("regex", name=f"flag-{i}", on_fail="flag", must_match=("zzz",))
        await pipeline.complete(replace(ask(f"question {i}"), validators=(flagged,)), ACME)
        blocking = RequestValidator("regex", name=f"block-{i}", on_fail="block",
                                    must_match=("zzz",))  # fmt: skip
        with pytest.raises(FailedValidation):
            await pipeline.complete(replace(ask(f"other {i}"), validators=(blocking,)), ACME)
    labels = {
        sample.labels["validator"]
        for metric in registry.collect()
        if metric.name == "routecache_validator_failures"
        for sample in metric.samples
    }
    assert labels == {"request:regex"}
    assert sample(registry, "routecache_validator_failures_total", validator="request:regex") == 6
    await harness.service.aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_cut_short_by_its_deadline_is_reported_as_cancelled(streamed: bool) -> None:
    telemetry = RecordingTelemetry()
    hanging = FakeUpstream("hanging-model", gate=asyncio.Event())  # a provider that never answers
    metered = MeteredUpstream(hanging, telemetry)
    messages, params = [Message(Role.USER, "hello")], GenerationParams()

    async def call() -> None:
        if streamed:
            async for _ in metered.stream(messages, params):
                pass
        else:
            await metered.complete(messages, params)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(), timeout=0.05)
    assert telemetry.upstream == [("hanging-model", "cancelled")]


async def test_a_stream_the_caller_stops_reading_is_reported_as_cancelled() -> None:
    # The caller leaving between deltas closes the stream (GeneratorExit, not CancelledError):
    # the call went unreported, in neither the latency nor the error series.
    telemetry = RecordingTelemetry()
    metered = MeteredUpstream(FakeUpstream("chatty-model"), telemetry)
    deltas = metered.stream([Message(Role.USER, "tell me more")], GenerationParams())
    assert await anext(deltas) == "answer "
    await deltas.aclose()
    assert telemetry.upstream == [("chatty-model", "cancelled")]


@dataclass
class TimedTelemetry(RecordingTelemetry):
    """Also keeps the seconds of each upstream call."""

    seconds: list[float] = field(default_factory=list)

    def upstream_call(self, model: str, seconds: float, error: str | None) -> None:
        super().upstream_call(model, seconds, error)
        self.seconds.append(seconds)


@pytest.mark.parametrize("streamed", [False, True])
async def test_each_upstream_call_is_reported_with_its_outcome_and_duration(
    streamed: bool,
) -> None:
    telemetry = TimedTelemetry()
    upstream = FakeUpstream("model", gate=asyncio.Event())
    metered = MeteredUpstream(upstream, telemetry)
    messages, params = [Message(Role.USER, "hello")], GenerationParams()

    async def call() -> None:
        if streamed:
            assert [d async for d in metered.stream(messages, params)] == ["answer ", "to ",
                                                                           "hello "]  # fmt: skip
        else:
            await metered.complete(messages, params)

    asyncio.get_running_loop().call_later(0.05, upstream.gate.set)  # type: ignore[union-attr]
    await call()
    upstream.fail_with = UpstreamError("HTTP 503", retryable=True)
    with pytest.raises(UpstreamError):
        await call()
    upstream.fail_with = UpstreamError("HTTP 400", retryable=False)
    with pytest.raises(UpstreamError):
        await call()
    assert telemetry.upstream == [("model", None), ("model", "retryable"), ("model", "fatal")]
    assert telemetry.seconds[0] >= 0.04  # the call's own time, waited out at the gate


async def test_closing_a_metered_upstream_closes_the_one_it_wraps() -> None:
    closed: list[str] = []

    class Closing(FakeUpstream):
        async def aclose(self) -> None:
            closed.append(self.model_id)

    await MeteredUpstream(Closing("model"), RecordingTelemetry()).aclose()
    assert closed == ["model"]


async def test_a_callers_unnamed_validator_is_labelled_by_its_kind_too() -> None:
    harness = make_harness(score=0.2)
    pipeline, telemetry = harness.service.pipeline, harness.telemetry
    unnamed = RequestValidator("regex", on_fail="block", must_match=("zzz",))
    with pytest.raises(FailedValidation):
        await pipeline.complete(replace(ask("any question"), validators=(unnamed,)), ACME)
    assert telemetry.failed[-1][2] == ("request:regex",)
    await harness.service.aclose()


def test_breaker_gauge_values_are_the_documented_ones() -> None:
    # docs/operations.md: 0 closed, 1 half-open, 2 open; the RouteCacheBreakerOpen alert fires
    # on breaker_state >= 2.
    assert (BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN) == (0.0, 1.0, 2.0)


def test_prometheus_counts_failures_feedback_and_cost_controls_under_their_labels() -> None:
    prometheus = PrometheusTelemetry()
    registry = prometheus.registry
    prometheus.request_failed("acme", "unavailable", 0.5, ("json_schema",))
    prometheus.upstream_call("gpt-4", 0.2, None)
    prometheus.upstream_call("gpt-4", 0.3, "timeout")
    prometheus.feedback("acme", thumbs_up=False, invalidated=True)
    prometheus.feedback("acme", thumbs_up=False, invalidated=False)
    prometheus.feedback("acme", thumbs_up=True, invalidated=False)
    prometheus.budget_alert("acme", "day")
    prometheus.cost_control("acme", "downgraded")
    assert sample(registry, "routecache_errors_total", tenant="acme", reason="unavailable",
                  call="complete") == 1  # fmt: skip
    assert sample(registry, "routecache_requests_total", tenant="acme", path="error") == 1
    assert sample(registry, "routecache_request_latency_seconds_count", path="error") == 1
    assert sample(registry, "routecache_validator_failures_total", validator="json_schema") == 1
    assert (
        sample(registry, "routecache_upstream_errors_total", model="gpt-4", reason="timeout") == 1
    )
    assert sample(registry, "routecache_upstream_latency_seconds_count", model="gpt-4") == 2
    assert sample(registry, "routecache_feedback_total", tenant="acme", rating="down") == 2
    assert sample(registry, "routecache_feedback_total", tenant="acme", rating="up") == 1
    assert sample(registry, "routecache_feedback_invalidations_total", tenant="acme") == 1
    assert sample(registry, "routecache_budget_alerts_total", tenant="acme", period="day") == 1
    assert sample(registry, "routecache_cost_control_total", tenant="acme",
                  outcome="downgraded") == 1  # fmt: skip


def test_the_metrics_server_serves_on_the_port_it_bound_and_close_stops_it() -> None:
    # Port 0 picks a free one: `serve` prints .port, which must be the bound one.
    prometheus = PrometheusTelemetry()
    prometheus.budget_alert("acme", "day")
    before = set(threading.enumerate())
    server = MetricsServer(prometheus.registry, "127.0.0.1", 0)
    serving = set(threading.enumerate()) - before
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b'routecache_budget_alerts_total{period="day",tenant="acme"} 1.0' in (
                response.read()
            )
    finally:
        server.close()
    assert serving and not any(thread.is_alive() for thread in serving)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_budget_alerts_the_webhook_did_not_take_are_in_the_metrics() -> None:
    # Before: only the log said so; an operator's alert on lost budget alerts had nothing to read.
    prometheus = PrometheusTelemetry()
    harness = make_harness(telemetry=prometheus)
    costs = harness.service.costs
    assert costs is not None
    assert sample(prometheus.registry, "routecache_budget_webhook_failures_total") == 0
    costs.alerts.failed_deliveries += 2
    assert sample(prometheus.registry, "routecache_budget_webhook_failures_total") == 2


async def test_a_cheap_answers_failed_check_is_reported_when_its_escalation_fails() -> None:
    # The check failed (and escalated) whether or not the strong call then answered: the metric
    # counts it (operations.md: "escalated or final") and the error event names it.
    prometheus = PrometheusTelemetry()
    harness = make_harness(score=0.2, telemetry=prometheus)  # cheap first: prose, not json
    harness.strong.fail_with = UpstreamError("strong down", retryable=False)
    with pytest.raises(Unavailable):
        await harness.service.pipeline.complete(ask("give me json", json_mode=True), ACME)
    registry = prometheus.registry
    assert sample(registry, "routecache_validator_failures_total", validator="json_schema") == 1
    [event] = [e for e in harness.events.events if e["kind"] == "error"]
    assert event["failed_validators"] == ["json_schema"]
    assert event["validation"]["escalated"] is True
    assert event["validation"]["passed"] is False
    [result] = [r for r in event["validation"]["results"] if not r["passed"]]
    assert (result["name"], result["action"], result["model"]) == (
        "json_schema", "escalated", "cheap-model",
    )  # fmt: skip
    await harness.service.aclose()


async def test_a_stale_answer_served_after_a_paid_escalation_reports_what_it_cost() -> None:
    # Before: a stale answer reported cost 0 (a cache hit's usage) though the cheap call that
    # failed validation before the strong call failed was paid for and in the spend ledger.
    harness = make_harness(score=0.2)
    pipeline, request = harness.service.pipeline, ask("give me json", json_mode=True)
    request = replace(request, cache=CacheControl(ttl_seconds=5))
    await pipeline.complete(request, ACME)
    before = (await pipeline.costs.ledger.totals("acme"))[Period.DAY].cost_usd
    harness.clock.advance(6)
    harness.strong.fail_with = UpstreamError("strong down", retryable=False)
    stale = await pipeline.complete(request, ACME)
    paid = (await pipeline.costs.ledger.totals("acme"))[Period.DAY].cost_usd - before
    assert stale.cache.stale and paid > 0
    assert stale.usage.cost_usd == pytest.approx(paid) and stale.usage.saved_usd == 0
    assert stale.usage.prompt_tokens > 0 and stale.usage.completion_tokens > 0
    event = [e for e in harness.events.events if e["kind"] == "completion"][-1]
    assert event["cost_usd"] == pytest.approx(paid)
    await harness.service.aclose()


async def test_a_stale_answer_served_after_a_failed_escalation_carries_its_report() -> None:
    prometheus = PrometheusTelemetry()
    harness = make_harness(score=0.2, telemetry=prometheus)
    pipeline, request = harness.service.pipeline, ask("give me json", json_mode=True)
    request = replace(request, cache=CacheControl(ttl_seconds=5))
    await pipeline.complete(request, ACME)  # escalated, answered by strong, stored
    harness.clock.advance(6)  # expired: only a stale lookup finds it
    harness.strong.fail_with = UpstreamError("strong down", retryable=False)
    stale = await pipeline.complete(request, ACME)
    assert stale.cache.stale
    assert stale.validation.escalated and stale.validation.passed  # the cached answer passed
    assert [(r.name, r.action) for r in stale.validation.results if not r.passed] == [
        ("json_schema", "escalated")
    ]
    registry = prometheus.registry
    assert sample(registry, "routecache_validator_failures_total", validator="json_schema") == 2
    event = [e for e in harness.events.events if e["kind"] == "completion"][-1]
    assert event["stale"] and event["escalated"] is True
    await harness.service.aclose()

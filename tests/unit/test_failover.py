"""Fallback chains, breakers, deadlines, stale answers and validator actions, on fakes."""

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.domain import (
    CacheControl,
    CacheOutcome,
    ChatRequest,
    Completion,
    GenerationParams,
    LatencyBreakdown,
    Message,
    RequestValidator,
    Role,
    Tier,
)
from routecache.errors import FailedValidation, InvalidArgument, Unavailable, UpstreamError
from routecache.router.bootstrap import Overrides, Service, build_service
from routecache.router.budget import Period
from routecache.router.events import InMemoryEventLog
from routecache.router.ports import Pricing, UpstreamReply
from routecache.router.tokens import request_prompt_tokens
from routecache.router.upstream.breaker import BreakerState, CircuitBreaker
from routecache.router.upstream.deadline import note_failed_try, seconds_left
from routecache.router.upstream.failover import AllProvidersFailed, Failover, OpenedStream, Provider
from tests.fakes import FakeUpstream, ManualClock, count_shared_calls, eventually
from tests.unit.conftest import KEYS, unit_settings

ACME, GLOBEX = KEYS["acme"], KEYS["globex"]
PRICES = {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}
EXPIRED_IN_GRACE = 7 * 24 * 3600 + 600  # past the 7-day TTL, within the grace hour
DOWN = UpstreamError("HTTP 503 Service Unavailable", retryable=True)
# The models of the settings' tiers (their defaults), as a tenant's models_allowed names them.
CHEAP_MODEL, STRONG_MODEL = "mixtral-8x7b-instruct", "gpt-4-1106-preview"


class BreakingUpstream(FakeUpstream):
    async def stream(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> AsyncIterator[str]:
        yield "partial "
        raise UpstreamError("stream ended without finish_reason or [DONE]", retryable=True)


@dataclass
class Rig:
    service: Service
    ups: dict[str, FakeUpstream]
    events: InMemoryEventLog
    clock: ManualClock

    async def ask(self, prompt: str, key: str = ACME, **options: object) -> Completion:
        request = ChatRequest(messages=(Message(Role.USER, prompt),), **options)  # type: ignore[arg-type]
        return await self.service.pipeline.complete(request, key)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def rig(answers: dict[str, str] | None = None, validators: list[dict[str, object]] | None = None,
        monotonic: Callable[[], float] | None = None, breaking: bool = False,
        reserve: bool = False, **tenant_options: object) -> Rig:  # fmt: skip
    """Providers cheap then backup (`backup-model`) on the cheap tier, strong on the strong
    one, then reserve (`reserve-model`) with `reserve`. `tenant_options`: each tenant's."""
    answers = answers or {}

    def answer_of(n: str) -> Callable[[str, GenerationParams], str]:
        return lambda p, _: answers.get(n, f"{n} says {p}")

    ups = {
        name: (BreakingUpstream if breaking and name == "cheap" else FakeUpstream)(
            f"{name}-model", answer_of(name)
        )
        for name in ("cheap", "backup", "strong", *(["reserve"] if reserve else []))
    }
    options = {**tenant_options, **({"validators": validators} if validators else {})}
    settings = unit_settings(None, None, **options)
    settings = settings.model_copy(
        update={
            "upstream": settings.upstream.model_validate(
                {
                    "providers": {
                        "backup": {"model": "backup-model", **PRICES},
                        "reserve": {"model": "reserve-model", **PRICES},
                    },
                    "cheap_fallbacks": ["backup"],
                    "strong_fallbacks": ["reserve"] if reserve else [],
                    "breaker": {"failure_threshold": 2, "open_seconds": 30},
                    "stale_grace_seconds": 3600,
                }
            )
        }
    )
    clock, events = ManualClock(), InMemoryEventLog()
    service = build_service(
        settings,
        Overrides(
            embedder=HashEmbedder(),
            classifier=FixedScoreClassifier(0.1, version="v", default_threshold=0.5),
            providers=ups,
            events=events,
            clock=clock,
            monotonic=monotonic or clock,
        ),
    )
    return Rig(service, ups, events, clock)


async def test_fallback_provider_answers_when_the_first_fails() -> None:
    r = rig()
    r.ups["cheap"].fail_with = DOWN
    done = await r.ask("q")
    assert done.model == "backup-model" and done.tier is Tier.CHEAP
    assert done.provider == "backup"
    assert r.ups["strong"].calls == []
    event = r.events.events[-1]
    assert event["provider"] == "backup" and "HTTP 503" in event["upstream_failures"][0]


async def test_a_cheap_fallback_whose_model_the_tenant_may_not_use_is_skipped() -> None:
    # models_allowed leaves out backup-model: the cheap tier's fallback is not tried, the
    # strong tier (allowed) answers, for a stream too.
    r = rig(models_allowed=[CHEAP_MODEL, STRONG_MODEL])
    r.ups["cheap"].fail_with = DOWN
    done = await r.ask("q", cache=CacheControl(no_store=True))
    assert done.provider == "strong" and done.tier is Tier.STRONG
    _, streamed = await collect(r, "tell me")
    assert streamed.provider == "strong"
    assert r.ups["backup"].calls == []


async def test_a_tenant_kept_to_the_cheap_tier_gets_no_fallback_it_may_not_use() -> None:
    r = rig(models_allowed=[CHEAP_MODEL])
    r.ups["cheap"].fail_with = DOWN
    with pytest.raises(Unavailable, match="no cached answer"):
        await r.ask("q")
    with pytest.raises(Unavailable, match="no cached answer"):
        await collect(r, "tell me")
    assert r.ups["backup"].calls == [] and r.ups["strong"].calls == []


async def test_a_strong_fallback_whose_model_the_tenant_may_not_use_is_skipped() -> None:
    allowed = rig(reserve=True)  # the rig's strong fallback answers a tenant that may use it
    allowed.ups["strong"].fail_with = DOWN
    assert (await allowed.ask("q", force_tier=Tier.STRONG)).provider == "reserve"
    r = rig(reserve=True, models_allowed=[CHEAP_MODEL, STRONG_MODEL, "backup-model"])
    r.ups["strong"].fail_with = DOWN
    with pytest.raises(Unavailable, match="no cached answer"):
        await r.ask("q", force_tier=Tier.STRONG)
    assert r.ups["reserve"].calls == []


async def test_a_reservation_leaves_out_fallbacks_the_tenant_may_not_use() -> None:
    # backup (1 USD/Mtok) is dearer than the cheap provider (0.6): reserving its price for a
    # tenant that never reaches it refused requests its cap could take.
    r = rig(models_allowed=[CHEAP_MODEL])
    tenant = r.service.pipeline._p.authenticator.authenticate(ACME)
    request = ChatRequest(
        messages=(Message(Role.USER, "q"),), params=GenerationParams(max_tokens=100)
    )
    usd = r.service.pipeline.costs.worst_case_usd(
        tenant, request, Tier.CHEAP, cheap_only=True, streaming=True
    )
    assert usd == pytest.approx((request_prompt_tokens(request) + 100) * 0.6 / 1e6)


async def test_open_breaker_sheds_without_calling_the_provider() -> None:
    r = rig()
    r.ups["cheap"].fail_with = DOWN
    await r.ask("one", cache=CacheControl(no_store=True))
    await r.ask("two", cache=CacheControl(no_store=True))
    breaker = r.service.generator.failover.chain(Tier.CHEAP)[0][1].breaker
    assert breaker.state is BreakerState.OPEN
    done = await r.ask("three")
    assert r.ups["cheap"].calls == ["one", "two"]  # "three" was shed
    assert any("circuit open" in f for f in done.upstream_failures)
    r.clock.advance(30)  # half-open: one probe goes out, succeeds, closes the breaker
    r.ups["cheap"].fail_with = None
    assert (await r.ask("four")).provider == "cheap"
    assert state_of(breaker) is BreakerState.CLOSED  # read anew: mypy keeps the OPEN above


async def test_refused_request_does_not_trip_the_breaker() -> None:
    r = rig()
    r.ups["cheap"].fail_with = UpstreamError("HTTP 400 Bad Request", retryable=False)
    for prompt in ("a", "b", "c"):
        await r.ask(prompt)
    assert r.ups["cheap"].calls == ["a", "b", "c"]


async def test_a_request_every_provider_refuses_is_unavailable_naming_each_refusal() -> None:
    # A 4xx is not retried, but the chain moves on: a larger model may take what the cheap one
    # refused (docs/failure-semantics.md, step 4).
    r = rig()
    for up in r.ups.values():
        up.fail_with = UpstreamError("HTTP 400 Bad Request", retryable=False)
    with pytest.raises(Unavailable) as refused:
        await r.ask("too long for everyone")
    assert all(up.calls == ["too long for everyone"] for up in r.ups.values())
    assert str(refused.value).count("HTTP 400 Bad Request") == len(r.ups)


async def test_all_down_serves_a_stale_answer_of_the_same_scope_only() -> None:
    r = rig()
    first = await r.ask("what is the capital of France")
    r.clock.advance(EXPIRED_IN_GRACE)
    for up in r.ups.values():
        up.fail_with = DOWN
    stale = await r.ask("what is the capital of France")
    assert stale.cache.stale and stale.text == first.text
    assert stale.cache.outcome is CacheOutcome.EXACT
    assert stale.upstream_failures and "cheap-model" in stale.upstream_failures[0]
    with pytest.raises(Unavailable, match="no cached answer"):
        await r.ask("what is the capital of France", key=GLOBEX)
    with pytest.raises(Unavailable, match="no_cache"):
        await r.ask("what is the capital of France", cache=CacheControl(no_cache=True))
    r.clock.advance(3600)  # past the grace period: gone
    with pytest.raises(Unavailable, match=r"cheap-model.*backup-model.*strong-model"):
        await r.ask("what is the capital of France")
    assert r.events.events[-1]["kind"] == "error"


async def test_a_stale_answer_normalises_the_prompt_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_pipeline import count_normalisations

    r = rig()
    await r.ask("what is the capital of France")
    r.clock.advance(EXPIRED_IN_GRACE)
    for up in r.ups.values():
        up.fail_with = DOWN
    seen = count_normalisations(monkeypatch)
    stale = await r.ask("what is the capital of France")
    assert stale.cache.stale
    assert len(seen) == 1  # not again for the stale lookup's exact key


async def test_expired_entries_are_not_served_while_providers_answer() -> None:
    r = rig()
    await r.ask("q")
    r.clock.advance(EXPIRED_IN_GRACE)
    again = await r.ask("q")
    assert again.cache.outcome is CacheOutcome.MISS and not again.cache.stale


async def test_deadline_stops_the_chain() -> None:
    r = rig(monotonic=time.monotonic)
    for up in r.ups.values():
        up.gate = asyncio.Event()  # hangs
    request = ChatRequest(messages=(Message(Role.USER, "slow"),))
    with pytest.raises(Unavailable, match=r"cheap-model.*within.*backup: not tried, the deadline"):
        await asyncio.wait_for(r.service.pipeline.complete(request, ACME, 0.3), 5)
    assert r.ups["backup"].calls == [] and r.ups["strong"].calls == []


async def test_a_shared_call_cut_short_by_its_callers_deadline_is_retried_by_a_later_one() -> None:
    # The first caller allows 0.3 s, the identical one that joins it 5 s: when the first
    # caller's deadline ends the shared call, the second still has time and makes the call.
    r = rig(monotonic=time.monotonic)
    gate = asyncio.Event()
    for up in r.ups.values():
        up.gate = gate  # hangs until set
    request = ChatRequest(messages=(Message(Role.USER, "slow"),))
    complete, flight = r.service.pipeline.complete, count_shared_calls(r.service.pipeline)
    hurried = asyncio.create_task(complete(request, ACME, 0.3))
    await eventually(lambda: r.ups["cheap"].calls == ["slow"], "the hurried request's call")
    patient = asyncio.create_task(complete(request, ACME, 5.0))
    await eventually(lambda: len(flight.arrived) == 2, "the patient request joined the call")
    with pytest.raises(Unavailable, match="deadline"):
        await asyncio.wait_for(hurried, 5)
    gate.set()
    done = await asyncio.wait_for(patient, 5)
    assert done.text == "cheap says slow" and done.usage.cost_usd > 0
    assert r.ups["cheap"].calls == ["slow", "slow"]


async def test_a_shared_call_that_failed_in_time_fails_for_all_who_shared_it() -> None:
    r = rig(monotonic=time.monotonic)
    gate = asyncio.Event()
    for up in r.ups.values():
        up.gate, up.fail_with = gate, DOWN
    request = ChatRequest(messages=(Message(Role.USER, "down"),))
    complete, flight = r.service.pipeline.complete, count_shared_calls(r.service.pipeline)
    first = asyncio.create_task(complete(request, ACME, 1.0))
    await eventually(lambda: r.ups["cheap"].calls == ["down"], "the first request's call")
    second = asyncio.create_task(complete(request, ACME, 5.0))
    await eventually(lambda: len(flight.arrived) == 2, "the second request joined the call")
    gate.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(e, Unavailable) for e in results)
    assert r.ups["cheap"].calls == ["down"]  # one call, its error shared


async def test_a_request_sharing_a_call_with_a_later_deadline_gets_a_stale_answer_in_time() -> None:
    # The maker allows 30 s, the identical request that joins it less than the time kept back
    # for a stale answer: it must not wait for the maker's call (gRPC would end it
    # DEADLINE_EXCEEDED) but answer stale at once, as it would have alone.
    r = rig()
    first = await r.ask("what is the capital of France")
    r.clock.advance(EXPIRED_IN_GRACE)
    gate = asyncio.Event()
    for up in r.ups.values():
        up.gate = gate  # hangs until set
    request = ChatRequest(messages=(Message(Role.USER, "what is the capital of France"),))
    complete, flight = r.service.pipeline.complete, count_shared_calls(r.service.pipeline)
    maker = asyncio.create_task(complete(request, ACME, 30.0))
    await eventually(lambda: len(r.ups["cheap"].calls) == 2, "the maker's call")
    hurried = asyncio.create_task(complete(request, ACME, 0.05))
    await eventually(lambda: len(flight.arrived) == 2, "the hurried request joined the call")
    stale = await asyncio.wait_for(hurried, 5)
    assert stale.cache.stale and stale.text == first.text
    assert "did not answer in time" in stale.upstream_failures[0]
    gate.set()  # its giving up cancelled nothing: the maker gets the fresh answer
    done = await asyncio.wait_for(maker, 5)
    assert not done.cache.stale and done.usage.cost_usd > 0
    assert len(r.ups["cheap"].calls) == 2


PII_AND_REFUSAL: list[dict[str, object]] = [
    {"kind": "pii"},
    {"kind": "refusal", "on_fail": "retry"},
    {"kind": "regex", "must_not_match": ["(?i)forbidden"], "on_fail": "block"},
    {"kind": "regex", "name": "hedge", "must_not_match": ["(?i)maybe"], "on_fail": "flag"},
]


async def test_redacted_answer_is_served_and_cached_redacted() -> None:
    r = rig({"cheap": "mail me at a@b.io"}, PII_AND_REFUSAL)
    done = await r.ask("contact?")
    assert done.text == "mail me at [REDACTED EMAIL]" and done.validation.passed
    assert [x.action for x in done.validation.results if not x.passed] == ["redacted"]
    assert (await r.ask("contact?")).cache.outcome is CacheOutcome.EXACT


async def test_flagged_answer_is_served_but_never_cached() -> None:
    r = rig({"cheap": "maybe 4"}, PII_AND_REFUSAL)
    done = await r.ask("2+2?")
    assert done.text == "maybe 4" and not done.validation.passed
    assert done.cache.entry_id == ""
    assert (await r.ask("2+2?")).cache.outcome is CacheOutcome.MISS
    assert r.events.events[-1]["validation"]["results"][-1]["action"] == "flagged"


async def test_refusal_retries_once_then_escalates() -> None:
    r = rig({"cheap": "I'm sorry, but I can't help with that."}, PII_AND_REFUSAL)
    done = await r.ask("q")
    assert r.ups["cheap"].calls == ["q", "q"] and r.ups["strong"].calls == ["q"]
    assert done.model == "strong-model" and done.validation.escalated
    actions = [x.action for x in done.validation.results if not x.passed]
    assert actions == ["retried", "escalated"]


async def test_block_fails_at_once_and_nothing_is_stored() -> None:
    r = rig({"cheap": "the forbidden answer"}, PII_AND_REFUSAL)
    with pytest.raises(FailedValidation) as caught:
        await r.ask("q")
    assert r.ups["strong"].calls == []
    assert [x.action for x in caught.value.report.results if not x.passed] == ["blocked"]
    assert (await r.service.pipeline.admin.stats(ACME)).entries == 0


async def test_a_flagged_streamed_answer_is_served_but_never_cached() -> None:
    r = rig({"cheap": "maybe 4"}, PII_AND_REFUSAL)
    deltas, final = await collect(r, "2+2?")
    assert "".join(deltas) == "maybe 4 " and not final.validation.passed
    assert final.cache.entry_id == ""
    _, again = await collect(r, "2+2?")
    assert again.cache.outcome is CacheOutcome.MISS
    assert r.ups["cheap"].calls == ["2+2?", "2+2?"]


async def test_tenant_validators_replace_the_default_set() -> None:
    r = rig({"cheap": "mail me at a@b.io"})  # default set: length + json_schema
    assert (await r.ask("contact?")).text == "mail me at a@b.io"


async def collect(r: Rig, prompt: str) -> tuple[list[str], Completion]:
    """The streamed text deltas, then the Completion that ends the stream."""
    request = ChatRequest(messages=(Message(Role.USER, prompt),))
    *events, final = [e async for e in r.service.pipeline.complete_stream(request, ACME)]
    deltas = [e for e in events if isinstance(e, str)]
    assert deltas == events and isinstance(final, Completion)
    return deltas, final


async def test_stream_falls_back_before_the_first_delta_and_caches_the_answer() -> None:
    r = rig()
    r.ups["cheap"].fail_with = DOWN
    deltas, final = await collect(r, "tell me")
    assert "".join(deltas) == "backup says tell me " and final.provider == "backup"
    assert final.cache.entry_id
    _, cached = await collect(r, "tell me")
    assert cached.cache.outcome is CacheOutcome.EXACT


async def test_stream_broken_midway_ends_unavailable_and_stores_nothing() -> None:
    r = rig(breaking=True)
    received: list[object] = []
    with pytest.raises(Unavailable, match="broke after 8 characters"):
        async for event in r.service.pipeline.complete_stream(
            ChatRequest(messages=(Message(Role.USER, "q"),)), ACME
        ):
            received.append(event)
    assert received == ["partial "] and r.ups["backup"].calls == []
    assert (await r.service.pipeline.admin.stats(ACME)).entries == 0
    # Paid for what it sent (1 prompt token, 2 answer tokens by the len/4 estimate), at the
    # dearest price of the chain it may have reached: the strong model's 10 and 30 USD/Mtok.
    spent = await r.service.pipeline.costs.ledger.totals("acme")
    assert spent[Period.DAY].cost_usd == pytest.approx((1 * 10 + 2 * 30) / 1e6)


async def test_a_stream_broken_midway_pays_at_the_dearest_price_the_tenant_may_reach() -> None:
    # Kept to the cheap model: neither backup nor strong could have sent the text.
    r = rig(breaking=True, models_allowed=[CHEAP_MODEL])
    with pytest.raises(Unavailable, match="broke after 8 characters"):
        await collect(r, "q")
    spent = await r.service.pipeline.costs.ledger.totals("acme")
    assert spent[Period.DAY].cost_usd == pytest.approx((1 + 2) * 0.6 / 1e6)


async def test_stream_with_all_providers_down_serves_stale() -> None:
    r = rig()
    await r.ask("q")
    for up in r.ups.values():
        up.fail_with = DOWN
    r.clock.advance(EXPIRED_IN_GRACE)
    deltas, final = await collect(r, "q")
    assert "".join(deltas) == final.text and final.cache.stale
    stats = await r.service.pipeline.admin.stats(ACME)
    assert (stats.requests, stats.misses, stats.exact_hits) == (2, 1, 1)
    assert r.events.events[-1]["kind"] == "completion" and r.events.events[-1]["stale"]
    # Nothing paid (no provider answered), nothing saved (every provider was tried), as the
    # ledger records it; before, GetStats and the metrics counted a hit's saving.
    assert (final.usage.cost_usd, final.usage.saved_usd) == (0, 0)
    assert stats.saved_usd == 0


def _stages_ms(latency: LatencyBreakdown) -> float:
    stages: float = sum(v for k, v in vars(latency).items() if k != "total_ms")
    return stages


async def test_a_streamed_answer_counts_the_whole_request_in_its_total_latency() -> None:
    # Before: a stale streamed answer said total_ms 0, and a model's streamed answer left the
    # exact lookup, the embedding and the search out of its total (less than its own stages).
    r = rig()
    _, missed = await collect(r, "q")
    assert missed.latency.embed_ms > 0
    assert missed.latency.total_ms >= _stages_ms(missed.latency)
    for up in r.ups.values():
        up.fail_with = DOWN
    r.clock.advance(EXPIRED_IN_GRACE)
    _, stale = await collect(r, "q")
    assert stale.cache.stale
    assert stale.latency.total_ms >= _stages_ms(stale.latency) > 0


async def test_stream_validation_failure_ends_failed_precondition() -> None:
    r = rig({"cheap": "the forbidden answer"}, PII_AND_REFUSAL)
    with pytest.raises(FailedValidation, match="streamed answer failed"):
        await collect(r, "q")
    assert (await r.service.pipeline.admin.stats(ACME)).entries == 0


async def test_request_validators_add_to_the_tenants() -> None:
    r = rig({"cheap": "mail me at a@b.io"})
    pii = (RequestValidator("pii"),)
    done = await r.ask("contact?", validators=pii)
    assert done.text == "mail me at [REDACTED EMAIL]"
    names = {x.name for x in done.validation.results}
    assert names == {"length", "pii"}
    # Cached per set of request validators: a plain request does not get the redacted answer.
    plain = await r.ask("contact?")
    assert plain.cache.outcome is CacheOutcome.MISS and plain.text == "mail me at a@b.io"
    again = await r.ask("contact?", validators=pii)
    assert again.cache.outcome is CacheOutcome.EXACT


@pytest.mark.parametrize(
    ("validator", "problem"),
    [
        (RequestValidator("custom"), "per tenant"),
        (RequestValidator("regex"), "must_match"),
        (RequestValidator("regex", must_match=("(unclosed",)), "missing ), unterminated"),
        (RequestValidator("regex", must_match=("a" * 201,)), "200 characters"),
        # `re` raises OverflowError, not re.error, for a repeat count past its limit.
        (RequestValidator("regex", must_match=("a{4294967296}",)), "repetition number"),
        # `regex` unrolls counted repeats when it compiles: this one took 1.2 s and 275 MB on
        # the event loop, and ((a{1000}){1000}){1000} (24 characters) much more.
        (RequestValidator("regex", must_not_match=("(a{1000}){1000}",)), "repeats too large"),
        (RequestValidator("length", on_fail="explode"), "on_fail"),
        (RequestValidator("length"), "already in use"),  # the tenant's own length validator
    ],
)
async def test_bad_request_validators_are_invalid_arguments(
    validator: RequestValidator, problem: str
) -> None:
    r = rig()
    with pytest.raises(InvalidArgument, match=re.escape(problem)) as caught:
        await r.ask("q", validators=(validator,))
    assert caught.value.field == "validators[0]"
    assert r.ups["cheap"].calls == []


def chains(clock: ManualClock) -> tuple[Failover, FakeUpstream, FakeUpstream, CircuitBreaker]:
    """A failover of one cheap and one strong provider; the cheap one's breaker opens at the
    first failure and probes once after 30 s."""
    cheap, strong = FakeUpstream("cheap-model"), FakeUpstream("strong-model")
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=30, clock=clock)
    price = Pricing(1.0, 1.0)
    failover = Failover(
        {
            Tier.CHEAP: [Provider("cheap", cheap, price, breaker)],
            Tier.STRONG: [Provider("strong", strong, price, CircuitBreaker(clock=clock))],
        },
        clock=clock,
        reserve_seconds=0.5,
    )
    return failover, cheap, strong, breaker


async def test_a_probe_stream_the_caller_stops_reading_frees_its_probe_slot() -> None:
    clock = ManualClock()
    failover, _, _, breaker = chains(clock)
    breaker.record_failure()
    clock.advance(30)  # half-open: one probe may go out
    request = ChatRequest(messages=(Message(Role.USER, "two words"),))
    opened = await failover.open_stream(request, Tier.CHEAP, clock() + 10)
    assert opened.provider.name == "cheap" and not breaker.allow()  # the probe is out
    deltas = failover.deltas(opened, clock() + 10)
    assert await anext(deltas) == "answer "
    await deltas.aclose()  # the client went away: no verdict on the provider
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # else the provider would be shed until the process restarts


async def call_failover(failover: Failover, call: str, deadline: float) -> None:
    """Asks for an answer (`complete`) or opens a stream (`open_stream`) on the cheap tier."""
    if call == "complete":
        await failover.complete(REQUEST, Tier.CHEAP, deadline)
    else:
        await failover.open_stream(REQUEST, Tier.CHEAP, deadline)


@pytest.mark.parametrize("call", ["complete", "open_stream"])
async def test_no_provider_is_tried_without_the_reserve_left_before_the_deadline(
    call: str,
) -> None:
    clock = ManualClock()
    failover, cheap, strong, _ = chains(clock)
    deadline = clock() + 0.4  # less than the 0.5 s kept back for the stale lookup and reply
    with pytest.raises(AllProvidersFailed, match="not tried, the deadline") as failed:
        await call_failover(failover, call, deadline)
    assert cheap.calls == [] and strong.calls == []
    # A single-flight waiter with a later deadline reads out_of_time to make the call itself.
    assert failed.value.out_of_time == deadline


class Stalling(FakeUpstream):
    """Streams `deltas`, then hangs until cancelled; records whether its stream was closed."""

    def __init__(self, model_id: str, deltas: Sequence[str]) -> None:
        super().__init__(model_id)
        self.deltas, self.closed = list(deltas), False

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> AsyncIterator[str]:
        try:
            for delta in self.deltas:
                yield delta
            await asyncio.Event().wait()
        finally:
            self.closed = True


def stalling_failover(clock: ManualClock, upstream: FakeUpstream, probes: int = 1) -> Failover:
    """`upstream` as the only cheap provider, its breaker half-open (`probes` slots)."""
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=30, half_open_probes=probes,
                             clock=clock)  # fmt: skip
    breaker.record_failure()
    clock.advance(30)
    strong = Provider("strong", FakeUpstream("strong-model"), Pricing(1.0, 1.0), CircuitBreaker())
    cheap = Provider("cheap", upstream, Pricing(1.0, 1.0), breaker)
    return Failover({Tier.CHEAP: [cheap], Tier.STRONG: [strong]}, clock=clock, reserve_seconds=0.5)


REQUEST = ChatRequest(messages=(Message(Role.USER, "two words"),))


class RetryingUpstream(FakeUpstream):
    """A client whose first try failed (it notes it, as OpenAIChatClient does) and whose
    retry answers only when the gate opens."""

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        note_failed_try()
        return await super().complete(messages, params)


async def test_a_call_the_deadline_cut_short_after_a_failed_try_counts_against_the_breaker() -> (
    None
):
    # A hung provider behind the default deadline (60 s: two tries of 30 s) must open it.
    clock = ManualClock()
    retrying = RetryingUpstream("cheap-model")
    retrying.gate = asyncio.Event()
    failover = stalling_failover(clock, retrying)
    breaker = failover.chain(Tier.CHEAP)[0][1].breaker
    done = await asyncio.wait_for(failover.complete(REQUEST, Tier.CHEAP, clock() + 0.6), 5)
    assert done.provider.name == "strong"
    assert "within 0.10s (deadline), after 1 failed try" in done.failures[0]
    assert breaker.state is BreakerState.OPEN  # the probe failed


@pytest.mark.parametrize("probing", [False, True])
async def test_a_call_cut_short_by_the_request_deadline_is_no_failure_of_the_provider(
    probing: bool,
) -> None:
    # Before: it counted against the breaker, so one client with short deadlines opened a
    # healthy provider's breaker for every tenant. A hang past the client's own attempt
    # timeout is an UpstreamError, and counts (test_openai_client.py).
    clock = ManualClock()
    failover, cheap, _, breaker = chains(clock)
    if probing:
        breaker.record_failure()
        clock.advance(30)
    cheap.gate = asyncio.Event()  # no answer within the caller's deadline
    done = await asyncio.wait_for(failover.complete(REQUEST, Tier.CHEAP, clock() + 0.6), 5)
    assert done.provider.name == "strong"
    assert "no answer within 0.10s (deadline)" in done.failures[0]
    assert breaker.state is (BreakerState.HALF_OPEN if probing else BreakerState.CLOSED)
    assert breaker.allow()  # a probe's slot is free again


async def test_a_call_sent_before_the_breaker_opened_does_not_close_it_by_answering_late() -> None:
    # Before: its success closed the breaker another call's failure had just opened (and a
    # late failure opened a half-open one again: test_breaker.py).
    clock = ManualClock()
    failover, cheap, _, breaker = chains(clock)
    cheap.gate = asyncio.Event()
    late = asyncio.create_task(failover.complete(REQUEST, Tier.CHEAP, clock() + 60))
    await eventually(lambda: bool(cheap.calls), "the call went out")
    breaker.record_failure()  # another call's failure opens the breaker meanwhile
    cheap.gate.set()
    assert (await late).provider.name == "cheap"
    assert breaker.state is BreakerState.OPEN


async def test_a_probe_refused_as_a_bad_request_frees_its_slot() -> None:
    clock = ManualClock()
    failover, cheap, _, breaker = chains(clock)
    breaker.record_failure()
    clock.advance(30)
    cheap.fail_with = UpstreamError("HTTP 400 Bad Request", retryable=False)
    done = await failover.complete(REQUEST, Tier.CHEAP, clock() + 10)
    assert cheap.calls == ["two words"] and done.provider.name == "strong"
    assert breaker.allow()  # no verdict on the provider, and its probe slot is free again


async def test_a_probe_whose_caller_is_cancelled_frees_its_slot() -> None:
    clock = ManualClock()
    failover, cheap, _, breaker = chains(clock)
    breaker.record_failure()
    clock.advance(30)
    cheap.gate = asyncio.Event()
    call = asyncio.create_task(failover.complete(REQUEST, Tier.CHEAP, clock() + 10))
    await eventually(lambda: bool(cheap.calls), "the probe's call")
    assert not breaker.allow()  # the probe is out
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert breaker.allow()


async def test_a_probe_stream_read_to_its_end_closes_the_breaker() -> None:
    clock = ManualClock()
    failover, _, _, breaker = chains(clock)
    breaker.record_failure()
    clock.advance(30)
    opened = await failover.open_stream(REQUEST, Tier.CHEAP, clock() + 10)
    assert [d async for d in failover.deltas(opened, clock() + 10)] == ["answer ", "to ", "two ",
                                                                         "words "]  # fmt: skip
    assert breaker.state is BreakerState.CLOSED


async def test_a_stream_that_stalls_midway_ends_unavailable_at_the_deadline() -> None:
    clock = ManualClock()
    stalling = Stalling("stalling-model", ["first ", "second "])
    failover = stalling_failover(clock, stalling)
    breaker = failover.chain(Tier.CHEAP)[0][1].breaker
    deadline = clock() + 0.7
    opened = await failover.open_stream(REQUEST, Tier.CHEAP, deadline)
    received: list[str] = []
    with pytest.raises(Unavailable, match=r"broke after 13 characters: .*within 0\.70s"):
        async with asyncio.timeout(5):
            async for delta in failover.deltas(opened, deadline):
                received.append(delta)
    assert received == ["first ", "second "] and stalling.closed
    # The caller's deadline ended it: no verdict on the provider, the probe's slot is free.
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allow()


async def test_a_stream_the_caller_stops_reading_is_closed_upstream() -> None:
    clock = ManualClock()
    stalling = Stalling("stalling-model", ["first ", "second "])
    failover = stalling_failover(clock, stalling)
    opened = await failover.open_stream(REQUEST, Tier.CHEAP, clock() + 10)
    deltas = failover.deltas(opened, clock() + 10)
    assert await anext(deltas) == "first "
    await deltas.aclose()
    assert stalling.closed  # its connection goes back now, not when collected


async def test_a_probe_stream_cancelled_midway_frees_its_own_slot_only() -> None:
    clock = ManualClock()
    stalling = Stalling("stalling-model", ["first "])
    failover = stalling_failover(clock, stalling, probes=2)
    breaker = failover.chain(Tier.CHEAP)[0][1].breaker
    first = await failover.open_stream(REQUEST, Tier.CHEAP, clock() + 10)
    await failover.open_stream(REQUEST, Tier.CHEAP, clock() + 10)  # the other probe, still out

    received: list[str] = []

    async def read(opened: OpenedStream) -> None:
        async for delta in failover.deltas(opened, clock() + 10):
            received.append(delta)

    reading = asyncio.create_task(read(first))
    await eventually(lambda: received == ["first "], "waiting on the stalled stream")
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert breaker.allow()
    assert not breaker.allow()  # the second probe still holds its slot


async def test_the_deadline_exactly_at_the_reserve_tries_no_provider() -> None:
    clock = ManualClock()
    failover, cheap, strong, breaker = chains(clock)
    deadline = clock() + 0.5  # exactly the reserve: no time left for any provider
    with pytest.raises(AllProvidersFailed, match="not tried, the deadline") as failed:
        await failover.complete(REQUEST, Tier.CHEAP, deadline)
    assert cheap.calls == [] and strong.calls == [] and breaker.state is BreakerState.CLOSED
    assert failed.value.out_of_time == deadline


@pytest.mark.parametrize("call", ["complete", "open_stream"])
async def test_a_chain_that_failed_with_time_to_spare_names_no_deadline(call: str) -> None:
    clock = ManualClock()
    failover, cheap, strong, _ = chains(clock)
    cheap.fail_with = strong.fail_with = UpstreamError("down", retryable=True)
    with pytest.raises(AllProvidersFailed) as failed:
        await call_failover(failover, call, clock() + 10)
    assert failed.value.out_of_time is None


class TimeLeftRecorder(FakeUpstream):
    """Records the time its calls are told they have (what a client plans a Retry-After by)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.told: list[float | None] = []

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        self.told.append(seconds_left())
        return await super().complete(messages, params)


@pytest.mark.parametrize("call", ["complete", "open_stream"])
async def test_a_provider_call_can_read_the_time_its_budget_leaves(call: str) -> None:
    # Without it, a client waiting out a Retry-After would sleep into the timeout, and the
    # next provider would be "not tried, the deadline was reached".
    clock = ManualClock()
    cheap = TimeLeftRecorder("cheap-model")
    price = Pricing(1.0, 1.0)
    failover = Failover(
        {
            Tier.CHEAP: [Provider("cheap", cheap, price, CircuitBreaker(clock=clock))],
            Tier.STRONG: [Provider("strong", FakeUpstream("s"), price, CircuitBreaker())],
        },
        clock=clock,
        reserve_seconds=0.5,
    )
    await call_failover(failover, call, clock() + 10)
    (told,) = cheap.told
    assert told is not None and 9.0 < told <= 9.5  # the deadline less the reserve
    assert seconds_left() is None  # only within the call


def test_providers_of_one_model_at_two_endpoints_are_each_listed_once() -> None:
    # The list is what shutdown closes: keyed by model, the second endpoint's client leaked.
    price, breaker = Pricing(1.0, 1.0), CircuitBreaker()
    first, second = FakeUpstream("same-model"), FakeUpstream("same-model")
    primary = Provider("primary", first, price, breaker)
    backup = Provider("backup", second, price, breaker)
    failover = Failover({Tier.CHEAP: [primary, backup], Tier.STRONG: [backup]})
    assert [p.name for p in failover.providers()] == ["primary", "backup"]


def test_a_failover_needs_a_provider_for_every_tier() -> None:
    cheap = Provider("cheap", FakeUpstream("cheap-model"), Pricing(1.0, 1.0), CircuitBreaker())
    with pytest.raises(ValueError, match=r"no provider for tier.*strong"):
        Failover({Tier.CHEAP: [cheap], Tier.STRONG: []})


@pytest.mark.parametrize("call", ["complete", "open_stream"])
async def test_a_chain_leaves_out_the_providers_not_allowed(call: str) -> None:
    price = Pricing(1.0, 1.0)
    cheap_up, backup_up, strong_up = (
        FakeUpstream("c", fail_with=DOWN),
        FakeUpstream("b"),
        FakeUpstream("s"),
    )
    cheap, backup, strong = (
        Provider(name, up, price, CircuitBreaker())
        for name, up in (("cheap", cheap_up), ("backup", backup_up), ("strong", strong_up))
    )
    failover = Failover({Tier.CHEAP: [cheap, backup], Tier.STRONG: [strong, backup]})
    allowed = {"cheap", "strong"}
    assert [p.name for _, p in failover.chain(Tier.CHEAP, allowed=allowed)] == ["cheap", "strong"]
    if call == "complete":
        answered = await failover.complete(
            REQUEST, Tier.CHEAP, time.monotonic() + 10, allowed=allowed
        )
        assert answered.provider is strong
    else:
        opened = await failover.open_stream(
            REQUEST, Tier.CHEAP, time.monotonic() + 10, allowed=allowed
        )
        assert opened.provider is strong
        await failover.deltas(opened, time.monotonic() + 10).aclose()
    assert backup_up.calls == []


def test_a_provider_in_both_chains_is_listed_once() -> None:
    # providers() is what is closed at stop and what the breaker gauges watch.
    shared = Provider("shared", FakeUpstream("m"), Pricing(1.0, 1.0), CircuitBreaker())
    cheap = Provider("cheap", FakeUpstream("c"), Pricing(1.0, 1.0), CircuitBreaker())
    failover = Failover({Tier.CHEAP: [cheap, shared], Tier.STRONG: [shared]})
    assert [p.name for p in failover.providers()] == ["cheap", "shared"]


@pytest.mark.parametrize("call", ["complete", "open_stream"])
async def test_a_provider_in_both_chains_is_tried_once_per_request(call: str) -> None:
    # Tried again in the STRONG chain, a provider down would get two failures from one
    # request on its breaker (threshold 2: opened by a single request).
    price = Pricing(1.0, 1.0)
    shared_up, cheap_up, strong_up = (FakeUpstream(m, fail_with=DOWN) for m in "msc")
    shared = Provider("shared", shared_up, price, CircuitBreaker(failure_threshold=2))
    cheap = Provider("cheap", cheap_up, price, CircuitBreaker())
    strong = Provider("strong", strong_up, price, CircuitBreaker())
    failover = Failover({Tier.CHEAP: [cheap, shared], Tier.STRONG: [strong, shared]})
    assert [(t, p.name) for t, p in failover.chain(Tier.CHEAP)] == [
        (Tier.CHEAP, "cheap"),
        (Tier.CHEAP, "shared"),
        (Tier.STRONG, "strong"),
    ]
    with pytest.raises(AllProvidersFailed) as failed:
        await call_failover(failover, call, time.monotonic() + 10)
    assert len(shared_up.calls) == 1
    assert len(failed.value.failures) == 3
    assert shared.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
async def test_a_stale_answer_reports_the_classifier_that_routed_the_request(
    streamed: bool,
) -> None:
    # It reported the version in service when the outage ended, read anew when served: a
    # model swapped in (hot reload) while the providers were tried was named instead, and the
    # difficulty the request was routed by was left out.
    r = rig()
    classifier = r.service.pipeline._p.classifier
    assert isinstance(classifier, FixedScoreClassifier)
    await r.ask("what is the capital of France")
    r.clock.advance(EXPIRED_IN_GRACE)
    cheap = r.ups["cheap"]
    cheap.fail_with = r.ups["backup"].fail_with = r.ups["strong"].fail_with = DOWN
    complete, stream = cheap.complete, cheap.stream

    async def swapped_then_complete(
        messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        classifier._version = "v-new"  # the watcher swaps while the providers are tried
        return await complete(messages, params)

    async def swapped_then_stream(
        messages: Sequence[Message], params: GenerationParams
    ) -> AsyncIterator[str]:
        classifier._version = "v-new"
        async for delta in stream(messages, params):
            yield delta

    cheap.complete = swapped_then_complete  # type: ignore[method-assign]
    cheap.stream = swapped_then_stream  # type: ignore[method-assign]
    if streamed:
        _, stale = await collect(r, "what is the capital of France")
    else:
        stale = await r.ask("what is the capital of France")
    assert stale.cache.stale and classifier.version == "v-new"
    assert (stale.classifier_version, stale.difficulty) == ("v", 0.1)
    event = r.events.events[-1]
    assert (event["classifier_version"], event["difficulty"]) == ("v", 0.1)


async def test_a_users_request_outwaiting_its_users_hurried_one_still_shares_the_call() -> None:
    # u2's request makes the call; u1's hurried request joins it for all of u1's identical
    # requests, and u1's patient one waits behind it. The hurried one gives up (stale): the
    # patient one must go on waiting for u2's call, not give up with it nor call again.
    r = rig()
    first = await r.ask("what is the capital of France")
    r.clock.advance(EXPIRED_IN_GRACE)
    gate = asyncio.Event()
    for up in r.ups.values():
        up.gate = gate  # hangs until set

    def asked(user: str) -> ChatRequest:
        message = Message(Role.USER, "what is the capital of France")
        return ChatRequest(messages=(message,), end_user_id=user)

    complete, flight = r.service.pipeline.complete, count_shared_calls(r.service.pipeline)
    maker = asyncio.create_task(complete(asked("u2"), ACME, 30.0))
    await eventually(lambda: len(r.ups["cheap"].calls) == 2, "u2's call")
    hurried = asyncio.create_task(complete(asked("u1"), ACME, 0.6))  # waits 0.5 s at most
    await eventually(lambda: len(flight.arrived) == 2, "u1's hurried request joined the call")
    patient = asyncio.create_task(complete(asked("u1"), ACME, 30.0))
    await eventually(lambda: len(flight.arrived) == 3, "u1's patient request")
    stale = await asyncio.wait_for(hurried, 5)
    assert stale.cache.stale and stale.text == first.text
    await asyncio.sleep(0.05)
    assert not patient.done()
    gate.set()
    made, shared = await asyncio.wait_for(asyncio.gather(maker, patient), 5)
    assert not made.cache.stale and made.usage.cost_usd > 0 and not made.shared
    assert not shared.cache.stale and shared.shared and shared.usage.cost_usd == 0
    assert len(r.ups["cheap"].calls) == 2

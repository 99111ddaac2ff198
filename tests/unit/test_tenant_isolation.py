"""No sequence of operations by tenant A changes what tenant B sees.

The property runs every generated sequence twice on fresh in-process services (fakes): once
with A's operations interleaved, once with B's alone, and compares what B observed: its
answers, feedback and invalidation results, stats and events. A's operations include attacks:
the same prompts and tags as B, and feedback and invalidations naming B's response and entry
ids. The store is bounded at a few entries so eviction is in play.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.domain import (
    CacheControl,
    CacheOutcome,
    ChatRequest,
    Completion,
    Feedback,
    Message,
    RequestValidator,
    Role,
    Tier,
)
from routecache.errors import NotFound, RouteCacheError, Unavailable, UpstreamError
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, build_service
from routecache.router.events import InMemoryEventLog
from routecache.router.settings import ConfigError, LimitSettings, load_settings
from routecache.router.stats import ResponseRegistry, ServedResponse
from routecache.router.tenant_admin import InvalidateTarget
from routecache.router.validation import RequestValidators
from tests.fakes import FakeUpstream, ManualClock, eventually, json_answer, prose_answer

KEYS = {"A": "key-tenant-a", "B": "key-tenant-b"}
PROMPTS = [
    "what is the capital of france",
    "what is the capital of France?",
    "capital of france",
    "how do i reset my password",
    "reset my password please",
    "tell me a joke about cats",
]
TAGS = ["t1", "t2"]

texts = st.one_of(
    st.sampled_from(PROMPTS),
    st.text(st.sampled_from("abcdefg ?"), min_size=1, max_size=24).filter(str.strip),
)
who = st.sampled_from(["A", "B"])
completes = st.tuples(
    st.just("complete"), who, texts, st.sampled_from([None, *TAGS]), st.booleans()
)
operations = st.one_of(
    # Listed three times: most operations write or read the cache, so eviction happens.
    completes,
    completes,
    completes,
    st.tuples(st.just("feedback"), who, st.integers(0, 30), st.booleans()),
    st.tuples(st.just("invalidate_entry"), who, st.integers(0, 30)),
    st.tuples(st.just("invalidate_tag"), who, st.sampled_from(TAGS)),
    st.tuples(st.just("invalidate_all"), who),
    st.tuples(st.just("stats"), who),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 30.0, 120.0])),
)


def build(
    events: InMemoryEventLog,
    clock: ManualClock,
    cheap: FakeUpstream | None = None,
    strong: FakeUpstream | None = None,
) -> Service:
    config = load_settings(
        cache={"embedder": "hash", "similarity_threshold": 0.8, "max_entries": 2},
        metrics={"enabled": False},
        tenants=[
            {"name": name, "api_key_sha256": [hash_api_key(key)], "default_ttl_seconds": 100}
            for name, key in KEYS.items()
        ],
    )
    return build_service(
        config,
        Overrides(
            embedder=HashEmbedder(),
            classifier=FixedScoreClassifier(0.2, version="fixed", default_threshold=0.5),
            upstreams={
                Tier.CHEAP: cheap or FakeUpstream("cheap-model", prose_answer),
                Tier.STRONG: strong or FakeUpstream("strong-model", json_answer),
            },
            events=events,
            clock=clock,
        ),
    )


@dataclass
class Run:
    """One run of a sequence; B's observations with its random ids replaced by labels."""

    service: Service
    clock: ManualClock
    events: InMemoryEventLog
    responses: dict[str, list[str]] = field(default_factory=lambda: {"A": [], "B": [], "*": []})
    entries: dict[str, list[str]] = field(default_factory=lambda: {"A": [], "B": [], "*": []})
    labels: dict[str, str] = field(default_factory=dict)
    seen_by_b: list[object] = field(default_factory=list)

    def label(self, entry_id: str) -> str:
        if not entry_id:
            return ""
        return self.labels.setdefault(entry_id, f"e{len(self.labels)}")

    def pick(self, pool: Sequence[str], index: int) -> str:
        return pool[index % len(pool)] if pool else "nothing-seen-yet"


async def play(ops: Sequence[tuple[Any, ...]], *, with_a: bool) -> Run:
    clock, events = ManualClock(), InMemoryEventLog()
    run = Run(build(events, clock), clock, events)
    try:
        for op in ops:
            if op[0] == "advance":
                clock.advance(op[1])
            elif with_a or op[1] == "B":
                await step(run, op)
        await step(run, ("stats", "B"))  # B's final view, whatever the last operation was
        run.seen_by_b.extend(_b_events(run))
    finally:
        await run.service.aclose()
    return run


async def step(run: Run, op: tuple[Any, ...]) -> None:
    kind, tenant = op[0], op[1]
    # A may name any id it has seen, B's included: that is the attack. B names its own.
    pool = "*" if tenant == "A" else "B"
    try:
        seen = await _call(run, op, tenant, pool)
    except RouteCacheError as error:
        seen = (kind, type(error).__name__)
    if tenant == "B":
        run.seen_by_b.append(seen)


async def _call(run: Run, op: tuple[Any, ...], tenant: str, pool: str) -> object:
    pipeline, key = run.service.pipeline, KEYS[tenant]
    kind = op[0]
    if kind == "complete":
        _, _, text, tag, no_cache = op
        tags = () if tag is None else (tag,)
        request = ChatRequest(
            (Message(Role.USER, text),), cache=CacheControl(no_cache=no_cache, tags=tags)
        )
        done = await pipeline.complete(request, key)
        for owner in (tenant, "*"):
            run.responses[owner].append(done.response_id)
            if done.cache.entry_id:
                run.entries[owner].append(done.cache.entry_id)
        return _answer(run, done) if tenant == "B" else None
    if kind == "feedback":
        response_id = run.pick(run.responses[pool], op[2])
        removed = await pipeline.admin.feedback(Feedback(response_id, op[3]), key)
        return ("feedback", run.label(removed) if tenant == "B" else removed)
    if kind == "invalidate_entry":
        entry_id = run.pick(run.entries[pool], op[2])
        return (
            "removed",
            await pipeline.admin.invalidate(InvalidateTarget(entry_id=entry_id), key),
        )
    if kind == "invalidate_tag":
        return ("removed", await pipeline.admin.invalidate(InvalidateTarget(tag=op[2]), key))
    if kind == "invalidate_all":
        return ("removed", await pipeline.admin.invalidate(InvalidateTarget(all_entries=True), key))
    stats = await pipeline.admin.stats(key, 100)
    if tenant == "A":  # only B's observations are labelled (labels follow B's order)
        return None
    counters = {k: v for k, v in vars(stats).items() if k != "top_entries"}
    top = sorted(
        (run.label(e.entry_id), e.prompt, e.model, e.hits, round(e.saved_usd, 12))
        for e in stats.top_entries
    )
    return ("stats", counters, top)


def _answer(run: Run, done: Completion) -> tuple[object, ...]:
    return (
        done.text,
        done.model,
        done.tier,
        done.cache.outcome,
        round(done.cache.similarity, 6),
        run.label(done.cache.entry_id),
        done.cache.stale,
        done.usage,
        done.validation,
    )


def _b_events(run: Run) -> list[tuple[object, ...]]:
    kept = ("prompt", "cache_outcome", "path", "similarity", "model", "cost_usd", "removed")
    return [
        (event["kind"], *(event.get(name) for name in kept))
        for event in run.events.events
        if event.get("tenant") == "B"
    ]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(operations, min_size=4, max_size=20))
def test_tenant_a_never_changes_what_tenant_b_sees(ops: list[tuple[Any, ...]]) -> None:
    with_a = asyncio.run(play(ops, with_a=True))
    without_a = asyncio.run(play(ops, with_a=False))
    assert with_a.seen_by_b == without_a.seen_by_b


# Regression tests for what the audit found, and the guarantees the property leans on.


def ask(text: str) -> ChatRequest:
    return ChatRequest((Message(Role.USER, text),))


async def test_a_tenants_writes_never_evict_another_tenants_entries() -> None:
    # Before: one LRU bound over all tenants; A's answers pushed B's out of the cache.
    service = build(InMemoryEventLog(), ManualClock())
    pipeline = service.pipeline
    try:
        await pipeline.complete(ask("what is the boiling point of water"), KEYS["B"])
        for prompt in PROMPTS[:4]:
            await pipeline.complete(ask(prompt), KEYS["A"])
        again = await pipeline.complete(ask("what is the boiling point of water"), KEYS["B"])
        assert again.cache.outcome is CacheOutcome.EXACT
        assert (await pipeline.admin.stats(KEYS["B"])).entries == 1
        assert (await pipeline.admin.stats(KEYS["A"])).entries == 2  # A's own bound still holds
    finally:
        await service.aclose()


def test_a_tenants_responses_never_push_out_another_tenants() -> None:
    # Before: one bound over all tenants; a busy tenant made another's feedback NOT_FOUND.
    registry = ResponseRegistry(max_responses=2)
    registry.remember("b-1", ServedResponse("B", "B:e1", CacheOutcome.MISS))
    for number in range(5):
        registry.remember(f"a-{number}", ServedResponse("A", "", CacheOutcome.MISS))
    assert registry.find("B", "b-1") is not None
    assert registry.find("A", "b-1") is None and registry.find("B", "a-4") is None
    assert registry.find("A", "a-0") is None and registry.find("A", "a-4") is not None
    assert registry.find("A", "a-3") is not None  # the bound's worth of newest is kept


async def test_identical_requests_of_two_tenants_in_flight_are_never_coalesced() -> None:
    gate = asyncio.Event()
    cheap = FakeUpstream("cheap-model", prose_answer, gate=gate)
    service = build(InMemoryEventLog(), ManualClock(), cheap)
    try:
        calls = [service.pipeline.complete(ask("same words"), KEYS[t]) for t in "AABB"]
        pending = asyncio.gather(*calls)
        await eventually(lambda: len(cheap.calls) >= 2, "both tenants' leaders wait on the model")
        gate.set()
        done = await pending
    finally:
        await service.aclose()
    assert len(cheap.calls) == 2  # one per tenant; each tenant's twin shares its own call
    for first, second in (done[0:2], done[2:4]):
        assert sorted([first.usage.cost_usd > 0, second.usage.cost_usd > 0]) == [False, True]


async def test_a_stale_answer_never_comes_from_another_tenant() -> None:
    cheap = FakeUpstream("cheap-model", prose_answer)
    strong = FakeUpstream("strong-model", json_answer)
    clock = ManualClock()
    service = build(InMemoryEventLog(), clock, cheap, strong)
    pipeline = service.pipeline
    try:
        await pipeline.complete(ask("what is the capital of france"), KEYS["A"])
        await pipeline.complete(ask("how do i reset my password"), KEYS["B"])
        clock.advance(500)  # past the TTL (100 s), inside the stale grace period
        for upstream in (cheap, strong):
            upstream.fail_with = UpstreamError("HTTP 503", retryable=True)
        with pytest.raises(Unavailable, match="no cached answer"):
            await pipeline.complete(ask("what is the capital of france"), KEYS["B"])
        theirs = await pipeline.complete(ask("how do i reset my password"), KEYS["B"])
        assert theirs.cache.stale and theirs.cache.entry_id.startswith("B:")
        mine = await pipeline.complete(ask("what is the capital of france"), KEYS["A"])
        assert mine.cache.stale and mine.cache.entry_id.startswith("A:")
    finally:
        await service.aclose()


async def test_feedback_and_invalidation_with_another_tenants_ids_do_nothing() -> None:
    service = build(InMemoryEventLog(), ManualClock())
    pipeline = service.pipeline
    try:
        theirs = await pipeline.complete(ask("what is the capital of france"), KEYS["B"])
        with pytest.raises(NotFound) as unknown:
            await pipeline.admin.feedback(Feedback(theirs.response_id, False), KEYS["A"])
        with pytest.raises(NotFound) as never_seen:
            await pipeline.admin.feedback(Feedback("0" * 32, False), KEYS["A"])
        # The same answer as for an id that never existed: no existence signal either.
        assert str(unknown.value).replace(theirs.response_id, "ID") == str(
            never_seen.value
        ).replace("0" * 32, "ID")
        entry = InvalidateTarget(entry_id=theirs.cache.entry_id)
        assert await pipeline.admin.invalidate(entry, KEYS["A"]) == 0
        again = await pipeline.complete(ask("what is the capital of france"), KEYS["B"])
        assert again.cache.outcome is CacheOutcome.EXACT
    finally:
        await service.aclose()


@pytest.mark.parametrize("name", ["acme:prod", "a{b}", "", "x" * 65, "tab\tname"])
def test_tenant_names_that_could_cross_key_spaces_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"tenants\.0\.name"):
        load_settings(tenants=[{"name": name, "api_key_sha256": [hash_api_key("k")]}])


def test_request_validators_are_compiled_and_cached_per_tenant() -> None:
    # Before: one cache for all tenants; a tenant could tell from how fast its validators were
    # ready whether another had just used the same ones, and could flush the other's.
    validators = RequestValidators(LimitSettings(), max_cached=2)
    asked = ChatRequest((Message(Role.USER, "x"),), validators=(RequestValidator("pii"),))
    for_b = validators.build(asked, [], "B")[0]
    assert validators.build(asked, [], "B")[0] is for_b  # B's own cache
    for_a = validators.build(asked, [], "A")[0]
    assert for_a is not for_b  # compiled afresh for A: no sign B used it
    for kind in ("refusal", "length", "pii"):
        other = ChatRequest((Message(Role.USER, "x"),), validators=(RequestValidator(kind),))
        validators.build(other, [], "A")  # A fills and flushes its own cache
    assert validators.build(asked, [], "B")[0] is for_b

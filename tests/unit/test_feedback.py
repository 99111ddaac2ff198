"""Feedback: a thumbs-down removes the answer and makes its close neighbours harder to serve."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import HitRequirement
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import StoreUnavailable, Vector
from routecache.cache.semantic_cache import Distrust, NewEntry, SemanticCache
from routecache.domain import CacheOutcome, ChatRequest, Feedback, Message, Role, Tier
from routecache.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from routecache.router.logs import REQUEST_ID
from routecache.router.metrics import PrometheusTelemetry
from routecache.router.tenant_admin import InvalidateTarget
from tests.fakes import ManualClock, count_shared_calls, eventually
from tests.unit.conftest import KEYS, Harness, make_harness

ACME = KEYS["acme"]
SCOPE = "scope-1"


def at_angle(theta: float, axis: int = 1) -> Vector:
    """A unit vector: cos(angle between two of these) is their cosine similarity."""
    vector = np.zeros(4, dtype=np.float32)
    vector[0], vector[axis] = math.cos(theta), math.sin(theta)
    return vector


async def put(cache: SemanticCache, prompt: str, vector: Vector) -> str:
    entry = await cache.store(
        NewEntry("acme", SCOPE, prompt, f"answer to {prompt}", "m", Tier.CHEAP, vector,
                 0.01, 10, 10, 3600)
    )  # fmt: skip
    assert entry is not None
    return entry.entry_id


@pytest.fixture
def cache() -> SemanticCache:
    clock = ManualClock()
    return SemanticCache(
        InMemoryEntryStore(100, clock), ScopedFaissIndex(4), clock,
        distrust=Distrust(radius=0.8, penalty=0.05, max_penalty=0.2),
    )  # fmt: skip


async def test_thumbs_down_raises_the_similarity_a_neighbour_needs(cache: SemanticCache) -> None:
    bad = await put(cache, "capital of France", at_angle(0.0))
    neighbour_angle = math.acos(0.95)  # 0.95 similar to the bad entry: inside the radius
    neighbour = await put(cache, "capital of Spain", at_angle(neighbour_angle))
    far = await put(cache, "boiling point", at_angle(1.2, axis=3))
    query = at_angle(neighbour_angle + math.acos(0.92))  # 0.92 similar to the neighbour
    hit = await cache.lookup_semantic(SCOPE, "", query, HitRequirement(0.9))
    assert hit is not None and hit.entry.entry_id == neighbour

    assert await cache.distrust("acme", bad) == 1
    assert await cache.get("acme", bad) is None
    assert cache.penalty_of(neighbour) == pytest.approx(0.05)
    assert cache.penalty_of(far) == 0.0
    # 0.92 no longer clears 0.9 + 0.05; a query as close as 0.96 still does.
    assert await cache.lookup_semantic(SCOPE, "", query, HitRequirement(0.9)) is None
    closer = at_angle(neighbour_angle + math.acos(0.96))
    hit = await cache.lookup_semantic(SCOPE, "", closer, HitRequirement(0.9))
    assert hit is not None and hit.entry.entry_id == neighbour


async def test_penalties_add_up_to_the_cap_and_leave_with_the_entry(cache: SemanticCache) -> None:
    neighbour = await put(cache, "keep", at_angle(0.0))
    for i in range(6):
        bad = await put(cache, f"bad {i}", at_angle(0.1 + i * 0.01))
        await cache.distrust("acme", bad)
    assert cache.penalty_of(neighbour) == pytest.approx(0.2)
    await cache.invalidate_ids("acme", [neighbour])
    assert cache.penalty_of(neighbour) == 0.0


async def test_a_penalty_leaves_with_an_entry_the_store_lost() -> None:
    # Another replica, the expiry sweep or Redis' own expiry removed the entry behind this
    # cache's back: the lookup that finds it missing drops it from the index, and its penalty
    # must go too, or penalties pile up for the life of the process.
    clock = ManualClock()
    store = InMemoryEntryStore(100, clock)
    cache = SemanticCache(store, ScopedFaissIndex(4), clock)
    neighbour = await put(cache, "keep", at_angle(0.0))
    await cache.distrust("acme", await put(cache, "bad", at_angle(0.1)))
    assert cache.penalty_of(neighbour) > 0.0
    await store.delete([neighbour])
    assert await cache.lookup_semantic(SCOPE, "", at_angle(0.0), HitRequirement(0.5)) is None
    assert cache.penalty_of(neighbour) == 0.0


async def test_distrust_of_another_tenants_entry_does_nothing(cache: SemanticCache) -> None:
    entry = await put(cache, "mine", at_angle(0.0))
    neighbour = await put(cache, "near", at_angle(0.1))
    assert await cache.distrust("globex", entry) == 0
    assert cache.penalty_of(neighbour) == 0.0
    assert await cache.get("acme", entry) is not None


def ask(prompt: str) -> ChatRequest:
    return ChatRequest(messages=(Message(Role.USER, prompt),))


async def test_feedback_lands_in_events_stats_and_telemetry(harness: Harness) -> None:
    pipeline = harness.service.pipeline
    await pipeline.complete(ask("how tall is the eiffel tower"), ACME)
    hit = await pipeline.complete(ask("how tall is the eiffel tower today"), ACME)
    assert hit.cache.outcome is CacheOutcome.SEMANTIC
    assert await pipeline.admin.feedback(Feedback(hit.response_id, thumbs_up=True), ACME) == ""
    removed = await pipeline.admin.feedback(
        Feedback(hit.response_id, thumbs_up=False, correction="330 m"), ACME
    )
    assert removed == hit.cache.entry_id
    feedback = [e for e in harness.events.events if e["kind"] == "feedback"]
    assert [(e["thumbs_up"], e["invalidated"]) for e in feedback] == [(True, False), (False, True)]
    assert feedback[1]["correction"] == "330 m"
    assert feedback[1]["similarity"] == pytest.approx(hit.cache.similarity)
    assert harness.telemetry.feedback_seen == [("acme", True, False), ("acme", False, True)]
    stats = await pipeline.admin.stats(ACME)
    assert (stats.thumbs_up, stats.thumbs_down) == (0, 1)  # the latest rating of the response
    with pytest.raises(InvalidArgument):
        await pipeline.admin.feedback(Feedback("", thumbs_up=True), ACME)


async def test_a_thumbs_down_on_an_answer_shared_with_an_identical_request_removes_it(
    harness: Harness,
) -> None:
    # The second request shared the first's call (single flight): before, its response had
    # no entry behind it, so a thumbs-down on it removed nothing and the answer stayed served.
    pipeline = harness.service.pipeline
    harness.cheap.gate = asyncio.Event()
    flight = count_shared_calls(pipeline)
    question = ask("what is the tallest mountain")
    tasks = [asyncio.create_task(pipeline.complete(question, ACME)) for _ in "ab"]
    await eventually(lambda: len(flight.arrived) == 2, "both requests joined the call")
    harness.cheap.gate.set()
    made, shared = await asyncio.gather(*tasks)
    assert len(harness.cheap.calls) == 1 and shared.usage.cost_usd == 0  # it did share
    assert shared.cache.entry_id == made.cache.entry_id != ""
    removed = await pipeline.admin.feedback(Feedback(shared.response_id, False), ACME)
    assert removed == made.cache.entry_id
    again = await pipeline.complete(question, ACME)
    assert again.cache.outcome is CacheOutcome.MISS


async def test_stats_list_the_most_served_entries_first(harness: Harness) -> None:
    pipeline = harness.service.pipeline
    cost, model, entry = {}, {}, {}
    for prompt, repeats in (("alpha question", 1), ("beta question", 3), ("gamma question", 0)):
        first = await pipeline.complete(ask(prompt), ACME)
        cost[prompt], model[prompt] = first.usage.cost_usd, first.model
        entry[prompt] = first.cache.entry_id
        for _ in range(repeats):
            await pipeline.complete(ask(prompt), ACME)
    stats = await pipeline.admin.stats(ACME, top_n=2)
    assert [(e.prompt, e.hits) for e in stats.top_entries] == [
        ("beta question", 3), ("alpha question", 1),
    ]  # fmt: skip
    assert stats.top_entries[0].saved_usd == pytest.approx(3 * cost["beta question"])
    # the entry (to invalidate it) and the model that wrote it (which tier the savings came from)
    assert [(e.entry_id, e.model) for e in stats.top_entries] == [
        (entry[p], model[p]) for p in ("beta question", "alpha question")
    ]
    assert (await pipeline.admin.stats(KEYS["globex"])).top_entries == ()


async def test_feedback_events_carry_request_and_entry_and_a_repeat_removes_nothing(
    harness: Harness,
) -> None:
    pipeline = harness.service.pipeline
    await pipeline.complete(ask("how tall is the eiffel tower"), ACME)
    hit = await pipeline.complete(ask("how tall is the eiffel tower today"), ACME)
    token = REQUEST_ID.set("req-feedback")
    try:
        up = Feedback(hit.response_id, thumbs_up=True, comment="spot on")
        assert await pipeline.admin.feedback(up, ACME) == ""
        down = Feedback(hit.response_id, thumbs_up=False)
        assert await pipeline.admin.feedback(down, ACME) == hit.cache.entry_id
        # The entry is gone already: nothing is removed, and neither the reply nor the event
        # nor the telemetry may say otherwise.
        assert await pipeline.admin.feedback(down, ACME) == ""
    finally:
        REQUEST_ID.reset(token)
    feedback = [e for e in harness.events.events if e["kind"] == "feedback"]
    assert [e["invalidated"] for e in feedback] == [False, True, False]
    assert harness.telemetry.feedback_seen[-1] == ("acme", False, False)
    # The analysis joins feedback to the served answer by these; the request id follows the
    # request across services (docs/operations.md).
    for event in feedback:
        assert (event["request_id"], event["entry_id"]) == ("req-feedback", hit.cache.entry_id)
        assert event["response_id"] == hit.response_id
        assert event["cache_outcome"] == CacheOutcome.SEMANTIC.value
    assert feedback[0]["comment"] == "spot on"
    stats = await pipeline.admin.stats(ACME)
    assert (stats.thumbs_up, stats.thumbs_down) == (0, 1)


async def test_stats_count_each_response_once_with_its_latest_rating_as_the_notebook_does(
    harness: Harness,
) -> None:
    # GetStats counted every rating: a response rated down, then up (a changed mind) was one
    # thumbs-down and one thumbs-up, where the notebook (routecache/analysis) counts one up.
    pipeline = harness.service.pipeline
    first = await pipeline.complete(ask("how tall is the eiffel tower"), ACME)
    second = await pipeline.complete(ask("what is the capital of peru"), ACME)
    for response, thumbs_up in ((first, False), (first, True), (second, True), (second, True)):
        await pipeline.admin.feedback(Feedback(response.response_id, thumbs_up), ACME)
    stats = await pipeline.admin.stats(ACME)
    assert (stats.thumbs_up, stats.thumbs_down) == (2, 0)
    await pipeline.admin.feedback(Feedback(second.response_id, thumbs_up=False), ACME)
    stats = await pipeline.admin.stats(ACME)
    assert (stats.thumbs_up, stats.thumbs_down) == (1, 1)


async def test_a_penalised_neighbour_is_served_at_threshold_plus_penalty_exactly() -> None:
    # A penalty of 1/8 is exact in floating point, so "threshold + penalty" is the neighbour's
    # own similarity to the bit: at least that much similarity is served, as without penalty.
    clock = ManualClock()
    rule = Distrust(radius=0.8, penalty=0.125, max_penalty=0.5)
    cache = SemanticCache(InMemoryEntryStore(100, clock), ScopedFaissIndex(4), clock, distrust=rule)
    neighbour = await put(cache, "capital of Spain", at_angle(0.0))
    await cache.distrust("acme", await put(cache, "capital of France", at_angle(0.1)))
    assert cache.penalty_of(neighbour) == 0.125
    query = at_angle(0.3)
    (nearest,) = cache.index.search(SCOPE, query, 1)
    at_edge = HitRequirement(nearest.similarity - 0.125)
    hit = await cache.lookup_semantic(SCOPE, "", query, at_edge)
    assert hit is not None and hit.entry.entry_id == neighbour


async def test_a_stale_answer_for_an_outage_keeps_the_distrust_penalties(
    cache: SemanticCache,
) -> None:
    # The grace relaxes freshness, not the evidence that the neighbours of a thumbed-down
    # answer may answer another question: a stale lookup served what a normal one refused,
    # flagged stale only, as if merely old.
    bad = await put(cache, "capital of France", at_angle(0.0))
    neighbour_angle = math.acos(0.95)
    neighbour = await put(cache, "capital of Spain", at_angle(neighbour_angle))
    await cache.distrust("acme", bad)
    query = at_angle(neighbour_angle + math.acos(0.92))
    assert await cache.lookup_semantic(SCOPE, "", query, HitRequirement(0.9)) is None
    assert await cache.lookup_stale(SCOPE, "", query, HitRequirement(0.9)) is None
    clearing = at_angle(neighbour_angle + math.acos(0.96))  # clears threshold + penalty
    stale = await cache.lookup_stale(SCOPE, "", clearing, HitRequirement(0.9))
    assert stale is not None and stale.entry.entry_id == neighbour


async def test_a_neighbour_exactly_at_the_radius_is_penalised() -> None:
    # The radius is the least similarity that counts as a neighbour ("at least radius").
    probe = ScopedFaissIndex(4)
    probe.add(SCOPE, "neighbour", at_angle(0.0))
    (edge,) = probe.search(SCOPE, at_angle(0.5), 1)
    clock = ManualClock()
    rule = Distrust(radius=edge.similarity, penalty=0.05, max_penalty=0.2)
    cache = SemanticCache(InMemoryEntryStore(100, clock), ScopedFaissIndex(4), clock, distrust=rule)
    neighbour = await put(cache, "capital of Spain", at_angle(0.0))
    await cache.distrust("acme", await put(cache, "capital of France", at_angle(0.5)))
    assert cache.penalty_of(neighbour) == pytest.approx(0.05)


async def test_penalties_cap_at_the_documented_0_2_by_default() -> None:
    # The service sets the radius and the penalty from its settings but not the cap: the
    # default is the documented one (README, docs/operations.md).
    clock = ManualClock()
    cache = SemanticCache(InMemoryEntryStore(100, clock), ScopedFaissIndex(4), clock)
    neighbour = await put(cache, "keep", at_angle(0.0))
    for i in range(8):
        await cache.distrust("acme", await put(cache, f"bad {i}", at_angle(0.1 + i * 0.01)))
    assert cache.penalty_of(neighbour) == pytest.approx(0.2)


class _RefusingDeletes(InMemoryEntryStore):
    """Answers reads, refuses deletes (Redis out of memory) while `refusing` is set."""

    refusing = False

    async def delete(self, entry_ids):  # type: ignore[no-untyped-def]
        if self.refusing:
            raise StoreUnavailable("refused")
        return await super().delete(entry_ids)


async def test_a_thumbs_down_owed_over_several_tries_raises_the_neighbours_penalty_once() -> None:
    # Before: each try read the entry and raised its neighbours' penalties, then the delete
    # was refused and the removal stayed owed: three tries, three penalties for one thumbs-down.
    clock = ManualClock()
    store = _RefusingDeletes(100, clock)
    cache = SemanticCache(store, ScopedFaissIndex(4), clock,
                          distrust=Distrust(radius=0.8, penalty=0.05, max_penalty=0.2))  # fmt: skip
    bad = await put(cache, "capital of France", at_angle(0.0))
    neighbour = await put(cache, "capital of Spain", at_angle(math.acos(0.95)))
    store.refusing = True
    with pytest.raises(Unavailable):
        await cache.distrust("acme", bad)
    for _ in range(3):
        await cache.settle_owed()
    store.refusing = False
    await cache.settle_owed()
    assert await cache.get("acme", bad) is None
    assert cache.penalty_of(neighbour) == pytest.approx(0.05)


class _YieldingDeletes(InMemoryEntryStore):
    """Lets other tasks run during a delete, as a Redis round trip does."""

    async def delete(self, entry_ids):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return await super().delete(entry_ids)


async def test_thumbs_downs_at_once_leave_no_penalty_on_an_entry_one_of_them_removed() -> None:
    # Before: each removal found the others' entries among its neighbours before the deletes
    # and raised their penalties after them, on entries already gone: kept for the process's life.
    clock = ManualClock()
    cache = SemanticCache(_YieldingDeletes(100, clock), ScopedFaissIndex(4), clock,
                          distrust=Distrust(radius=0.8, penalty=0.05, max_penalty=0.2))  # fmt: skip
    bad = [await put(cache, f"bad {n}", at_angle(n * 0.05)) for n in range(3)]
    kept = await put(cache, "kept", at_angle(0.12))
    await asyncio.gather(*(cache.distrust("acme", entry_id) for entry_id in bad))
    assert [await cache.get("acme", entry_id) for entry_id in bad] == [None, None, None]
    assert [cache.penalty_of(entry_id) for entry_id in bad] == [0.0, 0.0, 0.0]
    assert cache.penalty_of(kept) == pytest.approx(0.15)


async def test_failed_feedback_invalidate_and_stats_calls_each_write_an_error_event(
    harness: Harness,
) -> None:
    # Before: a refused Feedback, Invalidate or GetStats left no error event and no
    # routecache_errors_total sample (docs/security.md, 5).
    admin = harness.service.pipeline.admin
    with pytest.raises(Unauthenticated):
        await admin.feedback(Feedback("r", thumbs_up=True, problems=(("rating", "x"),)), None)
    with pytest.raises(InvalidArgument):
        await admin.invalidate(InvalidateTarget(), ACME)
    with pytest.raises(InvalidArgument):
        await admin.stats(ACME, top_n=-1)
    errors = [(e["tenant"], e["reason"]) for e in harness.events.events if e["kind"] == "error"]
    expected = [("", "unauthenticated"), ("acme", "invalid_argument"), ("acme", "invalid_argument")]
    assert errors == expected
    assert [(t, reason) for t, reason, _ in harness.telemetry.failed] == expected


async def test_a_failed_feedback_call_is_an_error_but_no_request_in_the_metrics() -> None:
    # Failed Feedback/Invalidate/GetStats calls count in routecache_errors_total; counted in
    # routecache_requests_total too (path error), they lowered Complete's hit-rate ratios,
    # whose denominator holds no successful admin call. Labelled call="admin": the error-rate
    # alert divides Complete's failures (call="complete") by Complete's requests.
    prometheus = PrometheusTelemetry()
    harness = make_harness(telemetry=prometheus)
    with pytest.raises(NotFound):
        await harness.service.pipeline.admin.feedback(Feedback("no-such-response", True), ACME)
    sample = prometheus.registry.get_sample_value
    admin = {"tenant": "acme", "reason": "not_found", "call": "admin"}
    assert sample("routecache_errors_total", admin) == 1
    assert sample("routecache_requests_total", {"tenant": "acme", "path": "error"}) is None
    await harness.service.aclose()


async def test_a_failed_admin_calls_error_event_says_it_was_no_request(harness: Harness) -> None:
    # Both wrote path "error" and nothing else to tell them apart: the notebook counted a failed
    # Feedback as a request, lowering the hit rates that routecache_requests_total gives.
    pipeline = harness.service.pipeline
    with pytest.raises(NotFound):
        await pipeline.admin.feedback(Feedback("no-such-response", True), ACME)
    with pytest.raises(InvalidArgument):
        await pipeline.complete(ChatRequest(messages=(Message(Role.USER, ""),)), ACME)
    errors = [e for e in harness.events.events if e["kind"] == "error"]
    assert [(e["reason"], e["admin"]) for e in errors] == [
        ("not_found", True), ("invalid_argument", False),
    ]  # fmt: skip

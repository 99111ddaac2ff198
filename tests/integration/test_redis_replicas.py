"""Two service replicas sharing one real redis-server."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis

from routecache.backends.storage import RedisStorage
from routecache.cache.embedder import HashEmbedder
from routecache.cache.ports import Vector
from routecache.cache.semantic_cache import NewEntry
from routecache.domain import CacheOutcome, Feedback, Tier
from routecache.errors import Unavailable, UpstreamError
from routecache.router.tenant_admin import InvalidateTarget
from tests.fakes import ManualClock
from tests.integration.replicas import (
    ACME,
    GLOBEX,
    Replica,
    ask,
    eventually,
    ids_near,
    real_clock,
    replica_settings,
    start_replica,
)
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration

DOWN = UpstreamError("HTTP 503 Service Unavailable", retryable=True)
NEAR = {
    "how do I reset my password today": "how do I reset my password",
    "what is the capital city of france": "what is the capital city of france please",
}


@pytest.fixture
def clock() -> ManualClock:
    return real_clock()


@pytest.fixture
async def pair(
    redis_server: RedisServer, clock: ManualClock
) -> AsyncIterator[tuple[Replica, Replica]]:
    settings = replica_settings(redis_server.url)
    a = await start_replica(settings, clock)
    b = await start_replica(settings, clock)
    yield a, b
    await a.service.aclose()
    await b.service.aclose()


async def test_replicas_share_hits_both_ways(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    (p1, n1), (p2, n2) = NEAR.items()
    stored_on_a = await a.service.pipeline.complete(ask(p1), ACME)
    assert stored_on_a.cache.outcome is CacheOutcome.MISS and stored_on_a.cache.entry_id
    exact_on_b = await b.service.pipeline.complete(ask(p1), ACME)
    assert exact_on_b.cache.outcome is CacheOutcome.EXACT
    assert exact_on_b.cache.entry_id == stored_on_a.cache.entry_id
    await eventually(lambda: len(b.index) == 1, "A's entry in B's index")
    semantic_on_b = await b.service.pipeline.complete(ask(n1), ACME)
    assert semantic_on_b.cache.outcome is CacheOutcome.SEMANTIC
    assert semantic_on_b.cache.entry_id == stored_on_a.cache.entry_id

    stored_on_b = await b.service.pipeline.complete(ask(p2), ACME)
    await eventually(lambda: len(a.index) == 2, "B's entry in A's index")
    semantic_on_a = await a.service.pipeline.complete(ask(n2), ACME)
    assert semantic_on_a.cache.outcome is CacheOutcome.SEMANTIC
    assert semantic_on_a.cache.entry_id == stored_on_b.cache.entry_id
    assert len(a.cheap.calls) == 1 and len(b.cheap.calls) == 1
    # Never across tenants, on either replica.
    other = await b.service.pipeline.complete(ask(p1), GLOBEX)
    assert other.cache.outcome is CacheOutcome.MISS


@pytest.mark.parametrize("how", ["id", "tag", "tenant"])
async def test_invalidation_on_one_replica_is_seen_by_the_other(
    pair: tuple[Replica, Replica], how: str
) -> None:
    a, b = pair
    prompt, near = next(iter(NEAR.items()))
    stored = await a.service.pipeline.complete(ask(prompt, tags=("faq",)), ACME)
    kept = await a.service.pipeline.complete(ask("an unrelated question entirely"), GLOBEX)
    await eventually(lambda: len(b.index) == 2, "both entries in B's index")
    assert (
        await b.service.pipeline.complete(ask(near), ACME)
    ).cache.outcome is CacheOutcome.SEMANTIC
    target = {
        "id": InvalidateTarget(entry_id=stored.cache.entry_id),
        "tag": InvalidateTarget(tag="faq"),
        "tenant": InvalidateTarget(all_entries=True),
    }[how]
    assert await a.service.pipeline.admin.invalidate(target, ACME) == 1
    # Served nowhere from the moment the invalidation returned ...
    for replica in (a, b):
        answer = await replica.service.pipeline.complete(ask(near, no_store=True), ACME)
        assert answer.cache.outcome is CacheOutcome.MISS
    # ... and dropped from the other replica's index by the sync stream.
    await eventually(
        lambda: stored.cache.entry_id not in ids_near(b, "acme", prompt),
        "B's index forgot the invalidated entry",
    )
    again = await b.service.pipeline.complete(ask("an unrelated question entirely"), GLOBEX)
    assert again.cache.entry_id == kept.cache.entry_id  # the other tenant's entry stays


async def test_ttl_expiry_on_both_replicas(pair: tuple[Replica, Replica], clock: ManualClock,
                                           redis_server: RedisServer) -> None:  # fmt: skip
    a, b = pair
    prompt, near = next(iter(NEAR.items()))
    stored = await a.service.pipeline.complete(ask(prompt, ttl=60), ACME)
    await eventually(lambda: len(b.index) == 1, "the entry in B's index")
    clock.advance(61)
    # Expired: never a hit, though it stays (for stale answers) until the grace has passed.
    for replica in (b, a):
        for text in (prompt, near):
            answer = await replica.service.pipeline.complete(ask(text, no_store=True), ACME)
            assert answer.cache.outcome is CacheOutcome.MISS
    clock.advance(a.service.settings.upstream.stale_grace_seconds)
    # The sweep unlinks it in Redis and tells every replica's index, the sweeper's own too.
    for replica in (a, b):

        def left_the_index(r: Replica = replica) -> bool:
            return stored.cache.entry_id not in ids_near(r, "acme", prompt)

        await eventually(left_the_index, "expired entry left the index")
    assert redis_server_keys(redis_server, "*:e:*") == []


async def test_an_expired_entry_is_served_stale_by_another_replica_when_providers_fail(
    pair: tuple[Replica, Replica], clock: ManualClock
) -> None:
    a, b = pair
    prompt, near = next(iter(NEAR.items()))
    stored = await a.service.pipeline.complete(ask(prompt, ttl=60), ACME)
    await eventually(lambda: len(b.index) == 1, "the entry in B's index")
    clock.advance(61)
    b.cheap.fail_with = b.strong.fail_with = DOWN
    # Counting purges first: an expired entry within the grace survives the purge.
    assert await b.service.pipeline.cache.entry_count("acme") == 1
    for text, outcome in ((prompt, CacheOutcome.EXACT), (near, CacheOutcome.SEMANTIC)):
        stale = await b.service.pipeline.complete(ask(text, no_store=True), ACME)
        assert stale.cache.stale and stale.cache.outcome is outcome
        assert stale.cache.entry_id == stored.cache.entry_id and stale.text == stored.text
    clock.advance(b.service.settings.upstream.stale_grace_seconds)
    assert await b.service.pipeline.cache.entry_count("acme") == 0
    await eventually(lambda: stored.cache.entry_id not in ids_near(b, "acme", prompt),
                     "the entry left B's index past the grace")  # fmt: skip
    with pytest.raises(Unavailable, match="no cached answer"):
        await b.service.pipeline.complete(ask(prompt, no_store=True), ACME)


async def test_tenant_default_ttl_applies(redis_server: RedisServer, clock: ManualClock) -> None:
    settings = replica_settings(redis_server.url)
    settings.tenants[0].default_ttl_seconds = 30
    a = await start_replica(settings, clock)
    try:
        stored = await a.service.pipeline.complete(ask("short lived by default"), ACME)
        entry = await a.service.pipeline.cache.get("acme", stored.cache.entry_id)
        assert entry is not None and entry.expires_at == pytest.approx(clock() + 30)
        clock.advance(31)
        again = await a.service.pipeline.complete(ask("short lived by default"), ACME)
        assert again.cache.outcome is CacheOutcome.MISS
    finally:
        await a.service.aclose()


async def test_eviction_at_the_bound_drops_the_least_recently_used(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    settings = replica_settings(redis_server.url, max_entries=3)
    a = await start_replica(settings, clock)
    b = await start_replica(settings, clock)
    try:
        prompts = ["apples grow on trees", "rivers flow to the sea", "stars shine at night"]
        ids = []
        for prompt in prompts:
            clock.advance(1)
            ids.append((await a.service.pipeline.complete(ask(prompt), ACME)).cache.entry_id)
        clock.advance(1)
        used = await b.service.pipeline.complete(ask(prompts[0]), ACME)  # now the most recent
        assert used.cache.outcome is CacheOutcome.EXACT
        clock.advance(1)
        fourth = await b.service.pipeline.complete(ask("cats chase small mice"), ACME)
        assert await a.service.pipeline.cache.entry_count("acme") == 3
        assert await a.service.pipeline.cache.get("acme", ids[1]) is None  # least recently used
        for kept in (ids[0], ids[2], fourth.cache.entry_id):
            assert await a.service.pipeline.cache.get("acme", kept) is not None
        await eventually(lambda: ids[1] not in ids_near(a, "acme", prompts[1]),
                         "evicted entry left A's index")  # fmt: skip
        # The other tenant's bound is its own.
        await a.service.pipeline.complete(ask("globex question"), GLOBEX)
        assert await a.service.pipeline.cache.entry_count("acme") == 3
    finally:
        await a.service.aclose()
        await b.service.aclose()


async def test_a_restarted_replica_rebuilds_its_index(
    pair: tuple[Replica, Replica], redis_server: RedisServer, clock: ManualClock
) -> None:
    a, b = pair
    stored = [
        (await a.service.pipeline.complete(ask(prompt), ACME)).cache.entry_id for prompt in NEAR
    ]
    invalidated = await a.service.pipeline.complete(ask("soon gone"), ACME)
    await a.service.pipeline.admin.invalidate(
        InvalidateTarget(entry_id=invalidated.cache.entry_id), ACME
    )
    await b.service.aclose()
    restarted = await start_replica(replica_settings(redis_server.url), clock)
    try:
        # Ready means rebuilt: no waiting on the sync stream here.
        assert len(restarted.index) == len(stored)
        for near, entry_id in zip(NEAR.values(), stored, strict=True):
            answer = await restarted.service.pipeline.complete(ask(near), ACME)
            assert answer.cache.outcome is CacheOutcome.SEMANTIC
            assert answer.cache.entry_id == entry_id
        assert restarted.cheap.calls == []
    finally:
        await restarted.service.aclose()


async def test_a_penalty_leaves_with_an_entry_another_replica_removed(
    pair: tuple[Replica, Replica],
) -> None:
    # B records a thumbs-down's penalty on a neighbour; A then invalidates the neighbour. B
    # learns of it only from the sync stream, and must drop the penalty with the index row.
    a, b = pair
    cache = b.service.pipeline.cache
    neighbour = await cache.store(new_entry("keep", unit_vector(0.0)))
    bad = await cache.store(new_entry("bad", unit_vector(0.1)))
    assert neighbour is not None and bad is not None
    await cache.distrust("acme", bad.entry_id)
    assert cache.penalty_of(neighbour.entry_id) > 0.0
    assert await a.service.pipeline.cache.invalidate_ids("acme", [neighbour.entry_id]) == 1
    await eventually(lambda: len(b.index) == 0, "B's index forgot the invalidated entry")
    assert cache.penalty_of(neighbour.entry_id) == 0.0


def unit_vector(angle: float) -> Vector:
    vector = np.zeros(HashEmbedder().dimension, dtype=np.float32)
    vector[0], vector[1] = math.cos(angle), math.sin(angle)
    return vector


def new_entry(prompt: str, vector: Vector) -> NewEntry:
    return NewEntry("acme", "acme:scope-1", prompt, f"answer to {prompt}", "m", Tier.CHEAP, vector,
                    0.01, 10, 10, 3600)  # fmt: skip


def redis_server_keys(server: RedisServer, pattern: str) -> list[bytes]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return sorted(client.keys(pattern))  # type: ignore[arg-type]  # redis-py types a sync client's reply Awaitable | Any
    finally:
        client.close()


async def test_a_thumbs_down_while_redis_is_down_removes_the_answer_once_redis_is_back(
    own_redis_server: RedisServer, clock: ManualClock
) -> None:
    # Before: the feedback failed UNAVAILABLE and its removal was lost: once Redis was back the
    # answer the user had rated bad was served again.
    replica = await start_replica(replica_settings(own_redis_server.url), clock)
    pipeline = replica.service.pipeline
    try:
        prompt = "how do I reset my password today"
        stored = await pipeline.complete(ask(prompt), ACME)
        served = await pipeline.complete(ask(prompt), ACME)
        assert served.cache.outcome is CacheOutcome.EXACT
        own_redis_server.stop()
        with pytest.raises(Unavailable, match="removed once the cache store answers again"):
            await pipeline.admin.feedback(Feedback(served.response_id, thumbs_up=False), ACME)
        own_redis_server.start()
        storage = replica.service.storage
        assert isinstance(storage, RedisStorage)
        await storage.link.wait_up()
        again = await pipeline.complete(ask(prompt, no_store=True), ACME)
        assert again.cache.outcome is CacheOutcome.MISS
        await pipeline.cache.settle_owed()  # made in the background, off the request path
        assert await pipeline.cache.get("acme", stored.cache.entry_id) is None
    finally:
        await replica.service.aclose()


@pytest.mark.parametrize(
    "entry_id",
    ["acme}:rate:q:ureq:x:s", "acme:" + "0" * 31, "acme:" + "A" * 32, "globex:" + "0" * 32],
    ids=["one reaching another key", "too short", "not lowercase hex", "another tenant's"],
)
async def test_invalidating_an_id_that_is_not_one_of_the_callers_entries_removes_nothing(
    pair: tuple[Replica, Replica], redis_server: RedisServer, entry_id: str
) -> None:
    # Before: the id became a Redis key unchecked; one crafted to reach the tenant's own rate
    # bucket (a hash without an entry's fields) failed INTERNAL with a KeyError.
    user = "x}:e:acme}:rate:q:ureq:x:s"
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset(f"rc:{{acme}}:rate:q:ureq:{user}", mapping={"t": "1", "u": "1"})
    target = InvalidateTarget(entry_id=entry_id)
    assert await pair[0].service.pipeline.admin.invalidate(target, ACME) == 0

"""Two service replicas sharing one real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from routecache.domain import CacheOutcome
from routecache.router.pipeline import InvalidateTarget
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
    assert await a.service.pipeline.invalidate(target, ACME) == 1
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

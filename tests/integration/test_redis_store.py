"""The Redis entry store on a real redis-server: what tenant-wide reads and removals cost."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import redis

from routecache.backends.keys import KeySpace, TenantKeys
from routecache.backends.link import RedisLink
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import HitRequirement
from routecache.cache.ports import CacheEntry
from routecache.cache.semantic_cache import NewEntry, SemanticCache
from routecache.domain import Tier
from tests.fakes import ManualClock
from tests.integration.replicas import real_clock
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration

ENTRIES = 450
BATCH = 100
SCOPE = "acme:scope-1"


@dataclass
class Setup:
    cache: SemanticCache
    store: RedisEntryStore
    server: RedisServer
    clock: ManualClock
    link: RedisLink


@pytest.fixture
async def setup(redis_server: RedisServer) -> AsyncIterator[Setup]:
    link = RedisLink(redis_server.url, timeout_seconds=2.0, max_connections=4,
                     probe_interval_seconds=0.05)  # fmt: skip
    assert await link.connect()
    clock = real_clock()
    options = RedisStoreOptions(10_000, read_batch=BATCH, unlink_batch=BATCH)
    store = RedisEntryStore(link, KeySpace(), options, clock, "test")
    yield Setup(SemanticCache(store, ScopedFaissIndex(4), clock), store, redis_server, clock, link)
    await link.aclose()


def vector(i: int) -> np.ndarray:
    angle = i * 0.001
    return np.array([math.cos(angle), math.sin(angle), 0.0, 0.0], dtype=np.float32)


async def fill(
    setup: Setup, count: int, ttl: int = 3600, first: int = 0, tags: tuple[str, ...] = ()
) -> list[str]:
    ids = []
    for i in range(first, first + count):
        new = NewEntry("acme", SCOPE, f"question {i}", f"answer {i}", "m", Tier.CHEAP, vector(i),
                       0.01 * (i % 7), 10, 10, ttl, tags)  # fmt: skip
        entry = await setup.cache.store(new)
        assert entry is not None
        ids.append(entry.entry_id)
    return ids


class ServerStats:
    """Counts from INFO: command calls (pipelined ones each) and reads (about one a round trip)."""

    def __init__(self, server: RedisServer) -> None:
        self._client = redis.Redis(host="127.0.0.1", port=server.port)
        self._client.config_resetstat()

    def calls(self, command: str) -> int:
        stats = self._client.info("commandstats").get(f"cmdstat_{command}")  # type: ignore[union-attr]  # redis-py types a sync client's reply Awaitable | Any
        return int(stats["calls"]) if stats else 0

    def reads(self) -> int:
        return int(self._client.info("stats")["total_reads_processed"])  # type: ignore[index]  # redis-py types a sync client's reply Awaitable | Any

    def close(self) -> None:
        self._client.close()


async def test_stats_read_a_large_tenant_in_batches_without_its_vectors(setup: Setup) -> None:
    ids = await fill(setup, ENTRIES)
    for _ in range(3):
        await setup.store.record_hit(ids[10], setup.clock())
    await setup.store.record_hit(ids[20], setup.clock())
    stats = ServerStats(setup.server)
    try:
        top = await setup.cache.top_entries("acme", 2)
        assert [(e.entry_id, e.prompt, e.hit_count) for e in top] == [
            (ids[10], "question 10", 3), (ids[20], "question 20", 1),
        ]  # fmt: skip
        assert stats.calls("hgetall") == 0  # no entry read whole: no vectors, no answers
        # A few round trips a batch, not one an entry.
        assert stats.reads() < 4 * math.ceil(ENTRIES / BATCH) + 6
    finally:
        stats.close()


async def test_invalidating_a_large_tenant_reads_nothing_per_entry(setup: Setup) -> None:
    await fill(setup, ENTRIES)
    await setup.store.delete(["acme:warm-up"])  # loads the script: no NOSCRIPT retry below
    stats = ServerStats(setup.server)
    try:
        assert await setup.cache.invalidate_tenant("acme") == ENTRIES
        # One script call a batch: none blocks Redis for the whole tenant.
        assert stats.calls("evalsha") == math.ceil(ENTRIES / BATCH)
        assert stats.reads() < 2 * math.ceil(ENTRIES / BATCH) + 6
    finally:
        stats.close()
    assert await setup.cache.entry_count("acme") == 0
    assert len(setup.cache.index) == 0


async def test_top_entries_leave_out_entries_past_expiry_and_grace(setup: Setup) -> None:
    # The entry count purges first; the list of top entries did not, so it named entries the
    # count had already dropped (and the embedded store did not).
    gone, kept = await fill(setup, 1, ttl=10), await fill(setup, 1, first=1)
    await setup.store.record_hit(gone[0], setup.clock())
    setup.clock.advance(20)  # past expiry; the store's stale grace is 0
    assert [e.entry_id for e in await setup.cache.top_entries("acme", 10)] == kept
    assert await setup.cache.entry_count("acme") == 1


async def test_an_entry_is_purged_exactly_at_its_expiry(setup: Setup) -> None:
    # As the embedded store: held while expires_at + grace > now, and no longer.
    await fill(setup, 1, ttl=10)
    setup.clock.advance(10)
    assert await setup.cache.entry_count("acme") == 0


async def test_a_new_answer_to_the_same_prompt_replaces_the_old_entry(setup: Setup) -> None:
    first = await fill(setup, 1)
    second = await fill(setup, 1)  # the same prompt and scope: the same exact key
    assert first != second
    assert await setup.store.get(first[0]) is None
    assert await setup.cache.entry_count("acme") == 1
    assert len(setup.cache.index) == 1


async def test_removed_entries_leave_no_keys_behind(setup: Setup) -> None:
    await fill(setup, 3, tags=("news", "sport"))
    assert await setup.cache.invalidate_tenant("acme") == 3
    client = redis.Redis(host="127.0.0.1", port=setup.server.port)
    try:
        left = sorted(k.decode() for k in client.keys("*"))  # type: ignore[union-attr]  # redis-py types a sync client's reply Awaitable | Any
    finally:
        client.close()
    # Only the replicas' sync stream, which says what was removed.
    assert [k for k in left if not k.endswith("sync")] == []


async def test_a_tag_outlives_a_shorter_lived_entry_that_carries_it(setup: Setup) -> None:
    # Redis drops a tag's set when its expiry passes: a short-lived entry storing the same tag
    # must not bring that expiry forward, or invalidating the tag misses the longer-lived ones.
    options = RedisStoreOptions(10_000, expiry_grace_seconds=0)
    store = RedisEntryStore(setup.link, KeySpace(), options, setup.clock, "test")
    cache = SemanticCache(store, ScopedFaissIndex(4), setup.clock)
    graceless = Setup(cache, store, setup.server, setup.clock, setup.link)
    lasting = await fill(graceless, 1, tags=("news",))
    await fill(graceless, 1, ttl=1, first=1, tags=("news",))
    await asyncio.sleep(1.3)  # past the short entry's expiry, on Redis' own clock
    assert lasting[0] in await store.ids_with_tag("acme", "news")


def full_entry(now: float, name: str = "x", tags: tuple[str, ...] = ("billing",)) -> CacheEntry:
    """An entry whose every field differs from its neighbours and from the defaults."""
    return CacheEntry(
        entry_id=f"acme:{name}", tenant="acme", scope=SCOPE, exact_key=f"acme:s:{name}",
        prompt=f"prompt {name} ✓", answer=f"answer {name}", model="m", tier=Tier.STRONG,
        embedding=vector(3), created_at=now - 5, expires_at=now + 100, cost_usd=0.0125,
        prompt_tokens=7, completion_tokens=11, tags=tags, hit_count=3, last_hit_at=now - 1,
    )  # fmt: skip


async def test_an_entry_reads_back_with_every_field_and_counts_its_hits(setup: Setup) -> None:
    now = setup.clock()
    entry = full_entry(now, tags=("billing", "faq"))
    assert await setup.store.put(entry) == []
    got = await setup.store.get(entry.entry_id)
    assert got is not None
    assert dataclasses.replace(got, embedding=entry.embedding) == entry
    assert np.array_equal(got.embedding, entry.embedding) and got.embedding.flags.writeable
    await setup.store.record_hit(entry.entry_id, now + 2)
    hit = await setup.store.get(entry.entry_id)
    assert hit is not None and (hit.hit_count, hit.last_hit_at) == (4, now + 2)
    assert await setup.store.get("acme:never-stored") is None


async def test_redis_drops_an_entry_a_grace_after_its_stale_grace_ended(setup: Setup) -> None:
    # The backstop for a purge that never runs: expiry, then stale grace, then expiry grace.
    options = RedisStoreOptions(10_000, expiry_grace_seconds=60, stale_grace_seconds=300.0)
    store = RedisEntryStore(setup.link, KeySpace(), options, setup.clock, "test")
    entry = full_entry(setup.clock())
    await store.put(entry)
    with redis.Redis(host="127.0.0.1", port=setup.server.port) as raw:
        expires_ms = raw.pexpiretime(KeySpace().of("acme").entry(entry.entry_id))
    assert expires_ms == math.floor((entry.expires_at + 300.0) * 1000) + 60_000


async def test_ids_with_a_tag_come_sorted(setup: Setup) -> None:
    for name in ("c", "a", "b"):
        await setup.store.put(full_entry(setup.clock(), name))
    assert await setup.store.ids_with_tag("acme", "billing") == ["acme:a", "acme:b", "acme:c"]


async def test_top_entries_skip_an_entry_redis_dropped_before_any_purge(setup: Setup) -> None:
    # Redis' own expiry removes the entry's hash but leaves its id in the entry list.
    kept, dropped = await fill(setup, 2)
    with redis.Redis(host="127.0.0.1", port=setup.server.port) as raw:
        raw.delete(KeySpace().of("acme").entry(dropped))
    assert [s.entry_id for s in await setup.store.most_served("acme", 10)] == [kept]


def small_store(setup: Setup, **options: int) -> Setup:
    store = RedisEntryStore(setup.link, KeySpace(), RedisStoreOptions(**options), setup.clock,
                            "test")  # fmt: skip
    return Setup(SemanticCache(store, ScopedFaissIndex(4), setup.clock), store, setup.server,
                 setup.clock, setup.link)  # fmt: skip


async def test_an_entrys_keys_outlive_its_expiry_by_the_grace_and_its_tags_the_longest(
    setup: Setup,
) -> None:
    # Redis' own expiry is a backstop after the purge, which tells the replicas.
    (entry_id,) = await fill(setup, 1, ttl=10, tags=("news",))
    await fill(setup, 1, ttl=600, first=1, tags=("news",))  # a longer-lived one, tagged alike
    keys = KeySpace().of("acme")
    entry = await setup.store.get(entry_id)
    assert entry is not None
    client = setup.link.client
    for key in (keys.entry(entry_id), keys.exact(entry.exact_key)):
        assert (10 + 3600 - 5) * 1000 < await client.pttl(key) <= (10 + 3600) * 1000, key
    assert await client.pttl(keys.tag("news")) > (600 + 3600 - 5) * 1000


async def test_a_store_at_its_bound_drops_expired_entries_before_live_ones(setup: Setup) -> None:
    small = small_store(setup, max_entries_per_tenant=2)
    live = await fill(small, 1)  # the least recently used, but not expired
    setup.clock.advance(1)
    await fill(small, 1, ttl=10, first=1)
    setup.clock.advance(20)
    newest = await fill(small, 1, first=2)
    assert sorted(await small.store.ids_of_tenant("acme")) == sorted(live + newest)


async def test_a_store_at_its_bound_evicts_the_least_recently_used_entry(setup: Setup) -> None:
    small = small_store(setup, max_entries_per_tenant=3)
    ids = []
    for i in range(3):
        ids += await fill(small, 1, first=i)
        setup.clock.advance(1)
    await small.store.record_hit(ids[0], setup.clock())  # the oldest, now the latest used
    setup.clock.advance(1)
    newest = await fill(small, 1, first=3)
    assert sorted(await small.store.ids_of_tenant("acme")) == sorted([ids[0], ids[2], *newest])
    assert len(small.cache.index) == 3  # the store named what it evicted: the index forgot it


async def test_a_store_at_its_bound_keeps_the_entries_stored_last(setup: Setup) -> None:
    small = small_store(setup, max_entries_per_tenant=2)
    ids = []
    for i in range(6):  # never hit: each is as recent as when it was stored
        ids += await fill(small, 1, first=i)
        setup.clock.advance(1)
    assert sorted(await small.store.ids_of_tenant("acme")) == sorted(ids[-2:])


async def test_a_purge_removes_at_most_its_batch_and_the_next_one_the_rest(setup: Setup) -> None:
    small = small_store(setup, max_entries_per_tenant=10, purge_batch=2)
    await fill(small, 3, ttl=10)
    setup.clock.advance(10)
    assert [await small.store.purge_expired("acme") for _ in range(3)] == [2, 1, 0]


async def test_stats_leave_out_entries_past_grace_beyond_one_purge_batch(setup: Setup) -> None:
    # The purge before the stats unlinks one batch; the rest, still in Redis, was counted and
    # listed (docs/operations.md: stats include none past the grace).
    small = small_store(setup, max_entries_per_tenant=10, purge_batch=2, read_batch=BATCH)
    gone = await fill(small, 5, ttl=10)
    for entry_id in gone:
        await small.store.record_hit(entry_id, setup.clock())
    kept = await fill(small, 1, first=5)
    setup.clock.advance(10)  # exactly at the end: no longer held
    assert await small.cache.entry_count("acme") == 1
    assert [e.entry_id for e in await small.cache.top_entries("acme", 10)] == kept


async def test_a_purge_says_how_many_it_removed(setup: Setup) -> None:
    await fill(setup, 2, ttl=10)
    await fill(setup, 1, first=2)
    setup.clock.advance(10)
    assert await setup.store.purge_expired("acme") == 2


async def test_a_hit_is_recorded_on_its_entry_and_on_no_removed_one(setup: Setup) -> None:
    kept, gone = await fill(setup, 2)
    assert await setup.store.record_hit(kept, 1234.5) is True
    entry = await setup.store.get(kept)
    assert entry is not None and (entry.hit_count, entry.last_hit_at) == (1, 1234.5)
    await setup.store.delete([gone])
    # Removed meanwhile: no key comes back, and the cache is told (it must not serve it).
    assert await setup.store.record_hit(gone, 1234.5) is False
    assert await setup.link.client.exists(KeySpace().of("acme").entry(gone)) == 0


async def test_the_sync_stream_is_trimmed_as_entries_are_stored(setup: Setup) -> None:
    small = small_store(setup, max_entries_per_tenant=10_000, sync_stream_max_len=10)
    await fill(small, 300)
    # Trimmed about (whole stream nodes of up to 100 items), not exactly.
    assert await setup.link.client.xlen(KeySpace().of("acme").sync) < 250


class RemovedBetweenReads(RedisEntryStore):
    """Another replica removes the first of the top entries after their hit counts were read,
    before their prompts are."""

    async def _fields(
        self, keys: TenantKeys, ids: Sequence[str], names: Sequence[str]
    ) -> list[list[bytes | None]]:
        if tuple(names) == ("prompt", "model") and ids:
            await self.delete([ids[0]])
        return await super()._fields(keys, ids, names)


async def test_top_entries_skip_an_entry_removed_between_their_two_reads(setup: Setup) -> None:
    gone, kept = await fill(setup, 2)
    await setup.store.record_hit(gone, setup.clock())  # the most served: read first
    store = RemovedBetweenReads(setup.link, KeySpace(), RedisStoreOptions(10_000), setup.clock,
                                "test")  # fmt: skip
    assert [s.entry_id for s in await store.most_served("acme", 10)] == [kept]


async def test_a_redis_out_of_memory_stores_no_new_entry_and_stays_in_use(setup: Setup) -> None:
    # Before: Redis checks memory at a script's first write only if that command may grow it,
    # and PUT began with ZREM/DEL (unlinking an entry it replaces): every new entry was stored
    # past `maxmemory` under `noeviction`.
    with setup.server.out_of_memory():
        new = NewEntry("acme", SCOPE, "asked while full", "an answer", "m", Tier.CHEAP,
                       vector(1), 0.01, 10, 10, 3600, ())  # fmt: skip
        assert await setup.cache.store(new) is None
        assert (setup.link.up, setup.link.refusals) == (True, 1)
    assert await setup.cache.entry_count("acme") == 0
    assert len(await fill(setup, 1)) == 1  # with memory again, the next answer is stored


async def test_a_redis_out_of_memory_still_serves_the_entries_it_holds(setup: Setup) -> None:
    # Before: RECORD_HIT began with HINCRBY, which Redis refuses out of memory, so every lookup
    # (exact, semantic, stale) became a miss and every repeat went to the paid model.
    (entry_id,) = await fill(setup, 1)
    requirement = HitRequirement(0.9)
    with setup.server.out_of_memory():
        hits = [
            await setup.cache.lookup_exact(SCOPE, "question 0"),
            await setup.cache.lookup_semantic(SCOPE, "asked another way", vector(0), requirement),
            await setup.cache.lookup_stale(SCOPE, "question 0", None, requirement),
        ]
        assert [hit.entry.entry_id if hit else None for hit in hits] == [entry_id] * 3
        # Each hit it could not record is one refusal (counted and logged as every one is).
        assert (setup.link.up, setup.link.refusals, setup.cache.bypassed) == (True, 3, 0)
    entry = await setup.store.get(entry_id)
    assert entry is not None and entry.hit_count == 0  # those hits were not counted


async def test_a_redis_out_of_memory_serves_no_entry_removed_since_it_was_read(
    setup: Setup,
) -> None:
    kept, gone = await fill(setup, 2)
    await setup.store.delete([gone])
    with setup.server.out_of_memory():
        assert await setup.store.record_hit(gone, 1234.5) is False
        assert await setup.store.record_hit(kept, 1234.5) is True
        assert setup.link.refusals == 1  # the kept entry's hit, not recorded


async def fill_in_order(setup: Setup, count: int) -> list[str]:
    """`count` entries, each stored a second after the one before (least recently used first)."""
    ids = []
    for i in range(count):
        ids += await fill(setup, 1, first=i)
        setup.clock.advance(1)
    return ids


async def test_a_lowered_bound_is_reached_a_batch_a_put(setup: Setup) -> None:
    # Before: the first put after cache.max_entries was lowered evicted everything over it in
    # one script call (90k entries blocked Redis ~5 s: every replica marked it down, and the
    # put was reported failed) and returned every one of them.
    ids = await fill_in_order(setup, 100)
    small = small_store(setup, max_entries_per_tenant=10)
    small.cache = SemanticCache(small.store, setup.cache.index, setup.clock)  # holds all 100
    (added,) = await fill(small, 1, first=100)
    # The one the put added and a batch of 64 more, least recently used first; the index of
    # the replica that put it forgot them.
    assert await setup.store.ids_of_tenant("acme") == [*ids[65:], added]
    assert len(setup.cache.index) == 36
    setup.clock.advance(1)
    (last,) = await fill(small, 1, first=101)
    assert await setup.store.ids_of_tenant("acme") == [*ids[92:], added, last]


async def test_a_purge_trims_a_lowered_bound_a_batch_a_call(setup: Setup) -> None:
    ids = await fill_in_order(setup, 100)
    small = small_store(setup, max_entries_per_tenant=10, purge_batch=50)
    assert [await small.store.purge_expired("acme") for _ in range(3)] == [50, 40, 0]
    assert sorted(await setup.store.ids_of_tenant("acme")) == sorted(ids[-10:])

import asyncio
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache import semantic_cache
from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import CosinePolicy, HitRequirement, HitVerdict
from routecache.cache.memory_store import SCAN_SLICE, InMemoryEntryStore
from routecache.cache.ports import CacheEntry, StoreUnavailable
from routecache.cache.scope import exact_key
from routecache.cache.semantic_cache import NewEntry, SemanticCache
from routecache.domain import CacheOutcome, Tier
from routecache.errors import Unavailable
from tests.fakes import ManualClock, PartlySeenEmbedder

EMBED = HashEmbedder()


def vec(text: str) -> npt.NDArray[np.float32]:
    row: npt.NDArray[np.float32] = EMBED.encode([text])[0]
    return row


def new_entry(
    prompt: str, scope: str = "acme:s1", ttl: int = 100, tags: tuple[str, ...] = ()
) -> NewEntry:
    return NewEntry(
        tenant=scope.split(":")[0], scope=scope, prompt=prompt, answer=f"A:{prompt}", model="m",
        tier=Tier.CHEAP, embedding=vec(prompt), cost_usd=0.01, prompt_tokens=3,
        completion_tokens=4, ttl_seconds=ttl, tags=tags,
    )  # fmt: skip


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cache(clock: ManualClock) -> SemanticCache:
    return SemanticCache(
        InMemoryEntryStore(max_entries=3, clock=clock), ScopedFaissIndex(EMBED.dimension), clock
    )


def store_and_cache(
    clock: ManualClock, max_entries: int = 10, grace: float = 0.0
) -> tuple[InMemoryEntryStore, SemanticCache]:
    """An embedded store and the cache over it, both with the same stale grace."""
    store = InMemoryEntryStore(max_entries=max_entries, clock=clock, stale_grace_seconds=grace)
    index = ScopedFaissIndex(EMBED.dimension)
    return store, SemanticCache(store, index, clock, stale_grace_seconds=grace)


def with_grace(clock: ManualClock) -> tuple[InMemoryEntryStore, SemanticCache]:
    """A store and cache that keep expired entries for a 60 s stale grace."""
    return store_and_cache(clock, grace=60)


async def test_exact_hit_after_store_and_miss_in_other_scope(cache: SemanticCache) -> None:
    await cache.store(new_entry("What is the capital of France?"))
    hit = await cache.lookup_exact("acme:s1", "what is the capital of france")
    assert hit is not None and hit.outcome is CacheOutcome.EXACT and hit.similarity == 1.0
    assert await cache.lookup_exact("acme:s2", "What is the capital of France?") is None
    assert await cache.lookup_exact("globex:s1", "What is the capital of France?") is None


async def test_semantic_hit_respects_threshold_and_scope(cache: SemanticCache) -> None:
    await cache.store(new_entry("how do I reset my password today"))
    near = vec("how do I reset my password")
    hit = await cache.lookup_semantic("acme:s1", "", near, HitRequirement(0.5))
    assert hit is not None and hit.outcome is CacheOutcome.SEMANTIC
    assert 0.5 <= hit.similarity < 1.0
    assert await cache.lookup_semantic("acme:s1", "", near, HitRequirement(0.999)) is None
    assert await cache.lookup_semantic("acme:other", "", near, HitRequirement(0.1)) is None


async def test_expired_entries_are_never_served(cache: SemanticCache, clock: ManualClock) -> None:
    await cache.store(new_entry("short lived", ttl=10))
    clock.advance(11)
    assert await cache.lookup_exact("acme:s1", "short lived") is None
    assert (
        await cache.lookup_semantic("acme:s1", "", vec("short lived"), HitRequirement(0.1)) is None
    )
    assert await cache.entry_count("acme") == 0


async def test_an_entry_expires_at_its_ttl_and_its_stale_use_at_the_grace_end(
    clock: ManualClock,
) -> None:
    _store, cache = with_grace(clock)
    prompt = "short lived"
    await cache.store(new_entry(prompt, ttl=10))
    clock.advance(10)  # a TTL of 10 s: live for 10 s, not 10 s and a moment
    assert await cache.lookup_exact("acme:s1", prompt) is None
    assert await cache.lookup_semantic("acme:s1", "", vec(prompt), HitRequirement(0.1)) is None
    assert await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.1))
    clock.advance(60)  # the end of the grace period: not even a stale answer
    assert await cache.lookup_stale("acme:s1", prompt, None, HitRequirement(0.1)) is None


async def test_an_entry_is_served_to_its_own_scope_only_whatever_index_and_key_say(
    clock: ManualClock,
) -> None:
    # An entry of acme:s1 that the index files under acme:s2 (a restored snapshot, another
    # replica's index) and whose exact key is acme:s2's: the entry's own scope decides.
    store = InMemoryEntryStore(max_entries=10, clock=clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock, stale_grace_seconds=60)
    kept = await cache.store(new_entry("alpha"))
    assert kept is not None
    misfiled = replace(kept, entry_id="acme:misfiled", exact_key=exact_key("acme:s2", "alpha"))
    await store.put(misfiled)
    cache.index.add("acme:s2", misfiled.entry_id, misfiled.embedding)
    assert await cache.lookup_exact("acme:s2", "alpha") is None
    assert await cache.lookup_semantic("acme:s2", "", vec("alpha"), HitRequirement(0.1)) is None
    assert await cache.lookup_stale("acme:s2", "alpha", vec("alpha"), HitRequirement(0.1)) is None
    assert await cache.lookup_stale("acme:s2", "alpha", None, HitRequirement(0.1)) is None
    hit = await cache.lookup_exact("acme:s1", "alpha")
    assert hit is not None and hit.entry.entry_id == kept.entry_id


async def test_bound_evicts_least_recently_used(cache: SemanticCache) -> None:
    first = await cache.store(new_entry("one"))
    await cache.store(new_entry("two"))
    await cache.store(new_entry("three"))
    assert await cache.lookup_exact("acme:s1", "one") is not None  # "one" is now most recent
    await cache.store(new_entry("four"))
    assert await cache.entry_count("acme") == 3
    assert await cache.lookup_exact("acme:s1", "two") is None
    assert (await cache.lookup_exact("acme:s1", "one")).entry.entry_id == first.entry_id  # type: ignore[union-attr]
    assert await cache.lookup_semantic("acme:s1", "", vec("two"), HitRequirement(0.99)) is None


async def test_invalidation_by_id_tag_and_tenant_never_crosses_tenants(
    cache: SemanticCache,
) -> None:
    a = await cache.store(new_entry("alpha", tags=("docs",)))
    await cache.store(new_entry("beta", tags=("docs",)))
    b = await cache.store(new_entry("gamma", scope="globex:s1", tags=("docs",)))
    assert a is not None and b is not None
    assert await cache.invalidate_ids("globex", [a.entry_id]) == 0
    assert await cache.invalidate_tag("acme", "docs") == 2
    assert await cache.lookup_exact("acme:s1", "alpha") is None
    assert await cache.lookup_semantic("acme:s1", "", vec("alpha"), HitRequirement(0.5)) is None
    assert await cache.get("globex", b.entry_id) is not None
    assert await cache.invalidate_tenant("globex") == 1


async def test_restoring_the_same_prompt_replaces_the_old_entry(cache: SemanticCache) -> None:
    old = await cache.store(new_entry("same"))
    new = await cache.store(new_entry("same"))
    assert old is not None and new is not None
    assert await cache.entry_count("acme") == 1
    hit = await cache.lookup_semantic("acme:s1", "", vec("same"), HitRequirement(0.9))
    assert hit is not None and hit.entry.entry_id == new.entry_id != old.entry_id
    # The old answer leaves the index at once, not when some lookup meets it missing.
    assert [n.entry_id for n in cache.index.search("acme:s1", vec("same"), 4)] == [new.entry_id]


class _SlowPutStore(InMemoryEntryStore):
    """A store whose put is answered once `gate` is set (Redis busy for a moment)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(max_entries=10, clock=clock)
        self.gate, self.putting = asyncio.Event(), asyncio.Event()

    async def put(self, entry: CacheEntry) -> list[CacheEntry]:
        self.putting.set()
        await self.gate.wait()
        return await super().put(entry)


async def test_a_store_whose_caller_leaves_during_the_put_is_still_indexed(
    clock: ManualClock,
) -> None:
    # The put reaches the store whatever the caller does; before, a caller cancelled during it
    # left the entry in the store but never in this replica's index (replica sync skips its
    # own adds), so it was never served semantically here until a restart.
    store = _SlowPutStore(clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock)
    storing = asyncio.create_task(cache.store(new_entry("how do I reset my password")))
    await store.putting.wait()
    storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await storing
    closing = asyncio.create_task(cache.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the stop waits for the put of the caller gone
    store.gate.set()
    await closing
    near = vec("how do I reset my password")
    assert await cache.lookup_semantic("acme:s1", "", near, HitRequirement(0.9)) is not None


def test_faiss_index_search_add_remove() -> None:
    index = ScopedFaissIndex(EMBED.dimension)
    index.add("s", "a", vec("red apple"))
    index.add("s", "b", vec("green pear"))
    assert index.search("s", vec("red apple"), 2)[0].entry_id == "a"
    index.remove("s", "a")
    assert [n.entry_id for n in index.search("s", vec("red apple"), 2)] == ["b"]
    assert len(index) == 1
    assert index.search("missing", vec("x"), 3) == []


class _DownStore(InMemoryEntryStore):
    """A store that is unreachable (Redis down), for the cache's degraded paths."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(max_entries=10, clock=clock)
        self.down = False
        self.refusing_deletes = False  # as Redis out of memory: reads answered, writes refused
        self.broken: set[str] = set()  # ids whose delete fails on a bug, not an outage
        self.calls = 0  # store calls made (answered or not)

    async def put(self, entry):  # type: ignore[no-untyped-def]
        self._fail()
        return await super().put(entry)

    async def get(self, entry_id):  # type: ignore[no-untyped-def]
        self._fail()
        return await super().get(entry_id)

    async def get_exact(self, exact_key):  # type: ignore[no-untyped-def]
        self._fail()
        return await super().get_exact(exact_key)

    async def ids_of_tenant(self, tenant):  # type: ignore[no-untyped-def]
        self._fail()
        return await super().ids_of_tenant(tenant)

    async def most_served(self, tenant, n):  # type: ignore[no-untyped-def]
        self._fail()
        return await super().most_served(tenant, n)

    async def delete(self, entry_ids):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.down or self.refusing_deletes:
            raise StoreUnavailable("refused")
        if self.broken & set(entry_ids):
            raise KeyError("damaged entry hash")
        return await super().delete(entry_ids)

    def _fail(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("down")


async def test_an_unavailable_store_is_bypassed_but_invalidation_fails_loudly(
    clock: ManualClock,
) -> None:
    store = _DownStore(clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock)
    kept = await cache.store(new_entry("how do I reset my password today"))
    assert kept is not None
    store.down = True
    assert await cache.lookup_exact("acme:s1", "how do I reset my password today") is None
    assert (
        await cache.lookup_semantic(
            "acme:s1", "", vec("how do I reset my password"), HitRequirement(0.5)
        )
        is None
    )
    assert await cache.store(new_entry("asked while down")) is None
    assert cache.bypassed == 3
    with pytest.raises(Unavailable):
        await cache.invalidate_ids("acme", [kept.entry_id])
    store.down = False
    hit = await cache.lookup_exact("acme:s1", "how do I reset my password today")
    assert hit is not None and hit.entry.entry_id == kept.entry_id


async def test_stale_lookups_bypass_an_unavailable_store_and_feedback_and_stats_fail_loudly(
    clock: ManualClock,
) -> None:
    store = _DownStore(clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock, stale_grace_seconds=60)
    kept = await cache.store(new_entry("how do I reset my password today", ttl=10))
    assert kept is not None
    clock.now += 20  # expired, within the grace
    store.down = True
    prompt = "how do I reset my password today"
    assert await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.5)) is None
    assert cache.bypassed == 1
    with pytest.raises(Unavailable, match="read stats"):
        await cache.top_entries("acme", 3)
    store.down = False
    stale = await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.5))
    assert stale is not None and stale.entry.entry_id == kept.entry_id


async def _down_cache_of(
    clock: ManualClock, *prompts: str
) -> tuple[_DownStore, SemanticCache, list[str]]:
    """A cache over a store holding an entry of each prompt (ids returned), the store down."""
    store = _DownStore(clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock)
    ids = []
    for prompt in prompts:
        entry = await cache.store(new_entry(prompt))
        assert entry is not None
        ids.append(entry.entry_id)
    store.down = True
    return store, cache, ids


async def test_a_thumbs_down_while_the_store_is_down_removes_the_entry_once_it_is_back(
    clock: ManualClock,
) -> None:
    # Before: the feedback failed UNAVAILABLE and the removal was lost: once the store was
    # back the answer the user had rated bad was served again.
    prompt = "how do I reset my password today"
    store, cache, [bad] = await _down_cache_of(clock, prompt)
    with pytest.raises(Unavailable, match=r"record feedback.*removed once the cache store"):
        await cache.distrust("acme", bad)
    store.down = False
    assert await cache.lookup_exact("acme:s1", prompt) is None
    assert await cache.lookup_semantic("acme:s1", "", vec(prompt), HitRequirement(0.5)) is None
    await cache.settle_owed()
    assert await cache.get("acme", bad) is None and len(cache.index) == 0


async def test_an_owed_removal_the_store_still_refuses_is_not_served_meanwhile(
    clock: ManualClock,
) -> None:
    prompt = "how do I reset my password today"
    store, cache, [bad] = await _down_cache_of(clock, prompt)
    with pytest.raises(Unavailable):
        await cache.distrust("acme", bad)
    store.down, store.refusing_deletes = False, True
    assert await cache.lookup_exact("acme:s1", prompt) is None
    assert await cache.lookup_semantic("acme:s1", "", vec(prompt), HitRequirement(0.5)) is None
    assert await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.5)) is None
    store.refusing_deletes = False
    assert await cache.lookup_exact("acme:s1", prompt) is None
    await cache.settle_owed()
    assert await cache.get("acme", bad) is None


async def test_removals_owed_while_the_store_is_down_are_bounded_oldest_dropped_first(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(semantic_cache, "MAX_OWED_REMOVALS", 2)
    prompts = ("first question asked", "second question asked", "third question asked")
    store, cache, [first, second, third] = await _down_cache_of(clock, *prompts)
    for entry_id in (first, second, third):
        with pytest.raises(Unavailable):
            await cache.distrust("acme", entry_id)
    store.down = False
    hit = await cache.lookup_exact("acme:s1", prompts[0])
    assert hit is not None and hit.entry.entry_id == first
    await cache.settle_owed()
    assert await cache.get("acme", second) is None and await cache.get("acme", third) is None


async def test_one_tenants_owed_removals_do_not_push_out_another_tenants(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the bound was shared, so globex's thumbs-downs pushed acme's out and acme's bad
    # answer was served again once the store was back.
    monkeypatch.setattr(semantic_cache, "MAX_OWED_REMOVALS", 2)
    store, cache, [bad] = await _down_cache_of(clock, "how do I reset my password today")
    with pytest.raises(Unavailable):
        await cache.distrust("acme", bad)
    for n in range(3):
        with pytest.raises(Unavailable):
            await cache.distrust("globex", f"globex:{n}")
    store.down = False
    assert await cache.lookup_exact("acme:s1", "how do I reset my password today") is None
    await cache.settle_owed()
    assert await cache.get("acme", bad) is None


async def test_a_lookup_does_not_wait_for_the_owed_removals_once_the_store_is_back(
    clock: ManualClock,
) -> None:
    # Before: the first lookup after an outage made every removal owed, of every tenant, before
    # it answered (a tenant with 5 000 owed made another's one lookup 15 000 store calls).
    prompt = "how do I reset my password today"
    store, cache, [kept] = await _down_cache_of(clock, prompt)
    for n in range(50):
        with pytest.raises(Unavailable):
            await cache.distrust("globex", f"globex:{n}")
    store.down, store.calls = False, 0
    hit = await cache.lookup_exact("acme:s1", prompt)
    assert hit is not None and hit.entry.entry_id == kept
    assert store.calls == 1  # its own exact read; the hit is counted by record_hit
    await cache.settle_owed()
    assert store.calls > 50  # settled off the request path


async def test_an_owed_removal_failing_on_a_bug_is_dropped_and_logged_once_the_rest_are_made(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the first such failure stopped the settler, every later one stopped at it again,
    # so no owed removal of any tenant was made again and each lookup logged a traceback.
    prompts = ("first question asked", "second question asked", "third question asked")
    store, cache, [damaged, *others] = await _down_cache_of(clock, *prompts)
    for entry_id in (damaged, *others):
        with pytest.raises(Unavailable):
            await cache.distrust("acme", entry_id)
    store.down, store.broken = False, {damaged}
    for _ in range(2):
        await cache.lookup_exact("acme:s1", "asked by someone else")
        await cache.settle_owed()
    assert [await cache.get("acme", entry_id) for entry_id in others] == [None, None]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and damaged in errors[0].getMessage()


async def test_while_the_store_is_still_down_a_lookup_tries_one_owed_removal_not_all(
    clock: ManualClock,
) -> None:
    store, cache, _ = await _down_cache_of(clock)
    for n in range(20):
        with pytest.raises(Unavailable):
            await cache.distrust("globex", f"globex:{n}")
    store.calls = 0
    assert await cache.lookup_exact("acme:s1", "how do I reset my password today") is None
    await cache.settle_owed()
    assert store.calls == 2  # the lookup's read and the first owed removal's, both refused
    await cache.aclose()


async def test_stats_leave_out_entries_past_expiry_and_grace_as_redis_does(
    clock: ManualClock,
) -> None:
    # Redis purges a tenant's expired entries before it counts them; the embedded store kept
    # counting and listing them until a lookup met them or the bound evicted them.
    _store, cache = with_grace(clock)
    await cache.store(new_entry("soon expired", ttl=10))
    kept = await cache.store(new_entry("kept", ttl=1000))
    assert kept is not None
    clock.now += 20  # expired, within the grace: still held for stale answers, as on Redis
    assert await cache.entry_count("acme") == 2
    clock.now += 60  # past the grace
    assert await cache.entry_count("acme") == 1
    assert [e.entry_id for e in await cache.top_entries("acme", 10)] == [kept.entry_id]


def test_a_store_bound_below_one_entry_is_refused(clock: ManualClock) -> None:
    # A bound of 0 would evict every answer as it is stored: a cache that silently caches
    # nothing. The misconfiguration is refused at start instead.
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryEntryStore(max_entries=0, clock=clock)
    assert InMemoryEntryStore(max_entries=1, clock=clock) is not None


async def test_a_hit_records_how_often_and_when_the_entry_was_last_served(
    cache: SemanticCache, clock: ManualClock
) -> None:
    # Both are saved with the entry (snapshot, Redis) and feed the most-served stats.
    kept = await cache.store(new_entry("counted"))
    assert kept is not None
    clock.advance(5)
    assert await cache.lookup_exact("acme:s1", "counted") is not None
    clock.advance(7)
    assert await cache.lookup_semantic("acme:s1", "", vec("counted"), HitRequirement(0.9))
    entry = await cache.get("acme", kept.entry_id)
    assert entry is not None and entry.hit_count == 2 and entry.last_hit_at == clock.now


async def test_an_expired_entry_stops_counting_at_the_end_of_its_grace_exactly(
    clock: ManualClock,
) -> None:
    # The same instant at which it stops being served stale: counted while servable, no longer.
    store, cache = with_grace(clock)
    await cache.store(new_entry("brief", ttl=10))
    clock.advance(10 + 60 - 0.5)
    assert await store.count("acme") == 1
    clock.advance(0.5)
    assert await store.count("acme") == 0
    assert await store.most_served("acme", 10) == []


@pytest.mark.parametrize("lookup", ["exact", "semantic"])
async def test_a_lookup_that_meets_an_entry_past_its_grace_drops_it_from_store_and_index(
    clock: ManualClock, lookup: str
) -> None:
    # Nothing else sweeps the embedded store: left in place, dead entries would hold their
    # index rows and their slots under the bound until evicted.
    store, cache = with_grace(clock)
    gone = await cache.store(new_entry("past its grace", ttl=10))
    assert gone is not None
    clock.advance(71)
    if lookup == "exact":
        assert await cache.lookup_exact("acme:s1", "past its grace") is None
    else:
        query = vec("past its grace")
        assert await cache.lookup_semantic("acme:s1", "", query, HitRequirement(0.5)) is None
    assert await store.get(gone.entry_id) is None
    assert cache.index.search("acme:s1", vec("past its grace"), 4) == []


async def test_a_removed_entry_leaves_its_tags() -> None:
    # Tags name documents; an entry evicted, replaced or removed must not stay listed under one
    # (a later invalidation of the tag would count it, and the tag map would grow for ever).
    store, cache = store_and_cache(ManualClock(), max_entries=2)
    removed = await cache.store(new_entry("removed", tags=("doc-1",)))
    replaced = await cache.store(new_entry("replaced", tags=("doc-1",)))
    assert removed is not None and replaced is not None
    await cache.invalidate_ids("acme", [removed.entry_id])
    again = await cache.store(new_entry("replaced", tags=("doc-1",)))
    evicting = [await cache.store(new_entry(p)) for p in ("other", "another")]
    assert again is not None and all(evicting)
    assert await store.ids_with_tag("acme", "doc-1") == []
    assert await cache.invalidate_tag("acme", "doc-1") == 0


async def test_a_tenant_whose_entries_are_all_gone_leaves_nothing_in_the_store_maps(
    clock: ManualClock,
) -> None:
    # A recency list or tag set left empty per tenant and tag would grow the maps for as long
    # as the process runs, with tenants and documents that come and go.
    store, cache = store_and_cache(clock)
    for prompt in ("one", "two"):
        await cache.store(new_entry(prompt, tags=("doc-1",)))
    assert await cache.invalidate_tenant("acme") == 2
    assert (store._by_tenant, store._by_tag, store._by_exact_key, store._by_end) == ({}, {}, {}, {})


async def test_an_entry_put_again_under_its_id_drops_its_old_exact_key(clock: ManualClock) -> None:
    # A snapshot restore can put an id the store holds: the old version goes, keys and all,
    # or its old exact key would keep serving the new answer.
    store, cache = store_and_cache(clock)
    old = await cache.store(new_entry("first wording"))
    assert old is not None
    new = replace(old, prompt="second wording", exact_key=exact_key(old.scope, "second wording"))
    assert await store.put(new) == [old]
    assert await store.get_exact(old.exact_key) is None
    assert await store.get_exact(new.exact_key) == new


async def test_a_neighbour_exactly_at_the_threshold_is_served(cache: SemanticCache) -> None:
    # The threshold is the least similarity served ("at least"), through the cache as in the
    # policy: the floor check must not turn it into "more than".
    kept = await cache.store(new_entry("how do I reset my password today"))
    query = vec("how do I reset my password")
    (nearest,) = cache.index.search("acme:s1", query, 1)
    hit = await cache.lookup_semantic("acme:s1", "", query, HitRequirement(nearest.similarity))
    assert kept is not None and hit is not None and hit.entry.entry_id == kept.entry_id


async def test_a_caller_forcing_the_strong_tier_is_served_only_strong_answers(
    cache: SemanticCache,
) -> None:
    # The nearest neighbour is the cheap model's answer: it is passed over, not the end of the
    # search, and the strong model's answer behind it serves. Forcing cheap takes either.
    cheap = await cache.store(new_entry("how do I reset my password today"))
    strong = await cache.store(
        replace(new_entry("how do I reset my password now"), tier=Tier.STRONG)
    )
    assert cheap is not None and strong is not None
    query = vec("how do I reset my password today")
    ask = HitRequirement(0.3)
    assert await cache.lookup_exact("acme:s1", cheap.prompt, Tier.STRONG) is None
    hit = await cache.lookup_semantic("acme:s1", "", query, ask, Tier.STRONG)
    assert hit is not None and hit.entry.entry_id == strong.entry_id
    stale = await cache.lookup_stale("acme:s1", cheap.prompt, query, ask, Tier.STRONG)
    assert stale is not None and stale.entry.entry_id == strong.entry_id
    exact = await cache.lookup_exact("acme:s1", strong.prompt, Tier.CHEAP)
    assert exact is not None and exact.entry.entry_id == strong.entry_id
    hit = await cache.lookup_semantic("acme:s1", "", query, ask, Tier.CHEAP)
    assert hit is not None and hit.entry.entry_id == cheap.entry_id


async def test_a_hit_on_an_entry_from_a_clock_ahead_reports_age_zero_not_negative(
    cache: SemanticCache, clock: ManualClock
) -> None:
    # An entry written by a replica whose clock runs ahead looks created in the future here.
    await cache.store(new_entry("from the future"))
    clock.advance(-5)
    hit = await cache.lookup_exact("acme:s1", "from the future")
    assert hit is not None and hit.age_seconds == 0.0


async def test_a_stale_lookup_serves_an_expired_paraphrase_within_the_grace(
    clock: ManualClock,
) -> None:
    # No exact match: the stale answer comes from the nearest entry of the scope, expired or not.
    _store, cache = with_grace(clock)
    kept = await cache.store(new_entry("how do I reset my password today", ttl=10))
    assert kept is not None
    clock.advance(30)
    prompt = "how do I reset my password"
    stale = await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.5))
    assert stale is not None and stale.entry.entry_id == kept.entry_id
    assert stale.outcome is CacheOutcome.SEMANTIC


class _ListsVanishedIds(InMemoryEntryStore):
    """A store whose tag listing still names an entry another replica removed meanwhile."""

    async def ids_with_tag(self, tenant: str, tag: str) -> list[str]:
        return [*await super().ids_with_tag(tenant, tag), f"{tenant}:removed-meanwhile"]


async def test_an_invalidation_counts_only_the_entries_it_removed(clock: ManualClock) -> None:
    # The count goes back to the caller: an id listed but already gone was not removed here.
    cache = SemanticCache(
        _ListsVanishedIds(max_entries=10, clock=clock), ScopedFaissIndex(EMBED.dimension), clock
    )
    await cache.store(new_entry("alpha", tags=("docs",)))
    assert await cache.invalidate_tag("acme", "docs") == 1


async def test_a_hit_reports_its_age_since_stored_and_a_stale_exact_hit_is_exact(
    clock: ManualClock,
) -> None:
    # The age tells the caller how old the answer is (stale answers included); the outcome
    # tells it whether the prompt matched or only meant the same.
    _store, cache = with_grace(clock)
    await cache.store(new_entry("how old is this", ttl=10))
    clock.advance(4)
    fresh = await cache.lookup_exact("acme:s1", "how old is this")
    assert fresh is not None and fresh.age_seconds == 4.0
    clock.advance(26)
    stale = await cache.lookup_stale("acme:s1", "how old is this", None, HitRequirement(0.5))
    assert stale is not None and stale.outcome is CacheOutcome.EXACT and stale.similarity == 1.0
    assert stale.age_seconds == 30.0


def near(offset: float) -> npt.NDArray[np.float32]:
    """A unit vector `offset` away from the first axis: its similarity to `near(0)` falls as
    the offset grows."""
    row = np.zeros(EMBED.dimension, np.float32)
    row[0], row[1] = 1.0, offset
    unit: npt.NDArray[np.float32] = row / np.linalg.norm(row)
    return unit


@pytest.mark.parametrize("skipped", ["expired", "penalised", "cheap"])
async def test_many_nearer_entries_that_cannot_serve_do_not_hide_a_live_match(
    clock: ManualClock, skipped: str
) -> None:
    # Before: only the 4 nearest neighbours were read, and entries that cannot serve this
    # lookup (expired within the stale grace, penalised by a thumbs-down, the cheap model's
    # for a caller forcing strong) each took a slot: a live match behind them was a miss.
    _store, cache = with_grace(clock)
    for i in range(8):
        await cache.store(replace(new_entry(f"blocker {i}", ttl=10), embedding=near(0.001 * i)))
    if skipped == "expired":
        clock.advance(20)
    if skipped == "penalised":  # a thumbs-down among them: each now needs 0.05 more
        wrong = await cache.store(replace(new_entry("wrong"), embedding=near(0.0)))
        assert wrong is not None and await cache.distrust("acme", wrong.entry_id) == 1
    live = replace(new_entry("the live one"), embedding=near(0.1), tier=Tier.STRONG)
    kept = await cache.store(live)  # similarity 0.995: served at 0.96, not at 0.96 + 0.05
    forced = Tier.STRONG if skipped == "cheap" else None
    hit = await cache.lookup_semantic("acme:s1", "", near(0.0), HitRequirement(0.96), forced)
    assert kept is not None and hit is not None and hit.entry.entry_id == kept.entry_id


async def test_threshold_one_serves_an_identical_embedding(cache: SemanticCache) -> None:
    # similarity_threshold = 1 means "identical embeddings only". A float32 unit vector dotted
    # with itself is often 0.99999994, not 1: before, such an entry was never served at 1.
    kept = await cache.store(new_entry("what is the capital of France"))
    vector = vec("what is the capital of France")
    (itself,) = cache.index.search("acme:s1", vector, 1)
    assert itself.similarity < 1.0  # the rounding this is about
    hit = await cache.lookup_semantic("acme:s1", "", vector, HitRequirement(1.0))
    assert kept is not None and hit is not None and hit.entry.entry_id == kept.entry_id


class _RemovedWhileJudged(CosinePolicy):
    """A verifier pass during which the entry it judges is removed: an Invalidate or a
    thumbs-down that arrives while the cross-encoder runs in its thread."""

    def __init__(self) -> None:
        self.meanwhile: Callable[[], Awaitable[object]] = lambda: asyncio.sleep(0)

    async def judge(
        self, query: str, cached: str, similarity: float, requirement: HitRequirement
    ) -> HitVerdict:
        await self.meanwhile()
        return await super().judge(query, cached, similarity, requirement)


@pytest.mark.parametrize("removal", ["invalidate", "thumbs-down", "another replica"])
async def test_an_entry_removed_while_the_verifier_judges_it_is_not_served(
    clock: ManualClock, removal: str
) -> None:
    # Before: the lookup went on to serve the answer just removed. Removed behind the cache's
    # back (another replica's delete), it leaves the index too.
    policy = _RemovedWhileJudged()
    store = InMemoryEntryStore(10, clock)
    cache = SemanticCache(store, ScopedFaissIndex(EMBED.dimension), clock, policy=policy)
    removed = await cache.store(new_entry("how do I reset my password"))
    assert removed is not None
    policy.meanwhile = {
        "invalidate": lambda: cache.invalidate_ids("acme", [removed.entry_id]),
        "thumbs-down": lambda: cache.distrust("acme", removed.entry_id),
        "another replica": lambda: store.delete([removed.entry_id]),
    }[removal]
    query = vec("how do I reset my password")
    assert await cache.lookup_semantic("acme:s1", "", query, HitRequirement(0.5)) is None
    assert await cache.get("acme", removed.entry_id) is None
    assert cache.index.search("acme:s1", query, 1) == []


async def test_the_embedded_store_says_whether_a_hit_found_its_entry(clock: ManualClock) -> None:
    store, cache = store_and_cache(clock)
    kept = await cache.store(new_entry("counted"))
    assert kept is not None
    assert await store.record_hit(kept.entry_id, clock.now) is True
    assert await store.record_hit("acme:removed-meanwhile", clock.now) is False


async def test_the_bound_drops_entries_past_their_grace_before_evicting_a_live_one(
    clock: ManualClock,
) -> None:
    # As Redis's PUT does (it purges expired entries first): the dead entries are not counted,
    # so evicting a live one for them would shrink the cache below its bound.
    store, cache = store_and_cache(clock, max_entries=2)
    live = await cache.store(new_entry("live", ttl=1000))
    dead = await cache.store(new_entry("dead", ttl=5))
    assert live is not None and dead is not None
    assert await cache.lookup_exact("acme:s1", "dead") is not None  # the most recently used
    clock.advance(10)
    assert await cache.store(new_entry("new")) is not None
    assert await store.get(live.entry_id) is not None
    assert await store.get(dead.entry_id) is None
    assert dead.entry_id not in [n.entry_id for n in cache.index.search("acme:s1", vec("dead"), 4)]
    assert await cache.entry_count("acme") == 2


def cache_seeing(clock: ManualClock, grace: float = 0.0) -> SemanticCache:
    """A cache whose model cannot see the emoji of `PartlySeenEmbedder.UNSEEN`."""
    store = InMemoryEntryStore(max_entries=10, clock=clock, stale_grace_seconds=grace)
    index = ScopedFaissIndex(EMBED.dimension)
    seen_whole = PartlySeenEmbedder().sees_whole
    return SemanticCache(store, index, clock, stale_grace_seconds=grace, seen_whole=seen_whole)


async def test_a_prompt_the_model_cannot_see_whole_is_matched_by_the_exact_tier_only(
    clock: ManualClock,
) -> None:
    cache = cache_seeing(clock, grace=60)
    await cache.store(new_entry("What does the emoji mean?"))
    await cache.store(new_entry("What does the 😀 emoji mean?"))
    prompt = "What does the 😡 emoji mean?"
    assert float(vec(prompt) @ vec("What does the emoji mean?")) == pytest.approx(1.0)
    assert await cache.lookup_semantic("acme:s1", prompt, vec(prompt), HitRequirement(0.5)) is None
    assert await cache.lookup_stale("acme:s1", prompt, vec(prompt), HitRequirement(0.5)) is None
    exact = await cache.lookup_exact("acme:s1", "What does the 😀 emoji mean?")
    assert exact is not None and exact.outcome is CacheOutcome.EXACT


async def test_an_entry_the_model_could_not_see_whole_is_not_served_to_a_similar_prompt(
    clock: ManualClock,
) -> None:
    # Its prompt's unseen part may be what its answer is about: only the nearest entry seen
    # whole may serve, here one a little further off.
    cache = cache_seeing(clock, grace=60)
    unseen = await cache.store(new_entry("What does the 😀 emoji mean?"))
    seen = await cache.store(new_entry("What does the emoji mean, please?"))
    assert unseen is not None and seen is not None
    prompt = "What does the emoji mean?"
    for lookup in (cache.lookup_semantic, cache.lookup_stale):
        hit = await lookup("acme:s1", prompt, vec(prompt), HitRequirement(0.5))
        assert hit is not None and hit.entry.entry_id == seen.entry_id
    await cache.invalidate_ids("acme", [seen.entry_id])
    assert await cache.lookup_semantic("acme:s1", prompt, vec(prompt), HitRequirement(0.5)) is None


def unaccented_vec(text: str) -> npt.NDArray[np.float32]:
    """The vector of a model that cannot see accents, as the uncased MiniLM (its tokenizer
    drops the nonspacing marks of the text's NFD form)."""
    marks_dropped = "".join(
        char for char in unicodedata.normalize("NFD", text) if unicodedata.category(char) != "Mn"
    )
    return vec(marks_dropped)


async def test_prompts_differing_only_in_marks_the_model_cannot_see_are_no_semantic_hit(
    cache: SemanticCache,
) -> None:
    # Before: "avó" (grandmother) was served the answer cached for "avô" (grandfather) at
    # similarity 1.0, the exact tier keying them apart.
    cached = "Como se diz avô em inglês?"
    further = "Como se diz avó em inglês, por favor?"
    for prompt in (cached, further):
        await cache.store(replace(new_entry(prompt), embedding=unaccented_vec(prompt)))
    asked = "Como se diz avó em inglês?"
    assert float(unaccented_vec(asked) @ unaccented_vec(cached)) == pytest.approx(1.0)
    for lookup in (cache.lookup_semantic, cache.lookup_stale):
        hit = await lookup("acme:s1", asked, unaccented_vec(asked), HitRequirement(0.5))
        assert hit is not None and hit.entry.prompt == further  # the nearest one may serve
    # Case, spacing and how an accent is encoded (é or e + U+0301) are no such difference.
    for same in ("COMO  se diz avô em inglês?", unicodedata.normalize("NFD", cached)):
        hit = await cache.lookup_semantic(
            "acme:s1", same, unaccented_vec(same), HitRequirement(0.99)
        )
        assert hit is not None and hit.entry.prompt == cached


def raw_entry(i: int, ttl: float, hits: int, cost: float, now: float) -> CacheEntry:
    """A store row put directly (no embedding work): the stats tests need thousands."""
    return CacheEntry(
        f"acme:{i:08x}", "acme", "acme:s", f"acme:s:{i}", f"prompt {i}", "answer", "m",
        Tier.CHEAP, np.zeros(4, dtype=np.float32), now, now + ttl, cost, hit_count=hits,
    )  # fmt: skip


def reference_top(store: InMemoryEntryStore, now: float, n: int) -> list[tuple[str, int, float]]:
    """What one sort of all the tenant's held entries gives (the order before)."""
    held = [e for e in store.entries() if e.expires_at + store._grace > now]
    ranked = sorted(held, key=lambda e: (-e.hit_count, -e.cost_usd))
    return [(e.entry_id, e.hit_count, e.cost_usd) for e in ranked[:n]]


async def test_most_served_of_a_large_tenant_gives_the_loop_turns_and_keeps_the_order(
    clock: ManualClock,
) -> None:
    # One synchronous sort of a full tenant (100k entries) held every tenant's requests for
    # most of a second; the walk now yields between slices, with the same answer.
    store = InMemoryEntryStore(max_entries=10 * SCAN_SLICE, clock=clock, stale_grace_seconds=5)
    for i in range(3 * SCAN_SLICE + 7):  # no ties in the order (their order is not promised)
        await store.put(raw_entry(i, 10 if i % 5 else 1, i % 13, 0.001 * i, clock.now))
    for i in range(0, 3 * SCAN_SLICE, 97):  # hits move entries in the recency order
        assert await store.record_hit(f"acme:{i:08x}", clock.now)
    clock.advance(6)  # every fifth entry past expiry and grace: left out, as before
    task = asyncio.create_task(store.most_served("acme", 25))
    turns = 0
    while not task.done():
        turns += 1
        await asyncio.sleep(0)
    top = task.result()
    assert turns >= 3
    assert [(s.entry_id, s.hit_count, s.cost_usd) for s in top] == reference_top(
        store, clock.now, 25
    )


class _CountingEntries(dict[str, CacheEntry]):
    visits = 0

    def __getitem__(self, key: str) -> CacheEntry:
        self.visits += 1
        return super().__getitem__(key)

    def get(self, key: str, default: object = None) -> CacheEntry | None:  # type: ignore[override]
        self.visits += 1
        return super().get(key)


async def test_count_visits_the_ended_entries_only_and_counts_as_before(
    clock: ManualClock,
) -> None:
    store = InMemoryEntryStore(max_entries=10 * SCAN_SLICE, clock=clock, stale_grace_seconds=5)
    for i in range(2 * SCAN_SLICE):
        await store.put(raw_entry(i, 100, 0, 0.001, clock.now))
    for i in range(2 * SCAN_SLICE, 2 * SCAN_SLICE + 6):
        await store.put(raw_entry(i, 1, 0, 0.001, clock.now))
    await store.put(raw_entry(2 * SCAN_SLICE, 1, 0, 0.001, clock.now))  # put again: 2 rows
    await store.put(raw_entry(2 * SCAN_SLICE + 1, 500, 0, 0.001, clock.now))  # now lasts
    await store.delete([f"acme:{2 * SCAN_SLICE + 2:08x}"])  # its row stays in the heap
    clock.advance(6)
    counting = _CountingEntries(store._entries)
    store._entries = counting
    assert await store.count("acme") == 2 * SCAN_SLICE + 1  # the long ones and the re-put one
    assert counting.visits < 20
    clock.advance(100)
    assert await store.count("acme") == 1

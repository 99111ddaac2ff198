"""The cache policy: exact tier, scoped vector search, expiry and invalidation over the ports."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from routecache.cache.embedder import differ_only_in_marks
from routecache.cache.hit_policy import CosinePolicy, HitPolicy, HitRequirement, clears
from routecache.cache.ports import (
    CacheEntry,
    EntryStore,
    EntrySummary,
    StoreUnavailable,
    Vector,
    VectorIndex,
)
from routecache.cache.scope import exact_key
from routecache.domain import CacheOutcome, Tier
from routecache.errors import Unavailable
from routecache.outliving import Outliving

log = logging.getLogger(__name__)

# Thumbs-down removals a store that was down still owes (see SemanticCache.distrust): at most
# this many are remembered per tenant, the tenant's oldest forgotten first, so an outage cannot
# grow memory and one tenant's thumbs-downs cannot push out another's.
MAX_OWED_REMOVALS = 10_000

# Owed removals made at once once the store answers again (off the request path).
_SETTLE_CONCURRENCY = 8

# The most neighbours one lookup reads when the nearest ones cannot serve it (each costs a store
# read): entries expired within the stale grace can crowd a popular question's neighbourhood.
_MOST_NEIGHBOURS = 64


@dataclass(frozen=True)
class CacheHit:
    entry: CacheEntry
    outcome: CacheOutcome
    similarity: float
    age_seconds: float
    verifier_score: float | None = None  # the verifier's probability; None: not verified


@dataclass(frozen=True)
class NewEntry:
    """An answer that passed validation, ready to be cached."""

    tenant: str
    scope: str
    prompt: str
    answer: str
    model: str
    tier: Tier
    embedding: Vector
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    ttl_seconds: int
    tags: tuple[str, ...] = ()
    # The prompt's exact key when the caller made it already (CacheKeys); None: made here.
    exact_key: str | None = None


@dataclass(frozen=True)
class Distrust:
    """What a thumbs-down does to the neighbours of the answer it removes.

    Entries at least `radius` similar to the removed one need `penalty` more similarity to be
    served (penalties add up, to at most `max_penalty`): a wrong answer suggests its close
    neighbours may answer a different question too.
    """

    radius: float = 0.8
    penalty: float = 0.05
    max_penalty: float = 0.2
    neighbours: int = 16


def _answers(entry: CacheEntry, scope: str, forced: Tier | None) -> bool:
    """The entry is of this scope, and made by the tier the caller forced or a stronger one:
    a caller who forces the strong model is not served the cheap model's answer."""
    return entry.scope == scope and (forced is not Tier.STRONG or entry.tier is Tier.STRONG)


def new_entry_id(tenant: str) -> str:
    """`<tenant>:<uuid hex>`: a store can find an entry's tenant (and its keys) from the id."""
    return f"{tenant}:{uuid.uuid4().hex}"


_ENTRY_ID_TAIL = re.compile(r"[0-9a-f]{32}")  # a uuid4's hex, as new_entry_id writes it


def is_entry_id_of(tenant: str, entry_id: str) -> bool:
    """Whether `entry_id` has the form of `tenant`'s entry ids (new_entry_id)."""
    owner, _, tail = entry_id.rpartition(":")
    return owner == tenant and _ENTRY_ID_TAIL.fullmatch(tail) is not None


class SemanticCache:
    """Lookups and stores bypass the cache when the store is unavailable (counted in
    `bypassed`); invalidations, feedback and stats raise instead, so a caller never believes a
    removal that did not happen."""

    def __init__(
        self,
        store: EntryStore,
        index: VectorIndex,
        clock: Callable[[], float],
        candidates: int = 4,
        distrust: Distrust | None = None,
        stale_grace_seconds: float = 0.0,
        policy: HitPolicy | None = None,
        seen_whole: Callable[[str], bool] | None = None,
        removals_saved: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        # Awaited before an invalidation or thumbs-down is acknowledged, with whether it
        # removed anything: where the store is saved to disk (the memory backend's snapshot),
        # it returns once the removal is saved, or raises StoreUnavailable. None: the store
        # keeps what it is told itself (Redis).
        self._removals_saved = removals_saved or _kept_by_the_store
        # Whether the embedder's model sees all of a prompt (see `ports.SeesWhole`): two
        # prompts that differ only where it cannot see get the same vector, so a prompt or an
        # entry not seen whole is matched by the exact tier only. None: every prompt is.
        self._seen_whole = seen_whole
        self._policy: HitPolicy = policy or CosinePolicy()
        self._index = index
        self._clock = clock
        self._candidates = candidates
        self._distrust = distrust or Distrust()
        # entry id → how much higher than the threshold a query's similarity must be to serve it.
        self._penalties: dict[str, float] = {}
        # Expired entries are kept this long: an answer to serve, flagged stale, when no
        # provider can answer.
        self._grace = stale_grace_seconds
        self.bypassed = 0
        # tenant → entry ids of thumbs-downs the store was down for, oldest first: not served
        # by this cache, and removed by a background task a lookup starts once the store
        # answers again (a lookup never waits for them, least of all another tenant's).
        self._owed: dict[str, dict[str, None]] = {}
        self._settler: asyncio.Task[None] | None = None
        self._puts = Outliving(log, "the cache put")  # see store()

    @property
    def index(self) -> VectorIndex:
        return self._index

    async def lookup_exact(
        self, scope: str, prompt: str, forced: Tier | None = None, *, key: str | None = None
    ) -> CacheHit | None:
        """`forced`: the tier the caller forced; only its own or a stronger tier's answers do.
        `key`: the prompt's exact key, when the caller has it (CacheKeys); else made here."""
        self._start_settling()
        try:
            entry = await self._store.get_exact(key or exact_key(scope, prompt))
            if entry is None or self._owes(entry) or not _answers(entry, scope, forced):
                return None
            if not await self._is_live(entry):
                return None
            return await self._hit(entry, CacheOutcome.EXACT, 1.0)
        except StoreUnavailable:
            self.bypassed += 1
            return None

    async def lookup_semantic(
        self, scope: str, prompt: str, vector: Vector, requirement: HitRequirement,
        forced: Tier | None = None,
    ) -> CacheHit | None:  # fmt: skip
        """The nearest live entry of this scope, if the hit policy accepts it for the prompt."""
        self._start_settling()
        try:
            return await self._nearest(scope, prompt, vector, requirement, forced, self._is_live)
        except StoreUnavailable:
            self.bypassed += 1
            return None

    async def lookup_stale(
        self, scope: str, prompt: str, vector: Vector | None, requirement: HitRequirement,
        forced: Tier | None = None, *, key: str | None = None,
    ) -> CacheHit | None:  # fmt: skip
        """An entry of this scope, live or expired within the grace period, for the prompt or
        one meaning the same; for when no provider answers. Never crosses scopes. `key`: as
        for lookup_exact."""
        self._start_settling()
        try:
            entry = await self._store.get_exact(key or exact_key(scope, prompt))
            if (entry is not None and not self._owes(entry) and _answers(entry, scope, forced)
                    and await self._is_servable(entry)):  # fmt: skip
                return await self._hit(entry, CacheOutcome.EXACT, 1.0)
            if vector is None:
                return None
            # Penalised as a normal lookup: the grace relaxes freshness, not the distrust.
            return await self._nearest(
                scope, prompt, vector, requirement, forced, self._is_servable
            )
        except StoreUnavailable:
            self.bypassed += 1
            return None

    async def _nearest(
        self,
        scope: str,
        prompt: str,
        vector: Vector,
        requirement: HitRequirement,
        forced: Tier | None,
        usable: Callable[[CacheEntry], Awaitable[bool]],
    ) -> CacheHit | None:
        floor = self._policy.floor(requirement)
        # Entries that cannot serve this lookup (penalised, gone, another tier, expired) are
        # passed over, so they must not use up the search: while all of the k nearest were
        # passed over, it looks again 4 times as wide, up to a bound on the store reads.
        seen: set[str] = set()
        prompt_checked = False  # checked at the first candidate: most misses have none
        k = self._candidates
        while True:
            neighbours = self._index.search(scope, vector, k)
            for neighbour in neighbours:
                if neighbour.entry_id in seen:
                    continue
                seen.add(neighbour.entry_id)
                if not clears(neighbour.similarity, floor):
                    return None  # neighbours come best first
                if not clears(neighbour.similarity, floor + self.penalty_of(neighbour.entry_id)):
                    continue
                if not prompt_checked:
                    if not await self._sees_whole(prompt):
                        return None
                    prompt_checked = True
                # The store is the truth: an entry the index still holds but the store no
                # longer has (deleted on another replica, expired) is dropped here, never served.
                entry = await self._store.get(neighbour.entry_id)
                if entry is None:
                    self.forget_removed(scope, neighbour.entry_id)
                    continue
                # An entry whose prompt differs from this one only in marks the model cannot
                # see (accents) has its vector and verifier input: a different question
                # maybe ("avô", "avó"), which only the exact tier may answer.
                if (self._owes(entry) or not _answers(entry, scope, forced)
                        or not await usable(entry)
                        or differ_only_in_marks(prompt, entry.prompt)
                        or not await self._sees_whole(entry.prompt)):  # fmt: skip
                    continue
                verdict = await self._policy.judge(
                    prompt, entry.prompt, neighbour.similarity, requirement
                )
                if not verdict.accept:
                    return None  # only the nearest usable candidate is verified: one pass a lookup
                hit = await self._hit(entry, CacheOutcome.SEMANTIC, neighbour.similarity)
                return None if hit is None else replace(hit, verifier_score=verdict.verifier_score)
            if len(neighbours) < k or k >= max(self._candidates, _MOST_NEIGHBOURS):
                return None  # the scope has no more, or the bound is reached
            k = min(k * 4, max(self._candidates, _MOST_NEIGHBOURS))

    async def _sees_whole(self, prompt: str) -> bool:
        # Off the event loop, as the verifier: a prompt of thousands of characters takes
        # milliseconds to tokenize.
        return self._seen_whole is None or await asyncio.to_thread(self._seen_whole, prompt)

    async def store(self, new: NewEntry) -> CacheEntry | None:
        """Stores the entry; None when the store is unavailable (the answer is still served)."""
        now = self._clock()
        entry = CacheEntry(
            entry_id=new_entry_id(new.tenant),
            tenant=new.tenant,
            scope=new.scope,
            exact_key=new.exact_key or exact_key(new.scope, new.prompt),
            prompt=new.prompt,
            answer=new.answer,
            model=new.model,
            tier=new.tier,
            embedding=new.embedding,
            created_at=now,
            expires_at=now + new.ttl_seconds,
            cost_usd=new.cost_usd,
            prompt_tokens=new.prompt_tokens,
            completion_tokens=new.completion_tokens,
            tags=new.tags,
        )
        # Once sent, the put lands in the store whatever the caller does: a caller gone
        # meanwhile (deadline, disconnect) ends its wait, not the put and its index add, or the
        # entry would be in the store but never in this replica's index (replica sync skips
        # its own adds). `aclose` waits for the puts still running.
        return await self._puts.run(self._put_and_index(entry))

    async def _put_and_index(self, entry: CacheEntry) -> CacheEntry | None:
        try:
            evicted = await self._store.put(entry)
        except StoreUnavailable:
            self.bypassed += 1
            return None
        self._forget(evicted)
        self._index.add(entry.scope, entry.entry_id, entry.embedding)
        return entry

    async def get(self, tenant: str, entry_id: str) -> CacheEntry | None:
        entry = await self._store.get(entry_id)
        return entry if entry is not None and entry.tenant == tenant else None

    async def invalidate_ids(self, tenant: str, entry_ids: Sequence[str]) -> int:
        """Remove entries of this tenant; ids of other tenants are ignored, never removed. An id
        not of the form of the tenant's entry ids never reaches the store: as a key it could
        name another of the tenant's keys (a rate bucket), which would not decode."""
        mine = [i for i in entry_ids if is_entry_id_of(tenant, i)]
        async with _store_required("invalidate"):
            return await self._saved(await self._invalidate(tenant, mine))

    async def distrust(self, tenant: str, entry_id: str) -> int:
        """A thumbs-down: remove the entry, raise the similarity its neighbours need (returns
        the number of entries removed, 0 or 1). With the store down it raises Unavailable, but
        the removal is owed, not lost: the entry is not served by this cache meanwhile, and
        is removed in the background once a lookup finds the store answering (else the answer
        a user rated bad came back with the store, unless the caller retried the feedback)."""
        try:
            removed = await self._distrust_entry(tenant, entry_id)
        except StoreUnavailable as exc:
            self._owe(tenant, entry_id)
            raise Unavailable(
                "cache store unavailable, could not record feedback; retry later (the entry is"
                " removed once the cache store answers again)"
            ) from exc
        async with _store_required("record feedback"):  # removed, but not yet saved
            return await self._saved(removed)

    def _owe(self, tenant: str, entry_id: str) -> None:
        owed = self._owed.setdefault(tenant, {})
        owed.pop(entry_id, None)  # to the end: the newest is kept longest
        owed[entry_id] = None
        if len(owed) > MAX_OWED_REMOVALS:
            dropped = next(iter(owed))
            del owed[dropped]
            log.warning("more than %d thumbs-down removals owed to tenant %s while the cache store"
                        " is down: entry %s may be served again", MAX_OWED_REMOVALS, tenant,
                        dropped)  # fmt: skip

    def _owes(self, entry: CacheEntry) -> bool:
        owed = self._owed.get(entry.tenant)
        return owed is not None and entry.entry_id in owed

    def _start_settling(self) -> None:
        """Starts the owed removals in the background unless they are already being made:
        one settler at a time, so two lookups at once do not raise the neighbours' penalties
        twice for one thumbs-down."""
        if self._owed and (self._settler is None or self._settler.done()):
            self._settler = asyncio.create_task(self._settle_owed())

    async def settle_owed(self) -> None:
        """Makes the owed removals now, or waits for the background task making them."""
        self._start_settling()
        if self._settler is not None:
            await asyncio.shield(self._settler)

    async def aclose(self) -> None:
        """Waits for the puts of callers gone (before the store closes: they were sent), then
        stops making owed removals (they are in memory: a restart drops them anyway)."""
        await self._puts.wait()
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler

    async def _settle_owed(self) -> None:
        """Makes the owed removals, a few at once, oldest first per tenant, until the store
        fails one (it and the rest stay owed, for the next lookup's settler). A removal that
        fails on a bug (a damaged entry, say) is dropped and logged: kept owed, it would fail
        first on every try and hold up every other tenant's removals for good."""
        size = 1  # one first: while the store is still down, a lookup costs one failed call
        while self._owed:
            owed_now = ((tenant, owed_id) for tenant, ids in self._owed.items() for owed_id in ids)
            batch = list(itertools.islice(owed_now, size))
            results = await asyncio.gather(
                *(self._distrust_entry(*owed) for owed in batch), return_exceptions=True
            )
            still_down = False
            for (tenant, entry_id), result in zip(batch, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    still_down = True  # still down (or refusing): it stays owed
                    continue
                if isinstance(result, Exception):
                    log.error("could not make the thumbs-down removal owed to tenant %s of entry"
                              " %s; dropped, it may be served again", tenant, entry_id,
                              exc_info=result)  # fmt: skip
                elif isinstance(result, BaseException):
                    raise result  # cancelled: stop settling, the rest stays owed
                owed = self._owed.get(tenant, {})
                owed.pop(entry_id, None)
                if not owed:
                    self._owed.pop(tenant, None)
            if still_down:
                return
            size = _SETTLE_CONCURRENCY

    async def _distrust_entry(self, tenant: str, entry_id: str) -> int:
        entry = await self.get(tenant, entry_id)
        if entry is None:
            return 0
        rule = self._distrust
        neighbours = [
            n.entry_id
            for n in self._index.search(entry.scope, entry.embedding, rule.neighbours)
            if n.entry_id != entry_id and n.similarity >= rule.radius
        ]
        removed = await self._invalidate(tenant, [entry_id])
        # Only once the removal is made: a refused delete leaves it owed and tried again, and
        # each try would have raised the penalties once more for the one thumbs-down. Only on
        # neighbours still indexed: another removal made meanwhile (thumbs-downs at once) has
        # forgotten its entry, and a penalty set now would stay for the process's life.
        for neighbour_id in neighbours:
            if not self._index.contains(entry.scope, neighbour_id):
                continue
            raised = self.penalty_of(neighbour_id) + rule.penalty
            self._penalties[neighbour_id] = min(rule.max_penalty, raised)
        return removed

    def penalty_of(self, entry_id: str) -> float:
        return self._penalties.get(entry_id, 0.0)

    def penalties(self) -> dict[str, float]:
        """A copy of every penalty (entry id → penalty), for a snapshot: taken on the loop."""
        return dict(self._penalties)

    def seed_penalties(self, penalties: Mapping[str, float]) -> None:
        """The penalties a snapshot restored: without them, a restart served the neighbours of
        an answer rated bad at the normal threshold again."""
        self._penalties.update(penalties)

    def forget_removed(self, scope: str, entry_id: str) -> None:
        """An entry the store lost behind this cache's back (another replica's delete, the
        expiry sweep, Redis' own expiry): out of the index, and its penalty with it, or
        penalties would pile up for as long as the process runs."""
        self._index.remove(scope, entry_id)
        self._penalties.pop(entry_id, None)

    async def top_entries(self, tenant: str, n: int) -> list[EntrySummary]:
        """The tenant's most served entries, most hits first."""
        async with _store_required("read stats"):
            return await self._store.most_served(tenant, n)

    # The tenant's own tag set and entry list hold only its ids: no ownership check (one store
    # read an entry) is needed before removing them.
    async def invalidate_tag(self, tenant: str, tag: str) -> int:
        async with _store_required("invalidate"):
            return await self._saved(
                await self._remove(await self._store.ids_with_tag(tenant, tag))
            )

    async def invalidate_tenant(self, tenant: str) -> int:
        async with _store_required("invalidate"):
            return await self._saved(await self._remove(await self._store.ids_of_tenant(tenant)))

    async def _saved(self, removed: int) -> int:
        """`removed`, once the store has saved it (see `removals_saved`)."""
        await self._removals_saved(removed > 0)
        return removed

    async def entry_count(self, tenant: str) -> int:
        async with _store_required("count entries"):
            return await self._store.count(tenant)

    async def _invalidate(self, tenant: str, entry_ids: Sequence[str]) -> int:
        owned = [e.entry_id for e in [await self.get(tenant, i) for i in entry_ids] if e]
        return await self._remove(owned)

    async def _remove(self, entry_ids: Sequence[str]) -> int:
        removed = await self._store.delete(entry_ids)
        self._forget(removed)
        return len(removed)

    async def _is_live(self, entry: CacheEntry) -> bool:
        if entry.expires_at > self._clock():
            return True
        await self._is_servable(entry)  # drops it once past the grace period
        return False

    async def _is_servable(self, entry: CacheEntry) -> bool:
        if entry.expires_at + self._grace > self._clock():
            return True
        await self._invalidate(entry.tenant, [entry.entry_id])
        return False

    async def _hit(
        self, entry: CacheEntry, outcome: CacheOutcome, similarity: float
    ) -> CacheHit | None:
        """The hit, counted on its entry; None (a miss) when the entry was removed since it
        was read: an Invalidate or a thumbs-down while the verifier judged it, another
        replica's delete."""
        now = self._clock()
        if not await self._store.record_hit(entry.entry_id, now):
            self.forget_removed(entry.scope, entry.entry_id)
            return None
        return CacheHit(entry, outcome, similarity, max(0.0, now - entry.created_at))

    def _forget(self, entries: Sequence[CacheEntry]) -> None:
        """Drop evicted or replaced entries from the index (the store already dropped them)."""
        for entry in entries:
            self.forget_removed(entry.scope, entry.entry_id)


async def _kept_by_the_store(removed: bool) -> None:
    return None


@contextlib.asynccontextmanager
async def _store_required(action: str) -> AsyncIterator[None]:
    """A change the caller must be able to trust fails loudly (UNAVAILABLE) instead."""
    try:
        yield
    except StoreUnavailable as exc:
        raise Unavailable(f"cache store unavailable, could not {action}; retry later") from exc

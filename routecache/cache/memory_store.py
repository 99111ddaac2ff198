"""The embedded entry store: everything in this process, bounded, least recently used out."""

from __future__ import annotations

import asyncio
import heapq
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

from routecache.cache.ports import CacheEntry, EntrySummary

K = TypeVar("K")

# Entries past expiry and grace a put drops at most, as Redis's PUT script does.
PURGE_ON_PUT = 64
# Entries the stats walk between loop turns: about a millisecond's work.
SCAN_SLICE = 2048


class InMemoryEntryStore:
    """A dict of entries, at most `max_entries` per tenant (least recently used out), with
    secondary maps for exact keys and tags.

    The bound is per tenant, as on Redis: with one shared bound a tenant's writes would evict
    another tenant's entries, and so change what the other tenant is served.
    """

    def __init__(
        self, max_entries: int, clock: Callable[[], float], stale_grace_seconds: float = 0.0
    ) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        # Expired entries are held this long for stale answers (upstream.stale_grace_seconds),
        # and counted meanwhile, as on Redis.
        self._grace = stale_grace_seconds
        self._entries: dict[str, CacheEntry] = {}
        self._by_exact_key: dict[str, str] = {}
        self._by_tag: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        # Per tenant, order = recency of use: a hit moves an id to the end, eviction takes
        # the front.
        self._by_tenant: defaultdict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        # Per tenant, a min-heap of (end of grace, id), soonest first: a put drops the dead
        # entries before the bound evicts a live one. Rows of entries since removed or put
        # again are skipped when popped, and compacted away when they outnumber the entries.
        self._by_end: dict[str, list[tuple[float, str]]] = {}

    async def put(self, entry: CacheEntry) -> list[CacheEntry]:
        # A new answer for the same exact key replaces the old one.
        replaced = [entry.entry_id, self._by_exact_key.get(entry.exact_key)]
        evicted = [e for e in (self._unlink(i) for i in replaced if i) if e is not None]
        self._entries[entry.entry_id] = entry
        self._by_exact_key[entry.exact_key] = entry.entry_id
        recency = self._by_tenant[entry.tenant]
        recency[entry.entry_id] = None
        for tag in entry.tags:
            self._by_tag[(entry.tenant, tag)].add(entry.entry_id)
        self._push_end(entry)
        # Dead entries first (they are not counted): evicting a live one for them would leave
        # the tenant fewer servable entries than its bound.
        evicted.extend(self._purge_expired(entry.tenant, PURGE_ON_PUT))
        while len(recency) > self._max_entries:
            oldest = self._unlink(next(iter(recency)))
            if oldest is not None:
                evicted.append(oldest)
        return evicted

    async def get(self, entry_id: str) -> CacheEntry | None:
        return self._entries.get(entry_id)

    async def get_exact(self, exact_key: str) -> CacheEntry | None:
        entry_id = self._by_exact_key.get(exact_key)
        return None if entry_id is None else self._entries.get(entry_id)

    async def record_hit(self, entry_id: str, now: float) -> bool:
        entry = self._entries.get(entry_id)
        if entry is None:
            return False
        entry.hit_count += 1
        entry.last_hit_at = now
        self._by_tenant[entry.tenant].move_to_end(entry_id)
        return True

    async def delete(self, entry_ids: Sequence[str]) -> list[CacheEntry]:
        return [e for e in (self._unlink(i) for i in entry_ids) if e is not None]

    async def ids_with_tag(self, tenant: str, tag: str) -> list[str]:
        return sorted(self._by_tag.get((tenant, tag), ()))

    async def ids_of_tenant(self, tenant: str) -> list[str]:
        return sorted(self._by_tenant.get(tenant, ()))

    async def count(self, tenant: str) -> int:
        """The entries Redis would still hold (see `_alive`): the tenant's, less those past
        expiry and grace, found from the end heap's due rows rather than by visiting all."""
        held = len(self._by_tenant.get(tenant, ()))
        return held - await self._count_ended(tenant, self._clock())

    async def most_served(self, tenant: str, n: int) -> list[EntrySummary]:
        """Keeps the best `n` while walking the tenant's entries a slice at a time, a loop
        turn between slices, as Redis's scan is a batch a round trip: one sort of 100k
        entries held the loop (every tenant's requests) for most of a second. Entries put
        or removed during the walk may be missed; each one's hits are read in its slice."""
        now = self._clock()
        # A copy, as the walk spans loop turns; through the plain dict's keys, in put order:
        # the OrderedDict's own (recency) iteration takes 20 ms at 100k ids, on the loop.
        # Ties in hits and cost come in no promised order, as on Redis.
        ids = list(dict.keys(self._by_tenant.get(tenant, {})))
        # (order key, position, entry): positions are unique, so entries are never compared.
        best: list[tuple[tuple[int, float], int, CacheEntry]] = []
        for start in range(0, len(ids), SCAN_SLICE):
            if start:
                await asyncio.sleep(0)
            found = zip(range(start, len(ids)), ids[start : start + SCAN_SLICE], strict=False)
            entries = ((k, self._entries.get(i)) for k, i in found)
            rows = ((_order(e), k, e) for k, e in entries if e and self._alive(e, now))
            best = heapq.nsmallest(n, [*best, *rows])
        # Hits as the walk read them (the order's), not as now: the list stays in order.
        return [
            EntrySummary(e.entry_id, e.prompt, e.model, -hits, -cost) for (hits, cost), _, e in best
        ]

    def _alive(self, entry: CacheEntry, now: float) -> bool:
        """Whether Redis would still hold it: its purge drops entries past expiry and the
        stale grace. Stats leave those out without unlinking them: the cache still has them
        in its index, and drops them with their index rows when a lookup meets them or a put
        purges them."""
        return entry.expires_at + self._grace > now

    async def _count_ended(self, tenant: str, now: float) -> int:
        """How many of the tenant's entries are past expiry and grace. Walks only the due
        rows of a copy of its end heap (no row under one not yet due is due), a loop turn
        every slice; rows of entries removed or put again since are skipped, as the purge
        skips them."""
        ends = list(self._by_end.get(tenant, ()))
        ended: set[str] = set()  # an id put again with the same end has two rows
        stack = [0] if ends else []
        visited = 0
        while stack:
            row = stack.pop()
            end, entry_id = ends[row]
            if end > now:
                continue
            entry = self._entries.get(entry_id)
            if entry is not None and entry.tenant == tenant and not self._alive(entry, now):
                ended.add(entry_id)
            stack.extend(child for child in (2 * row + 1, 2 * row + 2) if child < len(ends))
            visited += 1
            if visited % SCAN_SLICE == 0:
                await asyncio.sleep(0)
        return len(ended)

    def _push_end(self, entry: CacheEntry) -> None:
        ends = self._by_end.setdefault(entry.tenant, [])
        heapq.heappush(ends, (entry.expires_at + self._grace, entry.entry_id))
        if len(ends) > 2 * len(self._by_tenant[entry.tenant]) + PURGE_ON_PUT:
            ids = self._by_tenant[entry.tenant]
            ends[:] = [(self._entries[i].expires_at + self._grace, i) for i in ids]
            heapq.heapify(ends)

    def _purge_expired(self, tenant: str, limit: int) -> list[CacheEntry]:
        """Unlinks up to `limit` of the tenant's entries past expiry and grace, soonest first."""
        now = self._clock()
        ends = self._by_end.get(tenant, [])
        purged: list[CacheEntry] = []
        while ends and ends[0][0] <= now and len(purged) < limit:
            end, entry_id = heapq.heappop(ends)
            entry = self._entries.get(entry_id)
            if entry is not None and entry.expires_at + self._grace == end:
                self._unlink(entry_id)
                purged.append(entry)
        return purged

    def entries(self) -> list[CacheEntry]:
        """All entries, each tenant's least recently used first (the order a snapshot
        restores)."""
        return [self._entries[i] for ids in self._by_tenant.values() for i in ids]

    def _unlink(self, entry_id: str) -> CacheEntry | None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        if self._by_exact_key.get(entry.exact_key) == entry_id:
            del self._by_exact_key[entry.exact_key]
        recency = self._by_tenant.get(entry.tenant)
        if recency is not None:
            recency.pop(entry_id, None)
            if not recency:
                del self._by_tenant[entry.tenant]
                self._by_end.pop(entry.tenant, None)
        for tag in entry.tags:
            _discard(self._by_tag, (entry.tenant, tag), entry_id)
        return entry


def _discard(index: defaultdict[K, set[str]], key: K, entry_id: str) -> None:
    """Drop an id from a secondary map, and the key with its last id, so nothing leaks."""
    members = index.get(key)
    if members is not None:
        members.discard(entry_id)
        if not members:
            del index[key]


def _order(entry: CacheEntry) -> tuple[int, float]:
    """`most_served_first`'s key from the entry itself: no summary is made for the many
    that do not make the top."""
    return (-entry.hit_count, -entry.cost_usd)

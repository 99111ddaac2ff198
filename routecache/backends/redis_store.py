"""The entry store and exact tier on Redis: one hash per entry, kept consistent by Lua scripts.

Each change also goes onto the tenant's sync stream, which every replica tails to keep its
FAISS index current (routecache.backends.replica_sync).
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from redis.exceptions import ResponseError

from routecache.backends import scripts
from routecache.backends.keys import KeySpace, TenantKeys, tenant_of_exact_key, tenant_of_id
from routecache.backends.link import RedisLink, guarded
from routecache.cache.ports import CacheEntry, EntrySummary, most_served_first
from routecache.domain import Tier

SWEEP_ORIGIN = "sweep"


@dataclass(frozen=True)
class RedisStoreOptions:
    max_entries_per_tenant: int
    sync_stream_max_len: int = 100_000
    # Redis drops an entry's keys this long after it expired, in case no purge ran.
    expiry_grace_seconds: int = 3600
    purge_batch: int = 1000
    # Expired entries stay this long (upstream.stale_grace_seconds): served, flagged stale,
    # when no provider answers. SemanticCache keeps them out of normal lookups.
    stale_grace_seconds: float = 0.0
    # Tenant-wide reads (stats) go this many entries a round trip.
    read_batch: int = 1000
    # Ids a DELETE script call unlinks: a script blocks Redis while it runs, so a tenant's
    # invalidation goes in calls of this size.
    unlink_batch: int = 500
    # Entries over the bound a PUT evicts besides the one it displaces: a lowered bound is
    # reached over the following puts and purges, never in one call that blocks Redis.
    evict_batch: int = 64


def encode_entry(entry: CacheEntry, keys: TenantKeys) -> list[str | bytes]:
    """The entry's hash fields as a flat name/value list."""
    fields: dict[str, str | bytes] = {
        "id": entry.entry_id, "tenant": entry.tenant, "scope": entry.scope,
        "xk": entry.exact_key, "xr": keys.exact(entry.exact_key), "prompt": entry.prompt,
        "answer": entry.answer, "model": entry.model, "tier": entry.tier.value,
        "emb": np.ascontiguousarray(entry.embedding, dtype=np.float32).tobytes(),
        "created": repr(entry.created_at), "expires": repr(entry.expires_at),
        "cost": repr(entry.cost_usd), "pt": str(entry.prompt_tokens),
        "ct": str(entry.completion_tokens), "tags": json.dumps(list(entry.tags)),
        "hits": str(entry.hit_count), "last_hit": repr(entry.last_hit_at),
    }  # fmt: skip
    return [item for pair in fields.items() for item in pair]


def decode_entry(raw: dict[bytes, bytes] | Sequence[bytes]) -> CacheEntry:
    """An entry from HGETALL's answer (a dict from redis-py, a flat list from a script)."""
    if not isinstance(raw, dict):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    f = {k.decode(): v for k, v in raw.items()}

    def text(name: str) -> str:
        return f[name].decode()

    return CacheEntry(
        entry_id=text("id"), tenant=text("tenant"), scope=text("scope"), exact_key=text("xk"),
        prompt=text("prompt"), answer=text("answer"), model=text("model"),
        tier=Tier(text("tier")), embedding=np.frombuffer(f["emb"], dtype=np.float32).copy(),
        created_at=float(f["created"]), expires_at=float(f["expires"]),
        cost_usd=float(f["cost"]), prompt_tokens=int(f["pt"]), completion_tokens=int(f["ct"]),
        tags=tuple(json.loads(f["tags"])), hit_count=int(f["hits"]),
        last_hit_at=float(f["last_hit"]),
    )  # fmt: skip


class RedisEntryStore:
    """EntryStore on Redis. Failures raise RedisDown (a StoreUnavailable): the cache bypasses."""

    def __init__(
        self,
        link: RedisLink,
        keyspace: KeySpace,
        options: RedisStoreOptions,
        clock: Callable[[], float],
        origin: str,
    ) -> None:
        self._link = link
        self._keys = keyspace
        self._options = options
        self._clock = clock
        self._origin = origin
        client = link.client
        self._put = client.register_script(scripts.PUT)
        self._delete = client.register_script(scripts.DELETE)
        self._purge = client.register_script(scripts.PURGE)
        self._get_exact = client.register_script(scripts.GET_EXACT)
        self._record_hit = client.register_script(scripts.RECORD_HIT)

    @property
    def sync_stream_max_len(self) -> int:
        """How many messages each tenant's sync stream keeps at least (MAXLEN ~)."""
        return self._options.sync_stream_max_len

    def _common(self, keys: TenantKeys) -> list[str | int]:
        return [keys.base, self._options.sync_stream_max_len, self._origin]

    async def put(self, entry: CacheEntry) -> list[CacheEntry]:
        keys = self._keys.of(entry.tenant)
        args = [
            *self._common(keys), repr(self._clock()), self._options.max_entries_per_tenant,
            self._options.evict_batch, self._options.expiry_grace_seconds * 1000, entry.entry_id,
            keys.exact(entry.exact_key), repr(entry.expires_at + self._options.stale_grace_seconds),
            entry.scope, len(entry.tags),
            *entry.tags, *encode_entry(entry, keys),
        ]  # fmt: skip
        removed = await guarded(self._link, lambda: self._put(args=args))
        return [decode_entry(raw) for raw in removed]

    async def get(self, entry_id: str) -> CacheEntry | None:
        key = self._keys.of(tenant_of_id(entry_id)).entry(entry_id)
        raw = await guarded(self._link, lambda: self._link.client.hgetall(key))
        return decode_entry(raw) if raw else None

    async def get_exact(self, exact_key: str) -> CacheEntry | None:
        keys = self._keys.of(tenant_of_exact_key(exact_key))
        args = [keys.base, keys.exact(exact_key)]
        raw = await guarded(self._link, lambda: self._get_exact(args=args))
        return decode_entry(raw) if raw else None

    async def record_hit(self, entry_id: str, now: float) -> bool:
        keys = self._keys.of(tenant_of_id(entry_id))
        args = [keys.base, entry_id, repr(now)]
        answer = await guarded(self._link, lambda: self._record_hit(args=args))
        if isinstance(answer, list):  # refused (out of memory): counted and logged as any
            self._link.refused(ResponseError(answer[0].decode()))
            return True  # still there: served, its hit not recorded
        return bool(answer)  # 0: gone

    async def delete(self, entry_ids: Sequence[str]) -> list[CacheEntry]:
        by_tenant: defaultdict[str, list[str]] = defaultdict(list)
        for entry_id in entry_ids:
            by_tenant[tenant_of_id(entry_id)].append(entry_id)
        removed: list[CacheEntry] = []
        for tenant, ids in by_tenant.items():
            removed.extend(await self._delete_of_tenant(tenant, ids))
        return removed

    async def _delete_of_tenant(self, tenant: str, ids: Sequence[str]) -> list[CacheEntry]:
        keys = self._keys.of(tenant)
        removed: list[CacheEntry] = []
        step = self._options.unlink_batch
        for start in range(0, len(ids), step):
            removed.extend(await self._delete_batch(keys, ids[start : start + step]))
        return removed

    async def _delete_batch(self, keys: TenantKeys, ids: Sequence[str]) -> list[CacheEntry]:
        args = [*self._common(keys), *ids]
        raws = await guarded(self._link, lambda: self._delete(args=args))
        return [decode_entry(raw) for raw in raws]

    async def purge_expired(self, tenant: str) -> int:
        """Unlinks this tenant's entries past expiry and stale grace, then the least recently
        used over the bound, at most `purge_batch` in all (and tells the replicas); returns how
        many."""
        keys = self._keys.of(tenant)
        # Not this replica's origin: every replica, the sweeper too, applies a sweep's deletes.
        args = [keys.base, self._options.sync_stream_max_len, SWEEP_ORIGIN, repr(self._clock()),
                self._options.purge_batch, self._options.max_entries_per_tenant]  # fmt: skip
        purged: int = await guarded(self._link, lambda: self._purge(args=args))
        return purged

    async def ids_with_tag(self, tenant: str, tag: str) -> list[str]:
        key = self._keys.of(tenant).tag(tag)
        members = await guarded(self._link, lambda: self._link.client.smembers(key))
        return sorted(m.decode() for m in members)

    async def ids_of_tenant(self, tenant: str) -> list[str]:
        key = self._keys.of(tenant).lru
        members = await guarded(self._link, lambda: self._link.client.zrange(key, 0, -1))
        return [m.decode() for m in members]

    async def most_served(self, tenant: str, n: int) -> list[EntrySummary]:
        """Scans the tenant's entry list a batch a round trip, reading only hit counts and
        costs and keeping the best `n`; then the prompts and models of those `n`. Purges
        first, as `count` does, and skips entries past expiry and grace that one purge batch
        left, so neither names one."""
        await self.purge_expired(tenant)
        now = self._clock()
        keys = self._keys.of(tenant)
        best: dict[str, tuple[int, float]] = {}
        cursor = 0
        while True:
            cursor, ids = await self._scan_ids(keys, cursor)
            rows = await self._fields(keys, ids, ("hits", "cost", "expires"))
            for entry_id, (hits, cost, expires) in zip(ids, rows, strict=True):
                if hits is None or cost is None or expires is None:  # gone since the scan
                    continue
                if float(expires) + self._options.stale_grace_seconds > now:
                    best[entry_id] = (int(hits), float(cost))
            best = dict(heapq.nlargest(n, best.items(), key=lambda item: item[1]))
            if cursor == 0:
                break
        rows = await self._fields(keys, list(best), ("prompt", "model"))
        summaries = [
            EntrySummary(entry_id, prompt.decode(), model.decode(), *best[entry_id])
            for entry_id, (prompt, model) in zip(best, rows, strict=True)
            if prompt is not None and model is not None
        ]
        return sorted(summaries, key=most_served_first)

    async def _scan_ids(self, keys: TenantKeys, cursor: int) -> tuple[int, list[str]]:
        """One ZSCAN step over the entry list (ids present throughout come at least once)."""
        batch = self._options.read_batch
        following, members = await guarded(
            self._link, lambda: self._link.client.zscan(keys.lru, cursor, count=batch)
        )
        return following, [m.decode() for m, _ in members]

    async def _fields(
        self, keys: TenantKeys, ids: Sequence[str], names: Sequence[str]
    ) -> list[list[bytes | None]]:
        """These fields of these entries in one round trip (None where an entry is gone)."""
        if not ids:
            return []
        pipe = self._link.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hmget(keys.entry(entry_id), names)
        rows: list[list[bytes | None]] = await guarded(self._link, pipe.execute)
        return rows

    async def count(self, tenant: str) -> int:
        """The tenant's entries not past expiry and grace: a purge unlinks at most one batch,
        so the rest are left out by their end in the expiry set (the purge's own order)."""
        await self.purge_expired(tenant)
        key = self._keys.of(tenant).expiry
        after_now = f"({self._clock()!r}"
        total: int = await guarded(
            self._link, lambda: self._link.client.zcount(key, after_now, "+inf")
        )
        return total

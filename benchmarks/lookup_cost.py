"""What one cache lookup costs as a scope grows: FAISS flat search over the scope's entries,
and the Redis round trip that fetches (and verifies) the candidate entry.

    python -m benchmarks.lookup_cost [--search-threads 1]

The FAISS part keeps every scope flat (the exact search whose cost sets main's IVF threshold);
benchmarks/index_scale.py measures the IVF side.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import faiss
import numpy as np

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisLink
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions
from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex
from routecache.cache.ports import CacheEntry
from routecache.domain import Tier
from tests.redis_fixture import temporary_redis_server

DIMENSION = 384


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def faiss_cost(sizes: list[int], queries: int = 300) -> None:
    rng = np.random.default_rng(3)
    flat_only = IndexPolicy(ivf_threshold=10**12)
    for size in sizes:
        index = ScopedFaissIndex(DIMENSION, flat_only)
        index.add_many("acme:s", [f"acme:{n}" for n in range(size)], unit_rows(rng, size))
        probes = unit_rows(rng, queries)
        started = time.perf_counter()
        for probe in probes:
            index.search("acme:s", probe, 4)
        per = (time.perf_counter() - started) / queries
        print(f"flat search, scope of {size:>9,} entries: {per * 1e6:>9,.0f} µs")


async def redis_cost(url: str, lookups: int = 2000) -> None:
    link = RedisLink(url, timeout_seconds=1, max_connections=8, probe_interval_seconds=1)
    await link.connect()
    store = RedisEntryStore(link, KeySpace(), RedisStoreOptions(10_000), time.time, "bench")
    now = time.time()
    entry = CacheEntry(
        entry_id="acme:" + "0" * 32, tenant="acme", scope="acme:s", exact_key="acme:s:x",
        prompt="What is the capital of France?", answer="Paris." * 60, model="m",
        tier=Tier.CHEAP, embedding=unit_rows(np.random.default_rng(1), 1)[0], created_at=now,
        expires_at=now + 3600, cost_usd=0.001,
    )  # fmt: skip
    await store.put(entry)
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("get (HGETALL)", lambda: store.get(entry.entry_id)),
        ("get_exact (Lua)", lambda: store.get_exact(entry.exact_key)),
        ("record_hit (Lua)", lambda: store.record_hit(entry.entry_id, time.time())),
    ]
    for name, call in calls:
        started = time.perf_counter()
        for _ in range(lookups):
            await call()
        per = (time.perf_counter() - started) / lookups
        print(f"redis {name:<18} one at a time:     {per * 1e6:>9,.0f} µs")
    await link.aclose()


async def main(threads: int | None) -> None:
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    print(f"FAISS OpenMP threads: {threads or 'default'}")
    faiss_cost([100, 1_000, 10_000, 100_000, 1_000_000])
    with temporary_redis_server(appendfsync="everysec") as url:
        await redis_cost(url)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-threads", type=int, default=None)
    asyncio.run(main(parser.parse_args().search_threads))

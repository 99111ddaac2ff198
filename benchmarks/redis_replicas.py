"""Two replicas on one redis-server: how soon a write on A is a hit on B, and requests per
second per replica on the cache-hit paths (Redis backend vs the embedded store).

    python -m benchmarks.redis_replicas --writes 500 --requests 4000

The embedder is the test HashEmbedder so the numbers are about storage and sync, not the
model; the MiniLM embedding, which a semantic lookup adds, is timed on its own at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from routecache.cache.embedder import MiniLMEmbedder
from routecache.domain import CacheOutcome
from routecache.router.pipeline import Pipeline
from tests.integration.replicas import (
    ACME,
    ask,
    real_clock,
    replica_settings,
    start_replica,
)
from tests.redis_fixture import temporary_redis_server


def unique_prompt() -> str:
    """Words no other prompt shares, so no write is a semantic hit on an earlier one."""
    return " ".join(uuid.uuid4().hex for _ in range(3))


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.95, 0.99)]
    return "p50 {:.2f}  p95 {:.2f}  p99 {:.2f}  max {:.2f} ms".format(
        *(v * 1000 for v in pick), ordered[-1] * 1000
    )


async def sync_delay(url: str, writes: int) -> None:
    clock = real_clock()
    settings = replica_settings(url, max_entries=10 * writes)
    # The 64-d test embedder collides now and then; only exact repeats may hit here.
    settings.cache.similarity_threshold = 0.999
    a = await start_replica(settings, clock)
    b = await start_replica(settings, clock)
    stores, delays = [], []
    for n in range(writes):
        started = time.perf_counter()
        done = await a.service.pipeline.complete(ask(unique_prompt()), ACME)
        acknowledged = time.perf_counter()
        assert done.cache.outcome is CacheOutcome.MISS, (n, done.cache)
        # Polling is the measurement: B's sync task signals nothing a benchmark could await.
        while len(b.index) < n + 1:  # noqa: ASYNC110
            await asyncio.sleep(0)
        delays.append(time.perf_counter() - acknowledged)
        stores.append(acknowledged - started)
    print(f"write on A (miss + store), {writes} writes: {percentiles(stores)}")
    print(f"A acknowledged → in B's index:            {percentiles(delays)}")
    await a.service.aclose()
    await b.service.aclose()


async def throughput(pipeline: Pipeline, requests: int, concurrency: int, prompts: int) -> float:
    texts = [unique_prompt() for _ in range(prompts)]
    for text in texts:
        await pipeline.complete(ask(text), ACME)
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            n = queue.pop()
            done = await pipeline.complete(ask(texts[n % prompts]), ACME)
            assert done.cache.outcome is CacheOutcome.EXACT

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def qps(url: str, requests: int) -> None:
    for backend in ("memory", "redis"):
        clock = real_clock()
        settings = replica_settings(url, max_entries=100_000)
        settings.cache.similarity_threshold = 0.999
        for tenant in settings.tenants:  # the limiter stays in the path, but never refuses
            tenant.requests_per_second = 1e6
        settings.store.backend = backend
        replica = await start_replica(settings, clock)
        rate = await throughput(replica.service.pipeline, requests, 16, 200)
        print(f"exact-hit requests/s, one replica, {backend:<6} store: {rate:,.0f}")
        await replica.service.aclose()


def minilm_cost(queries: int) -> None:
    embedder = MiniLMEmbedder()
    embedder.encode(["warm up"])
    started = time.perf_counter()
    for n in range(queries):
        embedder.encode([f"How do I reset the password of account number {n}?"])
    per_query = (time.perf_counter() - started) / queries
    print(f"MiniLM embedding, one query at a time:     {per_query * 1000:.1f} ms "
          f"(≤ {1 / per_query:,.0f} semantic lookups/s per replica)")  # fmt: skip


async def main(writes: int, requests: int, minilm: bool) -> None:
    # As a production Redis would run: append-only, fsync once a second.
    with temporary_redis_server(appendfsync="everysec") as url:
        await sync_delay(url, writes)
        await qps(url, requests)
    if minilm:
        minilm_cost(200)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.writes, args.requests, not args.no_minilm))

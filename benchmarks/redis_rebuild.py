"""How long a replica takes to rebuild its FAISS index from Redis, and what an entry costs.

Starts its own redis-server (no persistence) on a free loopback port, bulk-loads N synthetic
entries in the exact layout RedisEntryStore writes (random unit 384-d vectors, ~200-character
prompt and ~400-character answer, spread over tenants and scopes), then times
ReplicaSync.rebuild() into a fresh ScopedFaissIndex.

    python -m benchmarks.redis_rebuild --entries 100000
    python -m benchmarks.redis_rebuild --entries 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisLink
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions, encode_entry
from routecache.backends.replica_sync import ReplicaSync
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.ports import CacheEntry
from routecache.domain import Tier
from tests.redis_fixture import temporary_redis_server

DIMENSION = 384
PROMPT = "How should I configure the retry policy of my payment service when the bank times out? "
ANSWER = "Use exponential backoff with jitter, cap the attempts, and make the call idempotent. " * 5


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# Writes a batch of entries server-side from one template (fields as RedisEntryStore writes
# them): loading 1M entries one HSET at a time from Python takes longer than the rebuild.
FILL = """
local base, first, count, scopes, now, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), ARGV[5], ARGV[6]
local tenant, blob, dim_bytes = ARGV[7], ARGV[8], tonumber(ARGV[9])
local template = {}
for i = 10, #ARGV do template[#template + 1] = ARGV[i] end
for k = 0, count - 1 do
  local n = first + k
  local id = tenant .. ':' .. string.format('%032x', n)
  local scope = tenant .. ':' .. string.format('%032x', n % scopes)
  local xr = base .. 'x:' .. string.format('%032x', n % scopes) .. ':' .. string.format('%064x', n)
  local fields = {}
  for i = 1, #template, 2 do
    local name, value = template[i], template[i + 1]
    if name == 'id' then value = id
    elseif name == 'scope' then value = scope
    elseif name == 'xk' then value = scope .. ':' .. string.format('%064x', n)
    elseif name == 'xr' then value = xr
    elseif name == 'prompt' then value = value .. n
    elseif name == 'emb' then value = string.sub(blob, k * dim_bytes + 1, (k + 1) * dim_bytes)
    end
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('HSET', base .. 'e:' .. id, unpack(fields))
  redis.call('SET', xr, id)
  redis.call('ZADD', base .. 'lru', now, id)
  redis.call('ZADD', base .. 'exp', expires, id)
end
return count
"""


async def bulk_load(client: aioredis.Redis, entries: int, tenants: int, scopes: int) -> None:
    keyspace, rng, now = KeySpace(), np.random.default_rng(7), time.time()
    fill = client.register_script(FILL)
    batch = 1000
    for tenant_number in range(tenants):
        tenant = f"tenant{tenant_number}"
        keys = keyspace.of(tenant)
        template = encode_entry(
            CacheEntry(
                entry_id="", tenant=tenant, scope="", exact_key=f"{tenant}:", prompt=PROMPT,
                answer=ANSWER, model="mixtral-8x7b-instruct", tier=Tier.CHEAP,
                embedding=np.zeros(DIMENSION, dtype=np.float32), created_at=now,
                expires_at=now + 86400, cost_usd=0.0004, prompt_tokens=40, completion_tokens=90,
            ),
            keys,
        )  # fmt: skip
        share = entries // tenants + (1 if tenant_number < entries % tenants else 0)
        for first in range(0, share, batch):
            count = min(batch, share - first)
            vectors = rng.standard_normal((count, DIMENSION)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            await fill(args=[keys.base, first, count, scopes, repr(now), repr(now + 86400),
                             tenant, vectors.tobytes(), DIMENSION * 4, *template])  # fmt: skip


async def main(entries: int, tenants: int, scopes: int) -> None:
    with temporary_redis_server(appendonly=False) as url:
        await measure(url, entries, tenants, scopes)


async def measure(url: str, entries: int, tenants: int, scopes: int) -> None:
    client = aioredis.Redis.from_url(url)
    # Entry hashes hold values up to ~2 KB (the embedding); listpack encoding keeps them
    # compact (docs/scaling.md: about 20% less memory than Redis' default hashtable encoding).
    await client.config_set("hash-max-listpack-value", 4096)
    base = int((await client.info("memory"))["used_memory"])
    started = time.perf_counter()
    await bulk_load(client, entries, tenants, scopes)
    load_s = time.perf_counter() - started
    used = int((await client.info("memory"))["used_memory"]) - base
    await client.aclose()

    link = RedisLink(url, timeout_seconds=30, max_connections=8, probe_interval_seconds=1)
    await link.connect()
    index = ScopedFaissIndex(DIMENSION)
    names = [f"tenant{t}" for t in range(tenants)]
    store = RedisEntryStore(link, KeySpace(), RedisStoreOptions(entries), time.time, "bench")
    sync = ReplicaSync(link, KeySpace(), names, index, store, "bench", time.time)
    sample = await store.get(f"tenant0:{0:032x}")  # the loaded layout is the store's own
    assert sample is not None and sample.scope == f"tenant0:{0:032x}", "layout mismatch"
    rss_before = rss_bytes()
    started = time.perf_counter()
    loaded = await sync.rebuild()
    rebuild_s = time.perf_counter() - started
    rss_index = rss_bytes() - rss_before
    await link.aclose()
    print(f"entries                 {entries:>12,} ({tenants} tenants, {scopes} scopes each)")
    print(f"bulk load into redis    {load_s:>12.1f} s   ({entries / load_s:,.0f} entries/s)")
    print(f"redis memory            {used / 2**20:>12,.0f} MiB ({used / entries:,.0f} bytes/entry,"
          f" {2**30 / (used / entries):,.0f} entries/GiB)")  # fmt: skip
    print(f"index rebuild           {rebuild_s:>12.1f} s   ({loaded / rebuild_s:,.0f} entries/s,"
          f" {loaded:,} loaded)")  # fmt: skip
    print(
        f"replica memory (index)  {rss_index / 2**20:>12,.0f} MiB ({rss_index / entries:,.0f}"
        " bytes/entry)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--scopes", type=int, default=1000, help="scopes per tenant")
    args = parser.parse_args()
    asyncio.run(main(args.entries, args.tenants, args.scopes))

"""Which entry to evict at the size bound: hit rate of LRU (last use, what the stores do),
LFU (hit count) and FIFO (age) on a request stream, at several bounds.

The stream is synthetic and says so: question popularity follows a Zipf law (s=1.1, typical
of query logs) and the popular set drifts (every `--drift` requests a tenth of the ranks are
re-drawn, as topics trend and fade). Repeat this with a real log of (time, exact key) when a
deployment has one: the stores record hit_count and last_hit per entry for exactly that.

    python -m benchmarks.eviction_policy
"""

from __future__ import annotations

import argparse
import heapq
from collections import OrderedDict

import numpy as np


def stream(requests: int, universe: int, drift: int, seed: int = 11) -> list[int]:
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, size=requests * 2)
    ranks = ranks[ranks <= universe][:requests] - 1
    mapping = rng.permutation(universe)
    out = []
    for n, rank in enumerate(ranks):
        if n and n % drift == 0:
            moved = rng.choice(universe, size=universe // 10, replace=False)
            mapping[moved] = rng.permutation(mapping[moved])
        out.append(int(mapping[rank]))
    return out


def hit_rate(requests: list[int], bound: int, policy: str) -> float:
    cache: OrderedDict[int, int] = OrderedDict()  # key → hits while cached
    by_hits: list[tuple[int, int, int]] = []  # LFU heap of (hits, seq, key), stale rows skipped
    hits = 0
    for seq, key in enumerate(requests):
        if key in cache:
            hits += 1
            cache[key] += 1
            if policy == "lru":
                cache.move_to_end(key)
            elif policy == "lfu":
                heapq.heappush(by_hits, (cache[key], seq, key))
            continue
        if len(cache) >= bound:
            del cache[_victim(cache, by_hits, policy)]
        cache[key] = 0
        if policy == "lfu":
            heapq.heappush(by_hits, (0, seq, key))
    return hits / len(requests)


def _victim(cache: OrderedDict[int, int], by_hits: list[tuple[int, int, int]], policy: str) -> int:
    if policy != "lfu":  # lru: the front is least recently used; fifo: the front is oldest
        return next(iter(cache))
    while True:
        count, _, key = heapq.heappop(by_hits)
        if cache.get(key) == count:
            return key


def main(requests: int, universe: int, drift: int) -> None:
    log = stream(requests, universe, drift)
    print(f"{requests:,} requests over {universe:,} questions, drift every {drift:,}")
    print("bound (share of questions)   LRU      LFU      FIFO")
    for share in (0.01, 0.05, 0.2):
        bound = int(universe * share)
        rates = [hit_rate(log, bound, p) for p in ("lru", "lfu", "fifo")]
        print(f"{bound:>8,} ({share:>4.0%})              " +
              "  ".join(f"{r:6.1%}" for r in rates))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--universe", type=int, default=50_000)
    parser.add_argument("--drift", type=int, default=20_000)
    args = parser.parse_args()
    main(args.requests, args.universe, args.drift)

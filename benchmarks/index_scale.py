"""Vector search at scale: build time, memory per entry, lookup latency and recall, flat vs IVF.

    python -m benchmarks.index_scale [--sizes 10000,50000,100000,1000000] [--queries 1000]

Vectors are random unit vectors in 384 dimensions (the MiniLM size); queries are stored vectors
moved to cosine ~0.9 from the original, i.e. the near-duplicates a cache lookup looks for.
Recall@1 counts queries whose nearest neighbour is the original. Memory is the growth of the
process's resident set while the scope is filled, divided by the entries.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import faiss
import numpy as np

from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex

DIMENSION = 384


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def unit(rows: np.ndarray) -> np.ndarray:
    normed: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return normed


def near_duplicates(stored: np.ndarray, rng: np.random.Generator, cosine: float) -> np.ndarray:
    noise = unit(rng.normal(size=stored.shape))
    noise -= (noise * stored).sum(axis=1, keepdims=True) * stored  # orthogonal part only
    return unit(cosine * stored + np.sqrt(1 - cosine**2) * unit(noise))


def measure(size: int, queries: int, policy: IndexPolicy, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    index = ScopedFaissIndex(DIMENSION, policy)
    before = rss_bytes()
    start = time.perf_counter()
    for chunk in range(0, size, 100_000):
        rows = unit(rng.normal(size=(min(100_000, size - chunk), DIMENSION)))
        index.add_many("scope", [f"e{chunk + i}" for i in range(len(rows))], rows)
        if chunk == 0:
            sample = rows[: min(queries, len(rows))].copy()
    index.wait_for_rebuilds()
    build_s = time.perf_counter() - start
    grown = rss_bytes() - before
    probes = near_duplicates(sample, rng, 0.9)
    latencies, found = [], 0
    for i, probe in enumerate(probes):
        t = time.perf_counter()
        best = index.search("scope", probe, 1)
        latencies.append((time.perf_counter() - t) * 1000)
        found += bool(best) and best[0].entry_id == f"e{i}"
    latencies.sort()
    return {
        "entries": size,
        "kind": index.kind("scope"),
        "build_s": round(build_s, 2),
        "bytes_per_entry": round(grown / size),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
        "recall_at_1": round(found / len(probes), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nprobe", type=int, default=IndexPolicy().nprobe)
    parser.add_argument("--flat-only", action="store_true", help="never switch to IVF")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (as served)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    threshold = 10**12 if args.flat_only else IndexPolicy().ivf_threshold
    policy = IndexPolicy(ivf_threshold=threshold, nprobe=args.nprobe)
    print("entries   index  build_s  bytes/entry  p50_ms  p99_ms  recall@1")
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.queries, policy)
        print(
            f"{r['entries']:>8}  {r['kind']:>5}  {r['build_s']:>7}  {r['bytes_per_entry']:>11}"
            f"  {r['p50_ms']:>6}  {r['p99_ms']:>6}  {r['recall_at_1']:>8}",
            flush=True,
        )


if __name__ == "__main__":
    main()

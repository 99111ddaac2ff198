"""routecache against GPTCache on the same query stream, in one run on one machine.

    python -m benchmarks.vs_gptcache [--pairs ../shared/data/cache/qqp_dev.jsonl] [--seeded 300]
        [--queries 300] [--concurrency 1,64]

Both sides use the same all-MiniLM-L6-v2 (GPTCache gets routecache's ONNX encoder as its
embedding function, since its own ONNX model would come from a hub), FAISS, and the same replay
upstream over HTTP for misses. GPTCache runs as its documented similar-cache setup (SQLite +
FAISS data manager, SearchDistanceEvaluation, default Config), in this process, called from a
thread pool; a miss is get() → upstream call → put(), the code a GPTCache user writes.
routecache runs as `routecache serve` in a child process and is called over gRPC, so its figures
include a network hop that GPTCache's do not.

The stream (benchmarks.grpc_load's Workload): seed prompts are stored first; hit queries are
Quora duplicates of the seeds that routecache's verifier accepts (`--pairs`), or the seeds behind
a short preamble; miss queries are GSM8K prompts that were never stored (routecache: no_store, so
they stay misses).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.grpc_load import PathResults, Workload, add_stream_arguments, closed_loop, seed
from benchmarks.stack import running_stack
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
from routecache.client import RouteCacheClient
from routecache.replay.config import ReplayConfig
from routecache.replay.server import start_replay_server


def gptcache_instance(directory: Path, embedder: OnnxMiniLMEmbedder) -> Any:
    from gptcache import Cache, Config
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    def embed(text: str, **_: Any) -> np.ndarray:
        vector: np.ndarray = embedder.encode([text])[0]
        return vector

    manager = get_data_manager(
        CacheBase("sqlite", sql_url=f"sqlite:///{directory / 'gptcache.db'}"),
        VectorBase("faiss", dimension=embedder.dimension, index_path=str(directory / "faiss")),
        max_size=100_000,
    )
    cache = Cache()
    cache.init(
        pre_embedding_func=get_prompt,
        embedding_func=embed,
        data_manager=manager,
        similarity_evaluation=SearchDistanceEvaluation(),
        config=Config(),
    )
    return cache


class GptCacheSide:
    def __init__(self, cache: Any, upstream_url: str) -> None:
        from gptcache.adapter import api

        self._api = api
        self._cache = cache
        self._http = httpx.Client(base_url=upstream_url, timeout=30)

    def close(self) -> None:
        self._cache.flush()
        self._http.close()

    def ask(self, prompt: str, store: bool = True) -> str:
        hit = self._api.get(prompt, cache_obj=self._cache)
        if hit is not None:
            return "hit"
        self._call(prompt, store)
        return "miss"

    def seed(self, prompt: str) -> str:
        """Store a seed without looking it up first, as routecache's seeding does (no_cache)."""
        self._call(prompt, store=True)
        return "miss"

    def _call(self, prompt: str, store: bool) -> None:
        reply = self._http.post(
            "/chat/completions",
            json={"model": "gpt-4-1106-preview", "messages": [{"role": "user", "content": prompt}]},
        )
        reply.raise_for_status()
        if store:
            answer = reply.json()["choices"][0]["message"]["content"]
            self._api.put(prompt, answer, cache_obj=self._cache)


def run_threads(
    call: Callable[[str], str], prompts: Sequence[str], concurrency: int
) -> tuple[dict[str, PathResults], float]:
    results: dict[str, PathResults] = {"hit": PathResults(), "miss": PathResults()}

    def one(prompt: str) -> None:
        start = time.perf_counter()
        try:
            outcome = call(prompt)
        except Exception as error:  # GPTCache's SQLite store can fail under concurrent callers
            results.setdefault("error", PathResults()).errors[type(error).__name__] += 1
            return
        results[outcome].record((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts))
    return results, time.perf_counter() - start


async def gptcache_side(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    replay = await start_replay_server(ReplayConfig())
    report: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            side = GptCacheSide(
                gptcache_instance(Path(scratch), OnnxMiniLMEmbedder()), replay.base_url
            )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, run_threads, side.seed, workload.seeded, 8)
            for c in args.concurrency:
                hits = workload.semantic[: args.queries]
                misses = workload.unseeded[: args.queries]
                for name, prompts, call in (
                    ("hit", hits, side.ask),
                    ("miss", misses, lambda p: side.ask(p, store=False)),
                ):
                    results, seconds = await loop.run_in_executor(
                        None, run_threads, call, prompts, c
                    )
                    report[f"{name}@{c}"] = {k: r.summary(seconds) for k, r in results.items()}
            side.close()
    finally:
        await replay.close()
    return report


async def routecache_side(
    target: str, key: str, workload: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with RouteCacheClient(target, key, timeout_seconds=60) as client:
        await seed(client, workload)
        for c in args.concurrency:
            for name, path in (("hit", "semantic"), ("miss", "miss")):
                make = functools.partial(workload.request, path)
                results, seconds = await closed_loop(client, make, c, args.queries, 300)
                report[f"{name}@{c}"] = {k: r.summary(seconds) for k, r in results.items()}
    return report


def print_table(name: str, report: dict[str, Any]) -> None:
    for key, paths in report.items():
        for path, s in sorted(paths.items()):
            if s.get("errors"):
                print(f"{name:10} {key:9} {path:12} errors={s['errors']}", flush=True)
            if s.get("count"):
                print(
                    f"{name:10} {key:9} {path:12} n={s['count']:4.0f} p50={s['p50_ms']:7.2f} "
                    f"p99={s['p99_ms']:7.2f} ms  {s['throughput_per_s']:6.0f}/s",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(parser)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 64]
    )
    args = parser.parse_args()
    workload = Workload.from_args(args)
    print_table("gptcache", asyncio.run(gptcache_side(workload, args)))
    with running_stack() as stack:
        ours = asyncio.run(routecache_side(stack.target, stack.api_key, workload, args))
    print_table("routecache", ours)


if __name__ == "__main__":
    main()

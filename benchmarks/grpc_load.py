"""Drive a real `routecache serve` over gRPC and print latency and throughput per path.

    python -m benchmarks.grpc_load [--pairs ../shared/data/cache/qqp_dev.jsonl]
        [--levels 1,8,32,64,100,256] [--requests 400] [--seconds 15]
        [--soak-seconds 60 --soak-clients 100] [--out results.json]

It starts the replay upstream and the server as child processes (benchmarks/stack.py), seeds
the cache, then for each concurrency runs a closed loop per path:

- exact hit: a seeded prompt again, word for word;
- semantic hit: with `--pairs`, the partner of a seeded Quora question in a duplicate pair that
  the hit verifier accepts (benchmarks/paraphrase_stream.py); without it, a seeded GSM8K prompt
  behind a short preamble ("Quick question: ..."), which the verifier mostly refuses;
- miss: an unseeded recorded prompt with no_store, so it stays a miss on every repeat and goes
  through classifier, upstream and validators.

Each response is counted under the path the server reports (cache outcome and tier), not the
path it was meant for, and beside the client-side latency each line shows the server's own p50
per stage (total, embed, search: from the response's latency breakdown), so queueing in the
server and time in transport can be told apart. Every level is bounded by a request count and
a time limit. The best embedding throughput outside the server is measured in the same run
first, so the semantic lookups at each concurrency can be compared with it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.stack import RunningStack, running_stack
from routecache.client import RouteCacheClient, chat_request
from routecache.replay.recordings import Recordings
from routecache.v1 import routecache_pb2 as pb

PREAMBLE = "Quick question: "
# The server's own timing of each answer (CompleteResponse.latency): with the client-side
# latency they show how much of a request is model work, how much queueing and transport.
SERVER_STAGES = ("total_ms", "embed_ms", "search_ms")


@dataclass
class PathResults:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    server_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def record(self, client_ms: float, latency: pb.LatencyBreakdown | None = None) -> None:
        self.latencies_ms.append(client_ms)
        if latency is not None:
            for stage in SERVER_STAGES:
                self.server_ms[stage].append(getattr(latency, stage))

    def summary(self, seconds: float) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return {"count": 0, "errors": sum(self.errors.values())}

        def pct(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

        return {
            "count": len(ordered),
            "errors": sum(self.errors.values()),
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "throughput_per_s": round(len(ordered) / seconds, 1),
            **{f"server_{stage}_p50": round(statistics.median(values), 2)
               for stage, values in self.server_ms.items() if values},
        }  # fmt: skip


def path_of(response: pb.CompleteResponse) -> str:
    if response.cache.outcome == pb.CACHE_OUTCOME_EXACT:
        return "exact"
    if response.cache.outcome == pb.CACHE_OUTCOME_SEMANTIC:
        return "semantic"
    return "miss_strong" if response.tier == pb.TIER_STRONG else "miss_cheap"


@dataclass(frozen=True)
class Workload:
    seeded: list[str]
    semantic: list[str]  # semantic[i] should hit seeded[i]
    unseeded: list[str]

    @classmethod
    def from_recordings(cls, seeded: int) -> Workload:
        prompts = sorted(set(Recordings.load().prompts()))
        chosen = prompts[:seeded]
        return cls(chosen, [PREAMBLE + p for p in chosen], prompts[seeded:])

    @classmethod
    def from_pairs(cls, pairs_path: Path, seeded: int) -> Workload:
        """Quora duplicates the verifier accepts; misses are still recorded GSM8K prompts."""
        from benchmarks.paraphrase_stream import accepted_duplicates

        pairs = accepted_duplicates(pairs_path, seeded)
        unseeded = sorted(set(Recordings.load().prompts()))
        return cls([p.cached for p in pairs], [p.query for p in pairs], unseeded)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        if args.pairs is not None:
            return cls.from_pairs(args.pairs, args.seeded)
        return cls.from_recordings(args.seeded)

    def request(self, path: str, i: int) -> pb.CompleteRequest:
        if path == "exact":
            return chat_request(self.seeded[i % len(self.seeded)])
        if path == "semantic":
            return chat_request(self.semantic[i % len(self.semantic)])
        return chat_request(self.unseeded[i % len(self.unseeded)], no_store=True)


async def closed_loop(
    client: RouteCacheClient,
    make: Callable[[int], pb.CompleteRequest],
    concurrency: int,
    requests: int,
    seconds: float,
) -> tuple[dict[str, PathResults], float]:
    """`concurrency` callers send back to back until `requests` are sent or time is up."""
    results: dict[str, PathResults] = defaultdict(PathResults)
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            await _one(client, make(i), results)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def open_loop(
    client: RouteCacheClient,
    make: Callable[[int], pb.CompleteRequest],
    rate: float,
    seconds: float,
) -> tuple[dict[str, PathResults], float]:
    """Requests start at a fixed rate whatever the server's pace (no coordinated omission)."""
    results: dict[str, PathResults] = defaultdict(PathResults)
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, make(i), results)))
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


async def _one(
    client: RouteCacheClient, request: pb.CompleteRequest, results: dict[str, PathResults]
) -> None:
    start = time.perf_counter()
    try:
        response = await client.complete(request)
    except grpc.aio.AioRpcError as error:
        results["error"].errors[error.code().name] += 1
        return
    results[path_of(response)].record((time.perf_counter() - start) * 1000, response.latency)


async def seed(client: RouteCacheClient, workload: Workload) -> None:
    """Store every seeded prompt. no_cache: a seed that would hit an earlier seed is still
    stored under its own text, so the exact path finds each one."""
    results, _ = await closed_loop(
        client,
        lambda i: chat_request(workload.seeded[i], no_cache=True),
        8,
        len(workload.seeded),
        300,
    )
    failed = sum(r.errors.get(k, 0) for r in results.values() for k in r.errors)
    if failed:
        raise RuntimeError(f"seeding failed on {failed} requests")


async def run_levels(
    stack: RunningStack, workload: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    report: dict[str, Any] = {"levels": {}, "open_loop": {}}
    async with RouteCacheClient(stack.target, stack.api_key, timeout_seconds=60) as client:
        await seed(client, workload)
        for concurrency in args.levels:
            level: dict[str, Any] = {}
            for path in ("exact", "semantic", "miss"):
                results, seconds = await closed_loop(
                    client,
                    functools.partial(workload.request, path),
                    concurrency,
                    max(args.requests, 2 * concurrency),
                    args.seconds,
                )
                level[path] = {name: r.summary(seconds) for name, r in results.items()}
                _print_line(concurrency, path, level[path])
            report["levels"][str(concurrency)] = level
        for rate in args.open_rates:
            results, seconds = await open_loop(
                client, lambda i: workload.request("semantic", i), rate, args.open_seconds
            )
            report["open_loop"][str(rate)] = {n: r.summary(seconds) for n, r in results.items()}
            _print_line(f"open {rate:g}/s", "semantic", report["open_loop"][str(rate)])
        if args.soak_seconds:
            report["soak"] = await soak(client, workload, args)
    return report


async def soak(
    client: RouteCacheClient, workload: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    """Many clients, mixed paths, for a fixed time: the count of errors is what matters."""
    paths = ("exact", "semantic", "semantic", "miss")
    results, seconds = await closed_loop(
        client,
        lambda i: workload.request(paths[i % len(paths)], i),
        args.soak_clients,
        10**9,
        args.soak_seconds,
    )
    summary = {name: r.summary(seconds) for name, r in results.items()}
    errors = sum(r.errors.get(k, 0) for r in results.values() for k in r.errors)
    total = sum(len(r.latencies_ms) for r in results.values())
    print(f"soak: {args.soak_clients} clients, {seconds:.0f} s, {total} requests, {errors} errors")
    return {"clients": args.soak_clients, "seconds": seconds, "requests": total,
            "errors": errors, "paths": summary}  # fmt: skip


def _print_line(level: object, path: str, summary: dict[str, dict[str, float]]) -> None:
    parts = []
    for name, s in sorted(summary.items()):
        if s.get("count"):
            parts.append(
                f"{name} n={s['count']:.0f} p50={s['p50_ms']:.1f} p95={s['p95_ms']:.1f} "
                f"p99={s['p99_ms']:.1f} ms {s['throughput_per_s']:.0f}/s" + _server_part(s)
            )
        if s.get("errors"):
            parts.append(f"{name} errors={s['errors']:.0f}")
    print(f"c={level!s:>6} {path:8}  " + "; ".join(parts), flush=True)


def _server_part(summary: dict[str, float]) -> str:
    """The server's own p50s, e.g. " [server p50: total 16.7, embed 6.5, search 9.1 ms]"."""
    if "server_total_ms_p50" not in summary:
        return ""
    stages = ", ".join(
        f"{stage.removesuffix('_ms')} {summary[f'server_{stage}_p50']:.1f}"
        for stage in SERVER_STAGES
    )
    return f" [server p50: {stages} ms]"


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeded", type=int, default=300, help="prompts put in the cache first")
    parser.add_argument("--pairs", type=Path, default=None,
                        help="labelled pairs (qqp format): semantic hits are duplicates the "
                        "verifier accepts (default: GSM8K prompts behind a preamble)")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--levels", type=ints, default=[1, 8, 32, 64, 100, 256])
    parser.add_argument("--requests", type=int, default=400, help="per level and path, at most")
    parser.add_argument("--seconds", type=float, default=15.0, help="per level and path, at most")
    add_stream_arguments(parser)
    parser.add_argument("--open-rates", type=floats, default=[], help="semantic, requests/s")
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--soak-seconds", type=float, default=0.0)
    parser.add_argument("--soak-clients", type=int, default=100)
    parser.add_argument("--embedding-baseline", action="store_true",
                        help="measure embedding throughput outside the server first")  # fmt: skip
    parser.add_argument("--server-toml", default="", help="extra TOML for the server's config")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workload = Workload.from_args(args)
    report: dict[str, Any] = {"stream": "qqp duplicates" if args.pairs else "gsm8k + preamble"}
    if args.embedding_baseline:
        from benchmarks.embedding_throughput import measure

        report["embedding"] = measure(1024, workload.semantic)
        print(
            f"embedding outside the server: best {report['embedding']['best_throughput_per_s']:.0f}"
            f" texts/s ({report['embedding']['best_setting']})",
            flush=True,
        )
    with running_stack(args.server_toml) as stack:
        report.update(asyncio.run(run_levels(stack, workload, args)))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()

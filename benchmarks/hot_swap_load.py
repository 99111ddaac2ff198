"""A bounded load run over real gRPC while the classifier is swapped back and forth.

    python benchmarks/hot_swap_load.py --registry DIR [--seconds 30] [--concurrency 8]
                                       [--swap-every 2.0]

DIR is a model registry (routecache retrain --registry DIR) holding at least two versions.
Starts the replay upstream and the service (packaged MiniLM embedder, classifier.registry_dir =
DIR, reload check every 0.2 s), then sends uncached requests from `concurrency` clients for
`seconds`, while alternately promoting two versions and rolling back every `swap-every` seconds.
Prints one JSON object: requests, failures (must be 0), swaps the service performed, the
versions seen in responses, the version GetStats reports at the end, and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from routecache.classifier.registry import ModelRegistry
from routecache.classifier.reloading import ReloadingClassifier
from routecache.client import RouteCacheClient, chat_request
from routecache.replay.config import ReplayConfig
from routecache.replay.server import start_replay_server
from routecache.router.bootstrap import start_service
from routecache.router.demo import demo_settings


async def _client_loop(
    client: RouteCacheClient, prompts: list[str], stop: float, out: dict[str, list[object]]
) -> None:
    rng = random.Random(id(client))
    while time.perf_counter() < stop:
        request = chat_request(rng.choice(prompts), no_cache=True, no_store=True)
        started = time.perf_counter()
        try:
            response = await client.complete(request)
        except grpc.aio.AioRpcError as error:
            out["failures"].append(f"{error.code().name}: {error.details()}")
            continue
        out["latency_ms"].append((time.perf_counter() - started) * 1000)
        out["versions"].append(response.classifier_version)


async def _swapper(registry: ModelRegistry, versions: list[str], stop: float, every: float) -> int:
    changes = 0
    while time.perf_counter() + every < stop:
        await asyncio.sleep(every)
        if changes % 3 == 2:
            registry.rollback()
        else:
            registry.promote(versions[changes % 2])
        changes += 1
    return changes


async def run(args: argparse.Namespace) -> dict[str, object]:
    registry = ModelRegistry(Path(args.registry))
    versions = registry.versions()[-2:]
    if len(versions) < 2:
        raise SystemExit(f"{args.registry} needs two versions (run routecache retrain twice)")
    registry.promote(versions[0])
    replay = await start_replay_server(ReplayConfig())
    keys = {"acme": secrets.token_urlsafe(16)}
    settings = demo_settings(replay.base_url, keys)
    settings.classifier.registry_dir = Path(args.registry)
    settings.classifier.reload_interval_seconds = 0.2
    service = await start_service(settings)
    assert service.server is not None and isinstance(service.classifier, ReloadingClassifier)
    target = f"127.0.0.1:{service.server.port}"
    clients = [RouteCacheClient(target, keys["acme"]) for _ in range(args.concurrency)]
    prompts = list(replay.recordings.prompts())
    out: dict[str, list[object]] = {"failures": [], "latency_ms": [], "versions": []}
    try:
        stop = time.perf_counter() + args.seconds
        loops = [_client_loop(c, prompts, stop, out) for c in clients]
        pointer_changes, *_ = await asyncio.gather(
            _swapper(registry, versions, stop, args.swap_every), *loops
        )
        stats = await clients[0].stats()
    finally:
        for client in clients:
            await client.close()
        swaps = service.classifier.swaps
        await service.aclose()
        await replay.close()
    latency = np.array(out["latency_ms"], dtype=float)
    return {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "requests": len(out["latency_ms"]) + len(out["failures"]),
        "failures": len(out["failures"]),
        "failure_examples": sorted(set(map(str, out["failures"])))[:5],
        "pointer_changes": pointer_changes,
        "swaps_in_service": swaps,
        "versions_in_responses": dict(Counter(map(str, out["versions"]))),
        "current_at_end": registry.current_version(),
        "getstats_version_at_end": stats.classifier_version,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
        "latency_ms_p99": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--swap-every", type=float, default=2.0)
    report = asyncio.run(run(parser.parse_args()))
    print(json.dumps(report))
    return 0 if report["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

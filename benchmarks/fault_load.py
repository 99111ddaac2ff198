"""A bounded load run over real gRPC with injected upstream faults.

The replay upstream injects a fault into `--fault-rate` of its answers (429, 500, 503, hangs,
malformed JSON, truncated bodies and streams, empty answers, drawn at random); the service
runs with its defaults for retries, breakers and fallbacks (cheap → backup → strong). Every
response must be either a valid answer (validation passed; or stale and flagged as such) or a
documented status (docs/failure-semantics.md) with a message saying what failed; anything else
is an unexplained error and makes the script exit 1. It also checks that no answer that failed
validation was stored.

    python benchmarks/fault_load.py --requests 1500 --fault-rate 0.2
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
from dataclasses import dataclass

import grpc

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import load_artifact, packaged_artifact_path
from routecache.client import RouteCacheClient, chat_request
from routecache.replay import FaultKind, ReplayConfig, start_replay_server
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, start_service
from routecache.router.events import InMemoryEventLog
from routecache.router.settings import load_settings
from routecache.v1 import routecache_pb2 as pb

SCHEMA = json.dumps({"type": "object", "required": ["answer"]})
# The messages a documented failure carries (see docs/failure-semantics.md).
DOCUMENTED = {
    "UNAVAILABLE": ("no provider answered", "the stream broke"),
    "FAILED_PRECONDITION": ("failed validation", "no answer passed validation"),
}


@dataclass(frozen=True)
class Outcome:
    kind: str  # ok, stale, flagged, UNAVAILABLE, FAILED_PRECONDITION, unexplained
    detail: str = ""
    seconds: float = 0.0


def check_answer(done: pb.CompleteResponse, wants_json: bool) -> Outcome:
    if done.cache.stale:
        return Outcome("stale")
    if not done.validation.passed:
        return Outcome("flagged")
    if not done.text.strip():
        return Outcome("unexplained", "empty text marked valid")
    if wants_json:
        try:
            if not isinstance(json.loads(done.text), dict):
                return Outcome("unexplained", "non-object marked valid")
        except ValueError:
            return Outcome("unexplained", "invalid JSON marked valid")
    return Outcome("ok")


async def one_call(client: RouteCacheClient, prompt: str, rng: random.Random) -> Outcome:
    wants_json, stream = rng.random() < 0.15, rng.random() < 0.2
    request = chat_request(prompt, json_schema=SCHEMA if wants_json else None)
    started = time.perf_counter()
    try:
        if stream:
            events = [e async for e in client.complete_stream(request)]
            final = events[-1].final
            if "".join(e.delta for e in events[:-1]) != final.text:
                return Outcome("unexplained", "streamed deltas differ from the final text")
            outcome = check_answer(final, wants_json)
        else:
            outcome = check_answer(await client.complete(request), wants_json)
    except grpc.aio.AioRpcError as error:
        code, details = error.code().name, error.details() or ""
        known = any(marker in details for marker in DOCUMENTED.get(code, ()))
        outcome = Outcome(code if known else "unexplained", f"{code}: {details[:300]}")
    return Outcome(outcome.kind, outcome.detail, time.perf_counter() - started)


async def run(args: argparse.Namespace) -> int:
    kinds = tuple(FaultKind)
    replay = await start_replay_server(
        ReplayConfig(fault_rate=args.fault_rate, fault_kinds=kinds, fault_seed=args.seed,
                     hang_seconds=5.0)
    )  # fmt: skip
    key = secrets.token_urlsafe(12)
    provider = {"base_url": replay.base_url, "timeout_seconds": 1.0, "read_timeout_seconds": 1.0}
    settings = load_settings(
        server={"port": 0},
        metrics={"port": 0},  # a free port: a running service may hold the default
        tenants=[{"name": "load", "api_key_sha256": [hash_api_key(key)]}],
        upstream={
            "cheap": {**provider, "model": "mixtral-8x7b-instruct",
                      "input_usd_per_mtok": 0.6, "output_usd_per_mtok": 0.6},
            "strong": {**provider, "model": "gpt-4-1106-preview",
                       "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0},
            "providers": {"backup": {**provider, "model": "mixtral-8x7b-instruct",
                                     "input_usd_per_mtok": 0.6, "output_usd_per_mtok": 0.6}},
            "cheap_fallbacks": ["backup"],
        },
    )  # fmt: skip
    events = InMemoryEventLog()
    # The run measures upstream fault handling; MiniLM costs ~0.3-1 s a prompt on a busy
    # 2-core machine and would dominate it. --minilm uses it anyway.
    embedder = None if args.minilm else HashEmbedder(384)  # the classifier's input size
    # Given in code, the packaged model scores the hash vectors unchecked (a service would
    # refuse it): routing on them is meaningless, but any spread of tiers does for a fault run.
    classifier = None if args.minilm else load_artifact(packaged_artifact_path())
    overrides = Overrides(embedder=embedder, classifier=classifier, events=events)
    service = await start_service(settings, overrides)
    assert service.server is not None
    rng = random.Random(args.seed)
    recorded = list(replay.recordings.prompts())
    # Half repeats, so cache hits and stale answers have a chance to appear.
    pool = rng.sample(recorded, min(len(recorded), args.requests // 2))
    prompts = [rng.choice(pool) for _ in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)
    client = RouteCacheClient(f"127.0.0.1:{service.server.port}", key,
                              timeout_seconds=args.deadline)  # fmt: skip

    async def bounded(prompt: str) -> Outcome:
        async with gate:
            return await one_call(client, prompt, random.Random(rng.random()))

    started = time.perf_counter()
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(bounded(p) for p in prompts)), args.max_seconds
        )
    finally:
        elapsed = time.perf_counter() - started
        await client.close()
        await service.aclose()
        await replay.close()
    return report(outcomes, events, replay.injected_faults, replay.chat_requests, elapsed, args)


def report(outcomes: list[Outcome], events: InMemoryEventLog, injected: Counter[FaultKind],
           upstream_requests: int, elapsed: float, args: argparse.Namespace) -> int:  # fmt: skip
    kinds = Counter(o.kind for o in outcomes)
    stored_failed = [
        e for e in events.events
        if e["kind"] == "completion" and not e["validation_passed"] and e["entry_id"]
    ]  # fmt: skip
    latencies = sorted(o.seconds for o in outcomes)
    print(f"requests {len(outcomes)} in {elapsed:.1f}s, concurrency {args.concurrency}, "
          f"deadline {args.deadline}s, fault rate {args.fault_rate}, "
          f"embedder {'minilm' if args.minilm else 'hash'}")  # fmt: skip
    print(
        f"upstream requests {upstream_requests}, faults injected {sum(injected.values())}: "
        + ", ".join(f"{k.value} {n}" for k, n in sorted(injected.items()))
    )
    print("outcomes: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]
    print(f"latency s: p50 {p50:.3f}  p99 {p99:.3f}  max {latencies[-1]:.3f}")
    for kind in ("UNAVAILABLE", "FAILED_PRECONDITION", "unexplained"):
        for outcome in [o for o in outcomes if o.kind == kind][:2]:
            print(f"  e.g. {kind}: {outcome.detail}")
    print(f"answers that failed validation but were stored: {len(stored_failed)}")
    over = sum(1 for o in outcomes if o.seconds > args.deadline + 0.5)
    print(f"responses later than the deadline + 0.5 s: {over}")
    bad = kinds["unexplained"] + len(stored_failed) + over
    print("RESULT: " + ("PASS" if bad == 0 else f"FAIL ({bad} unexplained)"))
    return 0 if bad == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--deadline", type=float, default=5.0, help="per-request gRPC deadline")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound of the run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--minilm", action="store_true", help="the real embedder (slow on CPU)")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()

"""`routecache demo`: the replay upstream and the service on the embedded default, driven over
real gRPC by mixed traffic, then a summary of hits, routing, cost and latency."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc

from routecache.client import RouteCacheClient, chat_request
from routecache.replay.config import ReplayConfig
from routecache.replay.server import start_replay_server
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import start_service
from routecache.router.demo_report import (
    DemoResult,
    DemoTally,
    own_entries,
    prompt_tokens,
    summarise,
    tally,
    wrong_hit,
)
from routecache.router.settings import Settings, embedded_settings
from routecache.v1 import routecache_pb2 as pb

ANSWER_SCHEMA = json.dumps(
    {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
)


@dataclass(frozen=True)
class Call:
    tenant: str
    kind: str  # what the call is meant to show; the summary checks the outcome against it
    request: pb.CompleteRequest
    original: str = ""  # a repeat's or a paraphrase's question: its answer is the right hit


def _questions() -> list[dict[str, Any]]:
    text = resources.files("routecache.router").joinpath("demo_data/questions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _reformat(prompt: str) -> str:
    """The same words with other case and spacing: the exact tier normalises these away."""
    return "  " + prompt.upper().replace(" ", "  ") + "  "


def build_traffic(recorded: Sequence[str], questions: Sequence[dict[str, Any]], seed: int,
                  n_recorded: int) -> list[list[Call]]:  # fmt: skip
    """Three phases: first asks, then repeats and paraphrases, then the second tenant's repeats."""
    rng = random.Random(seed)
    prompts = rng.sample(list(recorded), min(n_recorded, len(recorded)))
    first = [Call("acme", "first-ask", chat_request(p)) for p in prompts]
    first += [Call("acme", "first-ask", chat_request(q["question"])) for q in questions]
    first += [
        Call("acme", "json", chat_request(q["question"], json_schema=ANSWER_SCHEMA))
        for q in questions[:8]
    ]
    shared = prompts[: len(prompts) // 3]
    second = [Call("acme", "exact-repeat", chat_request(_reformat(p)), p) for p in prompts[::2]]
    second += [
        Call("acme", "paraphrase", chat_request(q["paraphrase"]), q["question"])
        if q["same_meaning"]
        else Call("acme", "different-question", chat_request(q["paraphrase"]))
        for q in questions
    ]
    second += [Call("globex", "other-tenant", chat_request(p)) for p in shared]
    third = [Call("globex", "exact-repeat", chat_request(p), p) for p in shared]
    for phase in (first, second, third):
        rng.shuffle(phase)
    return [first, second, third]


async def _send(clients: dict[str, RouteCacheClient], call: Call,
                gate: asyncio.Semaphore) -> DemoResult:  # fmt: skip
    async with gate:
        started = time.perf_counter()
        try:
            response = await clients[call.tenant].complete(call.request)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            response, code = None, error.code().name
        elapsed_ms = (time.perf_counter() - started) * 1000
    asked = call.request.messages[-1].content
    return DemoResult(call.tenant, call.kind, code, elapsed_ms, response,
                      prompt_tokens(call.request), asked, call.original)  # fmt: skip


def demo_settings(base_url: str, keys: dict[str, str], events_path: Path | None = None,
                  similarity_threshold: float | None = None) -> Settings:  # fmt: skip
    # A threshold given means the plain cosine cache, to compare against the hit verifier.
    cosine_only = {"similarity_threshold": similarity_threshold, "verifier": "off"}
    # The embedded default, not load_settings: ROUTECACHE_* variables or ROUTECACHE_CONFIG
    # meant for a deployment would point the demo at its Redis or turn off the metrics it reads.
    return embedded_settings(
        server={"host": "127.0.0.1", "port": 0},
        cache=cosine_only if similarity_threshold is not None else {},
        metrics={"host": "127.0.0.1", "port": 0},
        events={"path": events_path},
        upstream={
            "cheap": {"base_url": base_url, "model": "mixtral-8x7b-instruct",
                      "input_usd_per_mtok": 0.6, "output_usd_per_mtok": 0.6},
            "strong": {"base_url": base_url, "model": "gpt-4-1106-preview",
                       "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0},
        },
        tenants=[{"name": name, "api_key_sha256": [hash_api_key(key)]}
                 for name, key in keys.items()],
    )  # fmt: skip


@dataclass(frozen=True)
class DemoReport:
    text: str  # the printed summary
    tally: DemoTally
    metrics_text: str  # /metrics as scraped at the end of the run
    feedback: tuple[int, int]  # thumbs up, thumbs down sent


async def _send_feedback(clients: dict[str, RouteCacheClient],
                         results: Sequence[DemoResult]) -> tuple[int, int]:  # fmt: skip
    """What a user would say about the cached answers: thumbs down on a wrong hit (which also
    removes the entry), the summary's count of them; thumbs up on any other hit."""
    up = down = 0
    entries = own_entries(results)
    for result in results:
        response = result.response
        if response is None or response.cache.outcome == pb.CACHE_OUTCOME_MISS:
            continue
        good = not wrong_hit(result, entries)
        await clients[result.tenant].feedback(response.response_id, thumbs_up=good)
        up, down = up + int(good), down + int(not good)
    return up, down


async def scrape_metrics(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return str(reply.read().decode("utf-8"))

    return await asyncio.to_thread(get)


async def run_demo(n_recorded: int = 45, concurrency: int = 4, seed: int = 7,
                   upstream_latency_ms: int = 0,
                   events_out: Path | None = None,
                   similarity_threshold: float | None = None) -> DemoReport:  # fmt: skip
    """Runs the whole demo: traffic, then feedback on the hits; returns the summary."""
    # Whatever fails, what was started is closed (last first): a failed start of the service
    # left the replay upstream listening.
    async with contextlib.AsyncExitStack() as opened:
        replay = await start_replay_server(ReplayConfig(latency_ms=upstream_latency_ms))
        opened.push_async_callback(replay.close)
        keys = {"acme": secrets.token_urlsafe(16), "globex": secrets.token_urlsafe(16)}
        settings = demo_settings(replay.base_url, keys, events_out, similarity_threshold)
        service = await start_service(settings)
        opened.push_async_callback(service.aclose)
        assert service.server is not None and service.metrics_port is not None
        target = f"127.0.0.1:{service.server.port}"
        clients = {name: RouteCacheClient(target, key) for name, key in keys.items()}
        for client in clients.values():
            opened.push_async_callback(client.close)
        recorded = list(replay.recordings.prompts())
        phases = build_traffic(recorded, _questions(), seed, n_recorded)
        gate = asyncio.Semaphore(concurrency)
        results: list[DemoResult] = []
        started = time.perf_counter()
        for phase in phases:
            results += await asyncio.gather(*(_send(clients, c, gate) for c in phase))
        wall_s = time.perf_counter() - started
        feedback = await _send_feedback(clients, results)
        strong = service.settings.upstream.strong
        text = summarise(results, wall_s, strong.input_usd_per_mtok, strong.output_usd_per_mtok)
        text += f"\n  feedback sent      {feedback[0]} up, {feedback[1]} down (on the hits)"
        metrics_text = await scrape_metrics(service.metrics_port)
        return DemoReport(text, tally(results), metrics_text, feedback)

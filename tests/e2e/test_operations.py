"""Operating the service over real gRPC and HTTP: dependency health, stats, feedback, /metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from routecache.client import chat_request
from routecache.router.server import DEPENDENCIES
from routecache.v1 import routecache_pb2 as pb
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def test_every_dependency_reports_serving(stack: Stack) -> None:
    async with stack.client() as client:
        assert [await client.health(d) for d in DEPENDENCIES] == ["SERVING"] * len(DEPENDENCIES)


async def test_stats_top_entries_and_feedback_counts(stack: Stack) -> None:
    async with stack.client("globex") as client:
        await client.complete(chat_request("How many eyes does a bee have?"))  # not in the top 1
        first = await client.complete(chat_request("How many legs does a spider have?"))
        for _ in range(2):
            hit = await client.complete(chat_request("How many legs does a spider have?"))
        await client.feedback(hit.response_id, thumbs_up=True)
        stats = await client.stats(top_n=1)
    assert stats.thumbs_up >= 1
    [top] = stats.top_entries
    assert top.entry_id == first.cache.entry_id and top.hits >= 2
    assert top.saved_usd == pytest.approx(top.hits * first.usage.cost_usd)


async def test_thumbs_down_on_a_semantic_hit_removes_it(stack: Stack) -> None:
    async with stack.client() as client:
        await client.complete(chat_request("How do I change my email address?"))
        hit = await client.complete(chat_request("How can I change my email address?"))
        assert hit.cache.outcome == pb.CACHE_OUTCOME_SEMANTIC
        reply = await client.feedback(hit.response_id, thumbs_up=False, correction="Settings")
        assert reply.invalidated_entry_id == hit.cache.entry_id
        again = await client.complete(chat_request("How can I change my email address?"))
    assert again.cache.outcome == pb.CACHE_OUTCOME_MISS


async def test_metrics_endpoint_serves_the_series(stack: Stack) -> None:
    port = stack.service.metrics_port
    assert port is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    for series in ("routecache_request_latency_seconds_bucket", "routecache_requests_total",
                   "routecache_in_flight_requests", "routecache_queue_depth"):  # fmt: skip
        assert series in text

"""Redis killed or slow under load: requests keep being answered, the cache dependency's
health says so, and everything comes back, with nothing acknowledged lost, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from routecache.domain import CacheOutcome, Completion
from routecache.router.metrics import PrometheusTelemetry
from routecache.router.server import CACHE_HEALTH_NAME, SERVICE_NAME
from tests.fakes import ManualClock
from tests.integration.replicas import (
    ACME,
    Replica,
    ask,
    eventually,
    real_clock,
    replica_settings,
    start_grpc_replica,
    start_replica,
)
from tests.redis_fixture import RedisServer, free_port

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def clock() -> ManualClock:
    return real_clock()


@pytest.fixture
async def replica(own_redis_server: RedisServer, clock: ManualClock) -> AsyncIterator[Replica]:
    started = await start_grpc_replica(replica_settings(own_redis_server.url), clock)
    yield started
    await started.service.aclose()


async def health_of(replica: Replica, name: str) -> int:
    assert replica.service.server is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.service.server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub lists no methods
        status: int = reply.status
        return status


def redis_up_metric(replica: Replica) -> float | None:
    telemetry = replica.service.telemetry
    assert isinstance(telemetry, PrometheusTelemetry)
    return telemetry.registry.get_sample_value("routecache_dependency_up", {"dependency": "redis"})


def stream_events(server: RedisServer) -> list[dict[str, object]]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return [json.loads(f[b"data"]) for _, f in client.xrange("rc:{acme}:events")]  # type: ignore[union-attr]  # redis-py types a sync client's reply Awaitable | Any
    finally:
        client.close()


PROMPTS = [f"question number {n} about topic {n * 7 % 13}" for n in range(40)]


async def test_killing_redis_under_load_fails_no_request_and_loses_nothing(
    replica: Replica, own_redis_server: RedisServer, clock: ManualClock
) -> None:
    pipeline = replica.service.pipeline
    answered: list[Completion] = []

    async def batch(start: int) -> None:
        requests = [ask(PROMPTS[(start + i) % len(PROMPTS)]) for i in range(8)]
        answered.extend(await asyncio.gather(*(pipeline.complete(r, ACME) for r in requests)))

    for n in range(10):  # Redis up: misses are stored, repeats hit
        await batch(n * 8)
    acknowledged = {c.cache.entry_id for c in answered if c.cache.entry_id}
    assert acknowledged and any(c.cache.outcome is not CacheOutcome.MISS for c in answered)

    await asyncio.gather(batch(80), asyncio.to_thread(own_redis_server.kill))
    for n in range(11, 20):  # Redis down: every request still answered, cache bypassed
        await batch(n * 8)
    assert await health_of(replica, CACHE_HEALTH_NAME) == NOT_SERVING
    assert await health_of(replica, "") == SERVING
    assert await health_of(replica, SERVICE_NAME) == SERVING
    assert pipeline.cache.bypassed > 0
    assert redis_up_metric(replica) == 0.0

    await asyncio.gather(batch(160), asyncio.to_thread(own_redis_server.start))
    await eventually(lambda: replica.service.storage.link.up, "redis seen up again")  # type: ignore[attr-defined]
    for n in range(21, 30):
        await batch(n * 8)
    assert len(answered) == 30 * 8  # zero failed requests: gather raises on any failure

    # The cache resumes: the entries acknowledged before the kill are there and served.
    for entry_id in acknowledged:
        assert await pipeline.cache.get("acme", entry_id) is not None
    again = await pipeline.complete(ask(PROMPTS[0]), ACME)
    assert again.cache.outcome is CacheOutcome.EXACT
    assert await health_of(replica, CACHE_HEALTH_NAME) == SERVING
    assert redis_up_metric(replica) == 1.0

    # Events buffered during the outage were flushed: one per answered request, none lost.
    responses = {c.response_id for c in [*answered, again]}
    await eventually(
        lambda: responses <= {e["response_id"] for e in stream_events(own_redis_server)},
        "every completion event in the Redis stream",
    )
    # Spend recorded during the outage reached Redis too.
    spent = sum(c.usage.cost_usd for c in answered)
    day = dt.datetime.fromtimestamp(clock(), tz=dt.UTC).date().isoformat()
    await eventually(
        lambda: _redis_cost(own_redis_server, f"rc:{{acme}}:spend:d:{day}") == pytest.approx(spent),
        "all spend in Redis",
    )


def _redis_cost(server: RedisServer, key: str) -> float:
    """The `cost` field of a spend hash (docs/redis-keys.md)."""
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return float(client.hget(key, "cost") or 0.0)  # type: ignore[arg-type]  # redis-py types a sync client's reply Awaitable | Any
    finally:
        client.close()


async def test_slow_redis_is_bypassed_then_used_again(
    replica: Replica, own_redis_server: RedisServer
) -> None:
    pipeline = replica.service.pipeline
    first = await pipeline.complete(ask("a question before the stall"), ACME)

    # 3 s: the request below must reach Redis while it stalls, after the reserve's timeout
    # and the embedding; with 1 s a loaded host (load ~6) reached it after the stall ended.
    stalling = asyncio.create_task(asyncio.to_thread(own_redis_server.debug_sleep, 3.0))
    await asyncio.to_thread(own_redis_server.wait_stalled)
    during = await pipeline.complete(ask("a question during the stall"), ACME)
    assert during.text and pipeline.cache.bypassed > 0
    await stalling
    await eventually(lambda: replica.service.storage.link.up, "redis answers again")  # type: ignore[attr-defined]
    after = await pipeline.complete(ask("a question before the stall"), ACME)
    assert after.cache.outcome is CacheOutcome.EXACT
    assert after.cache.entry_id == first.cache.entry_id


async def test_a_replica_started_while_redis_is_down_serves_and_catches_up(
    own_redis_server: RedisServer, clock: ManualClock
) -> None:
    settings = replica_settings(own_redis_server.url)
    writer = await start_grpc_replica(settings, clock)
    stored = await writer.service.pipeline.complete(ask("written before the outage"), ACME)
    await writer.service.aclose()
    own_redis_server.kill()
    late = await start_grpc_replica(settings, clock)
    try:
        assert await health_of(late, "") == SERVING
        assert await health_of(late, CACHE_HEALTH_NAME) == NOT_SERVING
        answer = await late.service.pipeline.complete(ask("asked during the outage"), ACME)
        assert answer.cache.outcome is CacheOutcome.MISS
        await asyncio.to_thread(own_redis_server.start)  # the append-only file brings it back
        await eventually(lambda: len(late.index) == 1, "index rebuilt once redis is back")
        near = await late.service.pipeline.complete(ask("written before the outage please"), ACME)
        assert near.cache.outcome is CacheOutcome.SEMANTIC
        assert near.cache.entry_id == stored.cache.entry_id
        assert await health_of(late, CACHE_HEALTH_NAME) == SERVING
    finally:
        await late.service.aclose()


async def test_a_replica_whose_index_rebuild_redis_refuses_keeps_using_redis_and_rebuilds_later(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    settings = replica_settings(redis_server.url)
    writer = await start_replica(settings, clock)
    stored = await writer.service.pipeline.complete(ask("written before the start"), ACME)
    await writer.service.aclose()
    with contextlib.ExitStack() as refusing:
        refusing.enter_context(redis_server.denied("xrevrange"))  # the rebuild's first read
        late = await start_replica(settings, clock)
        try:
            link = late.service.storage.link  # type: ignore[attr-defined]
            assert link.up and link.failures == 0  # refused, not down: the cache stays in use
            exact = await late.service.pipeline.complete(ask("written before the start"), ACME)
            assert exact.cache.entry_id == stored.cache.entry_id
            assert len(late.index) == 0
            refusing.close()  # Redis allows it again
            await eventually(lambda: len(late.index) == 1, "index rebuilt once redis allows it")
            assert link.failures == 0
        finally:
            await late.service.aclose()


async def test_health_is_not_serving_until_the_index_is_rebuilt(
    own_redis_server: RedisServer, clock: ManualClock
) -> None:
    port = free_port()
    settings = replica_settings(own_redis_server.url, timeout_seconds=10.0)
    settings.server.port = port
    # Redis stalls for 3 s (within the timeout): the rebuild waits, the server is already up.
    stall = asyncio.create_task(asyncio.to_thread(own_redis_server.debug_sleep, 3.0))
    await asyncio.to_thread(own_redis_server.wait_stalled)
    starting = asyncio.create_task(start_grpc_replica(settings, clock))
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not starting.done():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub lists no methods
                seen.append(reply.status)
            except grpc.aio.AioRpcError:
                pass  # not listening yet, or no status set yet
            await asyncio.sleep(0.05)
        replica = await starting
        try:
            assert NOT_SERVING in seen
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub lists no methods
            assert reply.status == SERVING
        finally:
            await replica.service.aclose()
    await stall


def scraped(replica: Replica) -> dict[str, float]:
    """The replica's /metrics over HTTP, as an operator's scrape sees it: unlabelled samples."""
    port = replica.service.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_writes_redis_refuses_show_in_the_metrics_while_health_stays_serving(
    replica: Replica, own_redis_server: RedisServer
) -> None:
    # Out of memory under `noeviction`: the link stays up and health SERVING, so before these
    # counters only a WARNING line a minute showed that every write took its degraded path.
    before = await asyncio.to_thread(scraped, replica)
    assert before["routecache_redis_refusals_total"] == 0
    with own_redis_server.out_of_memory():
        answer = await replica.service.pipeline.complete(ask("asked while redis is full"), ACME)
        assert answer.text and await health_of(replica, CACHE_HEALTH_NAME) == SERVING
        after = await asyncio.to_thread(scraped, replica)
    # Refused at least: the rate-limit take and the spend (the events' write may follow).
    assert after["routecache_redis_refusals_total"] >= 2
    assert after["routecache_rate_limit_fallbacks_total"] == 1
    assert after["routecache_redis_failures_total"] == 0
    assert after["routecache_events_dropped_total"] == 0  # kept in the buffer, not lost
    assert redis_up_metric(replica) == 1.0

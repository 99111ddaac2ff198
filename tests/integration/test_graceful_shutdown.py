"""SIGTERM while requests are in flight: `python -m routecache serve` (a real subprocess, with
the replay upstream as another) finishes every accepted request, refuses new ones, exits 0;
and the drain itself, in process over real gRPC: health is answered until the server stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.client import RouteCacheClient, chat_request
from routecache.domain import Tier
from routecache.router.bootstrap import Overrides, Service, start_service
from routecache.v1 import routecache_pb2 as pb
from tests.fakes import FakeUpstream
from tests.unit.conftest import KEYS, unit_settings

ROOT = Path(__file__).resolve().parents[2]
GRACE_SECONDS = 6.0

pytestmark = pytest.mark.integration


def test_sigterm_drains_accepted_requests_and_exits_zero() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sigterm_drain.py"), "--requests", "8",
         "--upstream-latency-ms", "1500", "--grace-seconds", "120", "--late", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=280, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["in_flight_at_sigterm"] >= 1  # SIGTERM really landed mid-run
    assert result["accepted_outcomes"] == {"OK": 8}
    # A late request that beat the signal is answered, and logged, like any other.
    late_answered = result["late_outcomes"].get("OK", 0)
    assert result["completion_events"] == 8 + late_answered
    assert result["exit_code"] == 0
    # Requests sent after SIGTERM are refused (or, if they beat the signal, answered): never cut.
    assert set(result["late_outcomes"]) <= {"UNAVAILABLE", "OK"}
    # The server ran with logging.format = "json": its own lines are JSON with a request id.
    lines = Path(result["serve_log"]).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert all("request_id" in r and "level" in r for r in records)
    assert any(r["message"].startswith("draining in-flight calls") for r in records)


@contextlib.asynccontextmanager
async def serving(
    cheap: FakeUpstream, grace_seconds: float = GRACE_SECONDS
) -> AsyncIterator[tuple[Service, str]]:
    settings = unit_settings(service={"server": {"port": 0, "grace_seconds": grace_seconds}})
    service = await start_service(settings, Overrides(
        embedder=HashEmbedder(),
        classifier=FixedScoreClassifier(0.2, version="v", default_threshold=0.5),
        upstreams={Tier.CHEAP: cheap, Tier.STRONG: FakeUpstream("strong-model")},
    ))  # fmt: skip
    assert service.server is not None
    try:
        yield service, f"127.0.0.1:{service.server.port}"
    finally:
        await service.aclose()


async def call_in_flight(
    service: Service, client: RouteCacheClient
) -> asyncio.Task[pb.CompleteResponse]:
    """A Complete sent and inside the pipeline (held there by the upstream's gate)."""
    in_flight = asyncio.create_task(client.complete(chat_request("a slow one")))
    while service.pipeline.in_flight.count == 0:  # noqa: ASYNC110  # no event to await
        await asyncio.sleep(0.01)
    return in_flight


async def health_of(target: str, name: str) -> str:
    """The status a new connection's health Check gets, or the error it ends with."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=name)
        try:
            reply = await stub.Check(request, timeout=3)  # type: ignore[attr-defined]  # the stub lists no methods
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_health_is_answered_and_new_calls_refused_while_calls_in_flight_drain() -> None:
    # Before: stop() closed the listener at once, so every health check of a draining pod was
    # refused (the liveness probe on routecache.embedder too, which must stay SERVING).
    gate = asyncio.Event()
    async with serving(FakeUpstream("cheap-model", gate=gate)) as (service, target):
        assert service.server is not None
        async with RouteCacheClient(target, KEYS["acme"], timeout_seconds=30) as client:
            in_flight = await call_in_flight(service, client)
            stopping = asyncio.create_task(service.server.stop())
            await asyncio.sleep(0.3)
            assert await health_of(target, "routecache.embedder") == "SERVING"
            assert await health_of(target, "") == "NOT_SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await client.complete(chat_request("sent during the drain"))
            assert not stopping.done()
            gate.set()
            answered = await in_flight
            await asyncio.wait_for(stopping, GRACE_SECONDS)
    assert answered.text
    assert late.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (late.value.details() or "")


async def test_a_call_still_running_at_the_drains_end_gets_its_last_second() -> None:
    # Before: a call still running when the drain (grace less the last second) ended was
    # cancelled at once, so with grace_seconds = 1 every call in flight was cut at SIGTERM.
    gate = asyncio.Event()
    async with serving(FakeUpstream("cheap-model", gate=gate), grace_seconds=1.0) as (
        service, target,
    ):  # fmt: skip
        assert service.server is not None
        async with RouteCacheClient(target, KEYS["acme"], timeout_seconds=30) as client:
            in_flight = await call_in_flight(service, client)
            stopping = asyncio.create_task(service.server.stop())
            await asyncio.sleep(0.2)  # the drain window (0 s) is over: gRPC's last second runs
            gate.set()
            answered = await in_flight
            await stopping
    assert answered.text


async def test_an_open_health_watch_does_not_hold_the_stop() -> None:
    # Before: gRPC's Watch never ends, so with no call in flight stop() still waited the whole
    # grace period for it.
    async with serving(FakeUpstream("cheap-model")) as (service, target):
        assert service.server is not None
        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[attr-defined]  # as above
                health_pb2.HealthCheckRequest(service="")
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            await service.server.stop()
            took = time.monotonic() - started
            with pytest.raises(grpc.aio.AioRpcError):
                while True:  # NOT_SERVING, then the end of the call
                    await watch.read()
    assert took < 2.0, took

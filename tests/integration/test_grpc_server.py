"""The gRPC server itself, with no pipeline attached: what its options and its stop do for a
caller, seen over a real channel."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routecache.client import chat_request
from routecache.router.server import SERVICE_NAME, RunningServer, _parsing_stream, start_server
from routecache.router.servicer import Context, RouteCacheServicer
from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc
from tests.unit.conftest import unit_settings

pytestmark = pytest.mark.integration

REQUEST_LIMIT = 8192  # limits.max_request_bytes, well under server.max_message_bytes (1 MiB)


@pytest_asyncio.fixture
async def running() -> AsyncIterator[RunningServer]:
    settings = unit_settings().server.model_copy(update={"port": 0, "grace_seconds": 30.0})
    server = await start_server(RouteCacheServicer(None), settings,
                                max_request_bytes=REQUEST_LIMIT)  # fmt: skip
    yield server
    await server.server.stop(None)


async def test_requests_are_bounded_by_limits_max_request_bytes_not_the_send_limit(
    running: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouteCacheStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await stub.Complete(chat_request("x" * REQUEST_LIMIT), timeout=10)
        # Under the limit, the request reaches the servicer (still starting: UNAVAILABLE).
        with pytest.raises(grpc.aio.AioRpcError) as parsed:
            await stub.Complete(chat_request("x" * (REQUEST_LIMIT - 100)), timeout=10)
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert parsed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_tells_health_watchers_not_serving_before_draining(
    running: RunningServer,
) -> None:
    # Client-side health checking (and load balancers) Watch the health service: a server being
    # stopped says NOT_SERVING while it drains, so no new calls are sent its way.
    await running.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub lists no methods
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop())
        try:
            update = await asyncio.wait_for(watch.read(), 10)
        finally:
            watch.cancel()  # the watch is an in-flight call the drain would wait for
            await stopping
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_stop_now_ends_a_drain_that_waits_for_a_call_in_flight(
    running: RunningServer,
) -> None:
    # What a second SIGTERM/SIGINT does to `serve`: the grace period (30 s here) is not waited out.
    await running.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[attr-defined]  # as above: the stub lists no methods
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        await watch.read()
        stopping = asyncio.create_task(running.stop())
        await watch.read()  # NOT_SERVING: the drain has begun, the watch is still in flight
        await running.stop_now()
        await asyncio.wait_for(stopping, 10)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await watch.read()
    # gRPC ends a cancelled call UNAVAILABLE: retryable, on another replica.
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_handler_closed_part_way_closes_the_servicers_generator_at_once() -> None:
    # Before: the servicer's generator was left to the loop's finaliser, so the pipeline
    # settled what the stream sent (and closed the provider's stream) turns later.
    closed: list[str] = []

    async def behaviour(request: Message, context: Context) -> AsyncGenerator[Message, None]:
        try:
            yield pb.CompleteStreamResponse(delta="one")
            yield pb.CompleteStreamResponse(delta="two")
        finally:
            closed.append("the servicer's generator")

    handler = _parsing_stream(behaviour, pb.CompleteRequest)
    context = cast(Context, None)  # read only when the request does not parse
    replies = handler(chat_request("q").SerializeToString(), context)
    assert await anext(replies) == pb.CompleteStreamResponse(delta="one")
    await replies.aclose()
    assert closed == ["the servicer's generator"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "::", "[::1]"])
async def test_the_server_binds_an_ipv6_host_written_without_brackets(host: str) -> None:
    # gRPC reads "::1:0" as a host name with no port: the address needs the brackets (and
    # "[::1]", the one form that bound before, must not get a second pair).
    settings = unit_settings().server.model_copy(update={"host": host, "port": 0})
    server = await start_server(RouteCacheServicer(None), settings)
    try:
        async with grpc.aio.insecure_channel(f"[::1]:{server.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # as above: the stub lists no methods
                health_pb2.HealthCheckRequest(), timeout=10
            )
        # Reached: NOT_SERVING until the pipeline is attached.
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop()

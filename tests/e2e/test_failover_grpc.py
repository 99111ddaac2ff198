"""Upstream faults seen through real gRPC: the caller's deadline reaches the provider calls."""

import grpc
import pytest

from routecache.client import RouteCacheClient, chat_request
from routecache.replay import FaultKind
from routecache.v1 import routecache_pb2 as pb
from tests.e2e.conftest import KEYS, Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def test_grpc_deadline_bounds_a_hanging_provider(stack: Stack) -> None:
    # The replay hangs for 30 s and the provider's own timeout is 30 s: only the caller's
    # 3 s deadline, passed down to the provider calls, can end this call early.
    stack.replay.script_faults(FaultKind.TIMEOUT)
    try:
        async with RouteCacheClient(stack.target, KEYS["acme"], timeout_seconds=3) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.complete(chat_request("Why is the sky blue at noon?", no_cache=True))
    finally:
        stack.replay.clear_scripted_faults()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "deadline" in details and "no_cache" in details


async def test_stream_retries_a_failed_open_and_streams_the_answer(stack: Stack) -> None:
    stack.replay.script_faults(FaultKind.HTTP_503)
    try:
        async with stack.client() as client:
            request = chat_request("Describe a rainbow in one line.", force_tier="strong")
            events = [e async for e in client.complete_stream(request)]
    finally:
        stack.replay.clear_scripted_faults()
    final = events[-1].final
    assert len(events) > 2 and final.validation.passed
    assert "".join(e.delta for e in events[:-1]) == final.text


async def test_request_validators_travel_over_grpc(stack: Stack) -> None:
    block_all = pb.RequestValidator(kind="regex", must_not_match=["."], on_fail="block")
    custom = pb.RequestValidator(kind="custom")
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as blocked:
            await client.complete(chat_request("Name a colour.", validators=[block_all]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete(chat_request("Name a colour.", validators=[custom]))
    assert blocked.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "regex: matches '.'" in (blocked.value.details() or "")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("field", "validators[0]") in tuple(refused.value.trailing_metadata() or ())

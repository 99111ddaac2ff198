"""Input limits over real gRPC: an oversized message is refused by gRPC itself from its length
prefix (the service never parses it); a field over its limit is INVALID_ARGUMENT naming it."""

from collections.abc import Callable

import grpc
import pytest

from routecache.client import chat_request
from routecache.v1 import routecache_pb2 as pb
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def test_a_message_over_the_size_limit_is_refused_by_grpc(stack: Stack) -> None:
    limit = stack.service.settings.limits.max_request_bytes
    request = chat_request("x" * (limit + 1))
    assert request.ByteSize() > limit
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(request)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC's own message, not the service's: the request never reached the servicer.
    assert "larger than max" in (error.value.details() or "")
    assert ("field", "messages") not in tuple(error.value.trailing_metadata() or ())


async def test_a_message_just_under_the_size_limit_gets_the_services_own_checks(
    stack: Stack,
) -> None:
    limits = stack.service.settings.limits
    request = chat_request("y" * (limits.max_message_chars + 1))
    assert request.ByteSize() < limits.max_request_bytes
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("field", "messages[0].content") in tuple(error.value.trailing_metadata() or ())


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (chat_request("hi", temperature=float("nan")), "params.temperature"),
        (chat_request("hi", top_p=-1.0), "params.top_p"),
        (chat_request("hi", max_tokens=10**6), "params.max_tokens"),
        (chat_request("hi", ttl_seconds=10**9), "cache.ttl_seconds"),
        (chat_request("hi", end_user_id="u" * 10_000), "end_user_id"),
        # An unknown role number: the stub types it out, the server must refuse it.
        (pb.CompleteRequest(messages=[pb.ChatMessage(role=7, content="hi")]), "messages[0].role"),  # type: ignore[arg-type]
    ],
)
async def test_each_field_over_its_limit_is_named(
    stack: Stack, request_: pb.CompleteRequest, field: str
) -> None:
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("field", field) in tuple(error.value.trailing_metadata() or ())
    assert field in (error.value.details() or "")


async def test_a_refusal_quoting_a_long_non_ascii_schema_keeps_its_status_code(
    stack: Stack,
) -> None:
    # The schema error quotes the schema; gRPC percent-encodes a status message's non-ASCII
    # bytes, and past ~16 KiB of header the caller got RESOURCE_EXHAUSTED (as if over its
    # quota), with gRPC's own text instead of the service's.
    schema = '{"type": "' + "語" * 2_000 + '"}'
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(chat_request("hi", json_schema=schema))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert details.startswith("params.response_format.json_schema: ")
    assert details.endswith("(cut)")


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m.messages[0], "role", 7),
        lambda m: setattr(m.routing, "force_tier", 7),
        lambda m: setattr(m.params.response_format, "type", 9),
    ],
)
async def test_an_unknown_enum_from_a_caller_without_a_valid_key_is_unauthenticated(
    stack: Stack, change: Callable[[pb.CompleteRequest], None]
) -> None:
    # Before: an unknown role, tier or response format was refused INVALID_ARGUMENT while
    # translating, ahead of the key check (and with no error event).
    request = chat_request("hi")
    change(request)
    async with stack.client(api_key="not-a-key") as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(request)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["Complete", "CompleteStream"])
async def test_a_schema_with_a_lone_surrogate_escape_is_invalid_over_grpc(
    stack: Stack, method: str
) -> None:
    # Before: admitted, then encoding it for the provider raised: INTERNAL on both methods,
    # counted as an internal error.
    request = chat_request("What is 2 + 2?", json_schema='{"type": "object", "\\ud800": 1}')
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            if method == "Complete":
                await client.complete(request)
            else:
                async for _ in client.complete_stream(request):
                    pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        "params.response_format.json_schema: not valid Unicode: a lone surrogate escape"
    )

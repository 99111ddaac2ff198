"""The gRPC edge as a caller without the typed client sees it: the authorization header as
sent by hand, defaults of unset request fields, and the caller's deadline on a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from routecache.client import RouteCacheClient, chat_request
from routecache.replay import FaultKind
from routecache.router.demo import scrape_metrics
from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc
from tests.e2e.conftest import KEYS, Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")


@pytest_asyncio.fixture(loop_scope="package")
async def stub(stack: Stack) -> AsyncIterator[pb_grpc.RouteCacheStub]:
    async with grpc.aio.insecure_channel(stack.target) as channel:
        yield pb_grpc.RouteCacheStub(channel)


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {KEYS['globex']}", f"bearer {KEYS['globex']}", f"BEARER   {KEYS['globex']}  "],
)
async def test_the_bearer_scheme_is_case_insensitive_and_spaces_around_the_key_are_ignored(
    stub: pb_grpc.RouteCacheStub, authorization: str
) -> None:
    stats = await stub.GetStats(
        pb.GetStatsRequest(), metadata=[("authorization", authorization)], timeout=30
    )
    assert stats.tenant == "globex"


@pytest.mark.parametrize(
    "authorization", [KEYS["globex"], f"Basic {KEYS['globex']}", f"Token {KEYS['globex']}"]
)
async def test_a_valid_key_under_another_scheme_is_unauthenticated(
    stub: pb_grpc.RouteCacheStub, authorization: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetStats(
            pb.GetStatsRequest(), metadata=[("authorization", authorization)], timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_get_stats_without_top_n_lists_up_to_ten_entries(
    stack: Stack, stub: pb_grpc.RouteCacheStub
) -> None:
    # The proto: "0 means 10". Enough entries of the tenant's own that a smaller default shows.
    async with stack.client("globex") as client:
        for number in range(11):
            await client.complete(chat_request(f"Spell the number {number}.", no_cache=True))
    metadata = [("authorization", f"Bearer {KEYS['globex']}")]
    stats = await stub.GetStats(pb.GetStatsRequest(), metadata=metadata, timeout=30)
    assert stats.entries >= 11 and len(stats.top_entries) == 10


async def test_a_streams_deadline_bounds_a_hanging_provider(stack: Stack) -> None:
    # As for Complete: the replay hangs for 30 s, as long as the provider's own timeout, so
    # only the caller's 3 s deadline passed down to the provider calls ends the stream early.
    stack.replay.script_faults(FaultKind.TIMEOUT)
    try:
        async with RouteCacheClient(stack.target, KEYS["acme"], timeout_seconds=3) as client:
            request = chat_request("Why is the sea salty at the shore?", no_cache=True)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [event async for event in client.complete_stream(request)]
    finally:
        stack.replay.clear_scripted_faults()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "deadline" in (caught.value.details() or "")


def _as_is(raw: bytes) -> bytes:
    return raw


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Complete", b"\xff\xff\xff"),  # not a protobuf at all
        ("CompleteStream", b"\xff\xff\xff"),
        # messages[0].content "hel\xffo": a string field that is not UTF-8
        ("Complete", b"\x0a\x09\x08\x02\x12\x05hel\xffo"),
        ("GetStats", b"\x08"),  # a field cut short
    ],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_not_unknown(
    stack: Stack, method: str, body: bytes
) -> None:
    # grpc's own deserializer would end the call UNKNOWN with Python's exception text.
    metadata = [("authorization", f"Bearer {KEYS['acme']}")]
    path = f"/routecache.v1.RouteCache/{method}"
    async with grpc.aio.insecure_channel(stack.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if method == "CompleteStream":
                stream = channel.unary_stream(path, _as_is, _as_is)
                _ = [message async for message in stream(body, metadata=metadata, timeout=30)]
            else:
                await channel.unary_unary(path, _as_is, _as_is)(body, metadata=metadata, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith("request: not a valid routecache.v1.") and "Error" not in details
    assert ("field", "request") in tuple(refused.value.trailing_metadata() or ())


def errors_total(metrics: str, tenant: str, reason: str) -> float:
    """The routecache_errors_total sample of a failed admin call of `tenant` and `reason` in a
    /metrics text (0: none)."""
    for line in metrics.splitlines():
        if (
            line.startswith("routecache_errors_total{")
            and f'tenant="{tenant}"' in line
            and (f'reason="{reason}"' in line)
            and 'call="admin"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    ("method", "request_"),
    [("Feedback", pb.FeedbackRequest(response_id="x")),  # no rating
     ("Invalidate", pb.InvalidateRequest()),  # no target
     ("GetStats", pb.GetStatsRequest(top_n=1_000_000))],
    ids=["Feedback", "Invalidate", "GetStats"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("api_key", "code", "tenant"),
    [("not-a-key", grpc.StatusCode.UNAUTHENTICATED, ""),
     (KEYS["globex"], grpc.StatusCode.INVALID_ARGUMENT, "globex")],
    ids=["no valid key", "a valid key"],
)  # fmt: skip
async def test_an_invalid_admin_call_checks_the_key_first_and_is_counted(
    stack: Stack, stub: pb_grpc.RouteCacheStub, method: str, request_: object,
    api_key: str, code: grpc.StatusCode, tenant: str,
) -> None:  # fmt: skip
    # Before: Feedback and Invalidate checked the request first (no key and no rating was
    # INVALID_ARGUMENT), and no failed admin call counted in routecache_errors_total.
    assert stack.service.metrics_port is not None
    reason = code.name.lower()
    before = errors_total(await scrape_metrics(stack.service.metrics_port), tenant, reason)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(stub, method)(
            request_, metadata=[("authorization", f"Bearer {api_key}")], timeout=30
        )
    assert refused.value.code() == code
    after = errors_total(await scrape_metrics(stack.service.metrics_port), tenant, reason)
    assert after == before + 1

"""Key administration and rate limits as a caller sees them over real gRPC."""

from __future__ import annotations

import json

import grpc
import pytest

from routecache.client import RouteCacheClient, chat_request
from routecache.router.cli import build_parser
from routecache.router.keys_cli import run_keys
from tests.e2e.conftest import LIMITED_KEY, Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def keys_command(
    stack: Stack, capsys: pytest.CaptureFixture[str], *args: str
) -> dict[str, object]:
    """`routecache keys --registry FILE --json ...` (in this process: the full CLI's imports
    take many seconds on a busy machine)."""
    argv = ["keys", "--registry", str(stack.key_registry), "--json", *args]
    assert await run_keys(build_parser().parse_args(argv)) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


async def test_a_revoked_key_is_refused_from_the_next_call(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    added = await keys_command(stack, capsys, "add", "--tenant", "globex")
    async with stack.client(api_key=str(added["api_key"])) as client:
        answer = await client.complete(chat_request("What is the capital of France?"))
        assert answer.text
        await keys_command(stack, capsys, "revoke", str(added["key_id"]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete(chat_request("What is the capital of France?"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_end_users_rate_limit_answers_with_the_retry_delay(stack: Stack) -> None:
    async with RouteCacheClient(stack.target, LIMITED_KEY, timeout_seconds=30) as client:
        request = chat_request("How many days are in a leap year?")
        request.end_user_id = "user-1"
        await client.complete(request)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await client.complete(request)
        request.end_user_id = "user-2"  # another end user has a bucket of their own
        await client.complete(request)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(limited.value.trailing_metadata() or ())
    assert 3_500_000 <= int(trailers["retry-after-ms"]) <= 3_600_000

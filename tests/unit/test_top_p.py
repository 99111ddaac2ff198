"""top_p: range-checked, part of the cache scope only when set, sent to the provider."""

import json

import httpx
import pytest

from routecache.cache.scope import scope_key
from routecache.client import chat_request
from routecache.domain import ChatRequest, GenerationParams, Message, Role
from routecache.errors import InvalidArgument
from routecache.router.input_validation import validate_request
from routecache.router.messages import request_from_pb
from routecache.router.settings import LimitSettings, ProviderSettings
from routecache.router.upstream.openai_client import OpenAIChatClient


def request(top_p: float | None, **params: object) -> ChatRequest:
    messages = (Message(Role.SYSTEM, "be brief"), Message(Role.USER, "q"))
    return ChatRequest(messages, GenerationParams(top_p=top_p, **params))  # type: ignore[arg-type]


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0001, float("nan"), float("inf")])
def test_top_p_outside_zero_to_one_is_invalid(top_p: float) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_request(request(top_p), LimitSettings())
    assert error.value.field == "params.top_p"


@pytest.mark.parametrize("top_p", [1e-9, 0.5, 1.0])
def test_top_p_in_range_passes(top_p: float) -> None:
    validate_request(request(top_p), LimitSettings())


def test_top_p_is_in_the_scope_only_when_set() -> None:
    # The digest computed before top_p existed: caches kept in Redis or snapshots stay reachable.
    unset = scope_key("acme", request(None, temperature=0.5, max_tokens=10))
    assert unset == "acme:2ada8577cfdcf680495a4ecddd33b9e3"
    assert scope_key("acme", request(0.9, temperature=0.5, max_tokens=10)) != unset
    assert scope_key("acme", request(0.9)) != scope_key("acme", request(0.8))


def test_top_p_travels_from_the_proto_to_the_provider() -> None:
    assert request_from_pb(chat_request("q", top_p=0.25)).params.top_p == 0.25
    assert request_from_pb(chat_request("q")).params.top_p is None


async def test_top_p_is_sent_to_the_provider_when_set() -> None:
    bodies: list[dict[str, object]] = []

    def answer(call: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(call.content))
        return httpx.Response(200, json={
            "model": "m", "choices": [{"message": {"role": "assistant", "content": "ok"},
                                       "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        })  # fmt: skip

    provider = ProviderSettings(model="m", input_usd_per_mtok=0, output_usd_per_mtok=0)
    client = OpenAIChatClient.from_settings(provider, transport=httpx.MockTransport(answer))
    messages = [Message(Role.USER, "q")]
    await client.complete(messages, GenerationParams(top_p=0.3))
    await client.complete(messages, GenerationParams())
    await client.aclose()
    assert bodies[0]["top_p"] == 0.3 and "top_p" not in bodies[1]

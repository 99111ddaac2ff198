"""OpenAIChatClient against httpx.MockTransport: what it sends, parses, and how it fails."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import time
import tomllib
import tracemalloc
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import SecretStr

from routecache.domain import (
    MAX_MODEL_NAME_CHARS,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)
from routecache.errors import UpstreamError
from routecache.router.settings import ProviderSettings, RetrySettings
from routecache.router.upstream import OpenAIChatClient
from routecache.router.upstream.deadline import provider_deadline
from routecache.router.upstream.openai_client import (
    MAX_DETAIL_CHARS,
    PROMPT_TOKEN_MARGIN,
    retry_after_seconds,
)

ROOT = Path(__file__).resolve().parents[2]
BASE_URL = "https://provider.test/v1"
MODEL = "cheap-model"
MESSAGES = (
    Message(Role.SYSTEM, "Answer briefly."),
    Message(Role.USER, "What is 2 + 2?"),
)
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A transport handler that answers from a script and keeps every request it saw."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self._responses = list(responses)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        # Repeat the last scripted answer, so "always fails" needs one entry.
        response = self._responses[min(len(self.requests), len(self._responses)) - 1]
        if isinstance(response, Exception):
            raise response
        return response

    @property
    def calls(self) -> int:
        return len(self.requests)

    def body(self, index: int = 0) -> Any:
        return json.loads(self.requests[index].content)


def completion(content: object = "4", **extra: Any) -> httpx.Response:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "cheap-model-2024",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        **extra,
    }
    return httpx.Response(200, json=payload)


async def one_call_from_settings(
    settings: ProviderSettings,
) -> tuple[Recorder, OpenAIChatClient]:
    """A client built from settings, after one completion: what it sent, and the closed client."""
    recorder = Recorder(completion())
    client = OpenAIChatClient.from_settings(settings, transport=httpx.MockTransport(recorder))
    try:
        await client.complete(MESSAGES, GenerationParams())
    finally:
        await client.aclose()
    return recorder, client


def sse(*events: object) -> httpx.Response:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content="".join(lines).encode()
    )


def chunk(content: str | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., OpenAIChatClient]]:
    clients: list[OpenAIChatClient] = []

    def make(handler: Handler, **kwargs: Any) -> OpenAIChatClient:
        kwargs.setdefault("backoff_seconds", (0.0, 0.0))
        client = OpenAIChatClient(
            BASE_URL,
            MODEL,
            kwargs.pop("api_key", "sk-test"),
            kwargs.pop("timeout_seconds", 5.0),
            transport=httpx.MockTransport(handler),
            **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses tenacity asks for, recorded instead of slept."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def record(seconds: float, *args: Any) -> None:
        recorded.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    return recorded


async def collect(deltas: AsyncIterator[str], into: list[str] | None = None) -> list[str]:
    received = [] if into is None else into
    async for delta in deltas:
        received.append(delta)
    return received


# A body whose content-encoding does not decode: httpx raises DecodingError, not a
# TransportError, while reading it.
def corrupt_gzip(request: httpx.Request | None = None) -> httpx.Response:
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"not gzip at all"))


class TrackedStream(httpx.AsyncByteStream):
    """A response body sent in parts (an exception part is raised there, an event part is
    waited for) that notes its close."""

    def __init__(self, *parts: bytes | Exception | asyncio.Event) -> None:
        self._parts = parts
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            if isinstance(part, Exception):
                raise part
            if isinstance(part, asyncio.Event):
                await part.wait()
                continue
            yield part

    async def aclose(self) -> None:
        self.closed = True


# JSON nested deeper than the parser recurses: json raises RecursionError, not ValueError.
TOO_DEEP = "[" * 100_000


def answers_streamed(status: int, *parts: bytes | Exception) -> tuple[Handler, list[TrackedStream]]:
    """A handler answering each request with `status` and a body sent in `parts`, and the
    bodies it sent (to check each was closed)."""
    bodies: list[TrackedStream] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(TrackedStream(*parts))
        return httpx.Response(status, stream=bodies[-1])

    return answer, bodies


def sse_line(event: object) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


# --- what goes out -------------------------------------------------------------------------


async def test_plain_request_has_only_model_and_messages(make_client: Any) -> None:
    recorder = Recorder(completion())
    await make_client(recorder).complete(MESSAGES, GenerationParams())

    request = recorder.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert recorder.body() == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
    }


async def test_set_params_are_sent(make_client: Any) -> None:
    recorder = Recorder(completion())
    params = GenerationParams(temperature=0.0, max_tokens=64)
    await make_client(recorder).complete(MESSAGES, params)

    body = recorder.body()
    assert body["temperature"] == 0.0
    assert body["max_tokens"] == 64
    assert "response_format" not in body
    assert "stream" not in body


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (ResponseFormat(ResponseFormatType.JSON_OBJECT), {"type": "json_object"}),
        (
            ResponseFormat(ResponseFormatType.JSON_SCHEMA, '{"type": "object", "required": ["a"]}'),
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "schema": {"type": "object", "required": ["a"]},
                },
            },
        ),
    ],
)
async def test_response_format_is_mapped_to_openai_shape(
    make_client: Any, response_format: ResponseFormat, expected: dict[str, Any]
) -> None:
    recorder = Recorder(completion("{}"))
    await make_client(recorder).complete(
        MESSAGES, GenerationParams(response_format=response_format)
    )
    assert recorder.body()["response_format"] == expected


async def test_invalid_json_schema_fails_before_any_call(make_client: Any) -> None:
    recorder = Recorder(completion())
    params = GenerationParams(
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, "{not json")
    )
    with pytest.raises(UpstreamError, match="json_schema") as caught:
        await make_client(recorder).complete(MESSAGES, params)
    assert caught.value.retryable is False
    assert recorder.calls == 0


async def test_no_authorization_without_key_and_extra_headers_sent(make_client: Any) -> None:
    recorder = Recorder(completion())
    client = make_client(recorder, api_key=None, headers={"x-replay-fault": "none"})
    await client.complete(MESSAGES, GenerationParams())
    assert "authorization" not in recorder.requests[0].headers
    assert recorder.requests[0].headers["x-replay-fault"] == "none"


async def test_an_empty_api_key_sends_no_authorization(make_client: Any) -> None:
    # An empty key file reads as "": "Bearer " would be refused where no key is accepted.
    recorder = Recorder(completion())
    await make_client(recorder, api_key="").complete(MESSAGES, GenerationParams())
    assert "authorization" not in recorder.requests[0].headers


async def test_user_agent_is_sent_and_a_configured_header_replaces_it(make_client: Any) -> None:
    recorder = Recorder(completion())
    await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert recorder.requests[0].headers["user-agent"] == "routecache/0.1"

    recorder = Recorder(completion())
    client = make_client(recorder, headers={"user-agent": "gateway-probe/2"})
    await client.complete(MESSAGES, GenerationParams())
    assert recorder.requests[0].headers["user-agent"] == "gateway-probe/2"


def test_max_attempts_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        OpenAIChatClient(BASE_URL, MODEL, max_attempts=0)


# --- what comes back -----------------------------------------------------------------------


async def test_provider_usage_and_model_are_taken(make_client: Any) -> None:
    usage = {"prompt_tokens": 17, "completion_tokens": 3, "total_tokens": 20}
    reply = await make_client(Recorder(completion("four", usage=usage))).complete(
        MESSAGES, GenerationParams()
    )
    assert (reply.text, reply.model) == ("four", "cheap-model-2024")
    assert (reply.prompt_tokens, reply.completion_tokens) == (17, 3)


async def test_missing_usage_is_estimated_at_four_chars_a_token(make_client: Any) -> None:
    answer = "The answer is four."  # 19 characters
    reply = await make_client(Recorder(completion(answer))).complete(MESSAGES, GenerationParams())
    prompt_chars = len("Answer briefly.\nWhat is 2 + 2?")
    assert reply.prompt_tokens == math.ceil(prompt_chars / 4)
    assert reply.completion_tokens == math.ceil(len(answer) / 4) == 5


async def test_missing_usage_counts_the_json_schema_sent_as_prompt_tokens(make_client: Any) -> None:
    # A json_schema request with no schema text sends {"type": "object"}: the model reads that.
    recorder = Recorder(completion("{}"))
    params = GenerationParams(response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA))
    reply = await make_client(recorder).complete(MESSAGES, params)
    assert recorder.body()["response_format"]["json_schema"]["schema"] == {"type": "object"}
    sent = 'Answer briefly.\nWhat is 2 + 2?\n{"type":"object"}'
    assert reply.prompt_tokens == math.ceil(len(sent) / 4)


async def test_partial_usage_estimates_only_the_missing_count(make_client: Any) -> None:
    recorder = Recorder(completion("abcdefghi", usage={"prompt_tokens": 11}))
    reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert (reply.prompt_tokens, reply.completion_tokens) == (11, 3)


@pytest.mark.parametrize("reported", [2**32, 2**40, -5])
async def test_token_counts_no_model_could_report_are_estimated(
    make_client: Any, reported: int
) -> None:
    # Taken as reported, 2**32 would be charged and then fail the reply's uint32 field.
    usage = {"prompt_tokens": reported, "completion_tokens": reported}
    recorder = Recorder(completion("abcdefghi", usage=usage))
    reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    prompt_chars = len("Answer briefly.\nWhat is 2 + 2?")
    assert (reply.prompt_tokens, reply.completion_tokens) == (math.ceil(prompt_chars / 4), 3)


async def test_null_content_is_an_empty_answer(make_client: Any) -> None:
    reply = await make_client(Recorder(completion(None))).complete(MESSAGES, GenerationParams())
    assert reply.text == ""


@pytest.mark.parametrize("model", ["", 7, None], ids=["empty", "number", "null"])
async def test_a_reported_model_that_is_no_name_names_the_configured_one(
    make_client: Any, model: object
) -> None:
    reply = await make_client(Recorder(completion(model=model))).complete(
        MESSAGES, GenerationParams()
    )
    assert reply.model == MODEL


async def test_a_reported_model_past_the_name_bound_names_the_configured_one(
    make_client: Any,
) -> None:
    # Before: a 1.2 MB model name was cached with the answer and sent in Completion.model and in
    # every validator result: the reply, every hit on the entry and GetStats failed
    # RESOURCE_EXHAUSTED until the entry's TTL ran out.
    long_name = "m" * (MAX_MODEL_NAME_CHARS + 1)
    reply = await make_client(Recorder(completion(model=long_name))).complete(
        MESSAGES, GenerationParams()
    )
    assert reply.model == MODEL
    at_bound = "m" * MAX_MODEL_NAME_CHARS
    reply = await make_client(Recorder(completion(model=at_bound))).complete(
        MESSAGES, GenerationParams()
    )
    assert reply.model == at_bound


@pytest.mark.parametrize("usage", ["lots", [17, 3], None], ids=["text", "list", "null"])
async def test_usage_that_is_not_an_object_is_estimated(make_client: Any, usage: object) -> None:
    reply = await make_client(Recorder(completion("abcdefghi", usage=usage))).complete(
        MESSAGES, GenerationParams()
    )
    prompt_chars = len("Answer briefly.\nWhat is 2 + 2?")
    assert (reply.prompt_tokens, reply.completion_tokens) == (math.ceil(prompt_chars / 4), 3)


async def test_true_as_a_token_count_is_estimated(make_client: Any) -> None:
    # JSON true is a Python int; taken as reported it would be charged as one token.
    usage = {"prompt_tokens": True, "completion_tokens": True}
    reply = await make_client(Recorder(completion("abcdefghi", usage=usage))).complete(
        MESSAGES, GenerationParams()
    )
    assert reply.completion_tokens == 3


async def test_reported_counts_at_the_bounds_are_taken(make_client: Any) -> None:
    # A cached prompt may be reported as 0 tokens; 2**28 is the largest count believed.
    usage = {"prompt_tokens": 0, "completion_tokens": 2**28}
    reply = await make_client(Recorder(completion("abcdefghi", usage=usage))).complete(
        MESSAGES, GenerationParams()
    )
    assert (reply.prompt_tokens, reply.completion_tokens) == (0, 2**28)


async def test_completion_tokens_over_the_max_tokens_sent_are_cut_to_it_and_logged_once(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: 200M completion tokens reported for a request sent with max_tokens=16 were taken
    # (under MAX_REPORTED_TOKENS): $200 charged against a $5 cap, the token bucket locked ~33 h.
    usage = {"prompt_tokens": 5, "completion_tokens": 200_000_000}
    client = make_client(Recorder(completion("Paris.", usage=usage)))
    params = GenerationParams(max_tokens=16)
    with caplog.at_level(logging.WARNING, logger="routecache.router.upstream.openai_client"):
        first = await client.complete(MESSAGES, params)
        second = await client.complete(MESSAGES, params)
    assert (first.prompt_tokens, first.completion_tokens) == (5, 16)
    assert second.completion_tokens == 16
    warnings = [r for r in caplog.records if "max_tokens" in r.getMessage()]
    assert len(warnings) == 1  # once per provider, not once per call
    assert "200000000" in warnings[0].getMessage()


async def test_completion_tokens_within_the_max_tokens_sent_or_with_none_sent_are_taken(
    make_client: Any,
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 900}
    client = make_client(Recorder(completion("Paris.", usage=usage)))
    assert (await client.complete(MESSAGES, GenerationParams())).completion_tokens == 900
    at_bound = await client.complete(MESSAGES, GenerationParams(max_tokens=900))
    assert at_bound.completion_tokens == 900


async def test_prompt_tokens_over_what_the_body_sent_could_hold_are_estimated_and_logged_once(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: "hello" reported as 200M prompt tokens was charged whole (under
    # MAX_REPORTED_TOKENS) against caps and quotas. A byte-level tokenizer gives each token a
    # byte at least, so no correct count passes the body's bytes plus the template margin.
    usage = {"prompt_tokens": 200_000_000, "completion_tokens": 2}
    recorder = Recorder(completion("Paris.", usage=usage))
    client = make_client(recorder)
    with caplog.at_level(logging.WARNING, logger="routecache.router.upstream.openai_client"):
        first = await client.complete(MESSAGES, GenerationParams())
        second = await client.complete(MESSAGES, GenerationParams())
    estimate = math.ceil(len("Answer briefly.\nWhat is 2 + 2?") / 4)
    assert (first.prompt_tokens, first.completion_tokens) == (estimate, 2)
    assert second.prompt_tokens == estimate
    warnings = [r for r in caplog.records if "prompt tokens" in r.getMessage()]
    assert len(warnings) == 1  # once per provider, not once per call
    assert "200000000" in warnings[0].getMessage()


async def test_prompt_tokens_up_to_the_body_bytes_plus_margin_are_taken(
    make_client: Any,
) -> None:
    recorder = Recorder(completion())
    client = make_client(recorder)
    await client.complete(MESSAGES, GenerationParams())
    bound = len(recorder.requests[0].content) + PROMPT_TOKEN_MARGIN  # the bytes sent
    for reported, charged in ((bound, bound), (bound + 1, 8)):
        usage = {"prompt_tokens": reported, "completion_tokens": 1}
        client = make_client(Recorder(completion(usage=usage)))
        reply = await client.complete(MESSAGES, GenerationParams())
        assert reply.prompt_tokens == charged


async def test_prompt_estimate_counts_the_line_between_messages(make_client: Any) -> None:
    messages = (Message(Role.SYSTEM, "abcd"), Message(Role.USER, "abcd"))
    reply = await make_client(Recorder(completion())).complete(messages, GenerationParams())
    assert reply.prompt_tokens == 3  # "abcd\nabcd": 9 characters


# --- failures and retries ------------------------------------------------------------------


# 408 and 409 as OpenAI's own SDK has them: a request the server gave up waiting for, or one
# that lost a race (a lock held a moment), says nothing against the request itself.
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_status_is_tried_twice_then_raised(make_client: Any, status: int) -> None:
    recorder = Recorder(httpx.Response(status, json={"error": {"message": "provider says no"}}))
    with pytest.raises(UpstreamError) as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    assert recorder.calls == 2
    message = str(caught.value)
    assert MODEL in message and f"HTTP {status}" in message
    assert message.endswith(": provider says no")  # the error's message, not its JSON


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_error_status_is_raised_at_once(make_client: Any, status: int) -> None:
    recorder = Recorder(httpx.Response(status, text="plain text detail"))
    with pytest.raises(UpstreamError, match=f"HTTP {status}.*plain text detail") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is False
    assert recorder.calls == 1


@pytest.mark.parametrize(
    ("retry_after", "named"),
    [("7", "(retry after 7s)"), ("Wed, 21 Oct 2026 07:28:00 GMT", "07:28:00 GMT)")],
    ids=["seconds", "http-date"],
)
async def test_429_names_retry_after(make_client: Any, retry_after: str, named: str) -> None:
    recorder = Recorder(httpx.Response(429, headers={"retry-after": retry_after}))
    with pytest.raises(UpstreamError) as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"error": {"code": "quota_exceeded"}}, "quota_exceeded"),
        ({"error": "overloaded"}, "overloaded"),
        ({"detail": "Model mixtral is loading"}, "Model mixtral is loading"),
        ({"message": "capacity exhausted"}, "capacity exhausted"),
        ({"detail": [{"msg": "worker pool drained"}]}, "worker pool drained"),
    ],
    ids=[
        "error-without-message",
        "error-as-text",
        "fastapi-detail",
        "message",
        "detail-not-text",
    ],
)
async def test_provider_error_of_another_shape_is_still_named(
    make_client: Any, body: dict[str, Any], detail: str
) -> None:
    recorder = Recorder(httpx.Response(503, json=body))
    with pytest.raises(UpstreamError, match="HTTP 503") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert detail in str(caught.value)
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(400, json={"error": {"message": "echoed prompt " * 10_000}}),
        httpx.Response(429, headers={"retry-after": "9" * 20_000}),
        sse(chunk("The answer"), {"error": {"message": "echoed prompt " * 10_000}}),
    ],
    ids=["error-message", "retry-after", "stream-error-event"],
)
async def test_a_huge_provider_error_is_cut_short_in_the_message(
    make_client: Any, response: httpx.Response
) -> None:
    # Before: the provider's text went whole into the message, and on into the gRPC status
    # details, where over 16 KiB turns an UNAVAILABLE into the client's RESOURCE_EXHAUSTED.
    client = make_client(Recorder(response), max_attempts=1)
    with pytest.raises(UpstreamError) as caught:
        await collect(client.stream(MESSAGES, GenerationParams()))
    assert len(str(caught.value)) < 500


async def test_a_long_error_text_of_another_shape_is_cut_to_the_detail_bound(
    make_client: Any,
) -> None:
    recorder = Recorder(httpx.Response(503, json={"detail": "d" * 5_000}))
    with pytest.raises(UpstreamError) as caught:
        await make_client(recorder, max_attempts=1).complete(MESSAGES, GenerationParams())
    assert "d" * MAX_DETAIL_CHARS in str(caught.value)
    assert "d" * (MAX_DETAIL_CHARS + 1) not in str(caught.value)


async def test_a_redirect_is_not_followed_but_raised_with_its_status(make_client: Any) -> None:
    # An http:// base_url answered with a redirect to https:// is a configuration error,
    # not a malformed answer worth retrying.
    recorder = Recorder(httpx.Response(301, headers={"location": "https://provider.test/v1"}))
    with pytest.raises(UpstreamError, match="HTTP 301") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is False
    assert recorder.calls == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"), httpx.ConnectError("refused")],
    ids=["read-timeout", "connect-timeout", "connect-error"],
)
async def test_transport_failures_are_retryable(make_client: Any, failure: Exception) -> None:
    recorder = Recorder(failure)
    with pytest.raises(UpstreamError) as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    assert recorder.calls == 2
    assert MODEL in str(caught.value)


@pytest.mark.parametrize(
    ("failure", "limit"),
    [(httpx.ReadTimeout("slow"), "20s"), (httpx.ConnectTimeout("slow"), "2s")],
    ids=["read", "connect"],
)
async def test_a_timeout_names_the_limit_of_the_phase_that_ran_out(
    make_client: Any, failure: Exception, limit: str
) -> None:
    # Before: every phase said "timed out after 30s", the whole attempt's limit.
    client = make_client(Recorder(failure), timeout_seconds=30.0, connect_timeout_seconds=2.0,
                         read_timeout_seconds=20.0)  # fmt: skip
    with pytest.raises(UpstreamError, match=f"timed out after {limit} "):
        await client.complete(MESSAGES, GenerationParams())


async def test_whole_call_is_bounded_by_the_timeout(make_client: Any) -> None:
    calls = 0

    async def stalls(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return completion()

    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"within 0\.05s") as caught:
        await make_client(stalls, timeout_seconds=0.05).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    assert calls == 2
    assert time.monotonic() - started < 4.0  # each try stalls 5 s unless the timeout ends it


def stalling_after(*failures: httpx.Response) -> Callable[[httpx.Request], Any]:
    """A transport handler: `failures` at the first tries, then no answer for 5 s."""
    left = list(failures)

    async def handler(request: httpx.Request) -> httpx.Response:
        if left:
            return left.pop(0)
        await asyncio.sleep(5)
        return completion()

    return handler


@pytest.mark.parametrize("call", ["complete", "stream"])
@pytest.mark.parametrize("failures", [0, 1])
async def test_the_tries_that_failed_before_the_call_deadline_are_noted_for_the_breaker(
    make_client: Any, call: str, failures: int
) -> None:
    # The deadline ending a call is no verdict on the provider, but a try that failed before
    # it is: a hung provider behind the default deadline (60 s: two tries of 30 s) must still
    # open its breaker (failover.py reads the note).
    client = make_client(stalling_after(*[httpx.Response(503)] * failures))
    with pytest.raises(TimeoutError):
        async with provider_deadline(0.3) as within:
            if call == "complete":
                await client.complete(MESSAGES, GenerationParams())
            else:
                await collect(client.stream(MESSAGES, GenerationParams()))
    assert within.failed_tries == failures


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json={"id": "x", "choices": []}),
        httpx.Response(200, json={"choices": [{"message": {"content": 42}}]}),
        completion(0),
        httpx.Response(200, json={"choices": [{"message": "4"}]}),
        httpx.Response(200, json=[{"choices": []}]),
        httpx.Response(200, text=TOO_DEEP),
    ],
    ids=[
        "not-json",
        "no-choices",
        "content-not-text",
        "content-zero",
        "message-not-object",
        "body-an-array",
        "nested-too-deep",
    ],
)
async def test_malformed_body_is_retryable(make_client: Any, response: httpx.Response) -> None:
    recorder = Recorder(response)
    with pytest.raises(UpstreamError, match="malformed") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    assert recorder.calls == 2


async def test_a_body_that_does_not_decode_is_an_upstream_error(make_client: Any) -> None:
    # Before: httpx.DecodingError left the client raw; the failover chain re-raised what
    # was not an UpstreamError, so the call ended INTERNAL without trying the next provider.
    calls: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return corrupt_gzip()

    client = make_client(answer)
    with pytest.raises(UpstreamError, match="DecodingError") as caught:
        await client.complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    with pytest.raises(UpstreamError, match="DecodingError") as caught:
        await collect(client.stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is True
    assert len(calls) == 4  # each retried once


async def test_retry_recovers_from_one_failure(make_client: Any) -> None:
    recorder = Recorder(httpx.Response(503), completion("recovered"))
    reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert reply.text == "recovered"
    assert recorder.calls == 2


async def test_default_backoff_pauses_between_attempts(make_client: Any) -> None:
    recorder = Recorder(httpx.Response(500))
    client = make_client(recorder, backoff_seconds=(0.05, 0.2))
    with pytest.raises(UpstreamError):
        await client.complete(MESSAGES, GenerationParams())
    pause = recorder.times[1] - recorder.times[0]
    assert 0.045 <= pause < 0.5


@pytest.mark.parametrize("status", [408, 409, 429, 503])
async def test_a_retry_waits_the_pause_the_provider_asked_for(
    make_client: Any, pauses: list[float], status: int
) -> None:
    # Before: the usual backoff (0.05-0.2 s), hammering a provider that asked for 2 s.
    recorder = Recorder(httpx.Response(status, headers={"retry-after": "2"}), completion())
    client = make_client(recorder, max_retry_after_seconds=2.0)  # a pause at the bound is waited
    reply = await client.complete(MESSAGES, GenerationParams())
    assert reply.text == "4"
    assert pauses == [2.0]


async def test_a_pause_past_the_bound_is_not_waited_and_not_retried(
    make_client: Any, pauses: list[float]
) -> None:
    # A provider saying 3600 must not park the request: the chain moves on at once.
    recorder = Recorder(httpx.Response(429, headers={"retry-after": "3600"}), completion())
    client = make_client(recorder, max_retry_after_seconds=5.0)
    with pytest.raises(UpstreamError, match="retry after 3600s") as caught:
        await client.complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True  # the next provider is tried
    assert recorder.calls == 1
    assert pauses == []


async def test_a_pause_past_the_call_deadline_fails_over_at_once(make_client: Any) -> None:
    # Sleeping 1 s in a call with 0.5 s left would end it TimeoutError, and leave the next
    # provider no time either: it fails now, as the provider's 429, for the chain to move on.
    responses = [httpx.Response(429, headers={"retry-after": "1"}), completion()]
    recorder = Recorder(*responses)
    client = make_client(recorder, max_retry_after_seconds=5.0)
    with pytest.raises(UpstreamError, match="HTTP 429"):
        async with provider_deadline(0.5):
            await collect(client.stream(MESSAGES, GenerationParams()))
    assert recorder.calls == 1


async def test_a_pause_past_half_the_time_left_fails_over_at_once(make_client: Any) -> None:
    # Waking with 0.1 s left, the retry would time out: the next provider gets the time.
    recorder = Recorder(httpx.Response(429, headers={"retry-after": "1"}), completion())
    with pytest.raises(UpstreamError, match="HTTP 429"):
        async with provider_deadline(1.1):
            await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert recorder.calls == 1


async def test_a_pause_within_the_call_deadline_is_waited(
    make_client: Any, pauses: list[float]
) -> None:
    recorder = Recorder(httpx.Response(429, headers={"retry-after": "1"}), completion())
    async with provider_deadline(30.0):
        reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert reply.text == "4"
    assert pauses == [1.0]


async def test_a_backoff_past_half_the_time_left_fails_over_at_once(
    make_client: Any, pauses: list[float]
) -> None:
    # Before: the 0.3 s backoff was slept with 0.2 s left after it, the retry then timed out,
    # and the next provider was left no time either.
    recorder = Recorder(httpx.Response(500), completion())
    client = make_client(recorder, backoff_seconds=(0.3, 0.3))
    with pytest.raises(UpstreamError, match="HTTP 500") as caught:
        async with provider_deadline(0.5):
            await client.complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True  # the next provider is tried
    assert recorder.calls == 1
    assert pauses == []


async def test_a_backoff_within_half_the_time_left_is_slept(
    make_client: Any, pauses: list[float]
) -> None:
    recorder = Recorder(httpx.Response(500), sse(chunk("4", finish_reason="stop")))
    client = make_client(recorder, backoff_seconds=(0.3, 0.3))
    async with provider_deadline(30.0):
        assert await collect(client.stream(MESSAGES, GenerationParams())) == ["4"]
    assert pauses == [0.3]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 0 ", 0.0),
        ("Fri, 27 Nov 2026 12:00:30 GMT", 30.0),
        ("Fri, 27 Nov 2026 12:00:30 -0000", 30.0),  # no zone given: GMT
        ("Fri, 27 Nov 2026 11:59:00 GMT", 0.0),  # already past
        ("9" * 5_000, math.inf),
        ("1.5", None),
        ("soon", None),
        ("\u00b2", None),  # a digit to str.isdigit, no number to float
        ("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", None),  # was an OverflowError
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header: str, seconds: float | None) -> None:
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(header, now) == seconds


async def test_max_attempts_one_means_no_retry(make_client: Any) -> None:
    recorder = Recorder(httpx.Response(500))
    with pytest.raises(UpstreamError):
        await make_client(recorder, max_attempts=1).complete(MESSAGES, GenerationParams())
    assert recorder.calls == 1


BOUND = 1_000


async def test_a_body_past_the_bound_is_not_read_on_and_fails_the_attempt(
    make_client: Any,
) -> None:
    # Before: the whole body was buffered (here it would read on into the ReadError); a
    # runaway provider could exhaust memory.
    answer, bodies = answers_streamed(
        200, b'{"choices": [' + b" " * 600, b" " * 600, httpx.ReadError("read too far")
    )

    client = make_client(answer, max_response_bytes=BOUND)
    with pytest.raises(UpstreamError, match=f"response body over {BOUND} bytes") as caught:
        await client.complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True  # like any malformed answer
    assert len(bodies) == 2 and all(body.closed for body in bodies)


async def test_a_body_of_exactly_the_bound_is_read(make_client: Any) -> None:
    response = completion("4")
    size = len(response.content)
    reply = await make_client(Recorder(response), max_response_bytes=size).complete(
        MESSAGES, GenerationParams()
    )
    assert reply.text == "4"
    with pytest.raises(UpstreamError, match="over"):
        await make_client(Recorder(response), max_response_bytes=size - 1).complete(
            MESSAGES, GenerationParams()
        )


async def test_an_error_body_past_the_bound_is_not_read_on(make_client: Any) -> None:
    # Before: aread() waited for the rest of the body (here: for ever, until the timeout).
    body = TrackedStream(b"x" * 600, b"x" * 600, asyncio.Event())
    client = make_client(
        Recorder(httpx.Response(503, stream=body)), max_response_bytes=BOUND, max_attempts=1
    )
    with pytest.raises(UpstreamError, match="HTTP 503") as caught:
        await client.complete(MESSAGES, GenerationParams())
    assert "no answer within" not in str(caught.value)
    assert body.closed


# --- streaming -----------------------------------------------------------------------------


async def test_stream_yields_text_deltas(make_client: Any) -> None:
    role_chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    usage_chunk = {"choices": [], "usage": {"prompt_tokens": 1}}
    body = (
        ": keep-alive comment\n\n"
        + "".join(
            f"data: {json.dumps(e)}\n\n"
            for e in (role_chunk, chunk("Two plus"), chunk(" two is"), chunk(" four."))
        )
        + f"data: {json.dumps(chunk(finish_reason='stop'))}\n\n"
        + f"data:{json.dumps(usage_chunk)}\n\n"
        + "data: [DONE]\n\n"
    )
    recorder = Recorder(httpx.Response(200, content=body.encode()))
    deltas = await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))

    assert deltas == ["Two plus", " two is", " four."]
    assert recorder.body()["stream"] is True


async def test_stream_with_finish_reason_but_no_done_is_complete(make_client: Any) -> None:
    recorder = Recorder(sse(chunk("ok"), chunk(finish_reason="stop")))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


async def test_truncated_stream_after_text_raises_without_retry(make_client: Any) -> None:
    recorder = Recorder(sse(chunk("The answer"), chunk(" is")))
    received: list[str] = []
    with pytest.raises(UpstreamError, match="without finish_reason") as caught:
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()), received)
    assert caught.value.retryable is True
    assert received == ["The answer", " is"]
    assert recorder.calls == 1  # text already handed on cannot be retried


async def test_stream_failing_before_any_text_is_retried(make_client: Any) -> None:
    # The first stream ends before any text and without [DONE]: nothing was handed on yet.
    recorder = Recorder(sse(chunk("")), sse(chunk("second"), "[DONE]"))
    deltas = await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert deltas == ["second"]
    assert recorder.calls == 2


@pytest.mark.parametrize(
    ("response", "retryable", "calls"),
    [
        (httpx.Response(429), True, 2),
        (httpx.Response(400, json={"error": {"message": "bad"}}), False, 1),
        (sse('{"choices": [{"delta": {"content": "unterminated'), True, 2),
        (sse({"error": {"message": "overloaded"}}), True, 2),
        (sse(TOO_DEEP), True, 2),
        (httpx.Response(503, text=TOO_DEEP), True, 2),
    ],
    ids=["429", "400", "malformed-chunk", "error-event", "chunk-too-deep", "error-too-deep"],
)
async def test_stream_failures_map_like_complete(
    make_client: Any, response: httpx.Response, retryable: bool, calls: int
) -> None:
    recorder = Recorder(response)
    with pytest.raises(UpstreamError) as caught:
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is retryable
    assert recorder.calls == calls


@pytest.mark.parametrize("content", [0, False, [], {}], ids=["zero", "false", "list", "object"])
async def test_a_stream_delta_whose_content_is_not_text_is_a_malformed_chunk(
    make_client: Any, content: object
) -> None:
    # Falsy non-text content once passed as an empty delta; only null or absent means no text.
    bad = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    recorder = Recorder(sse(bad, chunk(finish_reason="stop")))
    with pytest.raises(UpstreamError, match="malformed stream chunk") as caught:
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is True
    assert recorder.calls == 2


async def test_a_stream_delta_with_null_content_carries_no_text(make_client: Any) -> None:
    empty = {"choices": [{"index": 0, "delta": {"content": None}, "finish_reason": None}]}
    recorder = Recorder(sse(empty, chunk("ok"), chunk(finish_reason="stop")))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


async def test_data_lines_without_a_space_after_the_colon_are_read(make_client: Any) -> None:
    body = 'data:{"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\n'
    recorder = Recorder(httpx.Response(200, content=body.encode()))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


async def test_a_usage_chunk_after_finish_reason_without_done_is_complete(
    make_client: Any,
) -> None:
    usage_chunk = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    recorder = Recorder(sse(chunk("ok"), chunk(finish_reason="stop"), usage_chunk))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


async def test_a_finish_reason_that_is_not_text_does_not_end_the_stream(make_client: Any) -> None:
    odd = {"choices": [{"index": 0, "delta": {}, "finish_reason": 1}]}
    recorder = Recorder(sse(chunk("ok"), odd))
    with pytest.raises(UpstreamError, match="without finish_reason"):
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))


async def test_a_stream_stalling_before_any_text_is_retried(make_client: Any) -> None:
    bodies = [
        TrackedStream(httpx.ReadTimeout("stalled")),
        TrackedStream(sse_line(chunk("second")), b"data: [DONE]\n\n"),
    ]
    recorder = Recorder(*(httpx.Response(200, stream=body) for body in bodies))
    deltas = await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert deltas == ["second"]
    assert recorder.calls == 2


async def test_a_stream_stalling_after_text_is_a_retryable_error_without_retry(
    make_client: Any,
) -> None:
    # Retryable: the fallback chain may still try another provider for the next request.
    body = TrackedStream(sse_line(chunk("The answer")), httpx.ReadTimeout("stalled"))
    recorder = Recorder(httpx.Response(200, stream=body))
    received: list[str] = []
    with pytest.raises(UpstreamError, match="stalled") as caught:
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()), received)
    assert caught.value.retryable is True
    assert received == ["The answer"]
    assert recorder.calls == 1
    assert body.closed


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, TrackedStream(b'{"error": {"message": "busy"}}')),
        (200, TrackedStream(b"data: {oops\n\n")),
    ],
    ids=["http-503", "malformed-first-chunk"],
)
async def test_a_stream_failing_before_its_first_delta_releases_the_connection(
    make_client: Any, status: int, body: TrackedStream
) -> None:
    # Left open, each failed attempt would hold one of the pool's connections.
    recorder = Recorder(httpx.Response(status, stream=body))
    with pytest.raises(UpstreamError):
        await collect(make_client(recorder, max_attempts=1).stream(MESSAGES, GenerationParams()))
    assert body.closed


async def test_a_stream_cancelled_before_its_first_delta_releases_the_connection(
    make_client: Any,
) -> None:
    # The caller's deadline runs out while the provider has sent only its role chunk.
    body = TrackedStream(sse_line(chunk("")), asyncio.Event())
    client = make_client(Recorder(httpx.Response(200, stream=body)))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await collect(client.stream(MESSAGES, GenerationParams()))
    assert body.closed


async def test_a_stream_whose_error_body_breaks_is_still_an_upstream_error(
    make_client: Any,
) -> None:
    # Before: a stream's error body is read after the send, outside its error mapping; a
    # connection reset there left the client as httpx.ReadError, which the failover chain
    # re-raises, so the request ended INTERNAL without trying the next provider.
    answer, bodies = answers_streamed(503, b'{"error": ', httpx.ReadError("connection reset"))

    with pytest.raises(UpstreamError, match="HTTP 503") as caught:
        await collect(make_client(answer).stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is True
    assert len(bodies) == 2  # retried like any other 503
    assert all(body.closed for body in bodies)


async def test_an_error_event_in_a_stream_carries_the_providers_message(
    make_client: Any,
) -> None:
    recorder = Recorder(sse(chunk("The answer"), {"error": {"message": "model overloaded"}}))
    with pytest.raises(UpstreamError, match="error in stream: model overloaded"):
        await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))


async def test_a_stream_line_past_the_bound_is_not_read_on(make_client: Any) -> None:
    # Before: aiter_lines buffered a line without end whole.
    answer, bodies = answers_streamed(
        200, b"data: " + b"x" * 600, b"x" * 600, httpx.ReadError("read too far")
    )

    client = make_client(answer, max_response_bytes=BOUND)
    with pytest.raises(UpstreamError, match=f"stream line over {BOUND} bytes") as caught:
        await collect(client.stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is True
    assert len(bodies) == 2 and all(body.closed for body in bodies)


async def test_a_stream_longer_than_the_bound_in_lines_within_it_is_read(
    make_client: Any,
) -> None:
    # The bound is on one line, and four times it on the stream; lines end at \n, \r\n or \r.
    line = sse_line(chunk("x" * 100))
    events = [line, line.replace(b"\n", b"\r\n"), line.replace(b"\n", b"\r")]
    body = TrackedStream(*events, sse_line(chunk(finish_reason="stop")))
    client = make_client(Recorder(httpx.Response(200, stream=body)), max_response_bytes=len(line))
    assert "".join(await collect(client.stream(MESSAGES, GenerationParams()))) == "x" * 300


async def test_a_stream_past_four_times_the_bound_is_not_read_on(make_client: Any) -> None:
    # Before: only each line was bounded, and a provider streaming without end was read on
    # until the deadline (here: into the ReadError).
    line = sse_line(chunk("x" * 100))
    answer, bodies = answers_streamed(200, *[line] * 9, httpx.ReadError("read too far"))
    client = make_client(answer, max_response_bytes=2 * len(line))
    received: list[str] = []
    with pytest.raises(UpstreamError, match=f"stream over {8 * len(line)} bytes") as caught:
        await collect(client.stream(MESSAGES, GenerationParams()), received)
    assert caught.value.retryable is True  # like any malformed answer
    assert received == ["x" * 100] * 8  # what came within the bound was passed on
    assert len(bodies) == 1 and bodies[0].closed


async def test_a_stream_of_exactly_four_times_the_bound_is_read(make_client: Any) -> None:
    line = sse_line(chunk("x" * 100, finish_reason="stop"))

    def stream_bounded_by(bound: int) -> AsyncIterator[str]:
        recorder = Recorder(httpx.Response(200, content=line * 4))
        client: OpenAIChatClient = make_client(recorder, max_response_bytes=bound)
        return client.stream(MESSAGES, GenerationParams())

    assert "".join(await collect(stream_bounded_by(len(line)))) == "x" * 400
    with pytest.raises(UpstreamError, match="stream over"):
        await collect(stream_bounded_by(len(line) - 1))


async def test_a_complete_stream_line_past_the_bound_fails(make_client: Any) -> None:
    line = sse_line(chunk("x" * 100))
    body = sse(chunk("x" * 100), chunk(finish_reason="stop"))
    client = make_client(Recorder(body), max_response_bytes=len(line.rstrip()) - 1)
    with pytest.raises(UpstreamError, match="stream line over"):
        await collect(client.stream(MESSAGES, GenerationParams()))


async def test_empty_stream_yields_nothing(make_client: Any) -> None:
    recorder = Recorder(sse(chunk(""), chunk(finish_reason="stop"), "[DONE]"))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == []


async def test_from_settings_uses_the_secret_key_and_model() -> None:
    settings = ProviderSettings(
        base_url=BASE_URL,
        model="strong-model",
        api_key=SecretStr("sk-secret"),
        input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0,
        timeout_seconds=3.0,
    )
    recorder, client = await one_call_from_settings(settings)
    assert client.model == "strong-model"
    assert recorder.body()["model"] == "strong-model"
    assert recorder.requests[0].headers["authorization"] == "Bearer sk-secret"


@pytest.mark.parametrize(
    ("connect", "read", "expected"),
    [(1.5, 2.5, (1.5, 2.5)), (10.0, 20.0, (3.0, 3.0))],
    ids=["within", "capped"],
)
async def test_from_settings_connect_and_read_timeouts_are_bounded_by_the_whole_one(
    connect: float, read: float, expected: tuple[float, float]
) -> None:
    settings = ProviderSettings(
        base_url=BASE_URL,
        model=MODEL,
        input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0,
        timeout_seconds=3.0,
        connect_timeout_seconds=connect,
        read_timeout_seconds=read,
    )
    recorder, _client = await one_call_from_settings(settings)
    timeout = recorder.requests[0].extensions["timeout"]
    assert (timeout["connect"], timeout["read"]) == expected
    assert timeout["write"] == 3.0


async def test_from_settings_takes_the_response_bound_and_the_longest_pause(
    pauses: list[float],
) -> None:
    settings = ProviderSettings(
        base_url=BASE_URL,
        model=MODEL,
        input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0,
        max_response_bytes=64 << 10,
    )
    retry = RetrySettings(max_retry_after_seconds=30.0)
    recorder = Recorder(
        httpx.Response(429, headers={"retry-after": "20"}),
        completion("x" * (64 << 10)),
    )
    client = OpenAIChatClient.from_settings(
        settings, retry=retry, transport=httpx.MockTransport(recorder)
    )
    try:
        with pytest.raises(UpstreamError, match=f"over {64 << 10} bytes"):
            await client.complete(MESSAGES, GenerationParams())
    finally:
        await client.aclose()
    assert pauses == [20.0]  # within the 30 s bound (the default, 5 s, would not retry)


async def test_from_settings_takes_attempts_and_backoff_from_the_retry_settings(
    pauses: list[float],
) -> None:
    settings = ProviderSettings(
        base_url=BASE_URL, model=MODEL, input_usd_per_mtok=1.0, output_usd_per_mtok=2.0
    )
    retry = RetrySettings(max_attempts=3, backoff_initial_seconds=0.1, backoff_max_seconds=0.25)
    recorder = Recorder(httpx.Response(503))
    client = OpenAIChatClient.from_settings(
        settings, retry=retry, transport=httpx.MockTransport(recorder)
    )
    try:
        with pytest.raises(UpstreamError):
            await client.complete(MESSAGES, GenerationParams())
    finally:
        await client.aclose()
    assert recorder.calls == 3
    # Exponential from the initial pause (plus up to as much jitter), capped at the max.
    assert len(pauses) == 2
    assert 0.1 <= pauses[0] <= 0.2
    assert 0.2 <= pauses[1] <= 0.25


def test_the_declared_tenacity_floor_has_the_backoff_keyword_the_client_uses() -> None:
    # wait_exponential_jitter(multiplier=...) first shipped in tenacity 9.2.1 (9.0.0-9.1.4
    # raise TypeError on it, so every upstream call would fail): the floor must not allow them.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (requirement,) = (
        Requirement(spec)
        for spec in project["project"]["dependencies"]
        if Requirement(spec).name == "tenacity"
    )
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("9.2.1")


class TricklingStream(httpx.AsyncByteStream):
    """An event stream of keep-alive comments only, one every 10 ms for `seconds`."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = time.monotonic() + self._seconds
        while time.monotonic() < end:
            yield b": keep-alive\n\n"
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_stream_with_no_first_delta_within_the_timeout_is_retried_then_fails(
    make_client: Any,
) -> None:
    # Each comment arrives within the read timeout: only the bound on the stream's opening
    # ends a try, so the retry and the next provider still get their time.
    bodies = [TricklingStream(3.0), TricklingStream(3.0)]
    recorder = Recorder(*(httpx.Response(200, stream=body) for body in bodies))
    client = make_client(recorder, timeout_seconds=0.1)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"no first delta within 0\.1s") as caught:
        await collect(client.stream(MESSAGES, GenerationParams()))
    assert caught.value.retryable is True
    assert recorder.calls == 2
    assert time.monotonic() - started < 2.0
    assert all(body.closed for body in bodies)


async def test_a_stream_past_the_timeout_after_its_first_delta_is_read_on(
    make_client: Any,
) -> None:
    # The timeout bounds the opening; the rest of the stream is bounded per read.
    late = asyncio.Event()
    body = TrackedStream(sse_line(chunk("first")), late)
    client = make_client(Recorder(httpx.Response(200, stream=body)), timeout_seconds=0.1)
    deltas = client.stream(MESSAGES, GenerationParams())
    assert await anext(deltas) == "first"
    await asyncio.sleep(0.2)
    late.set()
    with pytest.raises(UpstreamError, match="without finish_reason"):
        await anext(deltas)


async def test_from_settings_takes_max_connections() -> None:
    # One call at a time: a second, while the first holds the only connection, gets none.
    settings = ProviderSettings(
        base_url=BASE_URL,
        model=MODEL,
        input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0,
        timeout_seconds=0.1,
        max_connections=1,
    )
    held = asyncio.Event()
    body = TrackedStream(sse_line(chunk("first")), held)
    recorder = Recorder(httpx.Response(200, stream=body), completion())
    client = OpenAIChatClient.from_settings(settings, transport=httpx.MockTransport(recorder))
    deltas = client.stream(MESSAGES, GenerationParams())
    assert isinstance(deltas, AsyncGenerator)  # closed early below
    try:
        assert await anext(deltas) == "first"
        with pytest.raises(UpstreamError, match=r"no free connection within 0\.1s") as caught:
            await client.complete(MESSAGES, GenerationParams())
        assert caught.value.retryable is False
        held.set()
        await deltas.aclose()
        assert (await client.complete(MESSAGES, GenerationParams())).text == "4"
    finally:
        await client.aclose()


async def test_the_data_lines_of_one_event_are_joined_with_a_newline(make_client: Any) -> None:
    # The SSE spec, as OpenAI's SDK reads it: a chunk's JSON may span several data lines.
    pretty = json.dumps(chunk("Hello"), indent=1).split("\n")
    event = "".join(f"data: {line}\n" for line in pretty) + "\n"
    body = event + f"data: {json.dumps(chunk(finish_reason='stop'))}\n\ndata: [DONE]\n\n"
    recorder = Recorder(httpx.Response(200, content=body.encode()))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["Hello"]


async def test_a_crlf_cut_between_two_reads_does_not_end_an_event(make_client: Any) -> None:
    first, second = json.dumps(chunk("Hi", "stop"))[:10], json.dumps(chunk("Hi", "stop"))[10:]
    body = TrackedStream(f"data: {first}\r".encode(), f"\ndata: {second}\r\n\r\n".encode())
    recorder = Recorder(httpx.Response(200, stream=body))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["Hi"]


async def test_a_byte_order_mark_before_the_first_event_is_skipped(make_client: Any) -> None:
    body = b"\xef\xbb\xbf" + sse_line(chunk("First")) + sse_line(chunk(" second", "stop"))
    recorder = Recorder(httpx.Response(200, content=body))
    deltas = await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert deltas == ["First", " second"]


async def test_a_null_error_in_a_chunk_is_no_error(make_client: Any) -> None:
    recorder = Recorder(sse({**chunk("ok"), "error": None}, chunk(finish_reason="stop")))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


async def test_a_null_delta_carries_no_text(make_client: Any) -> None:
    finish = {"choices": [{"index": 0, "delta": None, "finish_reason": "stop"}]}
    recorder = Recorder(sse(chunk("ok"), finish))
    assert await collect(make_client(recorder).stream(MESSAGES, GenerationParams())) == ["ok"]


@pytest.mark.parametrize("event", [[1, 2], "text"])
async def test_a_chunk_that_is_no_object_is_a_malformed_chunk(
    make_client: Any, event: object
) -> None:
    recorder = Recorder(sse(chunk("ok"), event))
    with pytest.raises(UpstreamError, match="malformed stream chunk"):
        await collect(make_client(recorder, max_attempts=1).stream(MESSAGES, GenerationParams()))


async def test_an_event_of_many_lines_past_the_bound_is_not_read_on(make_client: Any) -> None:
    line = b"data: " + b"x" * (40 << 10) + b"\n"
    recorder = Recorder(httpx.Response(200, content=line * 2 + b"\n"))
    client = make_client(recorder, max_response_bytes=64 << 10, max_attempts=1)
    with pytest.raises(UpstreamError, match="stream event over"):
        await collect(client.stream(MESSAGES, GenerationParams()))


async def test_an_error_object_in_a_200_body_carries_the_providers_message(
    make_client: Any,
) -> None:
    # Retryable, as an error event in a stream is: the provider failed this answer.
    error = httpx.Response(200, json={"error": {"message": "upstream overloaded", "code": 502}})
    recorder = Recorder(error)
    with pytest.raises(UpstreamError, match="error in response: upstream overloaded") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True
    assert recorder.calls == 2


async def test_a_null_error_in_a_200_body_is_no_error(make_client: Any) -> None:
    recorder = Recorder(completion("4", error=None))
    assert (await make_client(recorder).complete(MESSAGES, GenerationParams())).text == "4"


def gzipped(content: bytes, encoding: str = "gzip") -> httpx.Response:
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(gzip.compress(content)))


async def test_requests_ask_for_a_body_that_is_not_encoded(make_client: Any) -> None:
    recorder = Recorder(completion())
    await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert recorder.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
async def test_an_encoded_body_sent_anyway_is_decoded(make_client: Any, encoding: str) -> None:
    answer = json.dumps({"choices": [{"message": {"content": "4"}}]}).encode()
    if encoding == "deflate":
        response = httpx.Response(
            200,
            headers={"content-encoding": "deflate"},
            stream=httpx.ByteStream(zlib.compress(answer)),
        )
    else:
        response = gzipped(answer, encoding)
    reply = await make_client(Recorder(response)).complete(MESSAGES, GenerationParams())
    assert reply.text == "4"


async def test_a_gzip_stream_sent_anyway_is_decoded(make_client: Any) -> None:
    events = sse_line(chunk("Hello")) + sse_line(chunk(" there", "stop"))
    response = gzipped(events)
    response.headers["content-type"] = "text/event-stream"
    deltas = await collect(make_client(Recorder(response)).stream(MESSAGES, GenerationParams()))
    assert deltas == ["Hello", " there"]


@pytest.mark.parametrize("call", ["complete", "stream"])
async def test_a_gzip_bomb_is_not_inflated_past_the_bound(make_client: Any, call: str) -> None:
    # 64 MiB of zeros in 64 KiB: inflated a network read at a time (as httpx decodes), the
    # whole of it was in memory before the bound on the body applied.
    bomb = gzipped(b"\0" * (64 << 20))
    client = make_client(Recorder(bomb), max_response_bytes=64 << 10, max_attempts=1)
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamError, match="over"):
            if call == "complete":
                await client.complete(MESSAGES, GenerationParams())
            else:
                await collect(client.stream(MESSAGES, GenerationParams()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


async def test_a_body_in_an_encoding_not_understood_is_a_malformed_answer(
    make_client: Any,
) -> None:
    body = httpx.ByteStream(b"\x0b\x01\x80")
    response = httpx.Response(200, headers={"content-encoding": "br"}, stream=body)
    recorder = Recorder(response)
    with pytest.raises(UpstreamError, match="content-encoding 'br'") as caught:
        await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert caught.value.retryable is True


async def test_a_lone_surrogate_escape_in_an_answer_is_replaced_so_it_can_be_sent(
    make_client: Any,
) -> None:
    # Before: JSON's "\ud83d" decoded to a lone surrogate, which no UTF-8 response can carry:
    # the answer was paid for and cached, and every delivery of it failed (UnicodeEncodeError).
    body = b'{"choices": [{"message": {"content": "cut \\ud83d emoji, whole \\ud83d\\ude00"}}]}'
    recorder = Recorder(httpx.Response(200, content=body))
    reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert reply.text == "cut \ufffd emoji, whole \U0001f600"
    reply.text.encode("utf-8")


async def test_a_lone_surrogate_escape_in_the_reported_model_is_replaced(
    make_client: Any,
) -> None:
    # Before: the model name was kept as the provider sent it and cached with the answer: every
    # reply carrying it (and every repeat, a hit) failed INTERNAL, and so did each snapshot save.
    body = b'{"choices": [{"message": {"content": "fine"}}], "model": "m\\ud800"}'
    recorder = Recorder(httpx.Response(200, content=body))
    reply = await make_client(recorder).complete(MESSAGES, GenerationParams())
    assert reply.model == "m\ufffd"
    reply.model.encode("utf-8")


async def test_a_lone_surrogate_escape_in_a_stream_delta_is_replaced(make_client: Any) -> None:
    lone = b'data: {"choices": [{"index": 0, "delta": {"content": "a\\udc00b"}}]}\n\n'
    recorder = Recorder(httpx.Response(200, content=lone + sse_line(chunk(" c", "stop"))))
    deltas = await collect(make_client(recorder).stream(MESSAGES, GenerationParams()))
    assert deltas == ["a\ufffdb", " c"]


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, content=b'{"error": {"message": "overloaded \\ud83d"}}'),
        httpx.Response(503, content=b'{"detail": "overloaded \\ud83d"}'),
        httpx.Response(503, content=b'{"error": "overloaded \\ud83d"}'),
        sse(chunk("The answer"), '{"error": {"message": "overloaded \\ud83d"}}'),
    ],
    ids=["error-message", "detail", "error-text", "stream-error-event"],
)
async def test_a_lone_surrogate_escape_in_a_provider_error_is_replaced(
    make_client: Any, response: httpx.Response
) -> None:
    # Before: the error text kept the lone surrogate JSON's "\ud83d" decodes to; it went on into
    # the error event's message (and a later completion's upstream_failures), which no UTF-8
    # event log can hold: the write raised, and an answered request ended INTERNAL.
    client = make_client(Recorder(response), max_attempts=1)
    with pytest.raises(UpstreamError) as caught:
        await collect(client.stream(MESSAGES, GenerationParams()))
    assert "overloaded \ufffd" in str(caught.value)
    str(caught.value).encode("utf-8")

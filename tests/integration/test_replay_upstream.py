"""The replay upstream over real HTTP, driven by the service's own OpenAIChatClient."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from routecache.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)
from routecache.errors import UpstreamError
from routecache.replay import FaultKind, Recordings, ReplayConfig, start_replay_server
from routecache.replay.build_fixture import main as build_fixture
from routecache.replay.server import RunningReplayServer
from routecache.router.tokens import request_prompt_tokens
from routecache.router.upstream import OpenAIChatClient
from tests.fakes import eventually

pytestmark = pytest.mark.integration

WEAK = "mixtral-8x7b-instruct"
STRONG = "gpt-4-1106-preview"
UNKNOWN_PROMPT = "Which is heavier, a kilogram of feathers or a kilogram of lead?"
JSON_MODE = GenerationParams(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT))
FAULT = "x-replay-fault"
LATENCY = "x-replay-latency-ms"
ClientFactory = Callable[..., OpenAIChatClient]


def packaged_rows() -> list[dict[str, str]]:
    """The fixture read independently of Recordings, so a lookup bug cannot hide itself."""
    text = resources.files("routecache.replay").joinpath("data", "gsm8k_recorded.jsonl")
    return [json.loads(line) for line in text.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return packaged_rows()


@pytest.fixture(scope="module")
def recordings() -> Recordings:
    return Recordings.load()


@pytest.fixture
def config() -> ReplayConfig:
    return ReplayConfig(hang_seconds=5.0)


@pytest.fixture
async def replay(
    config: ReplayConfig, recordings: Recordings
) -> AsyncIterator[RunningReplayServer]:
    async with await start_replay_server(config, recordings=recordings) as server:
        yield server


@pytest.fixture
async def client_for(replay: RunningReplayServer) -> AsyncIterator[ClientFactory]:
    clients: list[OpenAIChatClient] = []

    def make(model: str = STRONG, **kwargs: Any) -> OpenAIChatClient:
        client = OpenAIChatClient(
            replay.base_url,
            model,
            kwargs.pop("api_key", None),
            kwargs.pop("timeout_seconds", 2.0),
            **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def ask(prompt: str) -> list[Message]:
    return [Message(Role.USER, prompt)]


async def streamed(client: OpenAIChatClient, messages: list[Message], into: list[str]) -> str:
    async for delta in client.stream(messages, GenerationParams()):
        into.append(delta)
    return "".join(into)


# --- answers -------------------------------------------------------------------------------


async def test_the_reported_prompt_tokens_are_the_services_estimate_schema_included(
    client_for: ClientFactory,
) -> None:
    # The service reserves and rate-limits on its own estimate: the replay upstream reports
    # the same count, the JSON schema sent included, however the caller spaced the schema.
    schema = '{ "type": "object",  "required": ["answer"] }'
    params = GenerationParams(
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
    )
    messages = [Message(Role.SYSTEM, "Be brief."), *ask(UNKNOWN_PROMPT)]
    reply = await client_for().complete(messages, params)
    assert reply.prompt_tokens == request_prompt_tokens(ChatRequest(tuple(messages), params))
    plain = await client_for().complete(messages, GenerationParams())
    assert reply.prompt_tokens > plain.prompt_tokens


@pytest.mark.parametrize(("model", "field"), [(WEAK, "weak_response"), (STRONG, "strong_response")])
async def test_known_prompt_gets_the_recorded_answer(
    client_for: ClientFactory, rows: list[dict[str, str]], model: str, field: str
) -> None:
    row = rows[0]
    reply = await client_for(model).complete(ask(row["prompt"]), GenerationParams())
    assert reply.text == row[field]
    assert reply.model == model
    assert reply.prompt_tokens == -(-len(row["prompt"]) // 4)
    assert reply.completion_tokens == -(-len(row[field]) // 4)


async def test_lookup_uses_the_stripped_last_user_message(
    client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    row = rows[5]
    messages = [
        Message(Role.SYSTEM, "You are a maths tutor."),
        Message(Role.USER, "an earlier question"),
        Message(Role.ASSISTANT, "an earlier answer"),
        Message(Role.USER, f"  \n{row['prompt']}\n "),
    ]
    reply = await client_for(WEAK).complete(messages, GenerationParams())
    assert reply.text == row["weak_response"]


async def test_an_unlisted_model_gets_the_strong_answers(
    client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    reply = await client_for("some-other-model").complete(
        ask(rows[1]["prompt"]), GenerationParams()
    )
    assert reply.text == rows[1]["strong_response"]


async def test_unknown_prompt_gets_a_stable_answer_per_model(client_for: ClientFactory) -> None:
    weak, strong = client_for(WEAK), client_for(STRONG)
    first = await weak.complete(ask(UNKNOWN_PROMPT), GenerationParams())
    second = await weak.complete(ask(UNKNOWN_PROMPT), GenerationParams())
    other = await strong.complete(ask(UNKNOWN_PROMPT), GenerationParams())
    assert first.text == second.text
    assert first.text and other.text and first.text != other.text
    different = await weak.complete(ask(UNKNOWN_PROMPT + " Explain."), GenerationParams())
    assert different.text != first.text


def test_unknown_prompt_answer_is_the_same_in_another_process(recordings: Recordings) -> None:
    code = (
        "import sys; from routecache.replay.recordings import synthetic_answer; "
        "sys.stdout.write(synthetic_answer('weak', sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONIOENCODING": "utf-8"}
    other = subprocess.run(
        [sys.executable, "-c", code, UNKNOWN_PROMPT],
        env=env,
        capture_output=True,
        check=True,
        encoding="utf-8",
    )
    assert other.stdout == recordings.answer("weak", UNKNOWN_PROMPT)


@pytest.mark.parametrize("model", [WEAK, STRONG])
@pytest.mark.parametrize("prompt_index", [0, None])
async def test_streaming_reassembles_the_non_streaming_answer(
    client_for: ClientFactory, rows: list[dict[str, str]], model: str, prompt_index: int | None
) -> None:
    prompt = UNKNOWN_PROMPT if prompt_index is None else rows[prompt_index]["prompt"]
    client = client_for(model)
    whole = await client.complete(ask(prompt), GenerationParams())
    deltas: list[str] = []
    assert await streamed(client, ask(prompt), deltas) == whole.text
    assert len(deltas) > 1


async def test_max_tokens_truncates_with_finish_reason_length(
    replay: RunningReplayServer, client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    row = rows[0]
    reply = await client_for(STRONG).complete(ask(row["prompt"]), GenerationParams(max_tokens=5))
    assert reply.text == row["strong_response"][:20]
    body = {"model": STRONG, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with httpx.AsyncClient() as http:
        raw = (await http.post(f"{replay.base_url}/chat/completions", json=body)).json()
    assert raw["choices"][0]["finish_reason"] == "length"
    assert len(raw["choices"][0]["message"]["content"]) == 8


# --- JSON mode -----------------------------------------------------------------------------


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_json_mode_strong_always_answers_valid_json(
    client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    client = client_for(STRONG)
    for row in rows[:20]:
        reply = await client.complete(ask(row["prompt"]), JSON_MODE)
        assert json.loads(reply.text) == {"answer": row["strong_response"]}
    schema = ResponseFormat(ResponseFormatType.JSON_SCHEMA, '{"type": "object"}')
    reply = await client.complete(ask(UNKNOWN_PROMPT), GenerationParams(response_format=schema))
    assert parses_as_json(reply.text)


async def test_json_mode_weak_breaks_json_for_some_prompts_stably(
    client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    client = client_for(WEAK)
    valid = {}
    for row in rows[:20]:
        reply = await client.complete(ask(row["prompt"]), JSON_MODE)
        valid[row["prompt"]] = parses_as_json(reply.text)
        if not valid[row["prompt"]]:
            assert reply.text == row["weak_response"]
    assert 3 <= sum(valid.values()) <= 17, valid
    for prompt, was_valid in list(valid.items())[:6]:
        again = await client.complete(ask(prompt), JSON_MODE)
        assert parses_as_json(again.text) is was_valid


# --- faults --------------------------------------------------------------------------------


def faulty(client_for: ClientFactory, fault: FaultKind | str, **kwargs: Any) -> OpenAIChatClient:
    return client_for(STRONG, headers={"x-replay-fault": str(fault)}, **kwargs)


@pytest.mark.parametrize("fault", [FaultKind.HTTP_429, FaultKind.HTTP_500, FaultKind.HTTP_503])
async def test_http_faults_are_retried_then_raised(
    replay: RunningReplayServer, client_for: ClientFactory, fault: FaultKind
) -> None:
    with pytest.raises(UpstreamError, match=f"HTTP {fault.value[-3:]}") as caught:
        await faulty(client_for, fault).complete(ask(UNKNOWN_PROMPT), GenerationParams())
    assert caught.value.retryable is True
    assert replay.chat_requests == 2
    assert replay.injected_faults[fault] == 2


async def test_429_carries_retry_after(replay: RunningReplayServer) -> None:
    body = {"model": STRONG, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{replay.base_url}/chat/completions", json=body, headers={"x-replay-fault": "http_429"}
        )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")  # as OpenAI


@pytest.mark.parametrize("mode", ["complete", "stream"])
async def test_a_hang_becomes_an_error_within_the_client_timeout(
    replay: RunningReplayServer, client_for: ClientFactory, mode: str
) -> None:
    client = faulty(client_for, FaultKind.TIMEOUT, timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        if mode == "complete":
            await client.complete(ask(UNKNOWN_PROMPT), GenerationParams())
        else:
            await streamed(client, ask(UNKNOWN_PROMPT), [])
    elapsed = time.monotonic() - started
    assert caught.value.retryable is True
    assert replay.chat_requests == 2
    assert elapsed < 2 * 0.3 + 0.2 + 0.5  # two timed-out attempts and one pause, far below 5 s


@pytest.mark.parametrize("mode", ["complete", "stream"])
async def test_malformed_json_is_a_retryable_error(
    replay: RunningReplayServer, client_for: ClientFactory, mode: str
) -> None:
    client = faulty(client_for, FaultKind.MALFORMED_JSON)
    with pytest.raises(UpstreamError, match="malformed") as caught:
        if mode == "complete":
            await client.complete(ask(UNKNOWN_PROMPT), GenerationParams())
        else:
            await streamed(client, ask(UNKNOWN_PROMPT), [])
    assert caught.value.retryable is True
    assert replay.chat_requests == 2


async def test_truncated_stream_raises_after_a_prefix(
    client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    prompt = rows[0]["prompt"]
    received: list[str] = []
    with pytest.raises(UpstreamError, match="without finish_reason") as caught:
        await streamed(faulty(client_for, FaultKind.TRUNCATED_STREAM), ask(prompt), received)
    assert caught.value.retryable is True
    text = "".join(received)
    assert text and rows[0]["strong_response"].startswith(text)
    assert len(text) < len(rows[0]["strong_response"])


async def test_a_stream_past_four_times_the_response_bound_is_cut_off(
    replay: RunningReplayServer, client_for: ClientFactory, rows: list[dict[str, str]]
) -> None:
    # Before: only each line was bounded, so a stream of many lines within it was read whole.
    prompt = rows[0]["prompt"]
    body = {"model": STRONG, "messages": [{"role": "user", "content": prompt}], "stream": True}
    raw = (await post_chat(replay, body)).content
    bound = max(max(len(line) for line in raw.split(b"\n")), len(raw) // 8)
    assert 4 * bound < len(raw)  # every line within the bound, the stream past four times it
    client = client_for(STRONG, max_response_bytes=bound)
    with pytest.raises(UpstreamError, match=f"stream over {4 * bound} bytes") as caught:
        await streamed(client, ask(prompt), [])
    assert caught.value.retryable is True


async def test_empty_answer_is_an_empty_string(client_for: ClientFactory) -> None:
    client = faulty(client_for, FaultKind.EMPTY_ANSWER)
    reply = await client.complete(ask(UNKNOWN_PROMPT), GenerationParams())
    assert (reply.text, reply.completion_tokens) == ("", 0)
    assert await streamed(client, ask(UNKNOWN_PROMPT), []) == ""
    assert (await client.complete(ask(UNKNOWN_PROMPT), JSON_MODE)).text == ""


@pytest.mark.parametrize(
    "config", [ReplayConfig(fault_rate=1.0, fault_kinds=(FaultKind.HTTP_500,))]
)
async def test_fault_header_none_overrides_the_fault_rate(
    client_for: ClientFactory, config: ReplayConfig
) -> None:
    with pytest.raises(UpstreamError):
        await client_for(STRONG).complete(ask(UNKNOWN_PROMPT), GenerationParams())
    reply = await faulty(client_for, "none").complete(ask(UNKNOWN_PROMPT), GenerationParams())
    assert reply.text


async def run_outcomes(config: ReplayConfig, recordings: Recordings, count: int) -> list[str]:
    outcomes = []
    async with await start_replay_server(config, recordings=recordings) as server:
        client = OpenAIChatClient(server.base_url, STRONG, None, 0.3, max_attempts=1)
        try:
            for index in range(count):
                try:
                    await client.complete(ask(f"question {index}"), GenerationParams())
                    outcomes.append("ok")
                except UpstreamError as exc:
                    outcomes.append(str(exc).split(": ", 1)[1][:20])
        finally:
            await client.aclose()
    return outcomes


async def test_fault_rate_is_deterministic_for_a_seed(recordings: Recordings) -> None:
    kinds = (FaultKind.HTTP_500, FaultKind.HTTP_503, FaultKind.MALFORMED_JSON)
    config = ReplayConfig(fault_rate=0.5, fault_kinds=kinds, fault_seed=7)
    first = await run_outcomes(config, recordings, 30)
    second = await run_outcomes(config, recordings, 30)
    assert first == second
    assert 5 <= first.count("ok") <= 25
    assert len(set(first)) == 4  # ok and each of the three faults
    reseeded = await run_outcomes(ReplayConfig(fault_rate=0.5, fault_kinds=kinds), recordings, 30)
    assert reseeded != first


@pytest.mark.parametrize("config", [ReplayConfig(latency_ms=150)])
async def test_latency_is_added_to_every_answer(
    client_for: ClientFactory, config: ReplayConfig
) -> None:
    started = time.monotonic()
    await client_for(STRONG).complete(ask(UNKNOWN_PROMPT), GenerationParams())
    assert time.monotonic() - started >= 0.15


# --- auth, bad requests, other endpoints ---------------------------------------------------


@pytest.mark.parametrize("config", [ReplayConfig(api_key="sk-replay")])
async def test_wrong_key_is_refused_and_not_retried(
    replay: RunningReplayServer, client_for: ClientFactory, config: ReplayConfig
) -> None:
    with pytest.raises(UpstreamError, match="HTTP 401") as caught:
        await client_for(STRONG, api_key="sk-wrong").complete(ask("hi"), GenerationParams())
    assert caught.value.retryable is False
    assert replay.chat_requests == 1
    reply = await client_for(STRONG, api_key="sk-replay").complete(ask("hi"), GenerationParams())
    assert reply.text


@pytest.mark.parametrize("config", [ReplayConfig(api_key="sk-replay")])
@pytest.mark.parametrize("given", [b"Bearer \xff\xfe", "Bearer sk-r\u00e9play".encode()])
async def test_an_authorization_header_that_is_not_ascii_is_a_401_not_a_500(
    replay: RunningReplayServer, config: ReplayConfig, given: bytes
) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{replay.base_url}/chat/completions", json=HI, headers={b"authorization": given}
        )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("content", "headers", "param"),
    [
        (b"{not json", {}, None),
        (b"[" * 100_000, {}, None),  # deeper than json recurses: RecursionError, not ValueError
        (b'{"model": "m", "messages": []}', {}, "messages"),
        (b'{"model": "m"}', {}, "messages"),
        (b'{"model": "m", "messages": [{"content": "no role"}]}', {}, "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "bot", "content": "x"}]}', {}, "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "user"}]}', {}, "messages[0]"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', {}, "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": ""}]}', {FAULT: "?"}, None),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, '
            b'"stream_options": ["include_usage"]}',
            {},
            "stream_options",
        ),
        # json reads the escape as a lone surrogate, which no UTF-8 can hold: was a 500
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
            {},
            None,
        ),
        # A Content-Encoding the body does not decode from: was aiohttp's text/plain 500
        (b'{"model": "m", "messages": []}', {"content-encoding": "gzip"}, None),
        (b'{"model": "m", "messages": []}', {"content-encoding": "deflate"}, None),
    ],
    ids=[
        "bad-json",
        "json-nested-too-deep",
        "empty-messages",
        "no-messages",
        "no-role",
        "unknown-role",
        "no-content",
        "no-model",
        "unknown-fault",
        "stream-options-not-object",
        "lone-surrogate-escape",
        "not-gzip",
        "not-deflate",
    ],
)
async def test_malformed_request_is_a_400_with_an_openai_error(
    replay: RunningReplayServer, content: bytes, headers: dict[str, str], param: str | None
) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{replay.base_url}/chat/completions",
            content=content,
            headers={"content-type": "application/json", **headers},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


async def test_a_body_that_does_not_decode_closes_its_connection_and_logs_no_error(
    replay: RunningReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: aiohttp's text/plain 500 with a traceback. Answered 400 on a kept-alive
    # connection, aiohttp read on for the broken body after it, logged that as an unhandled
    # exception and dropped the connection under the client's next request.
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    url = f"{replay.base_url}/chat/completions"
    async with httpx.AsyncClient() as http:
        refused = await http.post(url, content=body, headers=headers)
        answered = await http.post(url, content=gzip.compress(body), headers=headers)
    assert refused.status_code == 400 and refused.headers["connection"] == "close"
    assert refused.json()["error"] == {
        "message": "the request body cannot be read: Can not decode content-encoding: gzip",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert answered.status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def post_chat(
    replay: RunningReplayServer, body: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{replay.base_url}/chat/completions", json=body, headers=headers or {}
        )


HI = {"model": STRONG, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "headers"),
    [(HI, {LATENCY: "soon"}), ({"model": STRONG}, {}), (HI, {FAULT: "http_418"})],
    ids=["bad-latency-header", "bad-body", "bad-fault-header"],
)
async def test_a_refused_request_leaves_the_scripted_faults_queued(
    replay: RunningReplayServer, body: object, headers: dict[str, str]
) -> None:
    replay.script_faults(FaultKind.HTTP_503)
    assert (await post_chat(replay, body, headers)).status_code == 400
    assert (await post_chat(replay, HI)).status_code == 503
    assert replay.injected_faults == {FaultKind.HTTP_503: 1}


@pytest.mark.parametrize("latency", ["inf", "-inf", "nan", "1e400", "86400000", "-5", "soon"])
async def test_a_latency_header_out_of_range_is_a_400_not_a_hang(
    replay: RunningReplayServer, latency: str
) -> None:
    async with httpx.AsyncClient(timeout=3.0) as http:
        response = await http.post(
            f"{replay.base_url}/chat/completions", json=HI, headers={LATENCY: latency}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and LATENCY in error["message"]


async def test_a_latency_header_in_range_delays_the_answer(replay: RunningReplayServer) -> None:
    started = time.monotonic()
    assert (await post_chat(replay, HI, {LATENCY: "120.5"})).status_code == 200
    assert time.monotonic() - started >= 0.12


async def test_both_token_limits_are_a_400_with_openai_code(replay: RunningReplayServer) -> None:
    response = await post_chat(replay, HI | {"max_tokens": 2, "max_completion_tokens": 3})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "invalid_parameter_combination")


async def test_a_body_over_the_size_limit_is_a_413_with_an_openai_error(
    replay: RunningReplayServer,
) -> None:
    # aiohttp's own refusal is a text/plain 413 that an OpenAI client cannot read.
    big = HI | {"messages": [{"role": "user", "content": "x" * (2 * 1024**2)}]}
    response = await post_chat(replay, big)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "1048576" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/chat/completions", 405), ("POST", "/v1/completions", 404)],
)
async def test_a_wrong_method_or_path_is_an_openai_error(
    replay: RunningReplayServer, method: str, path: str, status: int
) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.request(method, f"http://127.0.0.1:{replay.port}{path}", json=HI)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers.get("allow") == ("POST" if status == 405 else None)


async def test_models_and_health(replay: RunningReplayServer, recordings: Recordings) -> None:
    async with httpx.AsyncClient() as http:
        models = (await http.get(f"{replay.base_url}/models")).json()
        health = (await http.get(f"http://127.0.0.1:{replay.port}/health")).json()
    assert {m["id"] for m in models["data"]} == {WEAK, STRONG}
    assert health == {"status": "ok", "recordings": len(recordings)} and len(recordings) == 1074


# --- the command line and the fixture ------------------------------------------------------


def test_cli_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "routecache.replay", "--port", "0", "--model", "tiny=weak"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            base_url = banner.split(" at ")[1].split()[0]
            models = httpx.get(f"{base_url}/models", timeout=5).json()
            assert "tiny" in {m["id"] for m in models["data"]}
        finally:
            process.terminate()
        assert process.wait(timeout=5) == 0  # SIGTERM is a graceful stop, not a crash


def shared_routing_dir() -> Path:
    root = os.environ.get("ROUTECACHE_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[3] / "shared" / "data"
    return base / "routing"


@pytest.mark.shared_data
@pytest.mark.skipif(not shared_routing_dir().is_dir(), reason="needs ../shared/data/routing")
def test_fixture_is_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "recorded.jsonl"
    assert build_fixture(["--routing-dir", str(shared_routing_dir()), "--out", str(out)]) == 0
    packaged = resources.files("routecache.replay").joinpath("data", "gsm8k_recorded.jsonl")
    assert out.read_bytes() == packaged.read_bytes()


# --- the wire format, read raw -------------------------------------------------------------


def sse_data(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_speaks_openai_events_from_role_to_done(
    replay: RunningReplayServer, rows: list[dict[str, str]], include_usage: bool
) -> None:
    row = rows[0]
    body = {"model": WEAK, "messages": [{"role": "user", "content": row["prompt"]}],
            "stream": True, "max_tokens": 10} | (
        {"stream_options": {"include_usage": True}} if include_usage else {}
    )  # fmt: skip
    response = await post_chat(replay, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    *events, done = sse_data(response.text)
    assert done == "[DONE]"
    chunks = [json.loads(event) for event in events]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks.pop()["usage"] if include_usage else None
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    text = "".join(c["delta"].get("content", "") for c in choices)
    assert text == row["weak_response"][:40]
    if include_usage:
        assert usage == {"prompt_tokens": -(-len(row["prompt"]) // 4), "completion_tokens": 10,
                         "total_tokens": -(-len(row["prompt"]) // 4) + 10}  # fmt: skip


async def test_a_whole_answer_is_one_chat_completion_object(replay: RunningReplayServer) -> None:
    raw = (await post_chat(replay, HI)).json()
    assert raw["object"] == "chat.completion" and raw["id"].startswith("chatcmpl-")
    assert raw["choices"][0]["message"]["role"] == "assistant"
    assert raw["choices"][0]["finish_reason"] == "stop"
    empty = (await post_chat(replay, HI, {FAULT: "empty_answer"})).json()
    assert (empty["choices"][0]["message"]["content"], empty["choices"][0]["finish_reason"]) == (
        "",
        "stop",
    )


@pytest.mark.parametrize("config", [ReplayConfig(retry_after_seconds=7)])
async def test_429_carries_the_configured_retry_after(
    replay: RunningReplayServer, config: ReplayConfig
) -> None:
    response = await post_chat(replay, HI, {FAULT: "http_429"})
    assert (response.status_code, response.headers["retry-after"]) == (429, "7")


@pytest.mark.parametrize("config", [ReplayConfig(api_key="sk-replay")])
async def test_the_model_list_needs_the_key_too(
    replay: RunningReplayServer, config: ReplayConfig
) -> None:
    async with httpx.AsyncClient() as http:
        refused = await http.get(f"{replay.base_url}/models")
        listed = await http.get(
            f"{replay.base_url}/models", headers={"Authorization": "Bearer sk-replay"}
        )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {WEAK, STRONG}


async def test_an_ipv6_server_gives_a_usable_base_url(recordings: Recordings) -> None:
    async with await start_replay_server(ReplayConfig(), "::1", recordings=recordings) as server:
        assert server.base_url == f"http://[::1]:{server.port}/v1"
        async with httpx.AsyncClient() as http:
            models = (await http.get(f"{server.base_url}/models")).json()
    assert {m["id"] for m in models["data"]} == {WEAK, STRONG}


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=no-such-charset"]
)
async def test_a_body_that_is_not_utf8_is_a_400_naming_the_body(
    replay: RunningReplayServer, content_type: str
) -> None:
    # The body is read as UTF-8 whatever the charset says, as OpenAI reads it. Bytes that are
    # not UTF-8 were reported as a 'bad replay header'; an unknown charset was a 500.
    async def post(content: bytes) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            return await http.post(
                f"{replay.base_url}/chat/completions",
                content=content,
                headers={"content-type": content_type},
            )

    refused = await post(b'{"model": "m\xff", "messages": []}')
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("the request body is not UTF-8")
    assert (await post(json.dumps(HI).encode())).status_code == 200


@pytest.mark.parametrize("fault", ["http_500", "http_503"])
async def test_only_a_429_carries_retry_after(replay: RunningReplayServer, fault: str) -> None:
    response = await post_chat(replay, HI, {FAULT: fault})
    assert response.status_code == int(fault[-3:])
    assert "retry-after" not in response.headers
    assert response.json()["error"]["type"] == "server_error"


async def test_a_truncated_fault_on_a_whole_answer_cuts_the_body_short(
    replay: RunningReplayServer,
) -> None:
    response = await post_chat(replay, HI, {FAULT: "truncated_stream"})
    assert response.status_code == 200
    assert response.text.startswith('{"id": "chatcmpl-replay-')
    assert len(response.text) < len((await post_chat(replay, HI)).text) // 2 + 2
    with pytest.raises(ValueError):
        json.loads(response.text)


async def test_closing_the_server_wakes_a_hung_request_at_once(recordings: Recordings) -> None:
    server = await start_replay_server(ReplayConfig(hang_seconds=30.0), recordings=recordings)
    hung = asyncio.ensure_future(post_chat(server, HI, {FAULT: "timeout"}))
    await eventually(lambda: server.chat_requests == 1, "the request reached the server")
    await server.close()
    # Left hanging, the runner's 1 s shutdown timeout would cut it off with no answer at all.
    assert (await hung).status_code == 200


# --- connections ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [ReplayConfig(latency_ms=300)])
async def test_calls_past_max_connections_wait_for_one_outside_their_attempt_time(
    client_for: ClientFactory, config: ReplayConfig
) -> None:
    # Two calls at a time, each 0.3 s: the last two wait 0.3 s for a connection and then
    # answer within their own 0.5 s; the wait is this service's, not the provider's slowness.
    client = client_for(STRONG, timeout_seconds=0.5, max_attempts=1, max_connections=2)
    replies = await asyncio.gather(
        *(client.complete(ask(f"{UNKNOWN_PROMPT} {i}"), GenerationParams()) for i in range(4))
    )
    assert all(reply.text for reply in replies)


async def test_no_free_connection_within_the_timeout_is_not_the_providers_failure(
    client_for: ClientFactory, replay: RunningReplayServer
) -> None:
    # Not retryable: the failover chain moves on without a verdict on the provider's breaker.
    client = client_for(STRONG, timeout_seconds=0.2, max_connections=1)
    deltas = client.stream(ask(UNKNOWN_PROMPT), GenerationParams())
    assert isinstance(deltas, AsyncGenerator)  # closed early below
    assert await anext(deltas)  # the only connection, held by the open stream
    try:
        with pytest.raises(UpstreamError, match="no free connection") as caught:
            await client.complete(ask(UNKNOWN_PROMPT), GenerationParams())
        assert caught.value.retryable is False
        assert "max_connections 1" in str(caught.value)
        assert replay.chat_requests == 1
    finally:
        await deltas.aclose()
    assert (await client.complete(ask(UNKNOWN_PROMPT), GenerationParams())).text


async def test_a_number_past_the_digit_limit_is_a_400_naming_the_body(
    replay: RunningReplayServer,
) -> None:
    # Python refuses to read an int of over 4300 digits with a plain ValueError, which was
    # reported as a 'bad replay header'.
    content = b'{"model": "m", "messages": [], "max_tokens": ' + b"1" * 5000 + b"}"
    async with httpx.AsyncClient() as http:
        refused = await http.post(f"{replay.base_url}/chat/completions", content=content)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("the request body is not valid JSON")

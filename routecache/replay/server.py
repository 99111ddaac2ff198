"""The replay upstream: an aiohttp server speaking the OpenAI chat-completions API.

It answers from recorded model answers, with injectable latency and faults, so the service's
integration tests and demo exercise a real HTTP provider without network access or spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from routecache.replay.config import (
    DEFAULT_PORT,
    FAULT_HEADER,
    LATENCY_HEADER,
    FaultKind,
    FaultSchedule,
    ReplayConfig,
    header_latency_ms,
)
from routecache.replay.recordings import Recordings
from routecache.replay.wire import (
    DONE_EVENT,
    ChatCall,
    RequestError,
    StreamEvents,
    completion_body,
    error_body,
    parse_chat_call,
    shape_answer,
)

_HTTP_FAULTS = {
    FaultKind.HTTP_429: (429, "requests", "Rate limit reached (injected by replay)"),
    FaultKind.HTTP_500: (500, "server_error", "The server had an error (injected by replay)"),
    FaultKind.HTTP_503: (503, "server_error", "The engine is overloaded (injected by replay)"),
}


@dataclass
class ReplayState:
    """One server's recordings, fault schedule and counters; tests read the counters."""

    config: ReplayConfig
    recordings: Recordings
    faults: FaultSchedule
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    chat_requests: int = 0
    injected: Counter[FaultKind] = field(default_factory=Counter)


STATE = web.AppKey("replay_state", ReplayState)


def create_app(state: ReplayState) -> web.Application:
    app = web.Application(middlewares=[_openai_errors])
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    return app


def _error(status: int, message: str, kind: str, **extra: str | None) -> web.Response:
    return web.json_response(error_body(message, kind, **extra), status=status)


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, a body over its 1 MiB limit: 413) are text/plain; an
    OpenAI client reads an error from a JSON body, as every other error here has one."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.text or exc.reason, "invalid_request_error")
        if "Allow" in exc.headers:  # a 405 names the methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _unauthorised(request: web.Request, state: ReplayState) -> web.Response | None:
    expected = state.config.api_key
    if expected is None:
        return None
    # aiohttp decodes a header's non-UTF-8 bytes as surrogate escapes: encode them back (a
    # plain encode() raised on them, a 500) so such a header is just a wrong key.
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if hmac.compare_digest(given, f"Bearer {expected}".encode()):
        return None
    return _error(
        401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key"
    )


def _no_lone_surrogates(body: object) -> object:
    """The decoded body, or RequestError: json reads a "\\ud800" escape with no pair as a lone
    surrogate, which no UTF-8 can hold (the recordings' digest of the prompt failed on it)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"the request body has a string that is not valid Unicode: {exc.reason} "
            f"({exc.object[exc.start : exc.end]!r})"
        ) from exc
    return body


def _unreadable_body(request: web.Request, exc: web.RequestPayloadError) -> web.Response:
    """The JSON 400 for a body aiohttp's parser cannot read (one that does not decode from its
    Content-Encoding), where the error escaped as aiohttp's text/plain 500 and a traceback.

    The connection closes after it: the rest of the body cannot be read. Ended here, so aiohttp
    does not read on for it after the response, which raised again (logged as unhandled) and
    dropped the connection under a client that kept it alive."""
    cause = exc.__cause__  # the parser's error; its message without the status line
    problem = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    response = _error(400, f"the request body cannot be read: {problem}", "invalid_request_error")
    response.force_close()
    request.content.feed_eof()
    return response


def _latency_ms(request: web.Request, state: ReplayState) -> float:
    """The header's latency, else the configured one; raises ValueError for a bad header."""
    header = request.headers.get(LATENCY_HEADER)
    return state.config.latency_ms if header is None else header_latency_ms(header)


async def _pause(state: ReplayState, seconds: float) -> None:
    """Sleep, but wake at once when the server closes so shutdown never waits on a hang."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.closing.wait(), seconds)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.chat_requests += 1
    if (denied := _unauthorised(request, state)) is not None:
        return denied
    try:
        # UTF-8 whatever the charset says (as OpenAI reads it): request.text() would fail on
        # an unknown charset.
        payload = json.loads((await request.read()).decode("utf-8"))
    except web.RequestPayloadError as exc:  # a Content-Encoding the body does not decode from
        return _unreadable_body(request, exc)
    except UnicodeDecodeError as exc:
        return _error(400, f"the request body is not UTF-8: {exc}", "invalid_request_error")
    except json.JSONDecodeError as exc:
        return _error(
            400, f"the request body is not valid JSON: {exc.msg}", "invalid_request_error"
        )
    except RecursionError:  # JSON nested deeper than the parser recurses: no ValueError
        return _error(400, "the request body is nested too deeply", "invalid_request_error")
    except ValueError as exc:  # an int past Python's digit limit: the body's fault too
        return _error(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
    try:
        call = parse_chat_call(_no_lone_surrogates(payload))
        latency_ms = _latency_ms(request, state)
        # Last, once all else is valid: a refused request must not use up a scripted fault.
        fault = state.faults.next_fault(request.headers.get(FAULT_HEADER))
    except RequestError as exc:
        return _error(400, str(exc), "invalid_request_error", param=exc.param, code=exc.code)
    except ValueError as exc:  # a bad x-replay-* header
        return _error(400, f"bad replay header: {exc}", "invalid_request_error")
    await _pause(state, latency_ms / 1000)
    if fault is not None:
        state.injected[fault] += 1
    if fault in _HTTP_FAULTS:
        status, kind, message = _HTTP_FAULTS[fault]
        # As OpenAI's: a rate limit's type is what ran out (requests), its code says which error.
        code = "rate_limit_exceeded" if status == 429 else None
        response = _error(status, message, kind, code=code)
        if status == 429:
            response.headers["retry-after"] = str(state.config.retry_after_seconds)
        return response
    if fault is FaultKind.TIMEOUT:
        await _pause(state, state.config.hang_seconds)
    role = state.config.role_of(call.model)
    if fault is FaultKind.EMPTY_ANSWER:
        answer, finish_reason = "", "stop"  # empty even in JSON mode: no shaping applies
    else:
        answer, finish_reason = shape_answer(state.recordings.answer(role, call.prompt), role, call)
    if call.stream:
        return await _stream(request, call, answer, finish_reason, fault)
    body = json.dumps(
        completion_body(
            call, answer, finish_reason, response_id=_response_id(), created=int(time.time())
        ),
        ensure_ascii=False,
    )
    if fault in (FaultKind.MALFORMED_JSON, FaultKind.TRUNCATED_STREAM):
        body = body[: len(body) // 2]  # a body cut short is not JSON
    return web.Response(text=body, content_type="application/json")


async def _stream(
    request: web.Request,
    call: ChatCall,
    answer: str,
    finish_reason: str,
    fault: FaultKind | None,
) -> web.StreamResponse:
    state = request.app[STATE]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    events = StreamEvents(call, _response_id(), int(time.time()))
    size = state.config.stream_chunk_chars
    pieces = [answer[i : i + size] for i in range(0, len(answer), size)]
    await response.write(events.delta({"role": "assistant", "content": ""}))
    if fault is FaultKind.MALFORMED_JSON:
        await response.write(b'data: {"choices": [{"delta": {"content": "unterminated\n\n')
        return response
    if fault is FaultKind.TRUNCATED_STREAM:
        pieces = pieces[: len(pieces) // 2]
    for piece in pieces:
        await response.write(events.delta({"content": piece}))
    if fault is FaultKind.TRUNCATED_STREAM:
        return response  # ends cleanly at the HTTP level, but with no finish_reason or [DONE]
    await response.write(events.delta({}, finish_reason))
    if call.include_usage:
        await response.write(events.usage(answer))
    await response.write(DONE_EVENT)
    return response


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if (denied := _unauthorised(request, state)) is not None:
        return denied
    models = [
        {"id": model, "object": "model", "created": 0, "owned_by": f"routecache-replay:{role}"}
        for model, role in state.config.models.items()
    ]
    return web.json_response({"object": "list", "data": models})


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "recordings": len(state.recordings)})


def _response_id() -> str:
    return f"chatcmpl-replay-{uuid.uuid4().hex[:24]}"


class RunningReplayServer:
    """A started replay upstream; close it (or use `async with`) to free the port."""

    def __init__(self, runner: web.AppRunner, state: ReplayState, host: str, port: int) -> None:
        self._runner = runner
        self._state = state
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in /v1, to give a client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def recordings(self) -> Recordings:
        return self._state.recordings

    @property
    def chat_requests(self) -> int:
        """Chat-completions requests received so far, faulty and malformed ones included."""
        return self._state.chat_requests

    @property
    def injected_faults(self) -> Counter[FaultKind]:
        return Counter(self._state.injected)

    def script_faults(self, *faults: FaultKind | None) -> None:
        """The next requests meet these faults (None: a good answer), in order."""
        self._state.faults.script(faults)

    def clear_scripted_faults(self) -> None:
        """Drop queued faults that no request met (so they cannot leak into later calls)."""
        self._state.faults.clear_script()

    async def close(self) -> None:
        self._state.closing.set()
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningReplayServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def start_replay_server(
    config: ReplayConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    recordings: Recordings | None = None,
) -> RunningReplayServer:
    """Start serving in the running event loop; port 0 binds a free port (see `.port`)."""
    if recordings is None:
        recordings = await asyncio.to_thread(Recordings.load, config.recordings_path)
    state = ReplayState(config=config, recordings=recordings, faults=FaultSchedule(config))
    # Cancel a handler when its client hangs up, and bound shutdown, so that neither an
    # injected hang nor a half-read stream keeps the server (or a test) waiting.
    runner = web.AppRunner(create_app(state), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return RunningReplayServer(runner, state, host, bound_port)


async def serve_forever(
    config: ReplayConfig,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    recordings: Recordings | None = None,
) -> None:
    """Serve until cancelled (Ctrl-C) or sent SIGTERM, then close gracefully."""
    server = await start_replay_server(config, host, port, recordings=recordings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(
        f"replay upstream serving {len(server.recordings)} recordings "
        f"at {server.base_url} (models: {', '.join(config.models)})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m routecache.replay`: the same as `routecache replay-upstream`, run by the
    same code, so a bad recordings file or port is one line and exit 2 here too."""
    from routecache.router.cli import main as routecache_main  # the CLI imports this module

    return routecache_main(["replay-upstream", *(sys.argv[1:] if argv is None else argv)])

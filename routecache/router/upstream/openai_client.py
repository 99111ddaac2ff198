"""A ChatUpstream over any OpenAI-compatible chat-completions endpoint, on one pooled httpx client.

Every failure leaves as routecache.errors.UpstreamError; `retryable` is what the retry policy
here and the fallback chain above it decide on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from routecache.domain import (
    MAX_MODEL_NAME_CHARS,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
)
from routecache.errors import UpstreamError
from routecache.router.ports import UpstreamReply
from routecache.router.settings import ProviderSettings, RetrySettings
from routecache.router.tokens import (
    body_schema,
    estimate_tokens,
    prompt_tokens_estimate,
    sent_schema,
)
from routecache.router.upstream.deadline import note_failed_try, seconds_left
from routecache.unicode_text import replace_lone_surrogates

log = logging.getLogger(__name__)

CHAT_PATH = "chat/completions"
_JSON = {"Content-Type": "application/json"}
USER_AGENT = "routecache/0.1"
# A reported token count above this is no model's (far beyond any context window) and is
# estimated instead; the bound also keeps the tokens of every call one request makes within
# the uint32 fields of its reply.
MAX_REPORTED_TOKENS = 2**28
# Tokens a provider may count beyond the bytes of the body sent: special tokens and the chat
# template's own text. A byte-level tokenizer gives each token one byte at least, so the
# body's UTF-8 bytes plus this bound any correct prompt count, whatever the tokenizer.
PROMPT_TOKEN_MARGIN = 1024
# What parsing a provider's body raises when it is not the shape expected. RecursionError:
# JSON nested deeper than the parser recurses; raw, it would end the call INTERNAL without
# trying the next provider.
_MALFORMED = (ValueError, LookupError, TypeError, AttributeError, RecursionError)
# The most of a provider's own text (error message, Retry-After) an error message keeps:
# whole, it goes on into the gRPC status details, and past 16 KiB there the client gets
# RESOURCE_EXHAUSTED (as if over its quota) instead of UNAVAILABLE.
MAX_DETAIL_CHARS = 200
# The default bound on a response body (and on one line of a stream) read from a provider:
# limits.max_answer_chars (20 000) characters JSON-escaped at their worst (12 bytes for an
# astral character as a surrogate pair) are under 240 KiB; past 4 MiB no real answer is left.
DEFAULT_MAX_RESPONSE_BYTES = 4 << 20
# A whole stream is bounded by this many times the response bound: a stream repeats its chunk's
# envelope (id, model, created, fingerprint: some 200 bytes) for each token, so an answer at
# limits.max_answer_chars, streamed a character a chunk, takes about 5 MB as events.
STREAM_BOUND_MULTIPLE = 4
# The longest Retry-After the retry waits out by default; a longer one fails over at once.
DEFAULT_MAX_RETRY_AFTER_SECONDS = 5.0
# Calls one client has open to its provider at a time (httpx's own default pool size).
DEFAULT_MAX_CONNECTIONS = 100
# The most a compressed body inflates to in one step: the bound on the body applies between
# steps, so a small gzip body cannot inflate to hundreds of MiB first (as httpx decodes, a
# network read at a time).
INFLATE_STEP_BYTES = 64 << 10
# zlib's window bits for a gzip or a zlib header, whichever the body has.
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS
# Line breaks of server-sent events (a \r\n cut between two reads is still one: see _sse_lines).
_SSE_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class NoFreeConnection(UpstreamError):
    """Every connection to the provider stayed busy with this service's other calls: a limit
    of ours, no verdict on the provider (not retryable, so its breaker is not charged and the
    chain moves on)."""


class ProviderAskedToWait(UpstreamError):
    """A retryable HTTP status whose Retry-After says how long until the provider serves again."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float) -> None:
        super().__init__(message, retryable=retryable)
        self.retry_after = retry_after


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


def _note_failed(state: RetryCallState) -> None:
    """Before a retry: if the call deadline cuts it short, the failover still counts the try
    that failed against the provider's breaker."""
    note_failed_try()


def _asked_wait(state: RetryCallState) -> float | None:
    """The Retry-After of the attempt that just failed, in seconds; None when it gave none."""
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.retry_after if isinstance(exc, ProviderAskedToWait) else None


def _past_half_the_time_left(pause: float) -> bool:
    """No retry after a pause (a Retry-After or the backoff) of half the time the provider
    call has left or more: a retry that wakes just before the deadline times out, and leaves
    the next provider no time either."""
    left = seconds_left()
    return left is not None and pause >= left / 2


def retry_after_seconds(value: str, now: datetime | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date) as seconds from `now`; None when
    it is neither."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)  # float, not int: a run of 5 000 digits is inf, not a ValueError
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # Overflow: a year of 20 digits
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def response_format_body(response_format: ResponseFormat) -> dict[str, Any] | None:
    """The OpenAI `response_format` for ours; None for plain text (the provider's default)."""
    if response_format.type is ResponseFormatType.JSON_OBJECT:
        return {"type": "json_object"}
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
        try:
            schema = sent_schema(response_format)
        except json.JSONDecodeError as exc:
            raise UpstreamError(
                f"response_format.json_schema is not valid JSON: {exc.msg}", retryable=False
            ) from exc
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return None


def request_body(
    model: str, messages: Sequence[Message], params: GenerationParams, *, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role.value, "content": m.content} for m in messages],
    }
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if (response_format := response_format_body(params.response_format)) is not None:
        body["response_format"] = response_format
    if stream:
        body["stream"] = True
    return body


@dataclass(frozen=True)
class _Sent:
    """What a completion request sent that bounds the token counts its answer may report."""

    prompt_estimate: int  # charged when the provider reports no prompt count, or one past...
    prompt_bound: int  # ...this: the body's UTF-8 bytes plus PROMPT_TOKEN_MARGIN
    max_tokens: int | None  # no correct completion count passes it

    @classmethod
    def of(cls, body: dict[str, Any], encoded: bytes, prompt_estimate: int) -> _Sent:
        max_tokens = body.get("max_tokens")
        return cls(prompt_estimate, len(encoded) + PROMPT_TOKEN_MARGIN, max_tokens)


class _Bound(NamedTuple):
    """The most tokens a correct provider can report for one usage field of a request."""

    most: int
    why: str  # what the request sent that bounds the count, for the log
    charged: int  # what a count past `most` is charged as


def _encoded(body: dict[str, Any]) -> bytes:
    """`body` as sent, once for every try (as httpx's json= writes it: compact, not ASCII-
    escaped): its length bounds the prompt tokens a provider may report (_Sent)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class _OpenStream:
    """A stream whose status was checked and whose first delta (if any) was already read; it
    holds one of the client's connection slots until the response is closed."""

    response: httpx.Response
    first: str | None
    rest: AsyncIterator[str]


class OpenAIChatClient:
    """One model behind an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, the replay server).

    Retryable failures get `max_attempts` tries in all, with a short jittered pause between;
    a stream is only retried before its first text delta, since text already handed on
    cannot be taken back.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_seconds: float = 30.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_attempts: int = 2,
        backoff_seconds: tuple[float, float] = (0.05, 0.2),
        connect_timeout_seconds: float | None = None,
        read_timeout_seconds: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retry_after_seconds: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be at least 1")
        # Answers are small: asked for unencoded, no provider need inflate a bomb (one that
        # encodes anyway is inflated a bounded step at a time: see _body_parts).
        all_headers = {"user-agent": USER_AGENT, "accept-encoding": "identity", **(headers or {})}
        if api_key:
            all_headers["authorization"] = f"Bearer {api_key}"
        self._model = model
        self._where = f"upstream model {model!r} at {base_url}"
        self._timeout = timeout_seconds
        self._max_attempts = max_attempts
        self._backoff = backoff_seconds
        self._max_bytes = max_response_bytes
        self._max_stream_bytes = STREAM_BOUND_MULTIPLE * max_response_bytes
        self._max_retry_after = max_retry_after_seconds
        self._max_connections = max_connections
        # The usage fields ("prompt_tokens", "completion_tokens") whose count over what the
        # request could have used was logged yet: once per provider and field, so that a
        # provider miscounting every call does not flood the log.
        self._overcounts_logged: set[str] = set()
        # A call waits here for a connection before its attempt's timeout starts: waited for
        # inside httpx's pool, the queue of a busy moment would time out as the provider's
        # failure and open its breaker. The pool is as large, so httpx never waits itself.
        self._connections = asyncio.Semaphore(max_connections)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=all_headers,
            timeout=httpx.Timeout(
                timeout_seconds,
                connect=min(connect_timeout_seconds or timeout_seconds, timeout_seconds),
                read=min(read_timeout_seconds or timeout_seconds, timeout_seconds),
            ),
            # Idle connections kept as httpx keeps them (20): keeping all of a large pool idle
            # made a burst of 150 calls on a loopback provider several times slower.
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(20, max_connections),
            ),
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls,
        settings: ProviderSettings,
        *,
        retry: RetrySettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> OpenAIChatClient:
        """Raises ConfigError when the provider's key cannot be read."""
        retry = retry or RetrySettings()
        return cls(
            settings.base_url,
            settings.model,
            settings.resolve_api_key(),
            settings.timeout_seconds,
            transport=transport,
            max_attempts=retry.max_attempts,
            backoff_seconds=(retry.backoff_initial_seconds, retry.backoff_max_seconds),
            connect_timeout_seconds=settings.connect_timeout_seconds,
            read_timeout_seconds=settings.read_timeout_seconds,
            max_response_bytes=settings.max_response_bytes,
            max_retry_after_seconds=retry.max_retry_after_seconds,
            max_connections=settings.max_connections,
        )

    @property
    def model(self) -> str:
        return self._model

    async def aclose(self) -> None:
        await self._http.aclose()

    def _retrying(self) -> AsyncRetrying:
        # Jitter on an exponential base: retries of many callers do not line up.
        backoff = wait_exponential_jitter(
            multiplier=self._backoff[0], max=self._backoff[1], jitter=self._backoff[0]
        )

        def wait(state: RetryCallState) -> float:
            # A provider that asked for a pause gets it (stop saw that it fits).
            return max(backoff(state), _asked_wait(state) or 0.0)

        def stop(state: RetryCallState) -> bool:
            # tenacity has already planned the pause (upcoming_sleep) when it asks stop.
            return (
                state.attempt_number >= self._max_attempts
                or self._asked_too_long(state)
                or _past_half_the_time_left(state.upcoming_sleep)
            )

        return AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=_note_failed,
            reraise=True,
        )

    def _asked_too_long(self, state: RetryCallState) -> bool:
        """No retry when the provider asked for a pause past the bound."""
        asked = _asked_wait(state)
        return asked is not None and asked > self._max_retry_after

    def _error(self, what: str, *, retryable: bool) -> UpstreamError:
        return UpstreamError(f"{self._where}: {what}", retryable=retryable)

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        body = request_body(self._model, messages, params, stream=False)
        # What a provider that reports no usage is taken to have counted: the body's schema,
        # already parsed, counted as the replay upstream counts it.
        prompt_tokens = prompt_tokens_estimate(
            (m.content for m in messages), body_schema(body.get("response_format"))
        )
        encoded = _encoded(body)
        sent = _Sent.of(body, encoded, prompt_tokens)
        reply: UpstreamReply = await self._retrying()(self._complete_once, encoded, sent)
        return reply

    async def _complete_once(self, encoded: bytes, sent: _Sent) -> UpstreamReply:
        await self._take_connection()
        try:
            # httpx times each read; this bounds the whole call, so a trickling body
            # cannot hold it past the timeout either.
            async with asyncio.timeout(self._timeout):
                # Streamed, so that a body past the bound is never read whole.
                response = await self._send(encoded, stream=True)
                try:
                    await self._check_status(response)
                    content = await self._read_body(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise self._error(f"no answer within {self._timeout:g}s", retryable=True) from None
        finally:
            self._connections.release()
        return self._parse_completion(content, sent)

    async def _take_connection(self) -> None:
        """Waits, up to the timeout, for one of max_connections; the caller releases it."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._connections.acquire()
        except TimeoutError:
            raise self._no_free_connection() from None

    def _no_free_connection(self) -> NoFreeConnection:
        return NoFreeConnection(
            f"{self._where}: no free connection within {self._timeout:g}s (all of upstream "
            f"max_connections {self._max_connections} busy with other calls of this service; "
            "not counted against the provider)",
            retryable=False,
        )

    async def _send(self, encoded: bytes, *, stream: bool) -> httpx.Response:
        request = self._http.build_request("POST", CHAT_PATH, content=encoded, headers=_JSON)
        try:
            return await self._http.send(request, stream=stream)
        except httpx.RequestError as exc:  # transport errors, and a body that does not decode
            raise self._transport_error(exc) from exc

    async def _read_body(self, response: httpx.Response) -> bytes:
        """The whole body of a streamed response, read up to the bound and no further."""
        parts: list[bytes] = []
        size = 0
        try:
            async for part in self._body_parts(response):
                size += len(part)
                if size > self._max_bytes:
                    raise self._too_large("response body")
                parts.append(part)
        except httpx.RequestError as exc:  # transport errors, and a body that does not decode
            raise self._transport_error(exc) from exc
        return b"".join(parts)

    async def _body_parts(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The body decoded, gzip or deflate a step of INFLATE_STEP_BYTES at a time, so the
        reader's bound stops a bomb; httpx.DecodingError when it does not decode."""
        if response.is_stream_consumed:  # built whole, as a mock transport's: httpx decoded it
            yield response.content
            return
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            async for part in response.aiter_raw():
                yield part
            return
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise self._error(
                f"malformed response: content-encoding {encoding[:MAX_DETAIL_CHARS]!r} "
                "not asked for",
                retryable=True,
            )
        inflate = zlib.decompressobj(_GZIP_OR_ZLIB)
        try:
            async for data in response.aiter_raw():
                while data and not inflate.eof:
                    part = inflate.decompress(data, INFLATE_STEP_BYTES)
                    data = inflate.unconsumed_tail
                    yield part
            while part := inflate.decompress(b"", INFLATE_STEP_BYTES):  # any output held back
                yield part
        except zlib.error as exc:
            raise httpx.DecodingError(f"{encoding} body does not decode: {exc}") from exc

    def _transport_error(self, exc: httpx.RequestError) -> UpstreamError:
        """A request or a body read that failed in transport: retryable, whatever the cause,
        but for a wait for httpx's pool (ours; the slots above should leave it none)."""
        if isinstance(exc, httpx.PoolTimeout):
            return self._no_free_connection()
        if isinstance(exc, httpx.TimeoutException):
            return self._error(
                f"timed out after {self._limit_of(exc):g}s ({type(exc).__name__})", retryable=True
            )
        return self._error(f"connection failed ({type(exc).__name__}: {exc})", retryable=True)

    def _limit_of(self, exc: httpx.TimeoutException) -> float:
        """The limit the phase that timed out had (connect, read...), not the whole attempt's."""
        limits = self._http.timeout
        phase = {
            httpx.ConnectTimeout: limits.connect,
            httpx.ReadTimeout: limits.read,
            httpx.WriteTimeout: limits.write,
            httpx.PoolTimeout: limits.pool,
        }.get(type(exc))
        return self._timeout if phase is None else phase

    def _too_large(self, what: str, *, stream: bool = False) -> UpstreamError:
        # Retryable like any malformed answer (a runaway generation need not recur), and so
        # counted against the provider's breaker: the fault is the provider's, not the request's.
        limit, setting = self._max_bytes, "upstream max_response_bytes"
        if stream:
            limit, setting = self._max_stream_bytes, f"{STREAM_BOUND_MULTIPLE} times {setting}"
        return self._error(
            f"malformed response: {what} over {limit} bytes ({setting}), not read further",
            retryable=True,
        )

    async def _check_status(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        status = response.status_code
        # As OpenAI's own SDK retries: 408 (the server gave up waiting for the request) and
        # 409 (a conflict of the moment, such as a lock) are no fault of the request's.
        retryable = status in (408, 409, 429) or status >= 500
        try:
            # The body is read here, after _send and outside its error mapping.
            detail = _provider_message(await self._read_body(response))
        except UpstreamError:  # a broken or huge error body: the status still says what failed
            detail = ""
        what = f"HTTP {status} {response.reason_phrase}".rstrip()
        retry_after = response.headers.get("retry-after") if retryable else None
        if retry_after:
            # Seconds, or an HTTP date (which takes no unit).
            unit = "s" if retry_after.isdigit() else ""
            what += f" (retry after {retry_after[:MAX_DETAIL_CHARS]}{unit})"
        message = f"{self._where}: {what}: {detail}" if detail else f"{self._where}: {what}"
        if retry_after and (seconds := retry_after_seconds(retry_after)) is not None:
            raise ProviderAskedToWait(message, retryable=retryable, retry_after=seconds)
        raise UpstreamError(message, retryable=retryable)

    def _parse_completion(self, content_bytes: bytes, sent: _Sent) -> UpstreamReply:
        try:
            payload = json.loads(content_bytes)
            # Some providers (and proxies) answer 200 with an error object: its message says
            # more than the missing choices would. Retryable, as an error event in a stream.
            if isinstance(payload, dict) and payload.get("error"):
                raise self._error(f"error in response: {_error_text(payload)}", retryable=True)
            choice = payload["choices"][0]
            content = choice["message"].get("content")
        except _MALFORMED as exc:
            raise self._error(
                f"malformed response body ({type(exc).__name__}: {exc})", retryable=True
            ) from exc
        if content is None:  # a refusal or tool call carries no text
            content = ""
        if not isinstance(content, str):
            raise self._error("malformed response body (content is not a string)", retryable=True)
        # No UTF-8 response can carry a lone surrogate: the answer, paid for and cached, would
        # fail every delivery.
        content = replace_lone_surrogates(content)
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        return UpstreamReply(
            text=content,
            model=self._reported_model(payload.get("model")),
            prompt_tokens=self._prompt_tokens(usage, sent),
            completion_tokens=self._completion_tokens(usage, content, sent.max_tokens),
        )

    def _prompt_tokens(self, usage: Mapping[str, Any], sent: _Sent) -> int:
        """The provider's prompt-token count, unless it passes what the body sent could hold
        (no correct tokenizer's count does): then, as when it reports none, the estimate.
        Believed whole, "hello" reported as 200M tokens was charged against caps and quotas."""
        why = f"whose body was {sent.prompt_bound - PROMPT_TOKEN_MARGIN} bytes"
        bound = _Bound(sent.prompt_bound, why, charged=sent.prompt_estimate)
        return self._bounded_count(usage, "prompt_tokens", sent.prompt_estimate, bound)

    def _completion_tokens(
        self, usage: Mapping[str, Any], text: str, max_tokens: int | None
    ) -> int:
        """The provider's completion-token count, at most the max_tokens sent (which a correct
        provider never passes), else the estimate of the text. Believed whole, one over-report
        (200M for max_tokens=16) charged $200 against a $5 cap and locked the tenant's token
        bucket for a day and more."""
        bound = None
        if max_tokens is not None:
            bound = _Bound(max_tokens, f"sent with max_tokens={max_tokens}", charged=max_tokens)
        return self._bounded_count(usage, "completion_tokens", estimate_tokens(text), bound)

    def _bounded_count(
        self, usage: Mapping[str, Any], name: str, estimated: int, bound: _Bound | None
    ) -> int:
        """usage[name] when reported and within `bound`; `estimated` when not reported; else
        bound.charged, with a WARNING once per provider and name."""
        counted = _reported(usage, name)
        if counted is None:
            return estimated
        if bound is None or counted <= bound.most:
            return counted
        if name not in self._overcounts_logged:
            self._overcounts_logged.add(name)
            log.warning(
                "%s reported %d %s for a request %s; charged as %d (logged once per provider)",
                self._where, counted, name.replace("_", " "), bound.why, bound.charged,
            )  # fmt: skip
        return bound.charged

    def _reported_model(self, model: object) -> str:
        """The model the provider says answered, or the configured one when what it sent is
        no name or too long to be one. Sendable like the text: the model is cached and sent
        with every hit on the entry. (A stream's chunks are not read for it: a streamed
        answer is named by the configured model.)"""
        if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_NAME_CHARS:
            return replace_lone_surrogates(model)
        return self._model

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> AsyncIterator[str]:
        body = request_body(self._model, messages, params, stream=True)
        opened: _OpenStream = await self._retrying()(self._open_stream, _encoded(body))
        try:
            if opened.first is not None:
                yield opened.first
            async for delta in opened.rest:
                yield delta
        finally:
            try:
                await opened.response.aclose()
            finally:
                self._connections.release()

    async def _open_stream(self, encoded: bytes) -> _OpenStream:
        """One try at a stream, up to its first text delta, within the timeout: httpx times
        each read only, and a provider trickling keep-alive comments would otherwise hold the
        call's whole deadline, with no retry, no next provider and no verdict for its breaker.
        The rest of the stream is bounded per read (text handed on cannot be taken back).
        The stream opened holds a connection slot, which stream() releases."""
        await self._take_connection()
        try:
            async with asyncio.timeout(self._timeout):
                return await self._open_stream_once(encoded)
        except BaseException as exc:
            self._connections.release()
            if isinstance(exc, TimeoutError):
                raise self._error(
                    f"no first delta within {self._timeout:g}s", retryable=True
                ) from None
            raise

    async def _open_stream_once(self, encoded: bytes) -> _OpenStream:
        response = await self._send(encoded, stream=True)
        try:
            await self._check_status(response)
            deltas = self._deltas(response)
            first = await anext(deltas, None)
        except BaseException:
            await response.aclose()
            raise
        return _OpenStream(response, first, deltas)

    async def _deltas(self, response: httpx.Response) -> AsyncIterator[str]:
        """Parse server-sent events into non-empty text deltas."""
        finished = False
        try:
            async for data in self._sse_data(response):
                if data == "[DONE]":
                    return
                delta, finish_reason = self._parse_chunk(data)
                finished = finished or finish_reason is not None
                if delta:
                    yield delta
        except httpx.TimeoutException as exc:
            raise self._error(
                f"stream stalled for {self._limit_of(exc):g}s", retryable=True
            ) from exc
        except httpx.RequestError as exc:  # transport errors, and a body that does not decode
            raise self._error(
                f"stream broke ({type(exc).__name__}: {exc})", retryable=True
            ) from exc
        if not finished:
            raise self._error("stream ended without finish_reason or [DONE]", retryable=True)

    async def _sse_data(self, response: httpx.Response) -> AsyncIterator[str]:
        """The data of each event: its `data:` lines joined with \n, as the SSE spec (and
        OpenAI's SDK) reads them, so a chunk's JSON may span lines. Comments and the other
        fields (`event:`, `id:`, `retry:`) are skipped, and so is one byte order mark before
        the first line (the spec). An event's data is bounded as one line is."""
        data: list[str] = []
        size, first = 0, True
        async for line in self._sse_lines(response):
            if first:
                line, first = line.removeprefix("\ufeff"), False
            if not line:  # a blank line ends the event
                if data:
                    yield "\n".join(data).strip()
                data, size = [], 0
            elif line.startswith("data:"):
                size += len(line)
                if size > self._max_bytes:
                    raise self._too_large("stream event")
                data.append(line[len("data:") :])
        if data:  # the last event, cut short of its blank line: read like the others
            yield "\n".join(data).strip()

    async def _sse_lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """The lines of an event stream, none longer than the bound (httpx's aiter_lines
        would buffer a line without end whole), and all of them within the stream's bound (a
        provider streaming without end would be read on until the deadline). Event streams are
        UTF-8 by definition."""
        pending = bytearray()  # the line being read
        size = 0
        after_cr = False  # the last read ended with \r: a \n that starts the next ends no line
        async for part in self._body_parts(response):
            size += len(part)
            if size > self._max_stream_bytes:
                raise self._too_large("stream", stream=True)
            if after_cr and part.startswith(b"\n"):
                part = part[1:]
            after_cr = part.endswith(b"\r")
            first, *rest = _SSE_LINE_BREAK.split(part)
            pending += first
            for line in rest:  # each break ends the pending line and starts the next
                yield self._sse_line(pending)
                pending = bytearray(line)
            if len(pending) > self._max_bytes:  # an unended line past the bound: read no more
                raise self._too_large("stream line")
        if pending:
            yield self._sse_line(pending)

    def _sse_line(self, line: bytearray) -> str:
        if len(line) > self._max_bytes:
            raise self._too_large("stream line")
        return line.decode("utf-8", errors="replace")

    def _parse_chunk(self, data: str) -> tuple[str, str | None]:
        try:
            chunk = json.loads(data)
            # A chunk that is no object fails below; `"error": null` is no error.
            if isinstance(chunk, dict) and chunk.get("error"):
                raise self._error(f"error in stream: {_error_text(chunk)}", retryable=True)
            choices = chunk["choices"]
            if not choices:  # the usage-only chunk of stream_options.include_usage
                return "", None
            content = (choices[0].get("delta") or {}).get("content")  # null: a finish chunk
            finish_reason = choices[0].get("finish_reason")
        except _MALFORMED as exc:
            raise self._error(
                f"malformed stream chunk ({type(exc).__name__}: {exc})", retryable=True
            ) from exc
        if content is None:  # a role-only or finish chunk carries no text
            content = ""
        if not isinstance(content, str):  # 0, false or a list is no text, nor "no text"
            raise self._error("malformed stream chunk (content is not a string)", retryable=True)
        finished = finish_reason if isinstance(finish_reason, str) else None
        return replace_lone_surrogates(content), finished


def _reported(usage: Mapping[str, Any], name: str) -> int | None:
    """The provider's count; None when it reports none or one that cannot be."""
    value = usage.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPORTED_TOKENS:
        return value
    return None


def _error_text(payload: Any) -> str:
    """The error object's message, cut short and sendable: it goes on into the error event's
    `message`, a later completion's `upstream_failures` and the gRPC status details, none of
    which a lone surrogate (JSON's "\\ud83d") can be written to."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return replace_lone_surrogates(str(error["message"])[:MAX_DETAIL_CHARS])
    return "" if error is None else replace_lone_surrogates(str(error)[:MAX_DETAIL_CHARS])


def _provider_message(body: bytes) -> str:
    """What a provider's error body says, cut short: OpenAI's error object, else another
    server's own text ({"detail": ...} of FastAPI, {"message": ...}), else the body itself.
    Sendable (see `_error_text`): the body's bytes are decoded with replacement, but its JSON
    may still escape a lone surrogate."""
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()[:MAX_DETAIL_CHARS]
    if isinstance(payload, dict) and "error" in payload:
        return _error_text(payload)
    for key in ("detail", "message"):
        if isinstance(payload, dict) and isinstance(payload.get(key), str):
            return replace_lone_surrogates(str(payload[key]).strip()[:MAX_DETAIL_CHARS])
    return text.strip()[:MAX_DETAIL_CHARS]

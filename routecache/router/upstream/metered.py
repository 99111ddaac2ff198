"""A ChatUpstream decorator that reports every call's latency and failure to telemetry.

A call cut short by its deadline or by the caller leaving is reported as `cancelled`: a provider
that hangs shows in the metrics, not only in the breaker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence

from routecache.domain import GenerationParams, Message
from routecache.errors import UpstreamError
from routecache.router.ports import ChatUpstream, UpstreamReply
from routecache.router.telemetry import Telemetry

CANCELLED = "cancelled"


class MeteredUpstream:
    def __init__(self, inner: ChatUpstream, telemetry: Telemetry) -> None:
        self._inner = inner
        self._telemetry = telemetry

    @property
    def model(self) -> str:
        return self._inner.model

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        started = time.perf_counter()
        try:
            reply = await self._inner.complete(messages, params)
        except UpstreamError as error:
            self._report(started, _reason(error))
            raise
        except asyncio.CancelledError:
            self._report(started, CANCELLED)
            raise
        self._report(started, None)
        return reply

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        started = time.perf_counter()
        try:
            async for delta in self._inner.stream(messages, params):
                yield delta
        except UpstreamError as error:
            self._report(started, _reason(error))
            raise
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed between deltas
            self._report(started, CANCELLED)
            raise
        self._report(started, None)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _report(self, started: float, error: str | None) -> None:
        self._telemetry.upstream_call(self.model, time.perf_counter() - started, error)


def _reason(error: UpstreamError) -> str:
    return "retryable" if error.retryable else "fatal"

"""The gRPC servicer: translates messages and hands every call to the pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from routecache.domain import Completion
from routecache.errors import Unavailable
from routecache.router import error_mapping, messages
from routecache.router.logs import new_request_id
from routecache.router.pipeline import Pipeline
from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def api_key_of(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def request_id_of(context: Context) -> str:
    """Adopt the caller's x-request-id or make one; log lines and events carry it."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            return new_request_id(value)
    return new_request_id()


class RouteCacheServicer(pb_grpc.RouteCacheServicer):  # type: ignore[misc]  # untyped stub base
    def __init__(self, pipeline: Pipeline | None) -> None:
        self._ready: Pipeline | None = pipeline
        self._draining = False

    def attach(self, pipeline: Pipeline) -> None:
        """The server listens (health NOT_SERVING) while models load; calls wait for this."""
        self._ready = pipeline

    def drain(self) -> None:
        """Refuse new calls (UNAVAILABLE, retryable elsewhere) while those in flight finish:
        the listener stays open meanwhile, so health checks are still answered."""
        self._draining = True

    async def wait_idle(self, seconds: float) -> bool:
        """Whether the pipeline's calls in flight all ended within `seconds`."""
        return self._ready is None or await self._ready.in_flight.wait_idle(seconds)

    @property
    def _pipeline(self) -> Pipeline:
        if self._draining:
            raise Unavailable("routecache is draining: shutting down, try another replica")
        if self._ready is None:
            raise Unavailable("routecache is starting: models and index are loading")
        return self._ready

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        async def call() -> pb.CompleteResponse:
            request_id_of(context)
            chat = messages.request_from_pb(request)
            return messages.completion_to_pb(
                await self._pipeline.complete(chat, api_key_of(context), context.time_remaining())
            )

        return await error_mapping.unary(context, call)

    async def CompleteStream(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncGenerator[pb.CompleteStreamResponse, None]:
        async def events() -> AsyncGenerator[pb.CompleteStreamResponse, None]:
            request_id_of(context)
            chat = messages.request_from_pb(request)
            stream = self._pipeline.complete_stream(
                chat, api_key_of(context), context.time_remaining()
            )
            # Closed with this handler (the caller left): the pipeline settles what was sent
            # then, not when the loop finalises an abandoned generator.
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, Completion):
                        yield pb.CompleteStreamResponse(final=messages.completion_to_pb(event))
                    else:
                        yield pb.CompleteStreamResponse(delta=event)

        async with contextlib.aclosing(error_mapping.streaming(context, events())) as replies:
            async for message in replies:
                yield message

    async def Feedback(self, request: pb.FeedbackRequest, context: Context) -> pb.FeedbackResponse:
        async def call() -> pb.FeedbackResponse:
            request_id_of(context)
            removed = await self._pipeline.admin.feedback(
                messages.feedback_from_pb(request), api_key_of(context)
            )
            return pb.FeedbackResponse(recorded=True, invalidated_entry_id=removed)

        return await error_mapping.unary(context, call)

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: Context
    ) -> pb.InvalidateResponse:
        async def call() -> pb.InvalidateResponse:
            request_id_of(context)
            target = messages.invalidate_target_from_pb(request)
            removed = await self._pipeline.admin.invalidate(target, api_key_of(context))
            return pb.InvalidateResponse(removed=removed)

        return await error_mapping.unary(context, call)

    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.GetStatsResponse:
        async def call() -> pb.GetStatsResponse:
            request_id_of(context)
            stats = await self._pipeline.admin.stats(api_key_of(context), request.top_n or 10)
            return messages.stats_to_pb(stats)

        return await error_mapping.unary(context, call)

"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from routecache.errors import (
    FailedValidation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RouteCacheError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: list[tuple[type[RouteCacheError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedValidation, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]

# gRPC sends the status message in a trailer, percent-encoding every byte outside printable
# ASCII (%XX: three characters); a client refuses a trailer past its soft limit of 8 KiB at
# random (and every one past 16 KiB), and the call then ends RESOURCE_EXHAUSTED with gRPC's own
# text, as if over a quota. Messages that quote a caller's input (a schema error quotes the
# schema) are cut to half the soft limit, leaving room for the trailer's other entries (a cut
# to 8 KiB made a trailer of 8,448 bytes, refused now and then).
MAX_STATUS_MESSAGE_CHARS = 4096
_CUT = " … (cut)"

RETRY_AFTER_KEY = "retry-after-ms"
FIELD_KEY = "field"

T = TypeVar("T")


def status_of(error: RouteCacheError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def fit_status_message(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """`text`, cut so that gRPC's percent-encoding of it stays within `limit` characters."""
    if _encoded_size(text) <= limit:
        return text
    room, used = limit - _encoded_size(_CUT), 0
    for index, char in enumerate(text):
        used += _encoded_size(char)
        if used > room:
            return text[:index] + _CUT
    return text  # not reached: the whole text was over the limit


def _encoded_size(text: str) -> int:
    ascii_printable = sum(1 for c in text if " " <= c <= "~" and c != "%")
    return ascii_printable + 3 * (len(text.encode("utf-8", "replace")) - ascii_printable)


def trailing_metadata_of(error: RouteCacheError) -> tuple[tuple[str, str], ...]:
    if isinstance(error, ResourceExhausted):
        return ((RETRY_AFTER_KEY, str(math.ceil(error.retry_after_seconds * 1000))),)
    if isinstance(error, InvalidArgument):
        return ((FIELD_KEY, error.field),)
    return ()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, RouteCacheError):
        context.set_trailing_metadata(trailing_metadata_of(error))
        await context.abort(status_of(error), fit_status_message(str(error)))
    log.exception("unexpected error while serving a call")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


async def unary(context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Runs one unary handler, turning any error into the status code of the table above."""
    try:
        return await call()
    except Exception as error:
        await _abort(context, error)
        raise  # abort raises; this keeps type checkers sure the function never falls through


async def streaming(
    context: grpc.aio.ServicerContext[Any, Any], stream: AsyncGenerator[T, None]
) -> AsyncGenerator[T, None]:
    """The same mapping for a server-streaming handler; closing it closes `stream`."""
    try:
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item
    except Exception as error:
        await _abort(context, error)
        raise

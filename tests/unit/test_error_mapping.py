"""error_mapping at the edge: what a caller gets when a handler fails in a way no RouteCacheError
names, in a unary call and in a stream, and the trailers a known error carries."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest

from routecache.errors import InvalidArgument, ResourceExhausted
from routecache.router import error_mapping


class Aborted(Exception):
    """What grpc's context.abort raises: the handler ends there."""


class RecordingContext:
    """The part of the servicer context error_mapping uses, recording what it was told."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailers = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)


async def secret_failure() -> None:
    raise KeyError("sk-live-secret in a provider's config")


async def test_an_unforeseen_error_is_internal_logged_and_its_text_kept_from_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context: Any = RecordingContext()
    with pytest.raises(Aborted), caplog.at_level(logging.ERROR):
        await error_mapping.unary(context, secret_failure)
    assert context.code is grpc.StatusCode.INTERNAL
    # The exception's text may hold anything (a key, a prompt): the caller gets none of it,
    # the operator gets the traceback in the server log.
    assert "secret" not in context.details and "server log" in context.details
    assert any(r.exc_info and "sk-live-secret" in str(r.exc_info[1]) for r in caplog.records)


async def test_a_stream_that_fails_unforeseen_after_some_deltas_ends_internal() -> None:
    async def deltas() -> AsyncGenerator[str, None]:
        yield "partial "
        raise ValueError("a bug after the first delta")

    context: Any = RecordingContext()
    sent: list[str] = []
    with pytest.raises(Aborted):
        async for delta in error_mapping.streaming(context, deltas()):
            sent.append(delta)
    assert sent == ["partial "]  # what was sent stands
    assert context.code is grpc.StatusCode.INTERNAL and "bug" not in context.details


async def test_a_known_error_in_a_stream_carries_its_code_and_trailers() -> None:
    async def deltas() -> AsyncGenerator[str, None]:
        raise ResourceExhausted("spend cap reached", 2.0001)
        yield ""  # an async generator

    context: Any = RecordingContext()
    with pytest.raises(Aborted):
        _ = [d async for d in error_mapping.streaming(context, deltas())]
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Rounded up: a retry sent after the delay shown never comes too early.
    assert context.trailers == (("retry-after-ms", "2001"),)
    assert context.details == "spend cap reached"


async def test_an_invalid_argument_names_its_field_in_details_and_trailers() -> None:
    async def invalid() -> None:
        raise InvalidArgument("params.top_p", "must be in (0, 1]")

    context: Any = RecordingContext()
    with pytest.raises(Aborted):
        await error_mapping.unary(context, invalid)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert context.trailers == (("field", "params.top_p"),)
    assert context.details == "params.top_p: must be in (0, 1]"


@pytest.mark.parametrize("char", ["a", "é", "語", "%", "😀"])
def test_a_status_message_is_cut_to_fit_grpcs_encoded_trailer(char: str) -> None:
    text = "field: " + char * 20_000
    cut = error_mapping.fit_status_message(text, limit=1_000)
    assert cut.startswith("field: " + char) and cut.endswith("(cut)")
    encoded = sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in cut)
    assert 1_000 - 12 <= encoded <= 1_000  # within one character of the limit


def test_a_status_message_within_the_limit_is_kept_whole() -> None:
    text = "語" * 10
    assert error_mapping.fit_status_message(text, limit=90) == text
    assert error_mapping.fit_status_message(text, limit=89).endswith("(cut)")

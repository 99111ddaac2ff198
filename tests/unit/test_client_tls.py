"""ClientTls.from_files takes the paths as README shows them: plain strings or Paths; the
client releases its channel and the streams its caller stops reading."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from routecache.client import ClientTls, RouteCacheClient, chat_request
from routecache.v1 import routecache_pb2 as pb


def test_from_files_accepts_string_paths(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_bytes(f"PEM of {path.name}".encode())

    tls = ClientTls.from_files(str(ca), str(cert), str(key))

    assert tls == ClientTls(b"PEM of ca.pem", b"PEM of cert.pem", b"PEM of key.pem")
    assert ClientTls.from_files(ca) == ClientTls(b"PEM of ca.pem")


@pytest.mark.parametrize("given", ["cert_file", "key_file"])
def test_a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused(
    tmp_path: Path, given: str
) -> None:
    pem = tmp_path / "half.pem"
    pem.write_bytes(b"x")
    with pytest.raises(ValueError, match="needs its key, and a key its certificate"):
        ClientTls.from_files(None, **{given: str(pem)})


@pytest.mark.parametrize(
    ("key", "where"),
    [("sk-secret\r", "'\\r' at position 9"), ("sk-sécret", "'é' at position 4"),
     ("sk-\x00secret", "'\\x00' at position 3")],
    ids=["trailing CR", "non-ASCII", "NUL"],
)  # fmt: skip
def test_an_api_key_that_is_not_printable_ascii_is_refused_without_echoing_it(
    key: str, where: str
) -> None:
    # gRPC refuses such metadata only when a call is made, with a raw ExecuteBatchError.
    with pytest.raises(ValueError) as refused:
        RouteCacheClient("127.0.0.1:1", key)
    assert where in str(refused.value)
    assert "secret" not in str(refused.value) and "sécret" not in str(refused.value)


async def test_leaving_the_client_closes_its_channel() -> None:
    async with RouteCacheClient("127.0.0.1:1", "key") as client:
        pass
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
        await client.complete(chat_request("q"))


class _StreamCall:
    """A server stream of two messages that records being cancelled, as grpc.aio's call does."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[pb.CompleteStreamResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[pb.CompleteStreamResponse]:
        for _ in range(2):
            yield pb.CompleteStreamResponse()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_stream_the_caller_stops_reading_is_cancelled_at_once() -> None:
    # Left running, the server goes on paying for the rest of the answer it streams; before,
    # nothing cancelled the call until garbage collection got to it.
    call = _StreamCall()
    async with RouteCacheClient("127.0.0.1:1", "key") as client:
        client._stub = SimpleNamespace(CompleteStream=lambda *args, **kwargs: call)
        async with contextlib.aclosing(client.complete_stream(chat_request("q"))) as stream:
            async for _ in stream:
                break
        assert call.cancelled


async def test_feedback_sends_its_comment() -> None:
    # Before: the typed client had no way to fill FeedbackRequest.comment.
    sent: list[pb.FeedbackRequest] = []

    class Stub:
        async def Feedback(self, request: pb.FeedbackRequest, **_: object) -> pb.FeedbackResponse:
            sent.append(request)
            return pb.FeedbackResponse()

    async with RouteCacheClient("127.0.0.1:1", "k") as client:
        client._stub = Stub()
        await client.feedback("r1", thumbs_up=False, correction="Paris", comment="wrong city")
    assert (sent[0].correction, sent[0].comment) == ("Paris", "wrong city")


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.inf, math.nan, 1e10])
def test_a_timeout_no_grpc_deadline_can_hold_is_refused(seconds: float) -> None:
    # Past ~7.4e9 s gRPC's deadline overflowed into one already past: every call failed at once.
    with pytest.raises(ValueError, match="timeout_seconds"):
        RouteCacheClient("127.0.0.1:1", "k", timeout_seconds=seconds)

"""`routecache ask --stream` against a stub server whose stream breaks the protocol."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
import pytest

from routecache.router.ask import add_cli_arguments, ask
from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


class NoFinalServicer(pb_grpc.RouteCacheServicer):  # type: ignore[misc]  # untyped stub base
    """Sends deltas, then closes the stream OK without the final response."""

    async def CompleteStream(
        self, request: pb.CompleteRequest, context: object
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        for word in ("half ", "an ", "answer"):
            yield pb.CompleteStreamResponse(delta=word)


async def test_ask_reports_a_stream_without_a_final_response_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `response` was never set: an UnboundLocalError traceback instead of a message.
    server = grpc.aio.server()
    pb_grpc.add_RouteCacheServicer_to_server(NoFinalServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        parser = argparse.ArgumentParser()
        add_cli_arguments(parser)
        args = parser.parse_args(["hi", "--stream", "--target", f"127.0.0.1:{port}",
                                  "--api-key", "k"])  # fmt: skip
        code = await ask(args)
    finally:
        await server.stop(None)
    captured = capsys.readouterr()
    assert code == 1  # as for the other failures the server causes
    assert captured.out == ""
    assert captured.err == "half an answer\nroutecache: the stream ended without a final response\n"

"""A small typed asyncio client for backend services calling routecache over gRPC."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routecache.router.auth import check_sendable_key
from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_TIERS = {None: pb.TIER_UNSPECIFIED, "cheap": pb.TIER_CHEAP, "strong": pb.TIER_STRONG}


def chat_request(
    prompt: str,
    *,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    json_object: bool = False,
    json_schema: str | None = None,
    no_cache: bool = False,
    no_store: bool = False,
    ttl_seconds: int = 0,
    tags: Sequence[str] = (),
    force_tier: str | None = None,
    end_user_id: str = "",
    validators: Sequence[pb.RequestValidator] = (),
) -> pb.CompleteRequest:
    """Builds a request: optional system prompt, earlier (role, text) turns, then the prompt.

    Raises ValueError for a role or tier it does not know, or a number out of its field's
    range."""
    if unknown := {role for role, _ in history} - _ROLES.keys():
        raise ValueError(f"unknown role {min(unknown)!r}: one of {', '.join(_ROLES)}")
    if force_tier not in _TIERS:  # else a bare KeyError from the lookup below
        raise ValueError(f"unknown tier {force_tier!r}: one of {', '.join(filter(None, _TIERS))}")
    messages = [pb.ChatMessage(role=pb.ROLE_SYSTEM, content=system)] if system else []
    messages += [pb.ChatMessage(role=_ROLES[role], content=text) for role, text in history]
    messages.append(pb.ChatMessage(role=pb.ROLE_USER, content=prompt))
    params = pb.GenerationParams()
    if temperature is not None:
        params.temperature = temperature
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if top_p is not None:
        params.top_p = top_p
    if json_schema is not None:
        params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        params.response_format.json_schema = json_schema
    elif json_object:
        params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    return pb.CompleteRequest(
        messages=messages,
        params=params,
        cache=pb.CacheControl(
            no_cache=no_cache, no_store=no_store, ttl_seconds=ttl_seconds, tags=list(tags)
        ),
        routing=pb.RoutingControl(force_tier=_TIERS[force_tier]),
        end_user_id=end_user_id,
        validators=list(validators),
    )


@dataclass(frozen=True)
class ClientTls:
    """TLS for the channel (PEM bytes): the CA that signed the server's certificate (None: the
    system's roots) and, for a server that requires mTLS, this client's certificate and key."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        ca_file: str | PathLike[str] | None = None,
        cert_file: str | PathLike[str] | None = None,
        key_file: str | PathLike[str] | None = None,
    ) -> ClientTls:
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        files = (ca_file, cert_file, key_file)
        return cls(*(None if f is None else Path(f).read_bytes() for f in files))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


# A day: gRPC adds a call's timeout to the clock in int64 nanoseconds, so a timeout past about
# 7.4e9 s overflowed into a deadline already past (every call DEADLINE_EXCEEDED at once).
MAX_TIMEOUT_SECONDS = 86_400.0


class RouteCacheClient:
    """One channel, one API key. Use `async with RouteCacheClient(target, key) as client`;
    pass `tls` for a server with TLS (and mTLS). To stop reading a stream early, read it
    under `contextlib.aclosing(client.complete_stream(request))`: the call is cancelled as
    the block ends, not whenever the abandoned generator is collected."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout_seconds: float = 60.0,
        tls: ClientTls | None = None,
    ) -> None:
        check_sendable_key(api_key)  # before the channel opens: nothing to close if it is refused
        if not 0 < timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"timeout_seconds must be above 0 and at most {MAX_TIMEOUT_SECONDS:g}, "
                f"not {timeout_seconds!r}"
            )
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            self._channel = grpc.aio.secure_channel(target, tls.credentials())
        self._stub = pb_grpc.RouteCacheStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout_seconds

    async def complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        response: pb.CompleteResponse = await self._stub.Complete(
            request, metadata=self._metadata, timeout=self._timeout
        )
        return response

    async def complete_stream(
        self, request: pb.CompleteRequest
    ) -> AsyncGenerator[pb.CompleteStreamResponse, None]:
        call = self._stub.CompleteStream(request, metadata=self._metadata, timeout=self._timeout)
        try:
            async for message in call:
                yield message
        finally:
            # Runs when the generator is closed (aclose, or aclosing's block ending after a
            # break): the call ends then, where the server would otherwise go on generating,
            # and paying for, the rest of the answer.
            call.cancel()

    async def feedback(
        self, response_id: str, *, thumbs_up: bool, correction: str = "", comment: str = ""
    ) -> pb.FeedbackResponse:
        rating = pb.RATING_UP if thumbs_up else pb.RATING_DOWN
        request = pb.FeedbackRequest(
            response_id=response_id, rating=rating, correction=correction, comment=comment
        )
        response: pb.FeedbackResponse = await self._stub.Feedback(
            request, metadata=self._metadata, timeout=self._timeout
        )
        return response

    async def invalidate(
        self, *, entry_id: str = "", tag: str = "", all_entries: bool = False
    ) -> int:
        if entry_id:
            request = pb.InvalidateRequest(entry_id=entry_id)
        elif tag:
            request = pb.InvalidateRequest(tag=tag)
        else:
            request = pb.InvalidateRequest(all=all_entries)
        response: pb.InvalidateResponse = await self._stub.Invalidate(
            request, metadata=self._metadata, timeout=self._timeout
        )
        return response.removed

    async def stats(self, top_n: int = 10) -> pb.GetStatsResponse:
        response: pb.GetStatsResponse = await self._stub.GetStats(
            pb.GetStatsRequest(top_n=top_n), metadata=self._metadata, timeout=self._timeout
        )
        return response

    async def health(self, service: str = "") -> str:
        """The health service's status name for `service` ("" = the whole server)."""
        # The health stubs are typed for sync channels; this one is asyncio.
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RouteCacheClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

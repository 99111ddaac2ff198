"""The gRPC server: RouteCache plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from routecache.errors import InvalidArgument
from routecache.router import error_mapping
from routecache.router.servicer import Context, RouteCacheServicer
from routecache.router.settings import ConfigError, ServerSettings
from routecache.v1 import routecache_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RouteCache"].full_name
# Health names of the parts that must be loaded before calls are served, one each so an
# operator sees which one holds readiness back ("" and SERVICE_NAME: the whole service).
DEPENDENCIES = ("routecache.embedder", "routecache.classifier", "routecache.index")
# The cache's store as its own health entry: Redis down marks only this NOT_SERVING, since
# the service keeps answering without its cache.
CACHE_HEALTH_NAME = "routecache.v1.RouteCache.cache"


def add_routecache_servicer(servicer: RouteCacheServicer, server: grpc.aio.Server) -> None:
    """What routecache_pb2_grpc.add_RouteCacheServicer_to_server does, except that each handler
    is given the request's bytes and parses them itself: a request deserializer that raises
    (a corrupt message, a string field that is not UTF-8) makes gRPC end the call UNKNOWN with
    Python's exception text, where a malformed request is the caller's INVALID_ARGUMENT."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in pb.DESCRIPTOR.services_by_name["RouteCache"].methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsing_stream(behaviour, request_type),
                response_serializer=response_type.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing_unary(behaviour, request_type),
                response_serializer=response_type.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _parsed(raw: bytes, request_type: type[Message], context: Context) -> Message:
    """The request, or the call ends INVALID_ARGUMENT (field `request`)."""

    async def parse() -> Message:
        try:
            return request_type.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgument(
                "request",
                f"not a valid {request_type.DESCRIPTOR.full_name} (corrupt protobuf, or a "
                "string field that is not UTF-8)",
            ) from exc

    return await error_mapping.unary(context, parse)


def _parsing_unary(
    behaviour: Callable[[Message, Context], Awaitable[Message]], request_type: type[Message]
) -> Callable[[bytes, Context], Awaitable[Message]]:
    async def handler(raw: bytes, context: Context) -> Message:
        return await behaviour(await _parsed(raw, request_type, context), context)

    return handler


def _parsing_stream(
    behaviour: Callable[[Message, Context], AsyncGenerator[Message, None]],
    request_type: type[Message],
) -> Callable[[bytes, Context], AsyncGenerator[Message, None]]:
    async def handler(raw: bytes, context: Context) -> AsyncGenerator[Message, None]:
        replies = behaviour(await _parsed(raw, request_type, context), context)
        # aclosing: this handler closed part-way closes the servicer's generator now, so that
        # the pipeline settles what was sent then (see RouteCacheServicer.CompleteStream).
        async with contextlib.aclosing(replies):
            async for message in replies:
                yield message

    return handler


class ListenError(OSError):
    """A port could not be bound (taken, or an address this host does not have)."""


# The end of a drain: how long gRPC's stop lets the last replies go out (those of calls the
# pipeline no longer counts, Feedback, GetStats) before it cancels what is left, health Watch
# streams included (they never end on their own). Taken out of server.grace_seconds.
FINAL_GRACE_SECONDS = 1.0


class RunningServer:
    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 port: int, grace_seconds: float,
                 servicer: RouteCacheServicer) -> None:  # fmt: skip
        self.server = server
        self.health = health_servicer
        self.port = port
        self._grace_seconds = grace_seconds
        self._servicer = servicer
        self._cut = asyncio.Event()  # set by stop_now: a drain under way ends at once

    async def set_serving(self, serving: bool) -> None:
        status = _status(serving)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def set_dependency(self, name: str, *, serving: bool) -> None:
        """A dependency's own health entry (e.g. routecache.embedder, or the cache store)."""
        await self.health.set(name, _status(serving))

    async def set_cache_serving(self, serving: bool) -> None:
        await self.set_dependency(CACHE_HEALTH_NAME, serving=serving)

    async def stop(self) -> None:
        """Stop taking calls, let in-flight ones finish within the grace period.

        gRPC's own stop closes the listener at once: health checks would be refused for the
        whole drain (the liveness entry routecache.embedder stays SERVING, so that a draining
        pod is not killed), and an open health Watch would hold it to the full grace. So the
        overall status turns NOT_SERVING and new calls are refused UNAVAILABLE while the
        listener stays open, until the pipeline's calls end; then gRPC stops, briefly."""
        await self.set_serving(False)
        self._servicer.drain()
        log.info("draining in-flight calls (up to %.1f s)", self._grace_seconds)
        final = min(FINAL_GRACE_SECONDS, self._grace_seconds)
        await self._drained(self._grace_seconds - final)
        # Calls still running have gRPC's last second too (grace_seconds in all); after
        # stop_now, none.
        await self.server.stop(None if self._cut.is_set() else final)
        log.info("routecache stopped")

    async def _drained(self, seconds: float) -> None:
        """Returns once the calls in flight ended, `seconds` passed, or stop_now was called."""
        idle = asyncio.ensure_future(self._servicer.wait_idle(seconds))
        cut = asyncio.ensure_future(self._cut.wait())
        await asyncio.wait((idle, cut), return_when=asyncio.FIRST_COMPLETED)
        for task in (idle, cut):
            task.cancel()

    async def stop_now(self) -> None:
        """Cancel the calls still in flight: a drain that stop() is waiting out ends at once."""
        log.warning("cancelling the calls still in flight")
        self._cut.set()
        await self.server.stop(None)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _status(serving: bool) -> int:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS from the configured PEM files (None: plaintext); with a client CA, mTLS.

    Raises ConfigError naming a file that cannot be read."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = _read_pem(settings.tls_cert_file, "server.tls_cert_file")
    key = _read_pem(settings.tls_key_file, "server.tls_key_file")
    client_ca = settings.tls_client_ca_file
    roots = None if client_ca is None else _read_pem(client_ca, "server.tls_client_ca_file")
    _check_pems(settings, roots)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


class _EncryptedKey(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _check_pems(settings: ServerSettings, roots: bytes | None) -> None:
    """gRPC takes any bytes here and only fails at the bind, as 'could not bind host:port':
    check with OpenSSL that they are PEM, and that the key is the certificate's.

    The client CA is checked from the bytes gRPC gets (`roots`); the certificate and key are
    read again from their files, as the ssl module loads a chain and its key from files only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, or OpenSSL asks for an encrypted key's passphrase on the
        # terminal and the start waits at the prompt; gRPC cannot use such a key anyway.
        context.load_cert_chain(
            str(settings.tls_cert_file), str(settings.tls_key_file), password=_no_passphrase
        )
    except _EncryptedKey as exc:
        raise ConfigError(
            f"server.tls_key_file {settings.tls_key_file} is encrypted: gRPC needs the key "
            "without a passphrase"
        ) from exc
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls_cert_file {settings.tls_cert_file} and server.tls_key_file "
            f"{settings.tls_key_file} are not a PEM certificate chain and its private key "
            f"({exc.reason or exc})"
        ) from exc
    if roots is not None:
        try:
            # The certificates only: bundles put comments between them, in any encoding
            # ("# Issuer: ... Főtanúsítvány"), which gRPC reads past as OpenSSL does. cadata:
            # a str is read as PEM (bytes would be read as DER).
            pems = b"\n".join(_PEM_CERTIFICATE.findall(roots)).decode("ascii")
            if not pems:
                raise ValueError("no PEM certificate in it")
            context.load_verify_locations(cadata=pems)
        except (ssl.SSLError, ValueError) as exc:  # ValueError: none, or not ASCII
            reason = exc.reason if isinstance(exc, ssl.SSLError) else exc
            raise ConfigError(
                f"server.tls_client_ca_file {settings.tls_client_ca_file} is not a PEM CA "
                f"bundle ({reason or exc})"
            ) from exc


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


def _read_pem(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


async def start_server(
    servicer: RouteCacheServicer,
    settings: ServerSettings,
    dependencies: tuple[str, ...] = (),
    *,
    max_request_bytes: int | None = None,
) -> RunningServer:
    """Binds and starts NOT_SERVING (the caller marks it SERVING once loaded); the bound port
    is `.port` (pass port 0 for a free one).

    `max_request_bytes` (limits.max_request_bytes): gRPC refuses a larger request from its
    length prefix with RESOURCE_EXHAUSTED, so an oversized message is never parsed."""
    credentials = server_credentials(settings)
    receive_limit = max_request_bytes or settings.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # gRPC shares a port between processes by default: a second instance started by
            # mistake would take half the traffic silently instead of failing to start.
            ("grpc.so_reuseport", 0),
        ]
    )
    add_routecache_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    # An IPv6 host ("::1", "::") in brackets: gRPC reads "::1:0" as host "::1:0" with no port.
    bare_ipv6 = ":" in settings.host and not settings.host.startswith("[")
    host = f"[{settings.host}]" if bare_ipv6 else settings.host
    address = f"{host}:{settings.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:  # health and reflection share the port, so they are behind TLS too
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:  # grpcio raises where the bind fails (it never returns 0)
        raise ListenError(f"could not bind {address}: {error}") from error
    await server.start()
    running = RunningServer(server, health_servicer, port, settings.grace_seconds, servicer)
    await running.set_serving(False)
    for dependency in dependencies:
        await running.set_dependency(dependency, serving=False)
    scheme = "plaintext" if credentials is None else "TLS"
    if settings.tls_client_ca_file is not None:
        scheme = "mTLS"
    log.info("routecache listening on %s:%d (%s)", host, port, scheme)
    return running

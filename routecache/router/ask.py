"""`routecache ask`: one request to a running server, the whole response printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from routecache.cli_args import at_least, number_between
from routecache.client import MAX_TIMEOUT_SECONDS, ClientTls, RouteCacheClient, chat_request
from routecache.router.auth import check_sendable_key
from routecache.router.settings import ConfigError
from routecache.v1 import routecache_pb2 as pb


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the service")
    parser.add_argument("--api-key", required=True, help="sent as 'authorization: Bearer KEY'")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--turn", nargs=2, action="append", default=[], metavar=("ROLE", "TEXT"),
        help="an earlier turn (user|assistant TEXT), repeatable, oldest first",
    )  # fmt: skip
    parser.add_argument("--json-object", action="store_true", help="ask for a JSON object")
    parser.add_argument("--json-schema", help="JSON Schema text, or @FILE to read it from a file")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float, help="nucleus sampling, (0, 1]")
    parser.add_argument("--max-tokens", type=at_least(1))
    parser.add_argument("--no-cache", action="store_true", help="do not read the cache")
    parser.add_argument("--no-store", action="store_true", help="do not store the answer")
    parser.add_argument("--ttl", type=at_least(0), default=0, help="entry lifetime in seconds")
    parser.add_argument("--tag", action="append", default=[], help="tag the entry (repeatable)")
    parser.add_argument("--tier", choices=["cheap", "strong"], help="force a tier")
    parser.add_argument("--user", default="", help="end-user id")
    parser.add_argument("--stream", action="store_true", help="use CompleteStream")
    parser.add_argument(
        "--timeout", type=number_between(0, MAX_TIMEOUT_SECONDS, above_low=True), default=60.0,
        help=f"seconds (at most {MAX_TIMEOUT_SECONDS:g})",
    )  # fmt: skip
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA roots")
    parser.add_argument("--ca-file", type=Path, help="TLS: PEM CA that signed the server cert")
    parser.add_argument("--client-cert", type=Path, help="mTLS: this client's PEM certificate")
    parser.add_argument("--client-key", type=Path, help="mTLS: this client's PEM private key")
    parser.add_argument(
        "--validator",
        action="append",
        default=[],
        metavar="JSON",
        help='a validator for this request, e.g. \'{"kind": "pii", "on_fail": "flag"}\' '
        "(repeatable; see docs/validators.md)",
    )


def _schema(value: str | None) -> str | None:
    if value is not None and value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"--json-schema {value}: cannot read it ({error})") from error
    return value


def _validators(values: list[str]) -> list[pb.RequestValidator]:
    """Raises ConfigError for a flag that is not a RequestValidator in JSON."""
    parsed = []
    for value in values:
        try:
            fields = json.loads(value)
            # ParseDict wants a dict: a number or null was a TypeError, a list a ParseError.
            if not isinstance(fields, dict):
                raise ConfigError(f"--validator {value}: not a JSON object")
            parsed.append(ParseDict(fields, pb.RequestValidator()))
        # SystemError: protobuf's C parser on a key holding a lone surrogate ({"\ud800": 1}).
        except (ValueError, ParseError, SystemError) as error:
            raise ConfigError(f"--validator: {error}") from error
    return parsed


def _tls(args: argparse.Namespace) -> ClientTls | None:
    """None (plaintext) unless --tls or a certificate flag is given; ConfigError if unreadable."""
    files = (args.ca_file, args.client_cert, args.client_key)
    if not args.tls and all(f is None for f in files):
        return None
    try:
        return ClientTls.from_files(*files)
    except (OSError, ValueError) as error:
        raise ConfigError(f"TLS: {error}") from error


def _request(args: argparse.Namespace) -> pb.CompleteRequest:
    """Raises ConfigError for a request the flags cannot make (an unknown --turn role, a
    number too large for its uint32 field)."""
    schema, validators = _schema(args.json_schema), _validators(args.validator)
    try:
        return chat_request(
            args.prompt,
            system=args.system,
            history=[(role, text) for role, text in args.turn],
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            top_p=args.top_p,
            json_object=args.json_object,
            json_schema=schema,
            no_cache=args.no_cache,
            no_store=args.no_store,
            ttl_seconds=args.ttl,
            tags=args.tag,
            force_tier=args.tier,
            end_user_id=args.user,
            validators=validators,
        )
    except ValueError as error:
        raise ConfigError(f"cannot build the request: {error}") from error


async def ask(args: argparse.Namespace) -> int:
    request = _request(args)
    tls = _tls(args)
    try:
        check_sendable_key(args.api_key)
    except ValueError as error:  # a key pasted with a trailing CR, say
        raise ConfigError(f"--api-key: {error}") from error
    try:
        opened = RouteCacheClient(args.target, args.api_key, timeout_seconds=args.timeout, tls=tls)
    except ValueError as error:  # grpc cannot encode the target (undecodable bytes in it)
        raise ConfigError(f"--target: {error}") from error
    async with opened as client:
        try:
            if args.stream:
                response = await _streamed(client, request)
            else:
                response = await client.complete(request)
        except grpc.aio.AioRpcError as error:
            trailers = dict(error.trailing_metadata() or ())
            failure = {"code": error.code().name, "details": error.details(), "trailers": trailers}
            print(json.dumps({"error": failure}, indent=2))
            return 1
    if response is None:
        # The server closed the stream OK but never sent its answer: a server-side failure.
        print("routecache: the stream ended without a final response", file=sys.stderr)
        return 1
    print(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True), indent=2))
    return 0


async def _streamed(
    client: RouteCacheClient, request: pb.CompleteRequest
) -> pb.CompleteResponse | None:
    """Echoes the deltas to stderr as they come; the final message, None if none came."""
    response = None
    async for event in client.complete_stream(request):
        if event.HasField("final"):
            response = event.final
        else:
            print(event.delta, end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return response

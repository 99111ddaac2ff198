"""TLS and mTLS on the gRPC port, with certificates made at test time (trustme): the typed
client and `routecache ask` connect with the CA (and a client certificate for mTLS); a
plaintext client, or an mTLS client without a certificate the CA signed, cannot."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import trustme
from cryptography.hazmat.primitives import serialization
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.client import ClientTls, RouteCacheClient, chat_request
from routecache.domain import Tier
from routecache.router.ask import add_cli_arguments, ask
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, start_service
from routecache.router.server import SERVICE_NAME
from routecache.router.settings import ConfigError, load_settings
from tests.fakes import FakeUpstream, json_answer, prose_answer

pytestmark = pytest.mark.integration

KEY = "tls-key-acme"


@dataclass
class Pki:
    ca: trustme.CA
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: Path
    client_key: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@acme.example")
    paths = {name: tmp_path / f"{name}.pem" for name in ("sc", "sk", "ca", "cc", "ck")}
    server.cert_chain_pems[0].write_to_path(str(paths["sc"]))
    server.private_key_pem.write_to_path(str(paths["sk"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["cc"]))
    client.private_key_pem.write_to_path(str(paths["ck"]))
    return Pki(ca, paths["sc"], paths["sk"], paths["ca"], paths["cc"], paths["ck"])


async def serve(server: dict[str, object]) -> Service:
    settings = load_settings(
        server={"host": "127.0.0.1", "port": 0, **server},
        cache={"embedder": "hash"},
        metrics={"enabled": False},
        tenants=[{"name": "acme", "api_key_sha256": [hash_api_key(KEY)]}],
    )
    overrides = Overrides(
        embedder=HashEmbedder(),
        classifier=FixedScoreClassifier(0.2),
        upstreams={
            Tier.CHEAP: FakeUpstream("cheap-model", prose_answer),
            Tier.STRONG: FakeUpstream("strong-model", json_answer),
        },
    )
    return await start_service(settings, overrides)


@pytest_asyncio.fixture
async def tls_service(pki: Pki) -> AsyncIterator[str]:
    service = await serve({"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key})
    assert service.server is not None
    yield f"127.0.0.1:{service.server.port}"
    await service.aclose()


@pytest_asyncio.fixture
async def mtls_service(pki: Pki) -> AsyncIterator[str]:
    service = await serve(
        {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key,
         "tls_client_ca_file": pki.ca_file}
    )  # fmt: skip
    assert service.server is not None
    yield f"127.0.0.1:{service.server.port}"
    await service.aclose()


async def test_tls_answers_health_and_reflection_on_the_same_port(
    tls_service: str, pki: Pki
) -> None:
    tls = ClientTls.from_files(pki.ca_file)
    async with RouteCacheClient(tls_service, KEY, tls=tls, timeout_seconds=10) as client:
        done = await client.complete(chat_request("hello over tls"))
        assert done.text == "answer to hello over tls"
        assert await client.health() == "SERVING"
    async with grpc.aio.secure_channel(tls_service, tls.credentials()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]  # the reflection stubs type only a sync channel
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]  # type: ignore[operator]  # the reflection stubs leave the method untyped
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


async def test_a_plaintext_client_cannot_talk_to_a_tls_port(tls_service: str) -> None:
    async with RouteCacheClient(tls_service, KEY, timeout_seconds=5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(chat_request("hello"))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_service: str) -> None:
    other = ClientTls(root_certificates=trustme.CA().cert_pem.bytes())
    async with RouteCacheClient(tls_service, KEY, tls=other, timeout_seconds=5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(chat_request("hello"))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_the_ca_signed(mtls_service: str, pki: Pki) -> None:
    signed = ClientTls.from_files(pki.ca_file, pki.client_cert, pki.client_key)
    async with RouteCacheClient(mtls_service, KEY, tls=signed, timeout_seconds=10) as client:
        assert (await client.complete(chat_request("hello mtls"))).text

    stranger = trustme.CA().issue_cert("mallory@example")
    unsigned = ClientTls(
        pki.ca.cert_pem.bytes(),
        stranger.cert_chain_pems[0].bytes(),
        stranger.private_key_pem.bytes(),
    )
    for tls in (ClientTls.from_files(pki.ca_file), unsigned):
        async with RouteCacheClient(mtls_service, KEY, tls=tls, timeout_seconds=5) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.complete(chat_request("hello"))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_ask_takes_a_ca_and_a_client_certificate(
    mtls_service: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(
        ["hello from ask", "--target", mtls_service, "--api-key", KEY,
         "--ca-file", str(pki.ca_file), "--client-cert", str(pki.client_cert),
         "--client-key", str(pki.client_key)]
    )  # fmt: skip
    assert await ask(args) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "answer to hello from ask"
    with pytest.raises(ConfigError, match="TLS"):
        await ask(parser.parse_args(["x", "--api-key", KEY, "--client-cert", str(pki.ca_file)]))


def test_tls_settings_must_come_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="together"):
        load_settings(server={"tls_cert_file": tmp_path / "c.pem"})
    with pytest.raises(ConfigError, match="needs tls_cert_file"):
        load_settings(server={"tls_client_ca_file": tmp_path / "ca.pem"})


async def test_an_unreadable_certificate_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.tls_cert_file"):
        await serve({"tls_cert_file": tmp_path / "missing.pem", "tls_key_file": tmp_path / "k"})


async def test_a_certificate_file_that_is_not_pem_stops_the_start_naming_it(
    tmp_path: Path, pki: Pki
) -> None:
    # gRPC accepted the bytes and failed at the bind: "cannot listen ... could not bind".
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"server\.tls_cert_file .*garbage\.pem"):
        await serve({"tls_cert_file": garbage, "tls_key_file": pki.server_key})


async def test_a_key_of_another_certificate_stops_the_start(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"server\.tls_key_file .*not a PEM certificate chain"):
        await serve({"tls_cert_file": pki.server_cert, "tls_key_file": pki.client_key})


async def test_a_key_under_a_passphrase_stops_the_start_saying_so(tmp_path: Path, pki: Pki) -> None:
    # gRPC cannot use an encrypted key. OpenSSL asked for the passphrase on the terminal, so
    # `serve` started by hand sat waiting at a prompt; without one, the message said "not PEM".
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"server\.tls_key_file .*locked\.pem.* passphrase"):
        await serve({"tls_cert_file": pki.server_cert, "tls_key_file": locked})


def _with_a_byte_not_ascii_inside(pem: bytes) -> bytes:
    middle = pem.index(b"\n", len(pem) // 2)
    return pem[:middle] + "é".encode() + pem[middle:]


@pytest.mark.parametrize(
    "content",
    [lambda ca: b"not a CA\n", lambda ca: b"\xff\xfe not ASCII either\n", lambda ca: b"",
     _with_a_byte_not_ascii_inside],
    ids=["text", "not ASCII", "empty", "not ASCII inside a certificate"],
)  # fmt: skip
async def test_a_client_ca_file_that_is_not_pem_stops_the_start(
    tmp_path: Path, pki: Pki, content: Callable[[bytes], bytes]
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_bytes(content(pki.ca_file.read_bytes()))
    with pytest.raises(ConfigError, match=r"server\.tls_client_ca_file .*ca\.pem"):
        await serve(
            {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key,
             "tls_client_ca_file": garbage}
        )  # fmt: skip


async def test_a_client_ca_bundle_with_comments_not_in_ascii_is_taken(
    tmp_path: Path, pki: Pki
) -> None:
    # Bundles name each issuer in a comment ("# Issuer: ..."); before, the start refused one
    # whose comment was not ASCII, though gRPC reads it.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Issuer: CN=Főtanúsítvány\n".encode() + pki.ca_file.read_bytes())
    service = await serve(
        {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key,
         "tls_client_ca_file": bundle}
    )  # fmt: skip
    assert service.server is not None
    signed = ClientTls.from_files(pki.ca_file, pki.client_cert, pki.client_key)
    target = f"127.0.0.1:{service.server.port}"
    try:
        async with RouteCacheClient(target, KEY, tls=signed, timeout_seconds=10) as client:
            assert (await client.complete(chat_request("hello bundle"))).text
    finally:
        await service.aclose()

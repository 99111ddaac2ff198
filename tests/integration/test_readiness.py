"""Readiness over real gRPC: the server answers health checks NOT_SERVING (and calls with
UNAVAILABLE) while the models load, then SERVING for the service and each dependency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.cache.ports import CacheEntry
from routecache.cache.snapshot import read_live_entries, save_snapshot
from routecache.classifier.model import FixedScoreClassifier
from routecache.client import RouteCacheClient, chat_request
from routecache.domain import Tier
from routecache.router.bootstrap import Overrides, Service, start_service
from routecache.router.events import JsonlEventLog
from routecache.router.server import DEPENDENCIES, SERVICE_NAME, ListenError, start_server
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import ConfigError, Settings
from tests.fakes import FakeUpstream, RecordingTelemetry, eventually
from tests.unit.conftest import KEYS, unit_settings

pytestmark = pytest.mark.integration


class GatedEmbedder(HashEmbedder):
    """Holds every encode until the gate opens: a model that is still loading."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self._gate = gate

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self._gate.wait(timeout=30)
        return super().encode(texts)


class GatedTelemetry(RecordingTelemetry):
    """Its first breaker watch, before the build has acquired any part, waits for `gate`;
    `asked` is set when the build gets there: a build still running when the start is
    cancelled, which then acquires the upstream clients and the rest."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self._gate = gate
        self.asked = threading.Event()

    def watch_breaker(self, provider: str, state: Callable[[], float]) -> None:
        self.asked.set()
        self._gate.wait(timeout=30)
        super().watch_breaker(provider, state)


SNAPSHOT_ENTRY = CacheEntry(
    entry_id="acme:kept", tenant="acme", scope="acme:s", exact_key="acme:s:kept", prompt="q",
    answer="a", model="m", tier=Tier.CHEAP, embedding=np.full(4, 0.5, dtype=np.float32),
    created_at=0.0, expires_at=1e12, cost_usd=0.0,
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def health_when_listening(client: RouteCacheClient, service: str = "") -> str:
    for _ in range(200):
        try:
            return await client.health(service)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
    raise TimeoutError("the server never answered health checks")


async def test_not_serving_until_models_are_loaded() -> None:
    gate = threading.Event()
    port = free_port()
    base = unit_settings()
    settings = base.model_copy(update={"server": base.server.model_copy(update={"port": port})})
    overrides = Overrides(
        embedder=GatedEmbedder(gate),
        classifier=FixedScoreClassifier(0.2),
        upstreams={Tier.CHEAP: FakeUpstream("cheap"), Tier.STRONG: FakeUpstream("strong")},
    )
    starting = asyncio.create_task(start_service(settings, overrides))
    async with RouteCacheClient(f"127.0.0.1:{port}", KEYS["acme"]) as client:
        assert await health_when_listening(client) == "NOT_SERVING"
        assert await client.health(SERVICE_NAME) == "NOT_SERVING"
        assert await client.health("routecache.embedder") == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete(chat_request("too early"))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "starting" in (refused.value.details() or "")
        gate.set()
        service = await starting
        try:
            assert await client.health() == "SERVING"
            for dependency in DEPENDENCIES:
                assert await client.health(dependency) == "SERVING"
            answer = await client.complete(chat_request("now it works"))
            assert answer.text == "answer to now it works"
        finally:
            await service.aclose()


async def start_with_the_metrics_port_taken(base: Settings, grpc_port: int) -> None:
    """Start the service with fakes while another socket holds its metrics port: it must fail."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = base.model_copy(update={
            "server": base.server.model_copy(update={"port": grpc_port}),
            "metrics": base.metrics.model_copy(update={"port": taken.getsockname()[1]}),
        })  # fmt: skip
        overrides = Overrides(
            embedder=HashEmbedder(),
            classifier=FixedScoreClassifier(0.2),
            upstreams={Tier.CHEAP: FakeUpstream("cheap"), Tier.STRONG: FakeUpstream("strong")},
        )
        with pytest.raises(OSError):
            await start_service(settings, overrides)


async def test_a_taken_metrics_port_stops_the_start_and_frees_the_grpc_port() -> None:
    grpc_port = free_port()
    await start_with_the_metrics_port_taken(unit_settings(), grpc_port)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc_port))  # the failed start released it


async def test_a_start_that_fails_before_the_restore_keeps_the_cache_snapshot(
    tmp_path: Path,
) -> None:
    # Before: the failed start's clean-up saved the empty store over the snapshot, and the
    # next start found no cache (a metrics port still held by the process being replaced).
    path = tmp_path / "snapshot.jsonl"
    save_snapshot([SNAPSHOT_ENTRY], path)
    await start_with_the_metrics_port_taken(unit_settings(store={"snapshot_path": path}), 0)
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == [SNAPSHOT_ENTRY.entry_id]


async def test_a_second_server_on_the_same_port_fails_to_start() -> None:
    first = await start_server(RouteCacheServicer(None), unit_settings().server.model_copy(
        update={"port": 0}))  # fmt: skip
    try:
        taken = unit_settings().server.model_copy(update={"port": first.port})
        # ListenError: `serve` says "cannot listen", naming the ports, not "cannot start".
        with pytest.raises(ListenError, match="could not bind"):
            await start_server(RouteCacheServicer(None), taken)
    finally:
        await first.stop()


@dataclass
class ClosingUpstream(FakeUpstream):
    """Records its close in `closed` (share one list); `close_error` makes the close fail."""

    closed: list[str] = field(default_factory=list)
    close_error: Exception | None = None

    async def aclose(self) -> None:
        self.closed.append(self.model_id)
        if self.close_error is not None:
            raise self.close_error


def closing_overrides(closed: list[str], cheap_error: Exception | None = None) -> Overrides:
    return Overrides(
        embedder=HashEmbedder(),
        classifier=FixedScoreClassifier(0.2),
        upstreams={
            Tier.CHEAP: ClosingUpstream("cheap", closed=closed, close_error=cheap_error),
            Tier.STRONG: ClosingUpstream("strong", closed=closed),
        },
    )


def open_files() -> set[str]:
    """What this process holds open (Linux's /proc)."""
    held = set()
    for descriptor in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            held.add(os.readlink(descriptor))
    return held


async def test_closing_the_service_releases_its_ports_upstreams_and_event_log(
    tmp_path: Path,
) -> None:
    closed: list[str] = []
    events_path = tmp_path / "events.jsonl"
    settings = unit_settings(service={"server": {"port": 0}, "events": {"path": events_path}})
    service = await start_service(settings, closing_overrides(closed))
    events, ports = held_by(service)
    await service.aclose()
    assert sorted(closed) == ["cheap", "strong"]
    assert_released(events, ports)


def held_by(service: Service) -> tuple[JsonlEventLog, tuple[int, int]]:
    """The event log and the (gRPC, metrics) ports a started service holds."""
    assert service.server is not None and service.metrics_port is not None
    assert isinstance(service.events, JsonlEventLog)
    return service.events, (service.server.port, service.metrics_port)


def assert_released(events: JsonlEventLog, ports: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="closed file"):
        events.emit("completion", {})
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


async def test_a_release_step_that_fails_does_not_stop_the_later_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the first failure ended aclose: the strong client, the embedding threads, the
    # event log's file and the metrics port stayed held by a process that went on running.
    closed: list[str] = []
    settings = unit_settings(
        service={"server": {"port": 0}, "events": {"path": tmp_path / "events.jsonl"}}
    )
    failing = RuntimeError("cheap client would not close")
    service = await start_service(settings, closing_overrides(closed, cheap_error=failing))
    events, ports = held_by(service)
    with pytest.raises(RuntimeError, match="cheap client would not close"):
        await service.aclose()
    assert sorted(closed) == ["cheap", "strong"]
    assert_released(events, ports)
    logged = [r for r in caplog.records if "cheap client would not close" in r.getMessage()]
    assert len(logged) == 1  # once, naming the provider: not again for the whole generator
    assert "upstream cheap" in logged[0].getMessage()


async def test_a_build_that_fails_partway_releases_what_it_had_built(tmp_path: Path) -> None:
    # A damaged key registry fails the build after the upstream clients, the embedding worker
    # and the event log exist. Before: only the gRPC port was released, the rest leaked.
    keys = tmp_path / "keys.json"
    keys.write_text("not JSON")
    events_path = tmp_path / "events.jsonl"
    settings = unit_settings(service={
        "server": {"port": free_port()}, "events": {"path": events_path},
        "keys": {"source": "file", "registry_path": keys},
    })  # fmt: skip
    closed: list[str] = []
    with pytest.raises(ConfigError, match=r"keys\.registry_path"):
        await start_service(settings, closing_overrides(closed))
    assert sorted(closed) == ["cheap", "strong"]
    assert str(events_path) not in open_files()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", settings.server.port))


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_start_cancelled_mid_build_releases_what_the_build_acquires_afterwards(
    tmp_path: Path, cancels: int
) -> None:
    # A cancel does not stop the build's thread. Before: the start released what the build had
    # acquired by then (here nothing) and returned, and the upstream clients, embedding worker,
    # event log, storage and cost control the build went on to acquire were never released.
    gate = threading.Event()
    events_path = tmp_path / "events.jsonl"
    settings = unit_settings(
        service={"server": {"port": free_port()}, "events": {"path": events_path}}
    )
    closed: list[str] = []
    telemetry = GatedTelemetry(gate)
    starting = asyncio.create_task(
        start_service(settings, replace(closing_overrides(closed), telemetry=telemetry))
    )
    assert await asyncio.to_thread(telemetry.asked.wait, 30)
    for _ in range(cancels):  # a second cancel by the caller lands while it waits
        starting.cancel()
        await asyncio.sleep(0)  # the start takes the cancel (asyncio runs its wake-up first)
    gate.set()  # only now does the build go on, to acquire its parts
    with pytest.raises(asyncio.CancelledError):
        await starting
    await asyncio.get_running_loop().shutdown_default_executor()  # the build's thread is done
    # After a second cancel the release goes on without the start.
    await eventually(lambda: len(closed) == 2, "both upstream clients released")
    assert sorted(closed) == ["cheap", "strong"]
    assert str(events_path) not in open_files()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", settings.server.port))

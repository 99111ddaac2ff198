"""The whole service over real gRPC: the packaged MiniLM embedder and classifier, the replay
upstream over real HTTP, both on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from routecache.client import RouteCacheClient
from routecache.replay.config import ReplayConfig
from routecache.replay.server import RunningReplayServer, start_replay_server
from routecache.router.bootstrap import Service, start_service
from routecache.router.demo import demo_settings

KEYS = {"acme": "e2e-key-acme", "globex": "e2e-key-globex"}


@dataclass
class Stack:
    replay: RunningReplayServer
    service: Service
    target: str

    def client(self, tenant: str = "acme", api_key: str | None = None) -> RouteCacheClient:
        return RouteCacheClient(self.target, api_key or KEYS[tenant], timeout_seconds=30)


@pytest_asyncio.fixture(loop_scope="package", scope="package")
async def stack() -> AsyncIterator[Stack]:
    replay = await start_replay_server(ReplayConfig())
    service = await start_service(demo_settings(replay.base_url, KEYS))
    assert service.server is not None
    yield Stack(replay, service, f"127.0.0.1:{service.server.port}")
    await service.aclose()
    await replay.close()


HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only the ones in this folder.
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.e2e)

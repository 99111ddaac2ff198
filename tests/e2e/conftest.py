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
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Service, start_service
from routecache.router.demo import demo_settings
from routecache.router.settings import TenantRateSettings, TenantSettings

KEYS = {"acme": "e2e-key-acme", "globex": "e2e-key-globex"}
LIMITED_KEY = "e2e-key-limited"  # tenant "limited": one request per end user per hour


@dataclass
class Stack:
    replay: RunningReplayServer
    service: Service
    target: str
    key_registry: Path  # the service's key registry file (routecache keys --registry)

    def client(self, tenant: str = "acme", api_key: str | None = None) -> RouteCacheClient:
        return RouteCacheClient(self.target, api_key or KEYS[tenant], timeout_seconds=30)


@pytest_asyncio.fixture(loop_scope="package", scope="package")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    replay = await start_replay_server(ReplayConfig())
    settings = demo_settings(replay.base_url, KEYS)
    key_registry = tmp_path_factory.mktemp("keys") / "keys.json"
    settings.keys.registry_path = key_registry
    settings.tenants.append(
        TenantSettings(name="limited", api_key_sha256=[hash_api_key(LIMITED_KEY)],
                       rate=TenantRateSettings(user_requests=1, window_seconds=3600))
    )  # fmt: skip
    service = await start_service(settings)
    assert service.server is not None
    yield Stack(replay, service, f"127.0.0.1:{service.server.port}", key_registry)
    await service.aclose()
    await replay.close()


HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only the ones in this folder.
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.e2e)

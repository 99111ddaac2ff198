"""The whole service over real gRPC, on its own event loop in a thread, with the replay upstream
over real HTTP and the hash embedder: for tests that drive it with blocking clients (Hypothesis
tests are synchronous)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from routecache.classifier.model import FixedScoreClassifier
from routecache.replay.config import ReplayConfig
from routecache.replay.server import RunningReplayServer, start_replay_server
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, start_service
from routecache.router.settings import Settings, load_settings

T = TypeVar("T")


def service_settings(
    base_url: str, keys: Mapping[str, str], **sections: dict[str, object]
) -> Settings:
    server = {"host": "127.0.0.1", "port": 0, **sections.pop("server", {})}
    overrides: dict[str, object] = {
        "server": server,
        "cache": {"embedder": "hash", "similarity_threshold": 0.8},
        "metrics": {"enabled": False},
        "upstream": {
            "cheap": {"base_url": base_url, "model": "mixtral-8x7b-instruct",
                      "input_usd_per_mtok": 0.6, "output_usd_per_mtok": 0.6},
            "strong": {"base_url": base_url, "model": "gpt-4-1106-preview",
                       "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0},
        },
        "tenants": [{"name": name, "api_key_sha256": [hash_api_key(key)]}
                    for name, key in keys.items()],
        **sections,
    }  # fmt: skip
    return load_settings(None, **overrides)


@dataclass
class ThreadedService:
    loop: asyncio.AbstractEventLoop
    replay: RunningReplayServer
    service: Service

    @property
    def port(self) -> int:
        assert self.service.server is not None
        return self.service.server.port

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextmanager
def threaded_service(
    keys: Mapping[str, str], **sections: dict[str, object]
) -> Iterator[ThreadedService]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> ThreadedService:
        replay = await start_replay_server(ReplayConfig())
        try:
            settings = service_settings(replay.base_url, keys, **sections)
            classifier = FixedScoreClassifier(0.3, version="fixed", default_threshold=0.5)
            service = await start_service(settings, Overrides(classifier=classifier))
        except BaseException:
            await replay.close()
            raise
        return ThreadedService(loop, replay, service)

    try:
        running = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        try:
            yield running
        finally:
            running.run(running.service.aclose())
            running.run(running.replay.close())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

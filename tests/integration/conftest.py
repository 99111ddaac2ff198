from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_fixture import RedisServer, find_redis_server


@pytest.fixture(scope="session")
def redis_executable() -> str:
    found = find_redis_server()
    if found is None:
        pytest.skip(
            "redis-server not found: install it (apt-get install redis-server; scripts/test.sh "
            "does this when run as root) to run the Redis integration tests"
        )
    return found


@pytest.fixture(scope="session")
def redis_server_shared(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_server_shared: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, emptied before each test."""
    redis_server_shared.flushall()
    yield redis_server_shared


@pytest.fixture
def own_redis_server(redis_executable: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (tests that kill and restart it)."""
    server = RedisServer(redis_executable, tmp_path)
    server.start()
    yield server
    server.stop()

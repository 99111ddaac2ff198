"""The shared Redis link, as the service wires it, against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import SecretStr

from routecache.backends.link import RedisDown, guarded
from routecache.router.bootstrap import build_redis_link
from routecache.router.settings import StoreSettings
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration

# Longer than a call's allowance (0.25 s), shorter than a connection's (1 s).
LOOP_STALL_SECONDS = 0.4


def settings_for(server: RedisServer, **overrides: float) -> StoreSettings:
    return StoreSettings(backend="redis", redis_url=SecretStr(server.url), **overrides)


async def ping_on_a_new_connection_during_a_stall(settings: StoreSettings) -> bool:
    """Open a connection while the event loop is busy; True if Redis stayed up."""
    link = build_redis_link(settings)
    try:
        assert await link.connect()
        await link.client.connection_pool.disconnect()  # the next call must connect again
        # A busy loop (a burst of requests on a starved 2-core box) stalls every coroutine.
        asyncio.get_running_loop().call_soon(time.sleep, LOOP_STALL_SECONDS)
        try:
            await guarded(link, link.client.ping)
        except RedisDown:
            return False
        return link.up
    finally:
        await link.aclose()


async def test_a_stalled_loop_while_connecting_does_not_mark_redis_down(
    redis_server: RedisServer,
) -> None:
    # Found in CI: fifty cold connections on a busy box missed a connect timeout equal to the
    # 0.25 s call timeout, Redis was marked down, and spend caps fell back to each replica.
    assert await ping_on_a_new_connection_during_a_stall(settings_for(redis_server))


async def test_the_connect_timeout_is_what_bounds_a_new_connection(
    redis_server: RedisServer,
) -> None:
    # The same stall against a connect allowance shorter than it: the link goes down, so the
    # test above passes because of the setting, not because the stall missed the connect.
    tight = settings_for(redis_server, connect_timeout_seconds=0.25)
    assert not await ping_on_a_new_connection_during_a_stall(tight)

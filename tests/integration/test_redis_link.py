"""The shared Redis link, as the service wires it, against a real redis-server.

Found in CI: fifty new connections on a busy box missed the 0.25 s call timeout while opening,
Redis was marked down, and spend caps fell back to each replica's own ledger. Opening a
connection (the TCP connect, then redis-py's set-up commands) now gets
`store.connect_timeout_seconds`; calls on an open connection keep the call timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import redis
from pydantic import SecretStr

from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.router.bootstrap import build_redis_link
from routecache.router.settings import StoreSettings
from tests.redis_fixture import RedisServer, free_port

pytestmark = pytest.mark.integration

# Longer than a call's allowance (0.25 s), shorter than a connection's (1 s).
STALL_SECONDS = 0.4

Stall = Callable[[RedisServer], Awaitable[None]]


async def stall_the_event_loop(server: RedisServer) -> None:
    """A busy loop (a burst of requests on a starved 2-core box) holds up the TCP connect."""
    asyncio.get_running_loop().call_soon(time.sleep, STALL_SECONDS)


async def stall_redis(server: RedisServer) -> None:
    """Redis busy for a moment: the new connection's set-up replies (CLIENT SETINFO) wait."""
    started = threading.Event()

    def sleep_in_redis() -> None:
        started.set()
        # Longer by the ~0.1 s wait_stalled() takes to see it: what is left is STALL_SECONDS.
        server.debug_sleep(STALL_SECONDS + 0.1)

    threading.Thread(target=sleep_in_redis, daemon=True).start()
    started.wait()
    # DEBUG SLEEP must reach the server before we connect: late, the test saw no stall at all.
    await asyncio.to_thread(server.wait_stalled)


def settings_for(server: RedisServer, **overrides: float) -> StoreSettings:
    return StoreSettings(backend="redis", redis_url=SecretStr(server.url), **overrides)


async def ping_on_a_new_connection(link: RedisLink, server: RedisServer, stall: Stall) -> bool:
    """Open a new connection through a stall; True if Redis stayed up."""
    try:
        assert await link.connect()
        await link.client.connection_pool.disconnect()  # the next call must connect again
        await stall(server)
        try:
            await guarded(link, link.client.ping)
        except RedisDown:
            return False
        return link.up
    finally:
        await link.aclose()


@pytest.mark.parametrize("stall", [stall_the_event_loop, stall_redis])
async def test_a_slow_new_connection_does_not_mark_redis_down(
    redis_server: RedisServer, stall: Stall
) -> None:
    link = build_redis_link(settings_for(redis_server))
    assert await ping_on_a_new_connection(link, redis_server, stall)


@pytest.mark.parametrize("stall", [stall_the_event_loop, stall_redis])
async def test_the_connect_timeout_is_what_bounds_a_new_connection(
    redis_server: RedisServer, stall: Stall
) -> None:
    # The same stalls against a connect allowance shorter than them: the link goes down, so the
    # test above passes because of the setting, not because the stall missed the connection.
    link = build_redis_link(settings_for(redis_server, connect_timeout_seconds=0.25))
    assert not await ping_on_a_new_connection(link, redis_server, stall)


async def test_a_call_on_an_open_connection_keeps_the_call_timeout(
    redis_server: RedisServer,
) -> None:
    link = build_redis_link(settings_for(redis_server))
    try:
        assert await link.connect()  # the connection is open: the ping is an ordinary call
        await stall_redis(redis_server)
        with pytest.raises(RedisDown):
            await guarded(link, link.client.ping)
        assert not link.up
    finally:
        await link.aclose()


def test_a_connection_is_never_allowed_less_than_a_call() -> None:
    link = RedisLink("redis://127.0.0.1:1/0", timeout_seconds=2.0, max_connections=1,
                     probe_interval_seconds=1.0, connect_timeout_seconds=0.5)  # fmt: skip
    kwargs = link.client.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == 2.0
    assert kwargs["socket_timeout"] == 2.0


def probes_running() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name() == "redis-probe" and not t.done())


def link_to(url: str, block_ms: int = 1000) -> RedisLink:
    return RedisLink(url, timeout_seconds=0.25, max_connections=2,
                     probe_interval_seconds=0.05, block_ms=block_ms)  # fmt: skip


def changes_heard(link: RedisLink) -> list[bool]:
    """Each up/down change the link tells its listeners, in order."""
    heard: list[bool] = []

    async def listener(up: bool) -> None:
        heard.append(up)

    link.subscribe(listener)
    return heard


async def test_a_redis_down_at_start_is_reported_and_its_calls_are_refused_untried() -> None:
    link = link_to(f"redis://127.0.0.1:{free_port()}/0")
    heard = changes_heard(link)
    tried: list[str] = []

    async def call() -> str:
        tried.append("call")
        return "answer"

    try:
        assert not await link.connect()
        assert not link.up and heard == [False]
        with pytest.raises(RedisDown):
            await guarded(link, call)
        assert tried == []
        await link.mark_down(OSError("still down"))
        assert heard == [False] and probes_running() == 1
    finally:
        # Closing stops the probe rather than waiting for a Redis that may never answer.
        closed, _ = await asyncio.wait([asyncio.ensure_future(link.aclose())], timeout=5)
    assert closed and probes_running() == 0


async def test_listeners_hear_each_change_once_and_the_probe_brings_the_link_back(
    own_redis_server: RedisServer,
) -> None:
    link = link_to(own_redis_server.url)
    heard = changes_heard(link)
    try:
        assert await link.connect()
        own_redis_server.kill()
        with pytest.raises(RedisDown):
            await guarded(link, link.client.ping)
        await link.mark_down(OSError("another part failed too"))
        await asyncio.sleep(0.3)  # several probes fail meanwhile
        assert heard == [True, False] and not link.up
        own_redis_server.start()
        await asyncio.wait_for(link.wait_up(), timeout=3)
        assert heard == [True, False, True]
        assert await guarded(link, link.client.ping)
    finally:
        await link.aclose()


async def test_a_blocking_read_may_wait_its_whole_block_time(redis_server: RedisServer) -> None:
    link = link_to(redis_server.url, block_ms=600)
    try:
        assert await link.connect()
        read = await guarded(
            link, lambda: link.blocking.xread({"nothing-here": "$"}, block=link.block_ms)
        )
        assert not read and link.up
    finally:
        await link.aclose()


class ResetPings:
    """A client whose next `fails` pings end in a bare socket error (an OSError, no RedisError)."""

    def __init__(self, fails: int) -> None:
        self.fails = fails

    async def ping(self) -> bool:
        if self.fails:
            self.fails -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return True


async def test_a_bare_socket_error_marks_the_link_down_and_the_probe_rides_it_out() -> None:
    link = link_to(f"redis://127.0.0.1:{free_port()}/0")
    real, pings = link.client, ResetPings(fails=1)
    link.client = pings

    async def reset() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    try:
        assert not await link.connect()  # the ping at start
        await asyncio.wait_for(link.wait_up(), timeout=3)
        pings.fails = 2  # the probe's first two pings fail the same way
        with pytest.raises(RedisDown):
            await guarded(link, reset)  # a call
        assert not link.up
        await asyncio.wait_for(link.wait_up(), timeout=3)
        assert pings.fails == 0
    finally:
        link.client = real
        await link.aclose()


async def test_a_call_failing_while_listeners_hear_redis_is_up_is_probed_again() -> None:
    # A listener that yields (a contended condition, say) let a call fail meanwhile: it found
    # the probe still running and started none, the probe ended, and the link stayed down.
    link = link_to(f"redis://127.0.0.1:{free_port()}/0")
    real, link.client = link.client, ResetPings(fails=0)
    told_up, release = asyncio.Event(), asyncio.Event()

    async def slow_when_up(up: bool) -> None:
        if up:
            told_up.set()
            await release.wait()

    try:
        assert await link.connect()
        link.subscribe(slow_when_up)
        await link.mark_down(OSError("blip"))
        await asyncio.wait_for(told_up.wait(), timeout=3)  # the probe is telling listeners
        await link.mark_down(OSError("a call failed meanwhile"))
        release.set()
        await asyncio.wait_for(link.wait_up(), timeout=3)
        assert probes_running() == 0
    finally:
        link.client = real
        await link.aclose()


async def test_closing_the_link_closes_the_connections_of_both_pools(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server.url, block_ms=50)
    assert await link.connect()
    await guarded(link, lambda: link.blocking.xread({"nothing-here": "$"}, block=link.block_ms))
    await link.aclose()
    with redis.Redis(host="127.0.0.1", port=redis_server.port) as raw:
        for _ in range(40):  # the server notices a closed socket a moment later
            if len(raw.client_list()) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(raw.client_list()) == 1  # only this one is left


async def test_a_call_with_every_connection_in_use_waits_for_one_instead_of_marking_redis_down(
    redis_server: RedisServer,
) -> None:
    # More calls at once than store.max_connections (a burst of requests): the pool raised
    # "Too many connections", a RedisError, and the whole service took its degraded path.
    link = link_to(redis_server.url)  # two connections
    pool = link.client.connection_pool
    try:
        assert await link.connect()
        in_flight = [await pool.get_connection(), await pool.get_connection()]
        ping = asyncio.ensure_future(guarded(link, link.client.ping))
        await asyncio.sleep(0.05)  # the ping finds no free connection
        await pool.release(in_flight.pop())  # one of the calls in flight answers
        assert await ping and link.up and link.failures == 0
        await pool.release(in_flight.pop())
    finally:
        await link.aclose()


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("redis refused")]


async def test_a_write_redis_refuses_fails_that_call_alone_and_leaves_the_link_up(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Out of memory under `noeviction`: Redis answers, and refuses writes. Marked down, the link
    # flapped (the ping probe brought it back, the next write took it down again), sending every
    # part to its fallback in between and logging each cycle.
    link = link_to(redis_server.url)
    heard = changes_heard(link)
    try:
        assert await link.connect()
        with redis_server.out_of_memory():
            for _ in range(3):
                with pytest.raises(RedisDown):  # what every part takes its fallback on
                    await guarded(link, lambda: link.client.set("k", "v"))
            assert await guarded(link, lambda: link.client.get("k")) is None  # reads answered
            assert link.up and heard == [True] and probes_running() == 0
            assert link.failures == 0 and link.refusals == 3
        assert await guarded(link, lambda: link.client.set("k", "v"))  # no reconnect cycle
        assert heard == [True] and len(refusal_lines(caplog)) == 1
    finally:
        await link.aclose()


async def test_refusals_are_logged_once_per_distinct_error_not_once_per_call(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    link = link_to(redis_server.url)
    try:
        assert await link.connect()
        for error in ("script failed: boom", "script failed: boom", "script failed: bang"):
            with pytest.raises(RedisDown):
                await guarded(link, lambda e=error: link.client.eval(  # type: ignore[misc]
                    "return redis.error_reply(ARGV[1])", 0, e))  # fmt: skip
        lines = refusal_lines(caplog)
        assert len(lines) == 2 and "boom" in lines[0] and "bang" in lines[1]
        assert link.up and link.refusals == 3 and link.failures == 0
    finally:
        await link.aclose()

"""The shared Redis connection and its health: up, or down and probed until it answers again.

Every Redis-backed part goes through one link, so the first failure anywhere switches all of
them to their degraded paths at once (no part waits out its own timeout), and one probe brings
them all back without a restart. An error Redis answers with (out of memory, a script error)
fails only the call it answers: Redis is up, and a probe's PING would find it so at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from routecache.cache.ports import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
HealthListener = Callable[[bool], Awaitable[None]]


class RedisDown(StoreUnavailable):
    """Redis is unreachable or too slow; callers take their degraded path."""


class RedisRefused(RedisDown):
    """Redis answered this call with an error (OOM under `noeviction`, MISCONF, a script
    error): the caller takes its degraded path for this call alone; the link stays up."""


# A refusal's message is logged again only after this long: one line, not one per call.
_REFUSAL_LOG_SECONDS = 60.0


class _PatientSetup:
    """A new connection's set-up replies (CLIENT SETINFO, AUTH, SELECT) get the connect allowance.

    redis-py bounds only the TCP connect by socket_connect_timeout and reads the set-up replies
    under the call timeout, so a burst of new connections on a busy event loop could miss it.
    """

    socket_timeout: float | None
    socket_connect_timeout: float | None

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        call_timeout = self.socket_timeout
        self.socket_timeout = self.socket_connect_timeout
        try:
            await super().on_connect_check_health(check_health=check_health)  # type: ignore[misc]
        finally:
            self.socket_timeout = call_timeout


# Any: redis-py types its commands as "sync or awaitable" for both clients; callers await them.
def _redis_client(url: str, call_timeout: float, connect_timeout: float, size: int) -> Any:
    # No retries inside redis-py: a slow or dead Redis must cost one timeout, not several.
    # A call finding every connection in use waits for one (up to the connect allowance): the
    # plain pool raised "Too many connections" at once, and a burst of requests marked Redis
    # down for every part.
    pool = BlockingConnectionPool.from_url(
        url, socket_timeout=call_timeout, socket_connect_timeout=connect_timeout,
        max_connections=size, timeout=connect_timeout, retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    # Subclass whatever the URL chose (TCP, TLS or a Unix socket).
    pool.connection_class = type(
        f"Patient{pool.connection_class.__name__}", (_PatientSetup, pool.connection_class), {}
    )
    return Redis.from_pool(pool)  # closing the client closes its pool


class RedisLink:
    def __init__(
        self,
        url: str,
        timeout_seconds: float,
        max_connections: int,
        probe_interval_seconds: float,
        block_ms: int = 1000,
        connect_timeout_seconds: float = 1.0,
    ) -> None:
        # Opening a connection takes more round trips than a call: never allow it less.
        connect_timeout = max(connect_timeout_seconds, timeout_seconds)
        self.client = _redis_client(url, timeout_seconds, connect_timeout, max_connections)
        # Blocking stream reads wait up to block_ms by design, so they get their own pool.
        self.blocking = _redis_client(url, timeout_seconds + block_ms / 1000, connect_timeout, 4)
        self.block_ms = block_ms
        self._probe_interval = probe_interval_seconds
        self._up = asyncio.Event()
        self._listeners: list[HealthListener] = []
        self._probe: asyncio.Task[None] | None = None
        self._reported: bool | None = None
        self.failures = 0  # calls (and pings) that marked the link down
        self.refusals = 0  # calls Redis answered with an error: the link stayed up
        self._refusals_logged: dict[str, float] = {}  # message -> when last logged

    @property
    def probe_interval_seconds(self) -> float:
        return self._probe_interval

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def subscribe(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    async def connect(self) -> bool:
        """One ping at start; a Redis that is down now starts the probe instead of failing."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            await self.mark_down(exc)
            return False
        await self._set(True)
        return True

    def check(self) -> None:
        if not self._up.is_set():
            raise RedisDown("redis is down")

    async def wait_up(self) -> None:
        await self._up.wait()

    async def mark_down(self, exc: BaseException) -> None:
        self.failures += 1
        if self._reported is not False:
            log.warning("redis unavailable (%s): cache bypassed until it answers", exc)
        await self._set(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_up(), name="redis-probe")

    def refused(self, exc: ResponseError) -> None:
        """Counts a call Redis refused; logs each distinct error once per quiet minute."""
        self.refusals += 1
        message, now = str(exc), time.monotonic()
        if now - self._refusals_logged.get(message, -_REFUSAL_LOG_SECONDS) < _REFUSAL_LOG_SECONDS:
            return
        # Only messages logged within the minute are kept: bounded by the lines logged.
        self._refusals_logged = {
            m: at for m, at in self._refusals_logged.items() if now - at < _REFUSAL_LOG_SECONDS
        }
        self._refusals_logged[message] = now
        log.warning(
            "redis refused a call (%s: %s): that call took its degraded path, redis stays in "
            "use (%d refused so far; this error is logged again after %.0f s)",
            type(exc).__name__, exc, self.refusals, _REFUSAL_LOG_SECONDS,
        )  # fmt: skip

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                await self.client.ping()
            except (RedisError, OSError):
                continue
            log.info("redis answers again: cache back in use")
            await self._set(True)
            if self._up.is_set():
                return
            # A call failed while the listeners were told (one yielded): its mark_down found
            # this probe still running and started none, so this one goes on probing.

    async def _set(self, up: bool) -> None:
        if up == self._reported:
            return
        self._reported = up
        if up:
            self._up.set()
        else:
            self._up.clear()
        for listener in self._listeners:
            await listener(up)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()
        await self.blocking.aclose()


async def guarded(link: RedisLink, call: Callable[[], Awaitable[T]]) -> T:
    """Run one Redis call. An error Redis answers with raises RedisRefused (a RedisDown) for this
    call alone; any other Redis or socket failure marks the link down and raises RedisDown."""
    link.check()
    try:
        return await call()
    except ResponseError as exc:
        # Redis is up and answered: marked down, the probe's PING brought it straight back and
        # the next write took it down again, every part on its fallback in between.
        link.refused(exc)
        raise RedisRefused(str(exc)) from exc
    except (RedisError, OSError) as exc:
        await link.mark_down(exc)
        raise RedisDown(str(exc)) from exc

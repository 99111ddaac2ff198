"""Rate-limit buckets and spend counters shared by all replicas through Redis, falling back
to this replica's own in-process ones while Redis is down.

Spend recorded during an outage is kept as pending and added to Redis when it is back, so
no recorded cost is lost; until then the cap is checked against Redis' last answer plus this
replica's pending spend.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable

from routecache.backends import scripts
from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.router.limits import InMemoryRateLimiter
from routecache.router.ports import RateLimiter

log = logging.getLogger(__name__)

_SPEND_KEY_DAYS = 3  # a day's counter outlives the day for reports, then Redis drops it


def _tenant_and_name(key: str) -> tuple[str, str]:
    """Limiter keys are `tenant:<name>` (the pipeline's); anything else is its own tenant."""
    kind, _, tenant = key.partition(":")
    return (tenant, kind) if tenant else (key, "key")


class RedisRateLimiter:
    """A token bucket per key in one Redis hash, updated by one Lua script (atomic)."""

    def __init__(
        self, link: RedisLink, keyspace: KeySpace, clock: Callable[[], float],
        fallback: RateLimiter | None = None,
    ) -> None:  # fmt: skip
        self._link = link
        self._keys = keyspace
        self._clock = clock
        self._fallback = fallback or InMemoryRateLimiter(clock)
        self._bucket = link.client.register_script(scripts.TOKEN_BUCKET)
        self.fallbacks = 0

    async def acquire(self, key: str, per_second: float | None) -> float:
        if per_second is None:
            return 0.0
        tenant, name = _tenant_and_name(key)
        bucket = f"{self._keys.of(tenant).rate}:{name}"
        args = [repr(self._clock()), repr(per_second), repr(max(1.0, per_second))]
        try:
            wait = await guarded(self._link, lambda: self._bucket(keys=[bucket], args=args))
        except RedisDown:
            self.fallbacks += 1
            return await self._fallback.acquire(key, per_second)
        return float(wait)


class RedisSpendLedger:
    """Spend per tenant per UTC day: INCRBYFLOAT and EXPIRE in one MULTI transaction."""

    def __init__(self, link: RedisLink, keyspace: KeySpace, clock: Callable[[], float]) -> None:
        self._link = link
        self._keys = keyspace
        self._clock = clock
        self._pending: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._last_known: dict[tuple[str, str], float] = {}
        link.subscribe(self._on_health)

    def _day(self) -> str:
        return dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC).date().isoformat()

    async def spent_today(self, tenant: str) -> float:
        slot = (tenant, self._day())
        key = self._keys.of(tenant).spend(slot[1])
        try:
            raw = await guarded(self._link, lambda: self._link.client.get(key))
        except RedisDown:
            return self._last_known.get(slot, 0.0) + self._pending.get(slot, 0.0)
        self._last_known[slot] = float(raw or 0.0)
        return self._last_known[slot] + self._pending.get(slot, 0.0)

    async def record(self, tenant: str, cost_usd: float) -> None:
        slot = (tenant, self._day())
        self._pending[slot] += cost_usd
        await self.flush()

    async def flush(self) -> None:
        """Moves pending spend into Redis; what fails stays pending for the next try."""
        for slot in list(self._pending):
            amount = self._pending.pop(slot)
            try:
                await guarded(self._link, lambda s=slot, a=amount: self._add(s, a))  # type: ignore[misc]
            except RedisDown:
                self._pending[slot] += amount
                return

    async def _add(self, slot: tuple[str, str], amount: float) -> None:
        key = self._keys.of(slot[0]).spend(slot[1])
        async with self._link.client.pipeline(transaction=True) as pipe:
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, _SPEND_KEY_DAYS * 86400)
            total, _ = await pipe.execute()
        self._last_known[slot] = float(total)

    async def _on_health(self, up: bool) -> None:
        if up and self._pending:
            await self.flush()

"""Rate-limit buckets shared by all replicas through Redis, falling back to this replica's
own in-process ones while Redis is down. The spend ledger is in backends/redis_spend.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from routecache.backends import scripts
from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.router.quotas import Charge, InMemoryQuotaLimiter, QuotaLimiter, Verdict

log = logging.getLogger(__name__)

__all__ = ["RedisQuotaLimiter"]


class RedisQuotaLimiter:
    """Every bucket of a request taken in one Lua script: exact however many replicas and
    concurrent callers share them (all of a tenant's buckets are in its Cluster slot)."""

    def __init__(
        self, link: RedisLink, keyspace: KeySpace, clock: Callable[[], float],
        fallback: QuotaLimiter | None = None,
    ) -> None:  # fmt: skip
        self._link = link
        self._keys = keyspace
        self._clock = clock
        self._fallback = fallback or InMemoryQuotaLimiter(clock)
        self._script = link.client.register_script(scripts.TAKE_BUCKETS)
        self.fallbacks = 0

    async def take(self, tenant: str, charges: Sequence[Charge]) -> Verdict:
        if not charges:
            return Verdict()
        try:
            wait, worst = await self._run(tenant, charges, "take")
        except RedisDown:
            self.fallbacks += 1
            return await self._fallback.take(tenant, charges)
        wait_seconds = float(wait)
        if wait_seconds <= 0:
            return Verdict()
        return Verdict(wait_seconds, charges[int(worst) - 1].bucket)

    async def debit(self, tenant: str, charges: Sequence[Charge]) -> None:
        if not charges:
            return
        try:
            await self._run(tenant, charges, "debit")
        except RedisDown:
            # Counted too: the answer's tokens went to this replica's buckets, not the shared.
            self.fallbacks += 1
            await self._fallback.debit(tenant, charges)

    async def _run(self, tenant: str, charges: Sequence[Charge], mode: str) -> list[Any]:
        base = self._keys.of(tenant).rate
        keys = [f"{base}:q:{c.bucket}" for c in charges]
        args: list[str] = [repr(self._clock()), mode]
        for c in charges:
            args += [repr(c.per_second), repr(c.capacity), repr(float(c.amount))]
        result: list[Any] = await guarded(self._link, lambda: self._script(keys=keys, args=args))
        return result

"""In-process rate limits (token bucket) and spend ledger (per tenant, per UTC day)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated_at: float


class InMemoryRateLimiter:
    """A token bucket per key holding up to one second's worth of requests (the burst)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    async def acquire(self, key: str, per_second: float | None) -> float:
        if per_second is None:
            return 0.0
        now = self._clock()
        capacity = max(1.0, per_second)
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated_at) * per_second)
        bucket.updated_at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / per_second


class InMemorySpendLedger:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._spent: defaultdict[tuple[str, dt.date], float] = defaultdict(float)

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC).date()

    async def spent_today(self, tenant: str) -> float:
        return self._spent.get((tenant, self._today()), 0.0)

    async def record(self, tenant: str, cost_usd: float) -> None:
        self._spent[(tenant, self._today())] += cost_usd

"""In-process rate limits (token bucket) and spend ledger (router/budget.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from routecache.router.budget import InMemorySpendLedger

__all__ = ["InMemoryRateLimiter", "InMemorySpendLedger"]


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
        elapsed = max(0.0, now - bucket.updated_at)
        bucket.tokens = min(capacity, bucket.tokens + elapsed * per_second)
        bucket.updated_at = max(bucket.updated_at, now)  # a clock step back refills nothing twice
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / per_second

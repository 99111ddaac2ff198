"""Rate limits per tenant and per end user: token buckets of requests and of model tokens.

A request takes from all of its buckets or from none (one Lua script on Redis, one step on
the event loop here), so a refusal by the user's bucket does not use up the tenant's. The
prompt's tokens are taken on admission; the answer's tokens are debited after the upstream
call, which may leave a bucket below zero: the next requests then wait until it refills.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from routecache.domain import RateLimits, Tenant

# In-process buckets: past _MAX_BUCKETS full (idle) ones among the least recently used are
# dropped, _SWEEP a call; past twice as many (about 0.5 KB each: ~100 MB) the least recently
# used go, full or not (`InMemoryQuotaLimiter._evict`).
_MAX_BUCKETS = 100_000
_SWEEP = 8


@dataclass(frozen=True)
class Charge:
    bucket: str  # unique within the tenant
    per_second: float  # refill rate
    capacity: float
    amount: float

    @property
    def needed(self) -> float:
        """What must be in the bucket: the amount, or a full bucket for a larger one."""
        return min(self.amount, self.capacity)


@dataclass(frozen=True)
class Verdict:
    wait_seconds: float = 0.0
    bucket: str = ""  # the bucket that refused

    @property
    def allowed(self) -> bool:
        return self.wait_seconds <= 0


class QuotaLimiter(Protocol):
    async def take(self, tenant: str, charges: Sequence[Charge]) -> Verdict:
        """Take every charge, or none and say how long until all would fit."""
        ...

    async def debit(self, tenant: str, charges: Sequence[Charge]) -> None:
        """Take without asking (what a finished call used); buckets may go below zero."""
        ...


def user_slot(end_user_id: str) -> str:
    """A bounded name for an end user in keys and buckets, one per id."""
    # An id that already looks like a hashed one is hashed too: kept as it is, it could name
    # another user's slot on purpose and share their buckets and caps.
    if len(end_user_id) <= 64 and not end_user_id.startswith("h:"):
        return end_user_id
    return "h:" + hashlib.sha256(end_user_id.encode()).hexdigest()[:32]


def _bucket(name: str, per_window: float, window: float, amount: float) -> Charge:
    return Charge(name, per_window / window, per_window, amount)


def admission_charges(tenant: Tenant, end_user_id: str, prompt_tokens: int) -> list[Charge]:
    """The buckets a request takes from on admission: one request, and its prompt's tokens."""
    rate: RateLimits = tenant.rate
    window = rate.window_seconds
    charges: list[Charge] = []
    if tenant.requests_per_second is not None:  # the older per-second setting
        rps = tenant.requests_per_second
        charges.append(Charge("rps", rps, max(1.0, rps), 1.0))
    if rate.requests is not None:
        charges.append(_bucket("req", rate.requests, window, 1.0))
    if rate.tokens is not None:
        charges.append(_bucket("tok", rate.tokens, window, prompt_tokens))
    # Per-user buckets bind a named end user only (as per-user budgets, costs.caps_of): one
    # bucket for '' would cap every request without an end user at one user's allowance.
    if not end_user_id:
        return charges
    user = user_slot(end_user_id)
    if rate.user_requests is not None:
        charges.append(_bucket(f"ureq:{user}", rate.user_requests, window, 1.0))
    if rate.user_tokens is not None:
        charges.append(_bucket(f"utok:{user}", rate.user_tokens, window, prompt_tokens))
    return charges


def completion_charges(tenant: Tenant, end_user_id: str, tokens: int) -> list[Charge]:
    """The answer's tokens, debited from the token buckets after the call."""
    rate, window, charges = tenant.rate, tenant.rate.window_seconds, []
    if rate.tokens is not None and tokens:
        charges.append(_bucket("tok", rate.tokens, window, tokens))
    if rate.user_tokens is not None and tokens and end_user_id:
        user = user_slot(end_user_id)
        charges.append(_bucket(f"utok:{user}", rate.user_tokens, window, tokens))
    return charges


@dataclass
class _State:
    tokens: float
    updated: float


class InMemoryQuotaLimiter:
    """This process's buckets (the embedded store, and the fallback while Redis is down)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # Least recently used first: a bucket moves to the end whenever it is taken from.
        self._buckets: OrderedDict[tuple[str, str], tuple[_State, Charge]] = OrderedDict()

    def _refilled(self, tenant: str, charge: Charge, now: float) -> _State:
        key = (tenant, charge.bucket)
        found = self._buckets.get(key)
        state = _State(charge.capacity, now) if found is None else found[0]
        elapsed = max(0.0, now - state.updated)
        state.tokens = min(charge.capacity, state.tokens + elapsed * charge.per_second)
        # Never back in time: after a wall-clock step back, the refill up to `updated` has
        # already been given and must not be given again.
        state.updated = max(state.updated, now)
        self._buckets[key] = (state, charge)
        self._buckets.move_to_end(key)
        return state

    async def take(self, tenant: str, charges: Sequence[Charge]) -> Verdict:
        now = self._clock()
        states = [self._refilled(tenant, c, now) for c in charges]
        verdict = Verdict()
        for charge, state in zip(charges, states, strict=True):
            if state.tokens < charge.needed:
                wait = (charge.needed - state.tokens) / charge.per_second
                if wait > verdict.wait_seconds:
                    verdict = Verdict(wait, charge.bucket)
        if verdict.allowed:
            for charge, state in zip(charges, states, strict=True):
                state.tokens -= charge.amount
        self._evict(now)
        return verdict

    async def debit(self, tenant: str, charges: Sequence[Charge]) -> None:
        now = self._clock()
        for charge in charges:
            self._refilled(tenant, charge, now).tokens -= charge.amount
        self._evict(now)

    def _evict(self, now: float) -> None:
        """Past the bound, drops the full buckets among the few least recently used (no
        loss: a new one starts full), and past twice the bound the least recently used,
        full or not. O(_SWEEP) a call: scanning all buckets for full ones cost O(n) on every
        take of every tenant once the bound was passed by buckets that never refill (one
        per end user of a long window), and dropped none.

        A bucket not yet full that is dropped is forgotten: its end user's next request
        starts from a full one, more than was left. That is the price of bounded memory;
        the least recently used bucket is the one most likely refilled, a tenant's own
        buckets are used by all its requests, and only a flood of distinct end users
        (abuse, or a `_MAX_BUCKETS` too low for the traffic) gets that far."""
        if len(self._buckets) <= _MAX_BUCKETS:
            return
        oldest = list(itertools.islice(self._buckets.items(), _SWEEP))
        for key, (state, charge) in oldest:
            if state.tokens + (now - state.updated) * charge.per_second >= charge.capacity:
                del self._buckets[key]
        while len(self._buckets) > 2 * _MAX_BUCKETS:
            self._buckets.popitem(last=False)

"""Spend per tenant and per end user per UTC day and month, and the reservations that keep
hard caps from being overrun.

Before an upstream call the pipeline reserves the request's worst-case cost; the reservation
succeeds only if spent + reserved + this amount stays within every cap, checked and taken in
one atomic step (one Lua script on Redis). After the call it is settled to the actual cost, or
released when the call failed. Concurrent requests therefore cannot together pass a cap; what
can pass it is only an actual cost above its reservation (a provider counting more prompt
tokens than the len/4 estimate).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

_EPSILON = 1e-12  # float sums of many small costs must not refuse an exact fit
_RESIDUE_USD = 1e-9  # below this, spend taken back out of a total is nothing left
# In-process totals held past which a record that spent nothing (a cache hit's saving) of an
# end user without totals this period counts for the tenant's alone: free hits, each with a
# new end_user_id, would otherwise add two totals a hit for as long as the month lasts.
_MAX_TOTALS = 100_000


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


def period_ids(now: float) -> dict[Period, str]:
    day = dt.datetime.fromtimestamp(now, tz=dt.UTC).date()
    return {Period.DAY: day.isoformat(), Period.MONTH: day.strftime("%Y-%m")}


def seconds_to_period_end(now: float, period: Period) -> float:
    moment = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    if period is Period.DAY:
        end = dt.datetime.combine(moment.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    else:
        year, month = divmod(moment.month, 12)
        end = dt.datetime(moment.year + year, month + 1, 1, tzinfo=dt.UTC)
    return max((end - moment).total_seconds(), 1.0)


@dataclass(frozen=True)
class Cap:
    period: Period
    limit_usd: float
    per_user: bool = False

    def describe(self) -> str:
        period = "daily" if self.period is Period.DAY else "monthly"
        return (
            f"{'per-user ' if self.per_user else ''}{period} spend cap of {self.limit_usd:.6g} USD"
        )


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    tenant: str
    user: str
    amount_usd: float
    local: bool = False  # held by this process (Redis was down when it was made)


@dataclass(frozen=True)
class CapReached:
    cap: Cap
    committed_usd: float  # spent plus reserved when the reservation was refused


@dataclass(frozen=True)
class SpendRecord:
    """What one request cost and saved; `user` is the request's end user ('' if none)."""

    tenant: str
    user: str = ""
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    saved_usd: float = 0.0  # cache hits and shared in-flight calls: the cost not paid again
    calls: int = 0
    routing_saved_usd: float = 0.0  # a cheap answer: the strong model's price minus its own

    @property
    def spent(self) -> bool:
        """Whether it used anything (cost, tokens, calls), not only saved."""
        return bool(self.cost_usd or self.prompt_tokens or self.completion_tokens or self.calls)


@dataclass
class Totals:
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    saved_usd: float = 0.0
    calls: int = 0
    routing_saved_usd: float = 0.0

    def merge(self, other: Totals) -> None:
        self.cost_usd += other.cost_usd
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.saved_usd += other.saved_usd
        self.calls += other.calls
        self.routing_saved_usd += other.routing_saved_usd

    def add(self, record: SpendRecord) -> None:
        self.cost_usd += record.cost_usd
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.saved_usd += record.saved_usd
        self.calls += record.calls
        self.routing_saved_usd += record.routing_saved_usd

    def subtract(self, record: SpendRecord) -> None:
        self.cost_usd -= record.cost_usd
        self.prompt_tokens -= record.prompt_tokens
        self.completion_tokens -= record.completion_tokens
        self.saved_usd -= record.saved_usd
        self.calls -= record.calls
        self.routing_saved_usd -= record.routing_saved_usd

    def is_empty(self) -> bool:
        # Floats added up and taken apart again in another order leave ~1e-16 behind.
        amounts = (self.cost_usd, self.saved_usd, self.routing_saved_usd)
        counts = (self.prompt_tokens, self.completion_tokens, self.calls)
        return all(abs(a) < _RESIDUE_USD for a in amounts) and not any(counts)


# The tenant's spend in each period before and after a settle: soft budgets compare them.
Movement = dict[Period, tuple[float, float]]


class SpendLedger(Protocol):
    async def reserve(
        self, tenant: str, user: str, amount_usd: float, caps: Sequence[Cap]
    ) -> Reservation | CapReached:
        """Atomically: reserve `amount_usd` if it fits under every cap, else say which not."""
        ...

    async def settle(self, reservation: Reservation | None, record: SpendRecord) -> Movement:
        """Record what a request cost and saved, dropping its reservation (if any)."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose call never happened or failed."""
        ...

    async def totals(self, tenant: str, user: str = "") -> dict[Period, Totals]:
        """Now's day and month; user '' for the whole tenant."""
        ...

    async def spent_today(self, tenant: str) -> float: ...

    async def record(self, tenant: str, cost_usd: float) -> None:
        """Spend without a reservation or usage details."""
        ...


def new_reservation_id() -> str:
    return uuid.uuid4().hex


@dataclass
class _Held:
    reservation: Reservation
    expires_at: float


@dataclass
class InMemorySpendLedger:
    """This process's ledger: the embedded store's, and the Redis one's fallback."""

    clock: Callable[[], float]
    reservation_ttl_seconds: float = 600.0
    _totals: defaultdict[tuple[str, str, str], Totals] = field(
        default_factory=lambda: defaultdict(Totals)
    )
    _held: dict[str, _Held] = field(default_factory=dict)
    _periods: dict[Period, str] = field(default_factory=dict)  # of the last settle

    def committed(self, tenant: str, user: str, period_id: str, per_user: bool) -> float:
        """Spent plus held reservations (of the user, for a per-user cap)."""
        found = self._totals.get((tenant, user if per_user else "", period_id))
        return (0.0 if found is None else found.cost_usd) + self.held_usd(tenant, user, per_user)

    def held_usd(self, tenant: str, user: str, per_user: bool) -> float:
        """Reservations not yet settled, released or expired (of the user, for a per-user cap)."""
        self._expire(self.clock())
        return sum(
            h.reservation.amount_usd
            for h in self._held.values()
            if h.reservation.tenant == tenant and (not per_user or h.reservation.user == user)
        )

    async def reserve(
        self, tenant: str, user: str, amount_usd: float, caps: Sequence[Cap]
    ) -> Reservation | CapReached:
        now = self.clock()
        self._expire(now)
        ids = period_ids(now)
        for cap in caps:
            committed = self.committed(tenant, user, ids[cap.period], cap.per_user)
            if committed + amount_usd > cap.limit_usd + _EPSILON:
                return CapReached(cap, committed)
        reservation = Reservation(new_reservation_id(), tenant, user, amount_usd, local=True)
        self._held[reservation.reservation_id] = _Held(
            reservation, now + self.reservation_ttl_seconds
        )
        return reservation

    async def settle(self, reservation: Reservation | None, record: SpendRecord) -> Movement:
        if reservation is not None:
            self._held.pop(reservation.reservation_id, None)
        return self.add(record, period_ids(self.clock()))

    def add(self, record: SpendRecord, ids: dict[Period, str]) -> Movement:
        """Adds a record's spend to the periods `ids` (the Redis ledger's fallback passes the
        ones it keeps the record under, read before its Redis call: read after, a call timing
        out across midnight would be counted on a day `take_back` never takes it from)."""
        self._forget_ended(ids)
        moved: Movement = {}
        for period, pid in ids.items():
            tenant_totals = self._totals[(record.tenant, "", pid)]
            before = tenant_totals.cost_usd
            tenant_totals.add(record)
            moved[period] = (before, tenant_totals.cost_usd)
            if record.user and self._keeps_user(record, (record.tenant, record.user, pid)):
                self._totals[(record.tenant, record.user, pid)].add(record)
        return moved

    def _keeps_user(self, record: SpendRecord, key: tuple[str, str, str]) -> bool:
        """Whether the record counts for its end user too. Spend always does (per-user caps
        read it); a saving alone, past `_MAX_TOTALS`, only for a user already held."""
        return record.spent or key in self._totals or len(self._totals) < _MAX_TOTALS

    def _forget_ended(self, ids: dict[Period, str]) -> None:
        """Drops the totals of days and months before `ids` (read by nothing: reads and
        caps are of now's), once a period, as the Redis ledger's `_forget_past` does; Redis
        keeps its own for the retention days. Only earlier ones: after a clock stepped back
        the later day's spend must still count once the clock is there again."""
        if ids == self._periods:
            return
        self._periods = dict(ids)
        for key in [k for k in self._totals if _ended(k[2], ids)]:
            del self._totals[key]

    async def release(self, reservation: Reservation) -> None:
        self._held.pop(reservation.reservation_id, None)

    def take_back(self, record: SpendRecord, ids: dict[Period, str]) -> None:
        """Removes a settled record's spend from the periods `ids` (the Redis ledger's
        fallback: once the record has reached Redis, it must not be counted here too)."""
        for pid in ids.values():
            for who in dict.fromkeys(("", record.user)):
                key = (record.tenant, who, pid)
                found = self._totals.get(key)
                if found is None:
                    continue
                found.subtract(record)
                if found.is_empty():
                    del self._totals[key]

    async def totals(self, tenant: str, user: str = "") -> dict[Period, Totals]:
        ids = period_ids(self.clock())
        return {p: Totals(**vars(self._totals.get((tenant, user, pid), Totals())))
                for p, pid in ids.items()}  # fmt: skip

    async def spent_today(self, tenant: str) -> float:
        return (await self.totals(tenant))[Period.DAY].cost_usd

    async def record(self, tenant: str, cost_usd: float) -> None:
        await self.settle(None, SpendRecord(tenant, cost_usd=cost_usd))

    def _expire(self, now: float) -> None:
        for key in [k for k, h in self._held.items() if h.expires_at <= now]:
            del self._held[key]


def _ended(period_id: str, ids: dict[Period, str]) -> bool:
    """Whether a day's or month's id is before now's. Day ids are YYYY-MM-DD and months
    YYYY-MM: the length tells which, and ids of one kind order as strings do."""
    day, month = ids[Period.DAY], ids[Period.MONTH]
    return period_id < (day if len(period_id) == len(day) else month)

"""Spend, savings and tokens per tenant and end user per UTC day and month in Redis, and the
reservations that hold hard caps across every replica (routecache/router/budget.py).

Keys (all in the tenant's Cluster slot): `<base>spend:d:<day>` and `<base>spend:m:<month>`
hashes (cost, prompt_tokens, completion_tokens, saved, calls), the same with `:u:<user>` for
each end user, and `<base>resv` (reservation id → amount, user, expiry).

While Redis is down a replica reserves against Redis' last answer plus its own reservations
and spend, and keeps what it spent as pending: it is added to Redis when Redis is back, so no
recorded cost is lost. Each pending record goes to Redis under an id of its own, kept until
Redis confirms it, so a try whose answer was lost is not added twice; so does each model
call's settle, which is sent again by the flush if its answer was lost. A call that reserved
in Redis and settled while Redis was down has its reservation dropped there after the flush;
so has one released while Redis was down, and a reservation Redis may have made without its
answer coming back (a timeout, or the caller cancelled): dropping an id Redis lacks is harmless.
Its own reservations, never in Redis, lower the caps Redis checks until their calls end; so
does its spend Redis has not confirmed (pending or in doubt), until the flush adds it there.

Soft budgets are judged on Redis' movements alone: a settle made while Redis is down moves
nothing a soft budget sees (each replica knows only its own share: judged there, a crossing
was missed, or raised on every replica), and the flush tells its listeners (`on_flushed`)
what each record it adds moved in Redis, atomically, so one replica sees a crossing once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from routecache.backends import scripts
from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, RedisRefused, guarded
from routecache.router.budget import (
    Cap,
    CapReached,
    InMemorySpendLedger,
    Movement,
    Period,
    Reservation,
    SpendRecord,
    Totals,
    new_reservation_id,
    period_ids,
)

log = logging.getLogger(__name__)

_PREFIX = {Period.DAY: "d", Period.MONTH: "m"}

_Slot = tuple[str, str, str, str]  # tenant, user, day id, month id


def spend_suffix(period: Period, period_id: str, user: str = "") -> str:
    suffix = f"spend:{_PREFIX[period]}:{period_id}"
    return f"{suffix}:u:{user}" if user else suffix


@dataclass(frozen=True)
class Retention:
    day_seconds: int = 40 * 86400
    month_seconds: int = 400 * 86400
    # How long a request's settle id is kept (`settled:<id>`): one key per model call, so far
    # shorter than a flush's (kept as long as a day's spend). A settle whose answer was lost
    # is sent again under its id as soon as the link is back, seconds later as a rule.
    request_settle_seconds: int = 3600

    def of(self, period: Period) -> int:
        return self.day_seconds if period is Period.DAY else self.month_seconds


# Reservation ids an HDEL drops at once: one TTL's calls of a long outage in one command took
# ~0.2 s to build on the event loop and more than the call timeout to run (300,000 ids).
_DROP_BATCH = 1000


class RedisSpendLedger:
    def __init__(
        self,
        link: RedisLink,
        keyspace: KeySpace,
        clock: Callable[[], float],
        reservation_ttl_seconds: float = 600.0,
        retention: Retention | None = None,
    ) -> None:
        self._link = link
        self._keys = keyspace
        self._clock = clock
        self._ttl = reservation_ttl_seconds
        self._retention = retention or Retention()
        self._reserve = link.client.register_script(scripts.RESERVE)
        self._settle = link.client.register_script(scripts.SETTLE)
        # While Redis is down: this replica's own reservations and spend, on top of what
        # Redis last said was committed against each cap.
        self._local = InMemorySpendLedger(clock, reservation_ttl_seconds)
        # Per (tenant, user or '', period id): what Redis last said was committed / spent.
        self._last_committed: dict[tuple[str, str, str], float] = {}
        # Spend made while Redis was down, summed per tenant, user, day and month.
        self._pending: dict[_Slot, SpendRecord] = {}
        # Records sent without hearing back (a settle's or a flush's), by settle id: perhaps
        # in Redis. A settle's keeps its reservation, which Redis must drop when it adds it.
        self._in_doubt: dict[str, _InDoubt] = {}
        # Per tenant: the Redis reservations of calls settled while Redis was down (their
        # spend is in `_pending`), with when each expires there anyway, oldest first. The
        # flush drops them once that spend is in Redis, else each would hold the cap beside
        # it until it expires; expired ones are forgotten, so one TTL's calls at most.
        self._to_drop: dict[str, deque[tuple[float, str]]] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._stopping = False  # at stop: no background flush starts any more
        # Per (tenant, user or '', period id): the totals Redis last reported (a read, or a
        # settle's cost with this replica's usage added since), shown while Redis is down.
        self._last_totals: dict[tuple[str, str, str], Totals] = {}
        self._periods: dict[Period, str] = {}  # the period ids those two are kept for
        self._flushing = asyncio.Lock()
        self._flushed: list[Callable[[str, Movement], None]] = []
        link.subscribe(self._on_health)

    def on_flushed(self, listener: Callable[[str, Movement], None]) -> None:
        """Calls `listener(tenant, movement)` for each record a flush adds to Redis: the
        tenant's spend there before and after it, for soft budgets."""
        self._flushed.append(listener)

    def _base(self, tenant: str) -> str:
        return self._keys.of(tenant).base

    async def reserve(
        self, tenant: str, user: str, amount_usd: float, caps: Sequence[Cap]
    ) -> Reservation | CapReached:
        now = self._clock()
        ids = period_ids(now)
        rid = new_reservation_id()
        # What this replica committed that Redis has not confirmed lowers each cap Redis
        # checks: reservations made while Redis was down (their calls may still run), and
        # spend pending or in doubt until the flush adds it (many records take a while).
        # The flush takes each record back from the local ledger once it is in Redis, so
        # nothing counts twice but a record in doubt (perhaps in Redis already): the safe side.
        own = [self._local.committed(tenant, user, ids[cap.period], cap.per_user)
               for cap in caps]  # fmt: skip
        args: list[str] = [self._base(tenant), repr(now), rid, repr(amount_usd),
                           repr(self._ttl), user]  # fmt: skip
        for cap, mine in zip(caps, own, strict=True):
            suffix = spend_suffix(cap.period, ids[cap.period], user if cap.per_user else "")
            args += [suffix, "1" if cap.per_user else "0", repr(cap.limit_usd - mine)]
        try:
            self._link.check()
        except RedisDown:  # known down: nothing sent
            return await self._reserve_locally(tenant, user, amount_usd, caps)
        try:
            result = await guarded(self._link, lambda: self._reserve(keys=[], args=args))
        except RedisRefused:  # Redis answered with an error: it reserved nothing
            return await self._reserve_locally(tenant, user, amount_usd, caps)
        except RedisDown:
            # Redis may have run it and lost the answer (a timeout): its reservation would
            # hold the cap on every replica until it expires. Dropping an absent id is harmless.
            self._drop_later(tenant, rid)
            return await self._reserve_locally(tenant, user, amount_usd, caps)
        except asyncio.CancelledError:  # the caller gave up: the same, with no call to make
            self._drop_later(tenant, rid)
            self._flush_in_background()
            raise
        ok, refused, *committed = result
        if not int(ok):
            index = int(refused) - 1
            return CapReached(caps[index], float(committed[0]) + own[index])
        self._forget_past(ids)
        for cap, value in zip(caps, committed, strict=True):
            who = user if cap.per_user else ""
            # This call's own amount too: if Redis goes away while it runs, it still holds.
            self._last_committed[(tenant, who, ids[cap.period])] = float(value) + amount_usd
        self._flush_in_background()
        return Reservation(rid, tenant, user, amount_usd)

    def _forget_past(self, ids: dict[Period, str]) -> None:
        """Drops what Redis said of ended days and months: not to be counted against the
        new ones while Redis is down, nor kept forever."""
        if ids == self._periods:
            return
        self._periods = dict(ids)
        current = set(ids.values())
        for known in (self._last_committed, self._last_totals):
            for key in [k for k in known if k[2] not in current]:
                del known[key]

    async def _reserve_locally(
        self, tenant: str, user: str, amount_usd: float, caps: Sequence[Cap]
    ) -> Reservation | CapReached:
        # The local ledger only knows this replica's share: lower each cap by what Redis last
        # said was committed, so the replica does not spend the others' share again.
        ids = period_ids(self._clock())
        lowered = [Cap(c.period, c.limit_usd - self._known(tenant, user, c, ids), c.per_user)
                   for c in caps]  # fmt: skip
        outcome = await self._local.reserve(tenant, user, amount_usd, lowered)
        if isinstance(outcome, CapReached):
            index = lowered.index(outcome.cap)
            committed = outcome.committed_usd + caps[index].limit_usd - lowered[index].limit_usd
            return CapReached(caps[index], committed)
        return outcome

    def _known(self, tenant: str, user: str, cap: Cap, ids: dict[Period, str]) -> float:
        """The latest committed spend Redis reported for a cap: at a reservation, or after."""
        slot = (tenant, user if cap.per_user else "", ids[cap.period])
        spent = self._last_totals.get(slot, Totals()).cost_usd
        return max(self._last_committed.get(slot, 0.0), spent)

    async def settle(self, reservation: Reservation | None, record: SpendRecord) -> Movement:
        ids = period_ids(self._clock())
        if reservation is not None and reservation.local:
            await self._local.release(reservation)
            reservation = None
        # A reservation held in Redis goes with the record that settles it: now or at a flush.
        try:
            self._link.check()
        except RedisDown:  # nothing sent: pending, summed with the rest
            self._add_pending(record, ids)
            if reservation is not None:
                self._drop_later(reservation.tenant, reservation.reservation_id)
            return self._settle_locally(record, ids)
        # A model call's settle is sent under an id of its own: if Redis ran it but its answer
        # was lost, the flush sends it again under that id and Redis adds it once. A cache
        # hit's saving (no call) goes without one: an id key per hit would cost Redis more
        # memory than a saving counted twice after a lost answer is worth; no cap reads it.
        settle_id = new_reservation_id() if record.calls or record.cost_usd > 0 else ""
        lifetime = self._retention.request_settle_seconds
        try:
            moved = await guarded(
                self._link, lambda: self._apply(reservation, record, ids, settle_id, lifetime)
            )
        except RedisDown:  # down, or up and refusing the write (RedisRefused)
            if settle_id:
                self._in_doubt[settle_id] = _InDoubt(_slot(record, ids), record, reservation)
            else:
                self._add_pending(record, ids)
            return self._settle_locally(record, ids)
        self._flush_in_background()
        return moved

    def _settle_locally(self, record: SpendRecord, ids: dict[Period, str]) -> Movement:
        """Counts a record Redis has not confirmed in the local ledger, under the periods it
        is kept pending or in doubt for (the flush takes it back from those). It moves nothing
        for soft budgets yet: the flush reports its movement in Redis (module docstring)."""
        self._local.add(record, ids)
        return {}

    async def _apply(
        self,
        reservation: Reservation | None,
        record: SpendRecord,
        ids: dict[Period, str],
        settle_id: str = "",
        settle_id_seconds: int | None = None,
    ) -> Movement:
        if settle_id_seconds is None:  # a flush's: kept as long as the day's spend it adds to
            settle_id_seconds = self._retention.of(Period.DAY)
        args: list[str] = [
            self._base(record.tenant), "" if reservation is None else reservation.reservation_id,
            repr(record.cost_usd), str(record.prompt_tokens), str(record.completion_tokens),
            repr(record.saved_usd), str(record.calls), repr(record.routing_saved_usd),
            settle_id, str(settle_id_seconds),
        ]  # fmt: skip
        slots = [(period, pid, who) for period, pid in ids.items()
                 for who in dict.fromkeys(("", record.user))]  # fmt: skip
        for period, pid, who in slots:
            args += [spend_suffix(period, pid, who), str(self._retention.of(period))]
        out = await self._settle(keys=[], args=args)
        self._forget_past(period_ids(self._clock()))  # not `ids`: a flush may be of a past day
        moved: Movement = {}
        for i, (period, pid, who) in enumerate(slots):
            before, after = float(out[_SETTLED * i]), float(out[_SETTLED * i + 1])
            # The user's too: while Redis is down, per-user caps and totals start from these.
            self._last_totals[(record.tenant, who, pid)] = _settled_totals(out, i)
            if not who:
                # This settle's own move, the first try's for one sent again (scripts.SETTLE).
                moved[period] = (before, after)
        return moved

    async def release(self, reservation: Reservation) -> None:
        if reservation.local:
            await self._local.release(reservation)
            return
        key, rid = self._base(reservation.tenant) + "resv", reservation.reservation_id
        try:
            await guarded(self._link, lambda: self._link.client.hdel(key, rid))
        except RedisRefused:  # the link stays up: no health change would start the flush
            self._drop_later(reservation.tenant, rid)
            self._flush_in_background()
        except RedisDown:
            # Left there, it would hold the cap on every replica until it expires.
            self._drop_later(reservation.tenant, rid)

    async def totals(self, tenant: str, user: str = "") -> dict[Period, Totals]:
        ids = period_ids(self._clock())
        local = await self._local.totals(tenant, user)
        out: dict[Period, Totals] = {}
        for period, pid in ids.items():
            key = self._base(tenant) + spend_suffix(period, pid, user)
            try:
                raw = await guarded(self._link, lambda k=key: self._link.client.hgetall(k))  # type: ignore[misc]
                out[period] = _totals(raw)
                self._last_totals[(tenant, user, pid)] = replace(out[period])
            except RedisDown:
                out[period] = replace(self._last_totals.get((tenant, user, pid), Totals()))
            if self._pending or self._in_doubt:  # spent while Redis was down, not in Redis yet
                out[period].merge(local[period])
        return out

    async def spent_today(self, tenant: str) -> float:
        return (await self.totals(tenant))[Period.DAY].cost_usd

    async def record(self, tenant: str, cost_usd: float) -> None:
        await self.settle(None, SpendRecord(tenant, cost_usd=cost_usd))

    def _add_pending(self, record: SpendRecord, ids: dict[Period, str]) -> None:
        slot = _slot(record, ids)
        self._pending[slot] = _sum(self._pending.get(slot), record)

    def _drop_later(self, tenant: str, reservation_id: str) -> None:
        """Remembers a Redis reservation for the flush to drop; it expires there by now + TTL
        at the latest (it was made before)."""
        now = self._clock()
        waiting = self._live_to_drop(tenant, now)
        waiting.append((now + self._ttl, reservation_id))
        self._to_drop[tenant] = waiting

    def _live_to_drop(self, tenant: str, now: float) -> deque[tuple[float, str]]:
        """The tenant's reservations to drop, less those Redis has expired by now."""
        waiting = self._to_drop.pop(tenant, deque())
        while waiting and waiting[0][0] <= now:
            waiting.popleft()
        if waiting:
            self._to_drop[tenant] = waiting
        return waiting

    async def flush(self) -> None:
        """Moves spend recorded while Redis was down into Redis; what fails stays pending.

        The health listener and the service's stop may flush at once: one at a time."""
        async with self._flushing:
            # Rounds, until a round finds nothing new: a settle made while this one ran (Redis
            # away and back meanwhile) leaves spend and a reservation that it did not see.
            while self._pending or self._in_doubt or self._to_drop:
                if not await self._flush_round():
                    return
            # The local ledger is kept, not replaced: the reservations it holds are of calls
            # that may still be running, and count against the caps until they end.

    async def _flush_round(self) -> bool:
        # The reservations whose calls' spend is pending now, and only those: the pending
        # loop below sends that spend first. Dropped before it is in Redis, a reservation
        # would leave the caps Redis checks short of both.
        now = self._clock()
        to_drop = {tenant: [rid for _, rid in self._live_to_drop(tenant, now)]
                   for tenant in list(self._to_drop)}  # fmt: skip
        # Sent before without an answer: again under the same id, which Redis adds once.
        for settle_id in list(self._in_doubt):
            if not await self._flush_one(settle_id):
                return False
        while self._pending:
            slot = next(iter(self._pending))
            settle_id = new_reservation_id()
            self._in_doubt[settle_id] = _InDoubt(slot, self._pending.pop(slot))
            if not await self._flush_one(settle_id):
                return False
        for tenant, rids in to_drop.items():
            if not await self._drop_reservations(tenant, rids):
                return False
        return True

    async def _flush_one(self, settle_id: str) -> bool:
        """Sends one pending record; it stays in doubt until Redis confirms it, whether the
        call fails, times out after Redis ran it, or is cancelled."""
        (_, _, day, month), record, reservation = self._in_doubt[settle_id]
        ids = {Period.DAY: day, Period.MONTH: month}
        try:
            moved = await guarded(
                self._link, lambda: self._apply(reservation, record, ids, settle_id)
            )
        except RedisDown:
            return False
        del self._in_doubt[settle_id]
        # In Redis now, so in what Redis reports: no longer this replica's own spend.
        # One record at a time, as a flush cut short leaves the rest to count here.
        self._local.take_back(record, ids)
        for listener in self._flushed:
            listener(record.tenant, moved)
        return True

    async def _drop_reservations(self, tenant: str, rids: list[str]) -> bool:
        """Drops these remembered Redis reservations of the tenant (the oldest it remembers),
        a batch a call; on failure the rest are kept for the next flush."""
        key = self._base(tenant) + "resv"
        for start in range(0, len(rids), _DROP_BATCH):
            batch = rids[start : start + _DROP_BATCH]
            try:
                await guarded(self._link, lambda b=batch: self._link.client.hdel(key, *b))  # type: ignore[misc]
            except RedisDown:
                return False
            # Oldest first, and only expired ones went meanwhile (from the left too).
            dropped, waiting = set(batch), self._to_drop.get(tenant, deque())
            while waiting and waiting[0][1] in dropped:
                waiting.popleft()
            if not waiting:
                self._to_drop.pop(tenant, None)
        return True

    def report_unflushed(self) -> float:
        """At stop: logs the spend Redis has not confirmed (it ends with this process), so an
        operator can add it by hand; returns it in USD. A record sent without an answer may be
        in Redis already: its line names the settle key whose presence says it is."""
        left = 0.0
        for record in self._pending.values():
            left += record.cost_usd
            log.warning(
                "spend recorded while redis was down never reached it: tenant %s user %r "
                "%.6g USD, %d calls",
                record.tenant, record.user, record.cost_usd, record.calls,
            )  # fmt: skip
        for settle_id, (_, record, _) in self._in_doubt.items():
            left += record.cost_usd
            log.warning(
                "spend redis has not confirmed was sent without an answer: tenant %s "
                "user %r %.6g USD, %d calls; in redis already if key %s exists",
                record.tenant, record.user, record.cost_usd, record.calls,
                f"{self._base(record.tenant)}settled:{settle_id}",
            )  # fmt: skip
        return left

    def stop_flushing(self) -> asyncio.Task[None] | None:
        """At stop, before the last flush and report_unflushed: no background flush starts
        from now on; returns the one running, for the caller to cancel (what it was sending
        stays in doubt, under its settle id). Left running, it would go on adding spend the
        report had called lost."""
        self._stopping = True
        task, self._flush_task = self._flush_task, None
        return None if task is None or task.done() else task

    async def _on_health(self, up: bool) -> None:
        if up:
            self._flush_in_background()

    def _flush_in_background(self) -> None:
        """Starts a flush of what waits, unless one runs: when the link comes back up, and
        after each write Redis takes (one it refused, out of memory, left the link up, and
        its spend must reach the caps the other replicas check without waiting for an
        outage). In the background: the link's other listeners must not wait on it."""
        waiting = self._pending or self._in_doubt or self._to_drop
        if self._stopping or not waiting:
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self.flush(), name="spend-flush")


class _InDoubt(NamedTuple):
    slot: _Slot
    record: SpendRecord
    reservation: Reservation | None = None  # held in Redis; a flush's records hold none


def _slot(record: SpendRecord, ids: dict[Period, str]) -> _Slot:
    return record.tenant, record.user, ids[Period.DAY], ids[Period.MONTH]


def _sum(total: SpendRecord | None, record: SpendRecord) -> SpendRecord:
    if total is None:
        return record
    return SpendRecord(
        record.tenant, record.user, total.cost_usd + record.cost_usd,
        total.prompt_tokens + record.prompt_tokens,
        total.completion_tokens + record.completion_tokens, total.saved_usd + record.saved_usd,
        total.calls + record.calls, total.routing_saved_usd + record.routing_saved_usd,
    )  # fmt: skip


_SETTLED = 8  # SETTLE's answer per key: cost before and after the settle, then six totals now


def _settled_totals(out: Sequence[bytes], index: int) -> Totals:
    fields = ("cost", "prompt_tokens", "completion_tokens", "saved", "calls", "routing_saved")
    start = _SETTLED * index + 2
    return _totals(dict(zip((f.encode() for f in fields), out[start : start + 6], strict=True)))


def _totals(raw: dict[bytes, bytes]) -> Totals:
    def number(name: str) -> float:
        return float(raw.get(name.encode(), b"0"))

    return Totals(
        number("cost"), int(number("prompt_tokens")), int(number("completion_tokens")),
        number("saved"), int(number("calls")), number("routing_saved"),
    )  # fmt: skip

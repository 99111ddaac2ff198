"""Cost controls on the request path: rate limits on admission, a spend reservation before
the upstream call, the settlement after it, and the savings of answers that cost nothing.

Over a hard cap a tenant is refused with RESOURCE_EXHAUSTED (retry-after-ms: until the UTC
day or month ends), or under the `downgrade` policy served by the cheap tier alone (no strong
fallback, no escalation) while the cheap worst case still fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace

from routecache.domain import Budget, ChatRequest, OverCapPolicy, Tenant, Tier, Usage
from routecache.errors import FailedValidation, ResourceExhausted
from routecache.outliving import Outliving
from routecache.router.alerts import BudgetAlerts
from routecache.router.budget import (
    Cap,
    CapReached,
    Movement,
    Period,
    Reservation,
    SpendLedger,
    SpendRecord,
    seconds_to_period_end,
)
from routecache.router.generation import Generated, Generator, Tally
from routecache.router.quotas import (
    QuotaLimiter,
    admission_charges,
    completion_charges,
    user_slot,
)
from routecache.router.telemetry import Telemetry
from routecache.router.tokens import estimate_tokens, request_prompt_tokens

log = logging.getLogger(__name__)

_BUCKET_NAMES = {
    "rps": "requests per second",
    "req": "requests",
    "tok": "tokens",
    "ureq": "requests of this end user",
    "utok": "tokens of this end user",
}


def caps_of(budget: Budget, user: str = "") -> list[Cap]:
    """The caps a request of `user` reserves under. Per-user caps only bind a named end user:
    the ledgers keep no per-user spend for '' and would measure it against the tenant's.

    `budget.daily_usd` already holds the older `daily_budget_usd` where the tenant set only
    that (tenant_from_settings)."""
    limits = [
        (Period.DAY, budget.daily_usd, False),
        (Period.MONTH, budget.monthly_usd, False),
        (Period.DAY, budget.user_daily_usd, True),
        (Period.MONTH, budget.user_monthly_usd, True),
    ]
    return [Cap(period, limit, per_user) for period, limit, per_user in limits
            if limit is not None and (user or not per_user)]  # fmt: skip


@dataclass(frozen=True)
class Booking:
    """What a request may spend on its upstream calls, and how it is to be called."""

    tier: Tier
    request: ChatRequest  # max_tokens bounded when a cap needs a worst case
    reservation: Reservation | None = None
    cheap_only: bool = False
    # Downgraded by the end user's own cap, not the tenant's: a call no other end user's
    # identical request may share (it would be served this user's narrowing).
    users_own: bool = False


class RequestSpend:
    """What one request's own upstream calls cost, served or not. A request that fails after
    paying (an answer refused by validation, an escalation whose strong call failed, a stream
    cut short) has no completion event: its error event reports this instead."""

    __slots__ = ("completion_tokens", "cost_usd", "prompt_tokens", "shared")

    def __init__(self) -> None:
        self.cost_usd = 0.0
        self.prompt_tokens = self.completion_tokens = 0
        # Given an identical request's call (SingleFlight), its answer or its error: that
        # call's checks and escalation are the request that made it's, counted there once.
        self.shared = False

    def add(self, record: SpendRecord) -> None:
        self.cost_usd += record.cost_usd
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cost_usd)


# The request's own, per asyncio task (as logs.REQUEST_ID): the settles happen deep in the
# generation path, and the error they precede cannot carry the amount, because SingleFlight
# raises one error object to every caller sharing the call while only its maker paid.
REQUEST_SPEND: ContextVar[RequestSpend | None] = ContextVar(
    "routecache_request_spend", default=None
)


class CostControl:
    def __init__(
        self,
        quotas: QuotaLimiter,
        ledger: SpendLedger,
        alerts: BudgetAlerts,
        generator: Generator,
        max_output_tokens: int,
        clock: Callable[[], float],
        telemetry: Telemetry,
    ) -> None:
        self.quotas = quotas
        self.ledger = ledger
        self.alerts = alerts
        self._generator = generator
        self._max_output_tokens = max_output_tokens
        self._clock = clock
        self._telemetry = telemetry
        # Spend writes run to their end: the call was paid for, so a caller gone meanwhile
        # ends its wait, not the write (the spend still counts, the reservation goes).
        self._writes = Outliving(log, "the spend write")
        # Each tenant's budget as of its latest spend: spend settled while Redis was down is
        # judged against these soft budgets when the flush adds it there (spend_flushed).
        self._budgets: dict[str, Budget] = {}
        self._spent_listeners: list[Callable[[str, SpendRecord, int], None]] = []

    def on_spent(self, listener: Callable[[str, SpendRecord, int], None]) -> None:
        """`listener(tenant, record, strong_calls)` after each spend record is written: GetStats
        counts calls and cost from the records the ledger has, so it agrees with it."""
        self._spent_listeners.append(listener)

    async def admit(self, tenant: Tenant, request: ChatRequest) -> None:
        """Take the request and its prompt's tokens from the tenant's and the user's buckets."""
        charges = admission_charges(tenant, request.end_user_id, request_prompt_tokens(request))
        verdict = await self.quotas.take(tenant.name, charges)
        if not verdict.allowed:
            self._telemetry.cost_control(tenant.name, "rate_limited")
            what = _BUCKET_NAMES.get(verdict.bucket.split(":", 1)[0], verdict.bucket)
            raise ResourceExhausted(
                f"rate limit of tenant {tenant.name} reached ({what})", verdict.wait_seconds
            )

    async def book(
        self, tenant: Tenant, request: ChatRequest, tier: Tier, streaming: bool = False
    ) -> Booking:
        """Reserve the worst-case cost of the request's calls under the tenant's hard caps."""
        # A tenant whose models_allowed leaves out the strong model never reaches it.
        cheap_only = Tier.STRONG not in tenant.allowed_tiers
        user = user_slot(request.end_user_id)
        caps = caps_of(tenant.budget, user)
        if not caps:
            return Booking(tier, request, cheap_only=cheap_only)
        bounded = self._bounded(request)
        amount = self.worst_case_usd(
            tenant, bounded, tier, cheap_only=cheap_only, streaming=streaming
        )
        outcome = await self.ledger.reserve(tenant.name, user, amount, caps)
        if isinstance(outcome, Reservation):
            return Booking(tier, bounded, outcome, cheap_only)
        if tenant.budget.policy is OverCapPolicy.DOWNGRADE and Tier.CHEAP in tenant.allowed_tiers:
            cheap = self.worst_case_usd(
                tenant, bounded, Tier.CHEAP, cheap_only=True, streaming=streaming
            )
            downgraded = await self.ledger.reserve(tenant.name, user, cheap, caps)
            if isinstance(downgraded, Reservation):
                self._telemetry.cost_control(tenant.name, "downgraded")
                per_user = outcome.cap.per_user  # the first cap reached: a tenant's binds all
                return Booking(Tier.CHEAP, bounded, downgraded, cheap_only=True, users_own=per_user)
            outcome, amount = downgraded, cheap
        raise self._refusal(tenant, outcome, amount)

    def _refusal(self, tenant: Tenant, reached: CapReached, amount_usd: float) -> ResourceExhausted:
        self._telemetry.cost_control(tenant.name, "cap_refused")
        wait = seconds_to_period_end(self._clock(), reached.cap.period)
        # The worst case is refused, not the spend so far: say both, or a cap refusing a
        # request with little spent reads as a bug.
        return ResourceExhausted(
            f"{reached.cap.describe()} reached for tenant {tenant.name}: "
            f"{reached.committed_usd:.6g} USD spent or reserved, and this request may cost up "
            f"to {amount_usd:.6g} USD (its max_tokens at the dearest provider it may reach)",
            wait,
        )

    def _bounded(self, request: ChatRequest) -> ChatRequest:
        """A worst case needs a bound on the answer: the service's, when the caller set none."""
        if request.params.max_tokens is not None:
            return request
        params = replace(request.params, max_tokens=self._max_output_tokens)
        return replace(request, params=params)

    def worst_case_usd(
        self, tenant: Tenant, request: ChatRequest, tier: Tier, *, cheap_only: bool,
        streaming: bool = False,
    ) -> float:  # fmt: skip
        prompt = request_prompt_tokens(request)
        output = request.params.max_tokens or self._max_output_tokens
        calls = self._generator.worst_case_calls(
            request, tier, tenant=tenant.name, cheap_only=cheap_only, streaming=streaming,
            allowed=tenant.providers_allowed,
        )  # fmt: skip
        return sum(max(p.pricing.cost(prompt, output) for p in call) for call in calls)

    async def settle(
        self, tenant: Tenant, request: ChatRequest, booking: Booking | None, generated: Generated
    ) -> None:
        """Record what the answer cost. `booking` None: the caller shared another's call; it
        booked nothing, paid nothing and saved the call's cost."""
        user = user_slot(request.end_user_id)
        if booking is None:
            record = SpendRecord(tenant.name, user, saved_usd=generated.cost_usd)
            await self._settle(tenant, request, None, record, generated.tier, 0)
            return
        record = SpendRecord(
            tenant.name, user, generated.cost_usd, generated.prompt_tokens,
            generated.completion_tokens, calls=generated.calls,
            routing_saved_usd=self._routing_saving(generated, booking),
        )  # fmt: skip
        await self._settle(
            tenant, request, booking.reservation, record, generated.tier, generated.strong_calls
        )

    async def settle_refused(
        self, tenant: Tenant, request: ChatRequest, booking: Booking, error: FailedValidation
    ) -> None:
        """Answers that failed validation were paid for all the same."""
        await self._settle_unserved(tenant, request, booking, error.cost_usd, error)

    async def settle_spent(
        self, tenant: Tenant, request: ChatRequest, booking: Booking, tally: Tally
    ) -> None:
        """Generation failed some other way after `tally`'s calls: those were paid for (an
        escalation's first call, an answer a plugin broke on); no call answered, none paid."""
        if not tally.calls:
            await self.release(booking)
            return
        await self._settle_unserved(tenant, request, booking, tally.cost, tally)

    async def _settle_unserved(
        self, tenant: Tenant, request: ChatRequest, booking: Booking, cost_usd: float,
        paid: FailedValidation | Tally,
    ) -> None:  # fmt: skip
        """Calls paid for with no answer served, under the tier of the last one."""
        record = SpendRecord(
            tenant.name, user_slot(request.end_user_id), cost_usd, paid.prompt_tokens,
            paid.completion_tokens, calls=paid.calls,
        )  # fmt: skip
        await self._settle(
            tenant, request, booking.reservation, record, _last_tier(paid), paid.strong_calls
        )

    async def settle_partial(
        self, tenant: Tenant, request: ChatRequest, booking: Booking, sent: str
    ) -> None:
        """A stream cut short: what it sent, at the dearest price of the providers it may have
        reached (the pipeline does not know which one it was); nothing sent, nothing paid."""
        if not sent:
            await self.release(booking)
            return
        prompt, completion = request_prompt_tokens(request), estimate_tokens(sent)
        chain = self._generator.failover.chain(
            booking.tier, not booking.cheap_only, tenant.providers_allowed
        )
        cost = max(p.pricing.cost(prompt, completion) for _, p in chain)
        record = SpendRecord(tenant.name, user_slot(request.end_user_id), cost, prompt,
                             completion, calls=1)  # fmt: skip
        # Counted under the tier it was routed to, as the cost metric meters it.
        strong = int(booking.tier is Tier.STRONG)
        await self._settle(tenant, request, booking.reservation, record, booking.tier, strong)

    async def _settle(
        self, tenant: Tenant, request: ChatRequest, reservation: Reservation | None,
        record: SpendRecord, tier: Tier, strong_calls: int,
    ) -> None:  # fmt: skip
        """`strong_calls`: of the record's calls, those a strong-tier provider answered."""
        spend = REQUEST_SPEND.get()
        if spend is not None:  # now, not in the write: a caller cancelled meanwhile reports it
            spend.add(record)
        write = self._write(tenant, request, reservation, record, tier, strong_calls)
        await self._writes.run(write)

    async def _write(
        self, tenant: Tenant, request: ChatRequest, reservation: Reservation | None,
        record: SpendRecord, tier: Tier, strong_calls: int,
    ) -> None:  # fmt: skip
        """Every spend record goes through here, so the cost metric and GetStats count what
        the ledger does: refused answers and cut-short streams too, not only answers served."""
        self._budgets[tenant.name] = tenant.budget
        moved = await self.ledger.settle(reservation, record)
        if record.cost_usd or record.prompt_tokens or record.completion_tokens:
            self._telemetry.spent(tenant.name, tier.value, record)
        for listener in self._spent_listeners:
            listener(tenant.name, record, strong_calls)
        self.alerts.check(tenant.name, tenant.budget, moved)
        tokens = record.completion_tokens
        if tokens:
            charges = completion_charges(tenant, request.end_user_id, tokens)
            await self.quotas.debit(tenant.name, charges)

    def spend_flushed(self, tenant: str, moved: Movement) -> None:
        """Spend settled while Redis was down reached it (RedisSpendLedger.on_flushed)."""
        budget = self._budgets.get(tenant)
        if budget is not None:
            self.alerts.check(tenant, budget, moved)

    async def release(self, booking: Booking) -> None:
        """Gives back a reservation no call used. Outliving the caller, as a spend write
        does: a caller gone meanwhile would leave it holding the cap until its TTL, and
        finish_writes must see it before the ledger closes."""
        if booking.reservation is not None:
            await self._writes.run(self.ledger.release(booking.reservation))

    async def record_saving(self, tenant: Tenant, request: ChatRequest, saved_usd: float) -> None:
        """A cache hit: what the cached answer cost once and did not cost again."""
        user = user_slot(request.end_user_id)
        record = SpendRecord(tenant.name, user, saved_usd=saved_usd)
        await self._writes.run(self.ledger.settle(None, record))

    def _routing_saving(self, generated: Generated, booking: Booking) -> float:
        """What a cheap answer saved against the strong model. Booked cheap-only (a tenant
        kept off the strong tier), no routing decision saved anything."""
        if generated.tier is not Tier.CHEAP or booking.cheap_only:
            return 0.0
        _, strong = self._generator.failover.chain(Tier.STRONG)[0]
        full = strong.pricing.cost(generated.prompt_tokens, generated.completion_tokens)
        return max(0.0, full - generated.cost_usd)

    async def finish_writes(self) -> None:
        """Waits for the spend writes of callers gone: before the ledger closes (its last
        flush must see them)."""
        await self._writes.wait()

    async def aclose(self) -> None:
        """The writes, then the alerts. The service closes the two apart, around its storage:
        a Redis ledger's last flush may cross a soft budget (spend_flushed)."""
        await self.finish_writes()
        await self.alerts.aclose()


def _last_tier(calls: FailedValidation | Tally) -> Tier:
    """The tier spend with no answer served is metered under: that of its last call, as an
    escalated answer's whole cost and tokens are."""
    return Tier.STRONG if calls.strong_calls else Tier.CHEAP

"""The providers of a tier, tried in order under the caller's deadline, each behind a breaker.

A CHEAP request whose providers all fail goes on to the STRONG tier's providers (a fallback
model costs more but answers); only when every provider failed, was shed by its open breaker,
or the deadline ran out does the caller get Unavailable, naming what failed where.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from dataclasses import dataclass

from routecache.domain import ChatRequest, Tier
from routecache.errors import Unavailable, UpstreamError
from routecache.router.ports import ChatUpstream, Pricing, UpstreamReply
from routecache.router.upstream.breaker import BreakerTicket, CircuitBreaker
from routecache.router.upstream.deadline import provider_deadline

# Time kept back from the deadline for what follows a failed chain (stale lookup, reply).
DEFAULT_RESERVE_SECONDS = 0.1


@dataclass(frozen=True)
class Provider:
    name: str
    upstream: ChatUpstream
    pricing: Pricing
    breaker: CircuitBreaker

    @property
    def model(self) -> str:
        return self.upstream.model


@dataclass(frozen=True)
class Answered:
    reply: UpstreamReply
    provider: Provider
    tier: Tier
    failures: tuple[str, ...]  # what failed before this provider answered


@dataclass
class OpenedStream:
    provider: Provider
    tier: Tier
    first: str | None
    rest: AsyncIterator[str]
    failures: tuple[str, ...]
    ticket: BreakerTicket  # the provider's breaker let it through: for the stream's outcome


class AllProvidersFailed(Unavailable):
    def __init__(
        self, tier: Tier, failures: Sequence[str], out_of_time: float | None = None
    ) -> None:
        super().__init__(f"no provider answered the {tier.value} tier: " + "; ".join(failures))
        self.failures = tuple(failures)
        # The deadline that left no time for another provider; None when every provider
        # failed with time to spare. A caller with a later deadline may still get an answer.
        self.out_of_time = out_of_time


class Failover:
    def __init__(
        self,
        chains: Mapping[Tier, Sequence[Provider]],
        clock: Callable[[], float] = time.monotonic,
        reserve_seconds: float = DEFAULT_RESERVE_SECONDS,
    ) -> None:
        if missing := [t.value for t in Tier if not chains.get(t)]:
            raise ValueError(f"no provider for tier(s): {', '.join(missing)}")
        self._chains = chains
        self._clock = clock
        self._reserve = reserve_seconds

    def chain(
        self, tier: Tier, strong_fallback: bool = True, allowed: Collection[str] | None = None
    ) -> list[tuple[Tier, Provider]]:
        """`strong_fallback=False`: a CHEAP request stays on the cheap providers (a tenant
        downgraded at its spend cap, or kept off the strong tier). `allowed`: the names of the
        providers the tenant may use (its models_allowed; None: all); the others are left
        out, fallbacks included. A provider in several chains is listed once, at its first
        place: tried again, one request would charge its breaker twice."""
        order = [tier, Tier.STRONG] if tier is Tier.CHEAP and strong_fallback else [tier]
        listed: dict[str, tuple[Tier, Provider]] = {}
        for t in order:
            for p in self._chains[t]:
                if allowed is None or p.name in allowed:
                    listed.setdefault(p.name, (t, p))
        return list(listed.values())

    def providers(self) -> list[Provider]:
        unique = {p.name: p for chain in self._chains.values() for p in chain}
        return list(unique.values())

    async def complete(
        self,
        request: ChatRequest,
        tier: Tier,
        deadline: float,
        strong_fallback: bool = True,
        allowed: Collection[str] | None = None,
    ) -> Answered:
        failures: list[str] = []
        for provider_tier, provider in self.chain(tier, strong_fallback, allowed):
            admitted = self._budget(provider, deadline, failures)
            if admitted is None:
                continue
            budget, ticket = admitted
            try:
                # The client reads it (Retry-After) and notes the tries that failed in it.
                async with provider_deadline(budget) as call:
                    reply = await provider.upstream.complete(request.messages, request.params)
            except BaseException as exc:
                failures.append(_failed(provider, ticket, exc, budget, call.failed_tries))
                continue
            provider.breaker.record_success(ticket)
            return Answered(reply, provider, provider_tier, tuple(failures))
        raise AllProvidersFailed(tier, failures, self._ran_out(deadline))

    async def open_stream(
        self,
        request: ChatRequest,
        tier: Tier,
        deadline: float,
        strong_fallback: bool = True,
        allowed: Collection[str] | None = None,
    ) -> OpenedStream:
        """The first provider whose stream opens and yields its first delta (or ends cleanly)."""
        failures: list[str] = []
        for provider_tier, provider in self.chain(tier, strong_fallback, allowed):
            admitted = self._budget(provider, deadline, failures)
            if admitted is None:
                continue
            budget, ticket = admitted
            deltas = provider.upstream.stream(request.messages, request.params)
            try:
                async with provider_deadline(budget) as call:
                    first = await anext(deltas, None)
            except BaseException as exc:
                await _close(deltas)
                failures.append(_failed(provider, ticket, exc, budget, call.failed_tries))
                continue
            return OpenedStream(provider, provider_tier, first, deltas, tuple(failures), ticket)
        raise AllProvidersFailed(tier, failures, self._ran_out(deadline))

    async def deltas(self, opened: OpenedStream, deadline: float) -> AsyncGenerator[str, None]:
        """The opened stream's deltas; a break ends it with Unavailable (sent text stands)."""
        provider, ticket, sent, settled = opened.provider, opened.ticket, 0, False
        try:
            if opened.first is not None:
                sent += len(opened.first)
                yield opened.first
            while True:
                budget = deadline - self._clock()
                try:
                    async with asyncio.timeout(max(budget, 0.0)):
                        delta = await anext(opened.rest, None)
                except BaseException as exc:
                    settled = True
                    what = _failed(provider, ticket, exc, budget)
                    raise Unavailable(f"the stream broke after {sent} characters: {what}") from exc
                if delta is None:
                    break
                sent += len(delta)
                yield delta
            settled = True
            provider.breaker.record_success(ticket)
        finally:
            if not settled:  # the caller stopped reading: no verdict on the provider
                provider.breaker.release(ticket)
            await _close(opened.rest)

    def seconds_for_calls(self, deadline: float) -> float:
        """The time left before `deadline` for provider calls: the reserve is kept back for
        what follows a failed chain (stale lookup, reply). Negative when none is left."""
        return deadline - self._clock() - self._reserve

    def _ran_out(self, deadline: float) -> float | None:
        """The deadline when it leaves no time for another attempt, else None."""
        return deadline if self.seconds_for_calls(deadline) <= 0 else None

    def _budget(
        self, provider: Provider, deadline: float, failures: list[str]
    ) -> tuple[float, BreakerTicket] | None:
        """Seconds this provider may take and its breaker's ticket, or None (the reason
        appended to failures)."""
        budget = self.seconds_for_calls(deadline)
        if budget <= 0:
            failures.append(f"{provider.name}: not tried, the deadline was reached")
            return None
        ticket = provider.breaker.allow()
        if ticket is None:
            wait = provider.breaker.seconds_until_probe()
            failures.append(f"{provider.name}: circuit open, shed (next probe in {wait:.1f}s)")
            return None
        return budget, ticket


def _failed(
    provider: Provider,
    ticket: BreakerTicket,
    exc: BaseException,
    budget: float,
    failed_tries: int = 0,
) -> str:
    """Records the failure of the call `ticket` let through on the provider's breaker and says
    what happened; `failed_tries`: the tries of this call the client saw fail before it ended."""
    if isinstance(exc, TimeoutError):
        what = f"{provider.name} ({provider.model}): no answer within {budget:.2f}s (deadline)"
        # The request's deadline (a client's own attempt timeout is an UpstreamError): the
        # caller's to set, no verdict on the provider. Counted, one client with short
        # deadlines would open a healthy provider's breaker for every tenant. A try that
        # failed before it is the provider's failure, though.
        if not failed_tries:
            provider.breaker.release(ticket)
            return what
        provider.breaker.record_failure(ticket)
        return f"{what}, after {failed_tries} failed {'try' if failed_tries == 1 else 'tries'}"
    if isinstance(exc, UpstreamError):
        # A request the provider refuses (a 4xx other than 408/409/429) says nothing about the
        # provider's health.
        if exc.retryable:
            provider.breaker.record_failure(ticket)
        else:
            provider.breaker.release(ticket)
        return f"{provider.name} ({provider.model}): {exc}"
    provider.breaker.release(ticket)
    raise exc


async def _close(stream: AsyncIterator[str]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

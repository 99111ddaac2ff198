"""The telemetry port: what the pipeline reports about each request, and gauges read on scrape.

The Prometheus implementation is in router/metrics.py; bootstrap chooses it, or NullTelemetry
when metrics are off. Tests use the recording fake in tests/fakes.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from routecache.domain import CacheOutcome, ChatRequest, Completion, Tier, ValidationReport
from routecache.router.budget import SpendRecord


class RequestPath(StrEnum):
    """Where an answer came from; the latency histograms and request counters use it."""

    EXACT_HIT = "exact_hit"
    SEMANTIC_HIT = "semantic_hit"
    CHEAP = "cheap"
    STRONG = "strong"
    ERROR = "error"


def path_of(completion: Completion) -> RequestPath:
    if completion.cache.outcome is CacheOutcome.EXACT:
        return RequestPath.EXACT_HIT
    if completion.cache.outcome is CacheOutcome.SEMANTIC:
        return RequestPath.SEMANTIC_HIT
    return RequestPath.STRONG if completion.tier is Tier.STRONG else RequestPath.CHEAP


def failed_validator_labels(report: ValidationReport, request: ChatRequest) -> tuple[str, ...]:
    """The metric labels of the checks that failed. The caller names a request's own
    validators, so those are labelled by kind ("request:regex"): a label per name would let
    callers create time series without bound."""
    kinds = {requested.name or requested.kind: requested.kind for requested in request.validators}
    return tuple(
        f"request:{kinds[r.name]}" if r.name in kinds else r.name
        for r in report.results
        if not r.passed
    )


# Breaker states as gauge values, so a panel can show them as a step line.
BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN = 0.0, 1.0, 2.0


# Totals the degraded paths keep, by name: what each counts. Only these are watched, so the
# metric names stay a fixed list.
WATCHED_COUNTS = {
    "redis_failures": "Redis calls (and start-up pings) that failed and marked Redis down",
    "redis_refusals": "Redis calls answered with an error (e.g. out of memory): each took its "
    "degraded path while Redis stayed up",
    "rate_limit_fallbacks": "Rate-limit takes and debits served by this replica's own buckets "
    "because Redis was down or refused",
    "cache_bypassed": "Cache lookups and stores skipped because the entry store was unavailable",
    "events_dropped": "Events dropped from the full buffer while the event stream was unwritable, "
    "those of a batch that failed on something other than Redis, and those the JSONL event log "
    "could not write (a full disk)",
    "budget_webhook_failures": "Budget alerts the webhook did not take (an error status, a "
    "timeout, no answer); each is in the event log",
}


class Telemetry(Protocol):
    def request_started(self) -> None: ...

    def request_ended(self) -> None:
        """Called once for every request_started, however the request ended."""
        ...

    def request_completed(self, tenant: str, completion: Completion, seconds: float,
                          failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        """An answer was served; its path, tokens, cost and savings count, and
        `failed_validators` (labels from failed_validator_labels) the checks it failed."""
        ...

    def escalated(self, tenant: str) -> None:
        """A cheap answer failed a validator and went to the strong model, whether or not the
        strong model then answered (counted by the request that made the calls)."""
        ...

    def request_failed(self, tenant: str, reason: str, seconds: float,
                       failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        """`reason`: the error's kind (snake case of the exception class)."""
        ...

    def admin_call_failed(self, tenant: str, reason: str) -> None:
        """A failed Feedback, Invalidate or GetStats call: an error, not a request (the
        request series are Complete's, and the hit-rate ratios divide by them)."""
        ...

    def upstream_call(self, model: str, seconds: float, error: str | None) -> None: ...

    def feedback(self, tenant: str, thumbs_up: bool, invalidated: bool) -> None: ...

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        """Report a queue's depth (read on every scrape)."""
        ...

    def watch_breaker(self, provider: str, state: Callable[[], float]) -> None:
        """Report a circuit breaker's state: BREAKER_CLOSED, BREAKER_HALF_OPEN or BREAKER_OPEN."""
        ...

    def watch_dependency(self, name: str, up: Callable[[], bool]) -> None:
        """Report whether a dependency (Redis, a model provider) is reachable."""
        ...

    def watch_count(self, name: str, count: Callable[[], float]) -> None:
        """Report a running total a part keeps itself (read on every scrape), e.g. the calls
        Redis refused. `name` is one of WATCHED_COUNTS."""
        ...

    def budget_alert(self, tenant: str, period: str) -> None:
        """A tenant's spend crossed its soft budget for the period ('day' or 'month')."""
        ...

    def cost_control(self, tenant: str, outcome: str) -> None:
        """A request was rate_limited, cap_refused or downgraded by the cost controls."""
        ...

    def spent(self, tenant: str, tier: str, record: SpendRecord) -> None:
        """Spend the ledger recorded, its cost and tokens: an answer's, a refused answer's, a
        cut stream's, the calls paid before a later one failed."""
        ...


class NullTelemetry:
    """Records nothing: metrics are off."""

    def request_started(self) -> None:
        pass

    def request_ended(self) -> None:
        pass

    def request_completed(self, tenant: str, completion: Completion, seconds: float,
                          failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        pass

    def escalated(self, tenant: str) -> None:
        pass

    def request_failed(self, tenant: str, reason: str, seconds: float,
                       failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        pass

    def admin_call_failed(self, tenant: str, reason: str) -> None:
        pass

    def upstream_call(self, model: str, seconds: float, error: str | None) -> None:
        pass

    def feedback(self, tenant: str, thumbs_up: bool, invalidated: bool) -> None:
        pass

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        pass

    def watch_breaker(self, provider: str, state: Callable[[], float]) -> None:
        pass

    def watch_dependency(self, name: str, up: Callable[[], bool]) -> None:
        pass

    def watch_count(self, name: str, count: Callable[[], float]) -> None:
        pass

    def budget_alert(self, tenant: str, period: str) -> None:
        pass

    def cost_control(self, tenant: str, outcome: str) -> None:
        pass

    def spent(self, tenant: str, tier: str, record: SpendRecord) -> None:
        pass


def error_reason(error: BaseException) -> str:
    """An error's label: FailedValidation → failed_validation."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()

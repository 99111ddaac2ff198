"""Per-tenant counters behind GetStats, and the response-id registry behind Feedback."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace

from routecache.domain import CacheOutcome, Completion
from routecache.errors import FailedValidation


@dataclass
class _Counters:
    requests: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    cheap_calls: int = 0
    strong_calls: int = 0
    escalations: int = 0
    validation_failures: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    thumbs_up: int = 0
    thumbs_down: int = 0


class TenantStatsBook:
    def __init__(self) -> None:
        self._by_tenant: dict[str, _Counters] = {}

    def _counters(self, tenant: str) -> _Counters:
        return self._by_tenant.setdefault(tenant, _Counters())

    def record_completion(
        self, tenant: str, completion: Completion, upstream_calls: int = 0, strong_calls: int = 0
    ) -> None:
        """`upstream_calls`: the calls this request made itself (none for a hit or a shared
        call), `strong_calls` of them answered by a strong-tier provider."""
        counters = self._counters(tenant)
        counters.requests += 1
        outcome = completion.cache.outcome
        if outcome is CacheOutcome.EXACT:
            counters.exact_hits += 1
        elif outcome is CacheOutcome.SEMANTIC:
            counters.semantic_hits += 1
        else:
            counters.misses += 1
        if upstream_calls:
            counters.escalations += int(completion.validation.escalated)
        # Every call counts (a retry too), by the tier of the provider that answered it.
        counters.cheap_calls += upstream_calls - strong_calls
        counters.strong_calls += strong_calls
        counters.cost_usd += completion.usage.cost_usd
        counters.saved_usd += completion.usage.saved_usd

    def record_failure(self, tenant: str, *, validation: bool) -> None:
        counters = self._counters(tenant)
        counters.requests += 1
        counters.validation_failures += int(validation)

    def record_refused_calls(self, tenant: str, refused: FailedValidation) -> None:
        """The calls of a request whose every answer failed validation: paid for (the spend
        ledger has them) though nothing was served. Its maker's only: sharers paid nothing."""
        counters = self._counters(tenant)
        counters.cheap_calls += refused.calls - refused.strong_calls
        counters.strong_calls += refused.strong_calls
        counters.cost_usd += refused.cost_usd

    def record_feedback(self, tenant: str, thumbs_up: bool, previous: bool | None = None) -> None:
        """Counts each response once, with its latest rating (as the notebook's analysis does,
        routecache/analysis/cache_hits.py): `previous` is the response's earlier rating, if it
        had one, which a changed mind takes back."""
        counters = self._counters(tenant)
        if previous is not None:
            counters.thumbs_up -= int(previous)
            counters.thumbs_down -= int(not previous)
        counters.thumbs_up += int(thumbs_up)
        counters.thumbs_down += int(not thumbs_up)

    def snapshot(self, tenant: str) -> _Counters:
        return replace(self._counters(tenant))


@dataclass(frozen=True)
class ServedResponse:
    tenant: str
    entry_id: str  # the cache entry that served or was written by this response; "" if none
    cache_outcome: CacheOutcome
    similarity: float = 0.0
    rating: bool | None = None  # the latest feedback: True thumbs-up, None not rated yet


class ResponseRegistry:
    """Remembers each tenant's newest responses so feedback can find the cache entry behind one.

    Bounded per tenant: with one shared bound a busy tenant would push another tenant's
    responses out, and so make that tenant's feedback fail.
    """

    def __init__(self, max_responses: int = 100_000) -> None:
        self._max = max_responses
        self._by_tenant: defaultdict[str, OrderedDict[str, ServedResponse]] = defaultdict(
            OrderedDict
        )

    def remember(self, response_id: str, served: ServedResponse) -> None:
        responses = self._by_tenant[served.tenant]
        responses[response_id] = served
        if len(responses) > self._max:
            responses.popitem(last=False)

    def find(self, tenant: str, response_id: str) -> ServedResponse | None:
        responses = self._by_tenant.get(tenant)
        return None if responses is None else responses.get(response_id)

    def rate(self, tenant: str, response_id: str, thumbs_up: bool) -> bool | None:
        """Notes the response's latest rating (kept with it, so within the same bound); returns
        the one before, None if none or if the response is no longer remembered."""
        responses = self._by_tenant.get(tenant)
        served = None if responses is None else responses.get(response_id)
        if responses is None or served is None:
            return None
        responses[response_id] = replace(served, rating=thumbs_up)  # keeps its age in the order
        return served.rating

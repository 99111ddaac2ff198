"""Per-tenant counters behind GetStats, and the response-id registry behind Feedback."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace

from routecache.domain import CacheOutcome, Completion
from routecache.router.budget import SpendRecord


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

    def record_completion(self, tenant: str, completion: Completion) -> None:
        """A request answered. Its calls and cost come from the spend records (record_spent),
        its escalations as they happen (record_escalation): a failed request paid too."""
        counters = self._counters(tenant)
        counters.requests += 1
        outcome = completion.cache.outcome
        if outcome is CacheOutcome.EXACT:
            counters.exact_hits += 1
        elif outcome is CacheOutcome.SEMANTIC:
            counters.semantic_hits += 1
        else:
            counters.misses += 1
        counters.saved_usd += completion.usage.saved_usd

    def record_failure(self, tenant: str, *, validation: bool) -> None:
        counters = self._counters(tenant)
        counters.requests += 1
        counters.validation_failures += int(validation)

    def record_spent(self, tenant: str, record: SpendRecord, strong_calls: int) -> None:
        """One spend record of the cost control, as the ledger has it: the calls a request
        made itself (every one, a retry too, `strong_calls` of them answered by a strong-tier
        provider) and their cost, whether its answer was served, refused by validation, cut
        short or followed by a failure. A request sharing another's call records none."""
        counters = self._counters(tenant)
        counters.cheap_calls += record.calls - strong_calls
        counters.strong_calls += strong_calls
        counters.cost_usd += record.cost_usd

    def record_escalation(self, tenant: str) -> None:
        """A cheap answer failed a validator and went to the strong model, whatever came next."""
        self._counters(tenant).escalations += 1

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

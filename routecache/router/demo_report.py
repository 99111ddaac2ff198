"""The demo's summary: hit rates, routing split, cost against all-strong, latency by path."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from routecache.router.messages import request_from_pb
from routecache.router.tokens import estimate_tokens, request_prompt_tokens
from routecache.v1 import routecache_pb2 as pb

_OUTCOME = {
    pb.CACHE_OUTCOME_EXACT: "exact hit",
    pb.CACHE_OUTCOME_SEMANTIC: "semantic hit",
    pb.CACHE_OUTCOME_MISS: "miss",
}


@dataclass(frozen=True)
class DemoResult:
    tenant: str
    kind: str
    code: str
    latency_ms: float
    response: pb.CompleteResponse | None
    prompt_tokens: int  # the request's prompt as the service estimates it: a hit reports 0
    asked: str = ""  # the request's last message
    original: str = ""  # a repeat's or a paraphrase's question, asked first by the same tenant


def prompt_tokens(request: pb.CompleteRequest) -> int:
    """The prompt tokens the strong model would have been sent, counted by the service's own
    estimate (what its cost controls and the replay upstream count)."""
    return request_prompt_tokens(request_from_pb(request))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _path(result: DemoResult) -> str:
    if result.response is None:
        return f"error {result.code}"
    outcome = _OUTCOME[result.response.cache.outcome]
    if outcome != "miss":
        return outcome
    return "miss → strong" if result.response.tier == pb.TIER_STRONG else "miss → cheap"


def _one_call(response: pb.CompleteResponse) -> bool:
    """Whether the reported usage is one upstream call's: an escalation or a retry adds up
    the tokens of every call the request made."""
    validation = response.validation
    return not validation.escalated and all(r.action != "retried" for r in validation.results)


def _shared(response: pb.CompleteResponse) -> bool:
    """Whether a miss was answered by an identical request's call in flight: it carries that
    call's report but paid nothing and saved its cost (the one that made the call paid, saved
    nothing). /metrics counts the call's escalation once, for its maker. (Models priced at 0
    would make the two look alike.)"""
    usage = response.usage
    miss = response.cache.outcome == pb.CACHE_OUTCOME_MISS
    return miss and usage.cost_usd == 0 and usage.saved_usd > 0


def _all_strong_cost(result: DemoResult, in_price: float, out_price: float) -> float:
    """What the request would have cost sent to the strong model: one call, with the tokens it
    reported, else (a hit reports 0; several calls report their sum) estimated from the prompt
    and the served answer."""
    response = result.response
    assert response is not None
    usage = response.usage
    if _one_call(response) and usage.prompt_tokens:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
    else:
        prompt, completion = result.prompt_tokens, estimate_tokens(response.text)
    return (prompt * in_price + completion * out_price) / 1e6


# The calls that ask a question first, so store their answer: the entry a repeat or a
# paraphrase of it must hit (globex's "other-tenant" calls are its first asks of acme's prompts).
_FIRST_ASKS = ("first-ask", "other-tenant")


def _is_hit(result: DemoResult) -> bool:
    return result.response is not None and result.response.cache.outcome != pb.CACHE_OUTCOME_MISS


def _entry_tenant(entry_id: str) -> str:
    """The tenant that owns an entry: ids are `<tenant>:<uuid hex>` (new_entry_id)."""
    return entry_id.rpartition(":")[0]


def cross_tenant(result: DemoResult) -> bool:
    """A hit that served another tenant's entry: a leak, whatever the call meant to show."""
    response = result.response
    if response is None or response.cache.outcome == pb.CACHE_OUTCOME_MISS:
        return False
    return _entry_tenant(response.cache.entry_id) != result.tenant


def own_entries(results: Sequence[DemoResult]) -> dict[tuple[str, str], str]:
    """(tenant, question) → the entry its first ask stored (a miss reports the stored entry)."""
    return {
        (r.tenant, r.asked): r.response.cache.entry_id
        for r in results
        if r.kind in _FIRST_ASKS and r.response is not None and not _is_hit(r)
        and r.response.cache.entry_id
    }  # fmt: skip


def wrong_hit(result: DemoResult, entries: dict[tuple[str, str], str]) -> bool:
    """Whether a hit served another question's answer (what the demo's feedback thumbs down):
    an exact hit or a hit at similarity ~1 (the same words; two identical first asks in flight
    together meet in the semantic tier) is right, as is a repeat's or a paraphrase's hit on the
    entry its original stored; a hit on another tenant's entry or any other semantic hit is not.
    """
    if not _is_hit(result) or result.response is None:
        return False
    if cross_tenant(result):
        return True
    cache = result.response.cache
    if cache.outcome == pb.CACHE_OUTCOME_EXACT or cache.similarity >= 0.9999:
        return False
    own = entries.get((result.tenant, result.original)) if result.original else None
    return own is None or cache.entry_id != own


@dataclass(frozen=True)
class DemoTally:
    """The summary's counts: what a scrape of /metrics after the run must agree with."""

    requests: int
    exact_hits: int
    semantic_hits: int
    cheap: int
    strong: int
    errors: int
    escalated: int
    cost_usd: float
    saved_usd: float
    prompt_tokens: int
    completion_tokens: int


def tally(results: Sequence[DemoResult]) -> DemoTally:
    answered = [r.response for r in results if r.response is not None]
    paths = Counter(_path(r) for r in results)
    return DemoTally(
        requests=len(results),
        exact_hits=paths["exact hit"],
        semantic_hits=paths["semantic hit"],
        cheap=paths["miss → cheap"],
        strong=paths["miss → strong"],
        errors=len(results) - len(answered),
        escalated=sum(1 for r in answered if r.validation.escalated and not _shared(r)),
        cost_usd=sum(r.usage.cost_usd for r in answered),
        saved_usd=sum(r.usage.saved_usd for r in answered),
        prompt_tokens=sum(r.usage.prompt_tokens for r in answered),
        completion_tokens=sum(r.usage.completion_tokens for r in answered),
    )


def summarise(results: Sequence[DemoResult], wall_s: float, strong_in: float,
              strong_out: float) -> str:  # fmt: skip
    answered = [r for r in results if r.response is not None]
    paths = Counter(_path(r) for r in results)
    n = len(results)
    counts = tally(results)
    cost, saved, escalated = counts.cost_usd, counts.saved_usd, counts.escalated
    baseline = sum(_all_strong_cost(r, strong_in, strong_out) for r in answered)
    cross_tenant_hits = sum(1 for r in answered if cross_tenant(r))
    entries = own_entries(answered)
    wrong_hits = sum(1 for r in answered if wrong_hit(r, entries))
    lines = [
        f"routecache demo: {n} requests over real gRPC in {wall_s:.1f} s ({n / wall_s:.0f} req/s)",
        f"  exact hit rate     {paths['exact hit'] / n:6.1%}   ({paths['exact hit']})",
        f"  semantic hit rate  {paths['semantic hit'] / n:6.1%}   ({paths['semantic hit']})",
        f"  misses → cheap     {paths['miss → cheap']:5d}",
        f"  misses → strong    {paths['miss → strong']:5d}   ({escalated} escalated by validators)",
        f"  errors             {n - len(answered):5d}",
        f"  cross-tenant hits  {cross_tenant_hits:5d}   (must be 0)",
        f"  wrong hits         {wrong_hits:5d}   (another question's answer: thumbs down)",
        f"  cost               {cost:.4f} USD vs {baseline:.4f} USD all-strong "
        f"({cost / baseline:.1%}); hits saved {saved:.4f} USD"
        if baseline
        else "  cost  n/a",
        "  latency (ms)        count     p50     p95     p99",
    ]
    for path in sorted(paths):
        values = [r.latency_ms for r in results if _path(r) == path]
        lines.append(
            f"    {path:16s} {len(values):6d} {percentile(values, 50):7.1f} "
            f"{percentile(values, 95):7.1f} {percentile(values, 99):7.1f}"
        )
    everything = [r.latency_ms for r in results]
    lines.append(
        f"    {'all':16s} {n:6d} {percentile(everything, 50):7.1f} "
        f"{percentile(everything, 95):7.1f} {percentile(everything, 99):7.1f}"
    )
    return "\n".join(lines)

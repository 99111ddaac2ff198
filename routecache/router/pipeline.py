"""The request flow: auth → input checks → limits → exact tier → embed → semantic tier →
single-flight → classifier → models and validators → store → event → answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from routecache.cache.embedding_worker import EmbeddingWorker
from routecache.cache.ports import Vector
from routecache.cache.scope import exact_key, scope_key
from routecache.cache.semantic_cache import CacheHit, NewEntry, SemanticCache
from routecache.classifier.ports import DifficultyClassifier
from routecache.domain import (
    CacheInfo,
    ChatRequest,
    Completion,
    Feedback,
    LatencyBreakdown,
    Tenant,
    TenantStats,
    Tier,
    Usage,
    ValidationReport,
)
from routecache.errors import FailedValidation, InvalidArgument, NotFound, ResourceExhausted
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.generation import Generated, Generator
from routecache.router.input_validation import validate_request
from routecache.router.ports import EventSink, RateLimiter, SpendLedger
from routecache.router.settings import LimitSettings
from routecache.router.single_flight import SingleFlight
from routecache.router.stats import ResponseRegistry, ServedResponse, TenantStatsBook

_STREAM_CHUNK_CHARS = 48


@dataclass(frozen=True)
class InvalidateTarget:
    entry_id: str = ""
    tag: str = ""
    all_entries: bool = False


@dataclass
class PipelineParts:
    authenticator: ApiKeyAuthenticator
    limits: LimitSettings
    rate_limiter: RateLimiter
    spend: SpendLedger
    cache: SemanticCache
    embeddings: EmbeddingWorker
    classifier: DifficultyClassifier
    generator: Generator
    events: EventSink
    clock: Callable[[], float]


class Pipeline:
    def __init__(self, parts: PipelineParts) -> None:
        self._p = parts
        self._stats = TenantStatsBook()
        self._responses = ResponseRegistry()
        self._single_flight: SingleFlight[Generated] = SingleFlight()

    @property
    def cache(self) -> SemanticCache:
        return self._p.cache

    async def complete(self, request: ChatRequest, api_key: str | None) -> Completion:
        started = time.perf_counter()
        tenant = self._p.authenticator.authenticate(api_key)
        validate_request(request, self._p.limits)
        await self._check_limits(tenant, request)
        latency = LatencyBreakdown()
        try:
            completion, calls = await self._answer(tenant, request, latency)
        except FailedValidation:
            self._stats.record_failure(tenant.name, validation=True)
            raise
        latency.total_ms = (time.perf_counter() - started) * 1000
        self._stats.record_completion(tenant.name, completion, calls)
        self._emit_completion(tenant, request, completion)
        return completion

    async def complete_stream(
        self, request: ChatRequest, api_key: str | None
    ) -> AsyncIterator[str | Completion]:
        """First version: the answer is produced and validated whole, then sent in chunks."""
        completion = await self.complete(request, api_key)
        text = completion.text
        for start in range(0, len(text), _STREAM_CHUNK_CHARS):
            yield text[start : start + _STREAM_CHUNK_CHARS]
        yield completion

    async def _answer(
        self, tenant: Tenant, request: ChatRequest, latency: LatencyBreakdown
    ) -> tuple[Completion, int]:
        scope = scope_key(tenant.name, request)
        read_cache = not request.cache.no_cache
        if read_cache:
            with _stage(latency, "exact_ms"):
                hit = await self._p.cache.lookup_exact(scope, request.prompt)
            if hit is not None:
                return self._from_cache(tenant, hit, latency), 0
        with _stage(latency, "embed_ms"):
            vector = await self._p.embeddings.embed(request.prompt)
        if read_cache:
            threshold = tenant.similarity_threshold
            with _stage(latency, "search_ms"):
                hit = await self._p.cache.lookup_semantic(scope, vector, threshold)
            if hit is not None:
                return self._from_cache(tenant, hit, latency), 0
        with _stage(latency, "classify_ms"):
            tier, difficulty = self._route(tenant, request, vector)
        flight_key = f"{exact_key(scope, request.prompt)}:{tier.value}"
        generated, shared = await self._single_flight.run(
            flight_key, lambda: self._p.generator.generate(request, tier)
        )
        latency.upstream_ms, latency.validate_ms = generated.upstream_ms, generated.validate_ms
        entry_id = ""
        if not shared:
            await self._p.spend.record(tenant.name, generated.cost_usd)
            if not request.cache.no_store and generated.report.passed:
                with _stage(latency, "store_ms"):
                    entry_id = await self._store(tenant, scope, request, vector, generated)
        return self._from_models(tenant, generated, shared, entry_id, difficulty, latency), (
            0 if shared else generated.calls
        )

    def _route(self, tenant: Tenant, request: ChatRequest, vector: Vector) -> tuple[Tier, float]:
        classifier = self._p.classifier
        difficulty = classifier.failure_probability(vector, request.prompt)
        if request.force_tier is not None:
            return request.force_tier, difficulty
        threshold = tenant.routing_threshold
        if threshold is None:
            threshold = classifier.default_threshold
        return (Tier.STRONG if difficulty >= threshold else Tier.CHEAP), difficulty

    async def _store(
        self, tenant: Tenant, scope: str, request: ChatRequest, vector: Vector, generated: Generated
    ) -> str:
        entry = await self._p.cache.store(
            NewEntry(
                tenant=tenant.name,
                scope=scope,
                prompt=request.prompt,
                answer=generated.text,
                model=generated.model,
                tier=generated.tier,
                embedding=vector,
                cost_usd=generated.cost_usd,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
                ttl_seconds=request.cache.ttl_seconds or tenant.default_ttl_seconds,
                tags=request.cache.tags,
            )
        )
        return "" if entry is None else entry.entry_id

    def _from_cache(self, tenant: Tenant, hit: CacheHit, latency: LatencyBreakdown) -> Completion:
        entry = hit.entry
        response_id = self._new_response_id(tenant, entry.entry_id, hit)
        return Completion(
            response_id=response_id,
            text=entry.answer,
            model=entry.model,
            tier=entry.tier,
            cache=CacheInfo(hit.outcome, hit.similarity, entry.entry_id, hit.age_seconds),
            usage=Usage(saved_usd=entry.cost_usd),
            validation=ValidationReport(),
            latency=latency,
            classifier_version=self._p.classifier.version,
        )

    def _from_models(
        self,
        tenant: Tenant,
        generated: Generated,
        shared: bool,
        entry_id: str,
        difficulty: float,
        latency: LatencyBreakdown,
    ) -> Completion:
        # A caller that shared another's in-flight call paid nothing and saved its cost.
        cost, saved = (0.0, generated.cost_usd) if shared else (generated.cost_usd, 0.0)
        return Completion(
            response_id=self._new_response_id(tenant, entry_id, None),
            text=generated.text,
            model=generated.model,
            tier=generated.tier,
            cache=CacheInfo(entry_id=entry_id),
            usage=Usage(generated.prompt_tokens, generated.completion_tokens, cost, saved),
            validation=generated.report,
            latency=latency,
            classifier_version=self._p.classifier.version,
            difficulty=difficulty,
        )

    def _new_response_id(self, tenant: Tenant, entry_id: str, hit: CacheHit | None) -> str:
        response_id = uuid.uuid4().hex
        outcome = CacheInfo().outcome if hit is None else hit.outcome
        self._responses.remember(response_id, ServedResponse(tenant.name, entry_id, outcome))
        return response_id

    async def _check_limits(self, tenant: Tenant, request: ChatRequest) -> None:
        wait = await self._p.rate_limiter.acquire(
            f"tenant:{tenant.name}", tenant.requests_per_second
        )
        if wait > 0:
            raise ResourceExhausted(f"rate limit of tenant {tenant.name} reached", wait)
        budget = tenant.daily_budget_usd
        if budget is not None and await self._p.spend.spent_today(tenant.name) >= budget:
            raise ResourceExhausted(
                f"daily spend cap of {budget:.2f} USD reached for tenant {tenant.name}",
                self._seconds_to_next_day(),
            )

    def _seconds_to_next_day(self) -> float:
        now = self._p.clock()
        return 86400.0 - now % 86400.0

    def _emit_completion(self, tenant: Tenant, request: ChatRequest, done: Completion) -> None:
        self._p.events.emit(
            "completion",
            {
                "tenant": tenant.name,
                "end_user_id": request.end_user_id,
                "response_id": done.response_id,
                "prompt": request.prompt,
                "cache_outcome": done.cache.outcome.value,
                "similarity": done.cache.similarity,
                "entry_id": done.cache.entry_id,
                "model": done.model,
                "tier": done.tier.value,
                "difficulty": done.difficulty,
                "classifier_version": done.classifier_version,
                "cost_usd": done.usage.cost_usd,
                "saved_usd": done.usage.saved_usd,
                "validation_passed": done.validation.passed,
                "escalated": done.validation.escalated,
                "latency_ms": done.latency.total_ms,
            },
        )

    async def feedback(self, feedback: Feedback, api_key: str | None) -> str:
        """Records feedback; a thumbs-down on a cached answer removes the entry (returned)."""
        tenant = self._p.authenticator.authenticate(api_key)
        if not feedback.response_id:
            raise InvalidArgument("response_id", "required")
        served = self._responses.find(tenant.name, feedback.response_id)
        if served is None:
            raise NotFound(f"no recent response with id {feedback.response_id}")
        removed = ""
        thumbs_down_on_entry = not feedback.thumbs_up and served.entry_id
        if thumbs_down_on_entry and await self._p.cache.invalidate_ids(
            tenant.name, [served.entry_id]
        ):
            removed = served.entry_id
        self._p.events.emit(
            "feedback",
            {
                "tenant": tenant.name,
                "response_id": feedback.response_id,
                "thumbs_up": feedback.thumbs_up,
                "correction": feedback.correction,
                "comment": feedback.comment,
                "entry_id": served.entry_id,
                "cache_outcome": served.cache_outcome.value,
                "invalidated": bool(removed),
            },
        )
        return removed

    async def invalidate(self, target: InvalidateTarget, api_key: str | None) -> int:
        tenant = self._p.authenticator.authenticate(api_key)
        cache = self._p.cache
        if target.entry_id:
            removed = await cache.invalidate_ids(tenant.name, [target.entry_id])
        elif target.tag:
            removed = await cache.invalidate_tag(tenant.name, target.tag)
        elif target.all_entries:
            removed = await cache.invalidate_tenant(tenant.name)
        else:
            raise InvalidArgument("target", "set one of entry_id, tag or all")
        self._p.events.emit(
            "invalidate",
            {"tenant": tenant.name, "entry_id": target.entry_id, "tag": target.tag,
             "all": target.all_entries, "removed": removed},
        )  # fmt: skip
        return removed

    async def stats(self, api_key: str | None) -> TenantStats:
        tenant = self._p.authenticator.authenticate(api_key)
        counters = self._stats.snapshot(tenant.name)
        return TenantStats(
            tenant=tenant.name,
            entries=await self._p.cache.entry_count(tenant.name),
            classifier_version=self._p.classifier.version,
            **vars(counters),
        )


class _stage:
    """Adds the time spent in a block to one field of the latency breakdown."""

    def __init__(self, latency: LatencyBreakdown, field: str) -> None:
        self._latency = latency
        self._field = field

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self._started) * 1000
        setattr(self._latency, self._field, getattr(self._latency, self._field) + elapsed)

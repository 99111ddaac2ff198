"""The request flow: auth → input checks → limits → exact tier → embed → semantic tier →
single-flight → classifier → models and validators → store → event → answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from routecache.cache.embedding_worker import EmbeddingWorker
from routecache.cache.hit_policy import HitRequirement
from routecache.cache.ports import Vector
from routecache.cache.scope import CacheKeys
from routecache.cache.semantic_cache import CacheHit, NewEntry, SemanticCache
from routecache.classifier.ports import Assessment, DifficultyClassifier
from routecache.domain import (
    CacheInfo,
    ChatRequest,
    Completion,
    LatencyBreakdown,
    Tenant,
    Tier,
    Usage,
    ValidationReport,
)
from routecache.errors import (
    FailedValidation,
    InvalidArgument,
    ResourceExhausted,
    RouteCacheError,
    Unavailable,
)
from routecache.router.alerts import BudgetAlerts
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.costs import REQUEST_SPEND, Booking, CostControl, RequestSpend
from routecache.router.generation import Generated, Generator, Tally
from routecache.router.in_flight import InFlight
from routecache.router.input_validation import SchemaVerdicts, validate_request
from routecache.router.logs import REQUEST_ID
from routecache.router.ports import EventSink, SpendLedger
from routecache.router.quotas import InMemoryQuotaLimiter, user_slot
from routecache.router.settings import LimitSettings
from routecache.router.single_flight import SingleFlight, WaitedTooLong
from routecache.router.stats import ResponseRegistry, ServedResponse, TenantStatsBook
from routecache.router.telemetry import (
    NullTelemetry,
    Telemetry,
    error_reason,
    failed_validator_labels,
    path_of,
)
from routecache.router.tenant_admin import TenantAdmin
from routecache.router.upstream.failover import AllProvidersFailed

log = logging.getLogger(__name__)

# A call's answer, its booking and the cache entry it stored; and whether the caller got it
# from another end user's call.
_Made = tuple[Generated, Booking, str]
_Shared = tuple[_Made, bool]

_STREAM_CHUNK_CHARS = 48
_SERVER_SIDE = frozenset({"unavailable", "failed_validation", "internal"})


@dataclass
class PipelineParts:
    authenticator: ApiKeyAuthenticator
    limits: LimitSettings
    spend: SpendLedger
    cache: SemanticCache
    embeddings: EmbeddingWorker
    classifier: DifficultyClassifier
    generator: Generator
    events: EventSink
    clock: Callable[[], float]
    telemetry: Telemetry = field(default_factory=NullTelemetry)
    costs: CostControl | None = None  # default: in-process buckets on `spend`, no webhook


class Pipeline:
    def __init__(self, parts: PipelineParts) -> None:
        self._p = parts
        self._costs = parts.costs or CostControl(
            InMemoryQuotaLimiter(parts.clock), parts.spend,
            BudgetAlerts(parts.events, parts.telemetry), parts.generator,
            parts.limits.max_output_tokens, parts.clock, parts.telemetry,
        )  # fmt: skip
        self._stats = TenantStatsBook()
        # GetStats' calls and cost: from the spend records, as the ledger has them.
        self._costs.on_spent(self._stats.record_spent)
        self._responses = ResponseRegistry()
        # Identical requests in flight share one call: first those of one end user (every
        # request passes here), then their leaders across end users (_call_once).
        self._single_flight: SingleFlight[_Shared] = SingleFlight()
        self._across_users: SingleFlight[_Made] = SingleFlight()
        # Feedback, invalidation and stats: what a tenant does with the answers it was given.
        self.admin = TenantAdmin(parts, self._stats, self._responses, self._record_failure)
        self._unscored_logged = False  # a classifier's non-finite score is logged once
        self._schema_verdicts = SchemaVerdicts()  # admission's cached JSON Schema checks
        # Complete and CompleteStream calls running: a shutdown waits for their cleanup.
        self.in_flight = InFlight()

    @property
    def cache(self) -> SemanticCache:
        return self._p.cache

    @property
    def costs(self) -> CostControl:
        return self._costs

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """A Complete or CompleteStream call: in the in-flight gauge, and in what a shutdown
        waits for, until it ends."""
        self._p.telemetry.request_started()
        self.in_flight.enter()
        try:
            yield
        finally:
            self._p.telemetry.request_ended()
            self.in_flight.leave()

    async def complete(
        self, request: ChatRequest, api_key: str | None, seconds_left: float | None = None
    ) -> Completion:
        """`seconds_left`: the caller's deadline (None: upstream.request_timeout_seconds)."""
        started = time.perf_counter()
        deadline = self._p.generator.deadline(seconds_left)  # from now, not after the cache
        telemetry = self._p.telemetry
        tenant_name, spend = "", RequestSpend()
        REQUEST_SPEND.set(spend)
        with self._counted():
            try:
                tenant = await self._p.authenticator.resolve(api_key)
                tenant_name = tenant.name
                completion = await self._complete(tenant, request, started, deadline)
            # CancelledError is no Exception: a caller gone or a deadline passed is recorded too
            # (as "cancelled"), or the latency histogram would leave out the slowest requests.
            except (Exception, asyncio.CancelledError) as error:  # a bug: INTERNAL, recorded too
                self._record_failure(tenant_name, request, error, started, spend=spend)
                raise
        # A failed check of a shared call is counted once, by the request that made the call.
        failed = (
            () if completion.shared else failed_validator_labels(completion.validation, request)
        )
        telemetry.request_completed(
            tenant.name, completion, completion.latency.total_ms / 1000, failed
        )
        return completion

    async def _complete(
        self, tenant: Tenant, request: ChatRequest, started: float, deadline: float
    ) -> Completion:
        await self._admit(tenant, request)
        latency = LatencyBreakdown()
        try:
            completion = await self._answer(tenant, request, latency, deadline)
        except ResourceExhausted:  # a spend cap refused it: not admitted (operations.md)
            raise
        # An INTERNAL one too, and a cancelled one: it was admitted, and the calls it made are
        # in GetStats (from the spend records), so the request must be as well.
        except (Exception, asyncio.CancelledError) as error:
            self._fail(tenant, error)
            raise
        latency.total_ms = (time.perf_counter() - started) * 1000
        self._stats.record_completion(tenant.name, completion)
        self._emit_completion(tenant, request, completion)
        return completion

    def _record_failure(
        self, tenant: str, request: ChatRequest, error: BaseException, started: float,
        admin: bool = False, spend: RequestSpend | None = None,
    ) -> None:  # fmt: skip
        """`admin`: a Feedback, Invalidate or GetStats call's, an error but no request.
        `spend`: what the request's own calls cost before it failed (refused answers, an
        escalation's first call, a stream cut short), so the event log's spend adds up."""
        seconds = time.perf_counter() - started
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            reason = "cancelled"  # the caller left or its deadline passed: routine
        elif isinstance(error, RouteCacheError):
            reason = error_reason(error)
        else:
            reason = "internal"
        report = _checks_of(error)
        failed = () if report is None else tuple(r.name for r in report.results if not r.passed)
        shared = spend is not None and spend.shared  # the maker counts its call's checks
        labels = () if report is None or shared else failed_validator_labels(report, request)
        if admin:
            self._p.telemetry.admin_call_failed(tenant, reason)
        else:
            self._p.telemetry.request_failed(tenant, reason, seconds, labels)
        # The service's own trouble is a warning; a caller's mistake or limit is routine.
        level = logging.WARNING if reason in _SERVER_SIDE else logging.INFO
        log.log(level, "request failed: %s: %s", reason, error, extra={"tenant": tenant})
        # `admin`: a failed Feedback, Invalidate or GetStats call is an error but no request,
        # so an analysis can leave it out of the hit rates, as routecache_requests_total does.
        # The event is written before (or despite) the size checks: an unknown caller's text is
        # never kept, a tenant's at most what a valid request may hold, so no caller can fill
        # the event log (a Redis stream) with up to 1 MiB a request. The sizes stay, to debug.
        prompt = request.prompt if request.messages else ""
        kept = self._p.limits.max_message_chars if tenant else 0
        user = request.end_user_id[: self._p.limits.max_end_user_id_chars] if tenant else ""
        self._p.events.emit(
            "error",
            {"request_id": REQUEST_ID.get(), "tenant": tenant, "reason": reason,
             "end_user_id": user, "prompt": prompt[:kept], "prompt_chars": len(prompt),
             "prompt_cut": len(prompt) > kept, "path": "error", "admin": admin,
             "error": type(error).__name__, "message": str(error),
             "latency_ms": seconds * 1000, "failed_validators": list(failed),
             "cost_usd": 0.0 if spend is None else spend.cost_usd,
             "shared": shared,  # its checks are the shared call's, counted where it was made
             "validation": None if report is None else _report_payload(report)},
        )  # fmt: skip

    async def complete_stream(
        self, request: ChatRequest, api_key: str | None, seconds_left: float | None = None
    ) -> AsyncGenerator[str | Completion, None]:
        """Text deltas as the model sends them, then the Completion; a cached (or stale) answer
        is sent in chunks. Whole-text validators run at the end (see Generator.stream)."""
        started = time.perf_counter()
        deadline = self._p.generator.deadline(seconds_left)
        telemetry = self._p.telemetry
        tenant_name, finished, spend = "", False, RequestSpend()
        REQUEST_SPEND.set(spend)  # in the task iterating the stream: its settles see it
        with self._counted():
            try:
                tenant = await self._p.authenticator.resolve(api_key)
                tenant_name = tenant.name
                # aclosing: a stream closed part-way closes the generators inside it now, so that
                # what it was sent is paid for (settle_partial) before aclose() returns.
                inner = self._complete_stream(tenant, request, started, deadline)
                async with contextlib.aclosing(inner) as events:
                    async for event in events:
                        if isinstance(event, Completion):
                            finished = True
                            seconds = event.latency.total_ms / 1000
                            failed = failed_validator_labels(event.validation, request)
                            telemetry.request_completed(tenant.name, event, seconds, failed)
                        yield event
            # Closed part-way (aclose(): GeneratorExit, at a yield, so it was admitted): the caller
            # left, as a cancelled one did; closed after its Completion, it was served.
            except GeneratorExit as error:
                if not finished:
                    self._fail(tenant, error)
                    self._record_failure(tenant_name, request, error, started, spend=spend)
                raise
            # CancelledError is no Exception: a caller gone or a deadline passed is recorded too
            # (as "cancelled"), or the latency histogram would leave out the slowest requests.
            except (Exception, asyncio.CancelledError) as error:  # a bug: INTERNAL, recorded too
                self._record_failure(tenant_name, request, error, started, spend=spend)
                raise

    async def _complete_stream(
        self, tenant: Tenant, request: ChatRequest, started: float, deadline: float
    ) -> AsyncGenerator[str | Completion, None]:
        await self._admit(tenant, request)
        latency = LatencyBreakdown()
        try:
            keys, hit, vector = await self._lookup(tenant, request, latency)
            if hit is None:
                assert vector is not None  # a miss always embeds
                models = self._stream_models(
                    tenant, request, (keys, vector), latency, (started, deadline)
                )
                async with contextlib.aclosing(models) as events:  # see complete_stream
                    async for event in events:
                        yield event
                return
            await self._costs.record_saving(tenant, request, hit.usage.saved_usd)
            for chunk in _chunks(hit.text):
                yield chunk
        except ResourceExhausted:  # a spend cap refused it: not admitted (operations.md)
            raise
        # An INTERNAL one too, and a cancelled one: it was admitted, and the calls it made are
        # in GetStats (from the spend records), so the request must be as well.
        except (Exception, asyncio.CancelledError) as error:
            self._fail(tenant, error)
            raise
        latency.total_ms = (time.perf_counter() - started) * 1000
        self._stats.record_completion(tenant.name, hit)
        self._emit_completion(tenant, request, hit)
        yield hit

    async def _stream_models(
        self,
        tenant: Tenant,
        request: ChatRequest,
        where: tuple[CacheKeys, Vector],
        latency: LatencyBreakdown,
        times: tuple[float, float],
    ) -> AsyncGenerator[str | Completion, None]:
        """`times`: when the request started (perf_counter), for its total; its deadline."""
        (keys, vector), (started, deadline), generator = where, times, self._p.generator
        with _stage(latency, "classify_ms"):
            tier, difficulty, version = self._route(tenant, request, vector)
        booking = await self._costs.book(tenant, request, tier, streaming=True)
        events = generator.stream(booking.request, booking.tier, tenant=tenant.name,
                                  deadline=deadline, cheap_only=booking.cheap_only,
                                  allowed=tenant.providers_allowed)  # fmt: skip
        generated: Generated | None = None
        sent: list[str] = []
        try:
            # aclosing: see complete_stream; the provider's stream is closed before the spend
            # of what it sent is settled below.
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Generated):
                        generated = event
                    else:
                        sent.append(event)
                        yield event
        except FailedValidation as error:
            await self._costs.settle_refused(tenant, request, booking, error)
            raise
        except AllProvidersFailed as error:  # nothing was sent yet: a stale answer may do
            await self._costs.release(booking)
            scored = (difficulty, version)
            stale = await self._stale(tenant, request, keys, vector, latency, error, scored)
            for chunk in _chunks(stale.text):
                yield chunk
            latency.total_ms = (time.perf_counter() - started) * 1000
            self._stats.record_completion(tenant.name, stale)
            self._emit_completion(tenant, request, stale)
            yield stale
            return
        except BaseException:
            # A stream that broke or was dropped still paid for what it sent.
            await self._costs.settle_partial(tenant, request, booking, "".join(sent))
            raise
        assert generated is not None
        latency.upstream_ms, latency.validate_ms = generated.upstream_ms, generated.validate_ms
        await self._costs.settle(tenant, request, booking, generated)
        entry_id = ""
        if not request.cache.no_store and generated.report.passed:
            with _stage(latency, "store_ms"):
                entry_id = await self._store(tenant, keys, request, vector, generated)
        done = self._from_models(tenant, generated, False, entry_id, (difficulty, version), latency)
        latency.total_ms = (time.perf_counter() - started) * 1000
        self._stats.record_completion(tenant.name, done)
        self._emit_completion(tenant, request, done)
        yield done

    async def _admit(self, tenant: Tenant, request: ChatRequest) -> None:
        validate_request(request, self._p.limits, self._schema_verdicts.for_tenant(tenant.name))
        self._p.generator.validators_for(tenant.name, request)  # a bad one: INVALID_ARGUMENT now
        # Before any lookup: a tier the tenant may not use is refused whether or not cached.
        if request.force_tier is not None and request.force_tier not in tenant.allowed_tiers:
            raise InvalidArgument(
                "routing.force_tier", f"{request.force_tier.value} is not allowed for "
                f"tenant {tenant.name} (models_allowed)",
            )  # fmt: skip
        # Spend caps are checked later, by the reservation of a call: cache hits cost nothing.
        await self._costs.admit(tenant, request)

    async def _lookup(
        self, tenant: Tenant, request: ChatRequest, latency: LatencyBreakdown
    ) -> tuple[CacheKeys, Completion | None, Vector | None]:
        """The scope and exact key, and a cached answer or (on a miss) the prompt's embedding."""
        keys = CacheKeys.of(tenant.name, request)  # once: the key's normalising takes ms
        scope, read_cache = keys.scope, not request.cache.no_cache
        if read_cache:
            with _stage(latency, "exact_ms"):
                hit = await self._p.cache.lookup_exact(
                    scope, request.prompt, request.force_tier, key=keys.exact
                )
            if hit is not None:
                return keys, self._from_cache(tenant, hit, latency), None
        with _stage(latency, "embed_ms"):
            vector = await self._p.embeddings.embed(request.prompt)
        if read_cache:
            with _stage(latency, "search_ms"):
                hit = await self._p.cache.lookup_semantic(
                    scope, request.prompt, vector, _hit_requirement(tenant), request.force_tier
                )
            if hit is not None:
                return keys, self._from_cache(tenant, hit, latency), None
        return keys, None, vector

    async def _answer(
        self,
        tenant: Tenant,
        request: ChatRequest,
        latency: LatencyBreakdown,
        deadline: float,
    ) -> Completion:
        keys, hit, vector = await self._lookup(tenant, request, latency)
        if hit is not None:
            await self._costs.record_saving(tenant, request, hit.usage.saved_usd)
            return hit
        assert vector is not None  # a miss always embeds
        with _stage(latency, "classify_ms"):
            tier, difficulty, version = self._route(tenant, request, vector)
        scored = (difficulty, version)
        try:
            (generated, booking, entry_id), shared = await self._call_once(
                tenant, request, tier, deadline, (keys, vector, latency)
            )
        except Unavailable as error:  # the caller that booked the call released it
            return await self._stale(tenant, request, keys, vector, latency, error, scored)
        except WaitedTooLong as waited:  # the shared call goes on for its maker
            late = Unavailable(f"an identical request's call did not answer in time: {waited}")
            return await self._stale(tenant, request, keys, vector, latency, late, scored)
        latency.upstream_ms, latency.validate_ms = generated.upstream_ms, generated.validate_ms
        await self._costs.settle(tenant, request, None if shared else booking, generated)
        # A caller that shared the call serves the maker's entry: feedback on it removes that.
        return self._from_models(tenant, generated, shared, entry_id, scored, latency)

    async def _call_once(
        self, tenant: Tenant, request: ChatRequest, tier: Tier, deadline: float,
        where: tuple[CacheKeys, Vector, LatencyBreakdown],
    ) -> tuple[_Made, bool]:  # fmt: skip
        """The request's call, or an identical request's in flight, and whether it was shared:
        a request given another's answer or error is marked so in its spend (RequestSpend).

        Two flights, nested: the identical requests of one end user share first, and only
        their leader joins (or makes) the call shared across end users. A call narrowed by its
        end user's own cap goes alone (_book_and_generate): the other users' leaders stop
        waiting for it, while that user's own requests, bound by the same cap, still share it
        through their flight."""
        made = False

        def patience() -> float:
            # A caller joining a call made under a later deadline waits no longer than it would
            # for its own call, so that its stale answer still comes in time. Seconds from now:
            # a leader may join the call across users a while after it joined its user's.
            return self._p.generator.failover.seconds_for_calls(deadline)

        def make() -> Awaitable[_Made]:
            nonlocal made
            made = True
            return self._book_and_generate(tenant, request, tier, deadline, where)

        def across_users() -> Awaitable[_Shared]:
            return self._across_users.run(
                _flight_key(where[0], tier), make, lambda error: _not_mine(error, deadline),
                patience=patience(),
            )  # fmt: skip

        def not_this_users(error: BaseException) -> bool:
            # The leader stopped waiting for another user's call, on its own patience: this
            # caller's may be longer, so it joins that call itself rather than give up with it.
            return isinstance(error, WaitedTooLong) or _not_mine(error, deadline)

        try:
            (made_call, shared_across), shared_by_user = await self._single_flight.run(
                _user_flight_key(where[0], tier, request.end_user_id), across_users,
                not_this_users, patience=patience(),
            )  # fmt: skip
        except WaitedTooLong:  # it stopped waiting: nothing of the call is this request's
            raise
        except BaseException:
            _mark_shared(not made)
            raise
        shared = shared_across or shared_by_user
        _mark_shared(shared)
        return made_call, shared

    async def _book_and_generate(
        self, tenant: Tenant, request: ChatRequest, tier: Tier, deadline: float,
        where: tuple[CacheKeys, Vector, LatencyBreakdown],
    ) -> tuple[Generated, Booking, str]:  # fmt: skip
        """The call one of the identical requests in flight makes for all of them, booked
        under its caller's caps, and the id of the cache entry it stored ("" if none): stored
        here, so those sharing the answer get the id too. `where`: the scope and exact key, the
        prompt's vector and the caller's latency. The reservation is settled or released on
        failure."""
        (keys, vector, latency), entry_id = where, ""
        booking, spent = await self._costs.book(tenant, request, tier), Tally()
        if booking.users_own:  # narrowed by this end user's cap: not another user's answer
            self._across_users.go_alone(_flight_key(keys, tier))
        try:
            generated = await self._p.generator.generate(
                booking.request, booking.tier, tenant=tenant.name, deadline=deadline,
                cheap_only=booking.cheap_only, tally=spent, allowed=tenant.providers_allowed,
            )  # fmt: skip
            if not request.cache.no_store and generated.report.passed:
                with _stage(latency, "store_ms"):
                    entry_id = await self._store(tenant, keys, request, vector, generated)
        except FailedValidation as error:
            await self._costs.settle_refused(tenant, request, booking, error)
            raise
        except BaseException:  # the calls that answered before it failed were paid for
            await self._costs.settle_spent(tenant, request, booking, spent)
            raise
        finally:
            if spent.escalated:  # counted when it happens: the strong call may fail after
                self._p.telemetry.escalated(tenant.name)
                self._stats.record_escalation(tenant.name)
        return generated, booking, entry_id

    async def _stale(
        self,
        tenant: Tenant,
        request: ChatRequest,
        keys: CacheKeys,
        vector: Vector,
        latency: LatencyBreakdown,
        error: Unavailable,
        scored: tuple[float, str],
    ) -> Completion:
        """A cached answer of this scope, expired or not, flagged stale; else Unavailable.
        `scored`: (difficulty, classifier version) of the routing, reported as a model's
        answer's is: a model swapped in during the failed calls did not route it."""
        if request.cache.no_cache:
            raise _with_checks(
                Unavailable(f"{error}; no_cache is set, so no cached answer was tried"), error
            ) from error
        with _stage(latency, "search_ms"):
            hit = await self._p.cache.lookup_stale(
                keys.scope, request.prompt, vector, _hit_requirement(tenant), request.force_tier,
                key=keys.exact,
            )  # fmt: skip
        if hit is None:
            none = Unavailable(f"{error}; no cached answer to fall back on")
            raise _with_checks(none, error) from error
        served = self._from_cache(tenant, hit, latency)
        difficulty, version = scored
        # The failed calls' checks (a cheap answer escalated before the strong call failed) are
        # this request's, reported with the stale answer, which passed its own when stored.
        checks = served.validation if error.checks is None else replace(error.checks, passed=True)
        # Its usage is what the failed calls cost (an escalation's paid cheap call), not a
        # hit's saving: no call was avoided, every provider was tried, and the spend ledger
        # records no saving for it (GetStats, the metrics and the event log agree with it).
        spend = REQUEST_SPEND.get()
        usage = Usage() if spend is None else spend.usage()
        return replace(
            served, cache=replace(served.cache, stale=True), upstream_failures=(str(error),),
            classifier_version=version, difficulty=difficulty, validation=checks, usage=usage,
            shared=spend is not None and spend.shared,  # the checks are the shared call's
        )  # fmt: skip

    def _route(
        self, tenant: Tenant, request: ChatRequest, vector: Vector
    ) -> tuple[Tier, float, str]:
        """Tier, P(cheap fails) and the classifier version that scored it.

        The tier follows the routing score (the accuracy the strong model is expected to add).
        Synchronous on purpose: a hot-reloaded model swaps on the event loop, so the score,
        threshold and version used here all come from one model.
        """
        classifier = self._p.classifier
        assessment = classifier.assess(vector, request.prompt)
        if not (
            math.isfinite(assessment.failure_probability)
            and math.isfinite(assessment.routing_score)
        ):
            # NaN >= threshold is False: a request the model cannot score (a NaN embedding)
            # went to the cheap model, silently. The safe side is to treat it as hard; and a
            # NaN difficulty in the event log is no JSON.
            if not self._unscored_logged:
                self._unscored_logged = True
                log.warning(
                    "classifier %s gave a score that is not a finite number (%s); routing such "
                    "requests to the strong model (logged once)",
                    classifier.version,
                    assessment,
                )
            assessment = Assessment(failure_probability=1.0, routing_score=math.inf)
        difficulty = assessment.failure_probability
        version = classifier.version
        if request.force_tier is not None:  # one the tenant may use: checked on admission
            return request.force_tier, difficulty, version
        threshold = tenant.routing_threshold
        if threshold is None and tenant.operating_point is not None:
            threshold = classifier.threshold_for(tenant.operating_point)
        if threshold is None:
            threshold = classifier.default_threshold
        tier = Tier.STRONG if assessment.routing_score >= threshold else Tier.CHEAP
        if tier not in tenant.allowed_tiers:  # models_allowed leaves one tier
            tier = Tier.CHEAP if tier is Tier.STRONG else Tier.STRONG
        return tier, difficulty, version

    async def _store(
        self, tenant: Tenant, keys: CacheKeys, request: ChatRequest, vector: Vector,
        generated: Generated,
    ) -> str:  # fmt: skip
        entry = await self._p.cache.store(
            NewEntry(
                tenant=tenant.name,
                scope=keys.scope,
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
                exact_key=keys.exact,
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
            cache=CacheInfo(
                hit.outcome,
                hit.similarity,
                entry.entry_id,
                hit.age_seconds,
                verifier_score=hit.verifier_score,
            ),
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
        scored: tuple[float, str],
        latency: LatencyBreakdown,
    ) -> Completion:
        difficulty, version = scored
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
            classifier_version=version,
            difficulty=difficulty,
            provider=generated.provider,
            upstream_failures=generated.upstream_failures,
            shared=shared,
        )

    def _new_response_id(self, tenant: Tenant, entry_id: str, hit: CacheHit | None) -> str:
        response_id = uuid.uuid4().hex
        outcome = CacheInfo().outcome if hit is None else hit.outcome
        similarity = 0.0 if hit is None else hit.similarity
        served = ServedResponse(tenant.name, entry_id, outcome, similarity)
        self._responses.remember(response_id, served)
        return response_id

    def _emit_completion(self, tenant: Tenant, request: ChatRequest, done: Completion) -> None:
        self._p.events.emit(
            "completion",
            {
                "request_id": REQUEST_ID.get(),
                "tenant": tenant.name,
                "end_user_id": request.end_user_id,
                "response_id": done.response_id,
                "prompt": request.prompt,
                "cache_outcome": done.cache.outcome.value,
                "path": path_of(done).value,
                "similarity": done.cache.similarity,
                "verifier_score": done.cache.verifier_score,
                "entry_id": done.cache.entry_id,
                "model": done.model,
                "tier": done.tier.value,
                "difficulty": done.difficulty,
                "classifier_version": done.classifier_version,
                "prompt_tokens": done.usage.prompt_tokens,
                "completion_tokens": done.usage.completion_tokens,
                "cost_usd": done.usage.cost_usd,
                "saved_usd": done.usage.saved_usd,
                "validation_passed": done.validation.passed,
                "escalated": done.validation.escalated,
                "shared": done.shared,  # another request's call answered: labelled there
                "validation": _report_payload(done.validation),
                "stale": done.cache.stale,
                "provider": done.provider,
                "upstream_failures": list(done.upstream_failures),
                "latency_ms": done.latency.total_ms,
                "latency": vars(done.latency),
            },
        )

    def _fail(self, tenant: Tenant, error: BaseException) -> None:
        # The error event itself is emitted once, by _record_failure, for every failure.
        self._stats.record_failure(tenant.name, validation=isinstance(error, FailedValidation))


def _checks_of(error: BaseException) -> ValidationReport | None:
    """The checks the request's calls made before `error` (None: no answer was checked)."""
    if isinstance(error, FailedValidation):
        return error.report
    return error.checks if isinstance(error, RouteCacheError) else None


def _with_checks(error: Unavailable, cause: Unavailable) -> Unavailable:
    error.checks = cause.checks
    return error


def _report_payload(report: ValidationReport) -> dict[str, Any]:
    return {
        "passed": report.passed,
        "escalated": report.escalated,
        "results": [vars(r) for r in report.results],
    }


def _chunks(text: str) -> list[str]:
    return [text[i : i + _STREAM_CHUNK_CHARS] for i in range(0, len(text), _STREAM_CHUNK_CHARS)]


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


def _mark_shared(shared: bool) -> None:
    spend = REQUEST_SPEND.get()
    if spend is not None and shared:
        spend.shared = True


def _flight_key(keys: CacheKeys, tier: Tier) -> str:
    """Keyed by the routed tier, not the booked one: only the caller that makes the call books
    it, those sharing it pay nothing. A downgrade at a tenant's cap would be theirs too; one at
    an end user's cap is that user's alone, and its maker goes alone (_book_and_generate)."""
    return f"{keys.exact}:{tier.value}"


def _user_flight_key(keys: CacheKeys, tier: Tier, end_user_id: str) -> str:
    """One end user's identical requests: an end user's cap binds them all, so they share
    even a call it narrowed. Requests without an end user share one key, as they share caps."""
    return f"{_flight_key(keys, tier)}:u:{user_slot(end_user_id)}"


def _not_mine(error: BaseException, deadline: float) -> bool:
    """Whether a shared call failed for its maker's reasons alone, so that a caller with this
    deadline makes the call itself: the maker's caps refused its booking (another caller has
    caps of its own, its end user's perhaps), or the call ran out of the maker's time earlier
    than `deadline` (this caller still has time to get an answer)."""
    if isinstance(error, ResourceExhausted):  # in the call, only its booking refuses
        return True
    return (
        isinstance(error, AllProvidersFailed)
        and error.out_of_time is not None
        and error.out_of_time < deadline
    )


def _hit_requirement(tenant: Tenant) -> HitRequirement:
    return HitRequirement(tenant.similarity_threshold, tenant.max_false_hit_rate)

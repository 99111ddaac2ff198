"""What a tenant does with answers it was given: feedback on one, invalidating entries, stats.

These share the pipeline's parts and its per-tenant books, but not the request flow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from routecache.domain import ChatRequest, Feedback, Tenant, TenantStats, TopEntry
from routecache.errors import InvalidArgument, NotFound
from routecache.router.input_validation import (
    validate_feedback,
    validate_invalidation,
    validate_top_n,
)
from routecache.router.logs import REQUEST_ID
from routecache.router.stats import ResponseRegistry, TenantStatsBook

if TYPE_CHECKING:
    from routecache.router.pipeline import PipelineParts

T = TypeVar("T")


class RecordFailure(Protocol):
    """Records a failed call (its `error` event and routecache_errors_total sample): the
    tenant, if the key was valid, the request (none here), the error, when the call started,
    and whether it was an admin call (an error, not a request)."""

    def __call__(self, tenant: str, request: ChatRequest, error: BaseException, started: float,
                 admin: bool = False) -> None: ...  # fmt: skip


_NO_REQUEST = ChatRequest(messages=())


@dataclass(frozen=True)
class InvalidateTarget:
    entry_id: str = ""
    tag: str = ""
    all_entries: bool = False


class TenantAdmin:
    def __init__(
        self,
        parts: PipelineParts,
        stats: TenantStatsBook,
        responses: ResponseRegistry,
        record_failure: RecordFailure,
    ) -> None:
        self._parts = parts
        self._stats = stats
        self._responses = responses
        self._record_failure = record_failure

    async def _as_tenant(self, api_key: str | None, work: Callable[[Tenant], Awaitable[T]]) -> T:
        """`work` for the key's tenant: the key is checked before anything of the request, and
        a failure, the key's included, is recorded as a Complete's is."""
        started, tenant_name = time.perf_counter(), ""
        try:
            tenant = await self._parts.authenticator.resolve(api_key)
            tenant_name = tenant.name
            return await work(tenant)
        except (Exception, asyncio.CancelledError) as error:  # cancelled: as Complete's too
            self._record_failure(tenant_name, _NO_REQUEST, error, started, admin=True)
            raise

    async def feedback(self, feedback: Feedback, api_key: str | None) -> str:
        """Records feedback; a thumbs-down on a cached answer removes the entry (returned)."""
        return await self._as_tenant(api_key, lambda tenant: self._feedback(tenant, feedback))

    async def invalidate(self, target: InvalidateTarget, api_key: str | None) -> int:
        return await self._as_tenant(api_key, lambda tenant: self._invalidate(tenant, target))

    async def stats(self, api_key: str | None, top_n: int = 10) -> TenantStats:
        return await self._as_tenant(api_key, lambda tenant: self._tenant_stats(tenant, top_n))

    async def _feedback(self, tenant: Tenant, feedback: Feedback) -> str:
        validate_feedback(feedback, self._parts.limits)
        served = self._responses.find(tenant.name, feedback.response_id)
        if served is None:
            raise NotFound(f"no recent response with id {feedback.response_id}")
        removed = ""
        if not feedback.thumbs_up and served.entry_id:
            removed = served.entry_id if await self._parts.cache.distrust(
                tenant.name, served.entry_id) else ""  # fmt: skip
        # Read here, after the removal's await: two ratings of one response sent at once
        # each see the other's.
        previous = self._responses.rate(tenant.name, feedback.response_id, feedback.thumbs_up)
        self._stats.record_feedback(tenant.name, feedback.thumbs_up, previous)
        self._parts.telemetry.feedback(tenant.name, feedback.thumbs_up, bool(removed))
        self._parts.events.emit(
            "feedback",
            {
                "request_id": REQUEST_ID.get(),
                "tenant": tenant.name,
                "response_id": feedback.response_id,
                "thumbs_up": feedback.thumbs_up,
                "correction": feedback.correction,
                "comment": feedback.comment,
                "entry_id": served.entry_id,
                "cache_outcome": served.cache_outcome.value,
                "similarity": served.similarity,
                "invalidated": bool(removed),
            },
        )
        return removed

    async def _invalidate(self, tenant: Tenant, target: InvalidateTarget) -> int:
        validate_invalidation(target.entry_id, target.tag, self._parts.limits)
        cache = self._parts.cache
        if target.entry_id:
            # Only an id this tenant's entries can have reaches the store, where it becomes a
            # key: a crafted one could name another key of the tenant's (a rate bucket, say).
            # Any other is not one of its entries, as another tenant's id is not: none removed.
            removed = await cache.invalidate_ids(tenant.name, [target.entry_id])
        elif target.tag:
            removed = await cache.invalidate_tag(tenant.name, target.tag)
        elif target.all_entries:
            removed = await cache.invalidate_tenant(tenant.name)
        else:
            raise InvalidArgument("target", "set one of entry_id, tag or all=true")
        self._parts.events.emit(
            "invalidate",
            {"request_id": REQUEST_ID.get(), "tenant": tenant.name,
             "entry_id": target.entry_id, "tag": target.tag,
             "all": target.all_entries, "removed": removed},
        )  # fmt: skip
        return removed

    async def _tenant_stats(self, tenant: Tenant, top_n: int) -> TenantStats:
        validate_top_n(top_n, self._parts.limits)
        counters = self._stats.snapshot(tenant.name)
        top = await self._parts.cache.top_entries(tenant.name, top_n)
        return TenantStats(
            tenant=tenant.name,
            entries=await self._parts.cache.entry_count(tenant.name),
            classifier_version=self._parts.classifier.version,
            top_entries=tuple(
                TopEntry(e.entry_id, e.prompt, e.model, e.hit_count, e.hit_count * e.cost_usd)
                for e in top
            ),
            **vars(counters),
        )

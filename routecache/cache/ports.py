"""The ports of the semantic cache. Implementations are chosen in router/bootstrap.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from routecache.domain import Tier

Vector = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns text into unit-length float32 vectors (cosine similarity = dot product)."""

    @property
    def dimension(self) -> int: ...

    @property
    def name(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Blocking: one row per text. The pipeline calls it off the event loop."""
        ...


@runtime_checkable
class SeesWhole(Protocol):
    """An embedder that can tell whether its model sees all of a text.

    Two texts that differ only where the model cannot see (pieces its vocabulary lacks, read
    as [UNK]; a tail cut at its token limit) get the same vector, and the verifier reads the
    same: the cache matches such a text by the exact tier only.
    """

    def sees_whole(self, text: str) -> bool: ...


@dataclass
class CacheEntry:
    entry_id: str
    tenant: str
    scope: str
    exact_key: str
    prompt: str
    answer: str
    model: str
    tier: Tier
    embedding: Vector
    created_at: float
    expires_at: float
    cost_usd: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tags: tuple[str, ...] = ()
    hit_count: int = 0
    last_hit_at: float = 0.0


@dataclass(frozen=True)
class EntrySummary:
    """What stats show of an entry: read without its vector or answer, so listing a large
    tenant stays cheap."""

    entry_id: str
    prompt: str
    model: str
    hit_count: int
    cost_usd: float


def most_served_first(summary: EntrySummary) -> tuple[int, float]:
    """The stats order, as a sort key: most hits first, then the costliest (most saved)."""
    return (-summary.hit_count, -summary.cost_usd)


class StoreUnavailable(Exception):
    """The entry store cannot answer now (e.g. Redis down): the cache is bypassed, not failed."""


class EntryStore(Protocol):
    """Where cache entries live: in-process (embedded default) or Redis (production)."""

    async def put(self, entry: CacheEntry) -> list[CacheEntry]:
        """Store an entry; returns the entries it replaced or evicted to stay within the bound."""
        ...

    async def get(self, entry_id: str) -> CacheEntry | None: ...

    async def get_exact(self, exact_key: str) -> CacheEntry | None: ...

    async def record_hit(self, entry_id: str, now: float) -> bool:
        """Count a hit on the entry; False when it is gone (removed since it was read: the
        hit must not be served). True when it is there even if the store could not count the
        hit (Redis out of memory): a read the store answers is served."""
        ...

    async def delete(self, entry_ids: Sequence[str]) -> list[CacheEntry]:
        """Remove entries; returns the ones that existed."""
        ...

    async def ids_with_tag(self, tenant: str, tag: str) -> list[str]: ...

    async def ids_of_tenant(self, tenant: str) -> list[str]: ...

    async def count(self, tenant: str) -> int: ...

    async def most_served(self, tenant: str, n: int) -> list[EntrySummary]:
        """The tenant's `n` most served entries, in `most_served_first` order."""
        ...


@dataclass(frozen=True)
class Neighbour:
    entry_id: str
    similarity: float


class VectorIndex(Protocol):
    """Nearest-neighbour search that never looks outside one scope."""

    def add(self, scope: str, entry_id: str, vector: Vector) -> None: ...

    def add_many(self, scope: str, entry_ids: list[str], vectors: Vector) -> None: ...

    def remove(self, scope: str, entry_id: str) -> None: ...

    def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]: ...

    def contains(self, scope: str, entry_id: str) -> bool: ...

    def rows_of_tenant(self, tenant: str) -> list[tuple[str, str]]:
        """(scope, entry id) of each row of the tenant's entries (ids `<tenant>:<uuid hex>`)."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ScopeParts:
    """What a cached answer depends on besides the prompt itself."""

    tenant: str
    system_prompt: str
    context: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = field(default=())

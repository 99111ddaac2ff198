"""FAISS inner-product search, one index per scope so a lookup never sees another scope.

A scope starts as an exact flat index. Past `ivf_threshold` entries a flat search costs more
than a lookup should (about 0.2 ms per 1k vectors on one core here; docs/benchmarks.md), so
the scope is rebuilt as an IVF index: k-means cells over the scope's own vectors, searched
`nprobe` cells deep. IVF rather than HNSW because it removes entries in place (HNSW in FAISS
cannot), which an evicting, invalidating cache does all the time. Near-duplicate queries sit
very close to their match, where IVF's recall is at its best (benchmarks/index_scale.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import faiss
import numpy as np

from routecache.cache.ports import Neighbour, Vector

log = logging.getLogger(__name__)

# Rows a rebuild copies per hold of the index lock: well under 1 ms at 384 dimensions.
_COPY_SLICE = 2048


@dataclass(frozen=True)
class IndexPolicy:
    ivf_threshold: int = 5_000  # entries in one scope before it becomes an IVF index
    nprobe: int = 32
    cells_per_sqrt: float = 2.0  # IVF cells = cells_per_sqrt * sqrt(entries at build time)
    train_points_per_cell: int = 40  # k-means sample; all points made a 640k rebuild take minutes
    background: bool = True  # rebuild on a thread while the old index serves (False: inline)
    # FAISS's OpenMP threads on each thread that calls into the index; None: OpenMP's default
    # (one per core). OpenMP's count is per thread, so it is set where FAISS runs, not once.
    threads: int | None = None


class _ScopeIndex:
    """One scope's vectors with stable int64 labels for removal."""

    def __init__(self, dimension: int) -> None:
        self.index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self.id_of_label: dict[int, str] = {}
        self.label_of_id: dict[str, int] = {}
        self.built_size = 0  # entries when the IVF index was built; 0 while flat
        self.rebuilding: threading.Thread | None = None

    def vectors_and_labels(self, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.fromiter(self.id_of_label, dtype=np.int64, count=len(self.id_of_label))
        return self.vectors_of(labels, dimension), labels

    def vectors_of(self, labels: np.ndarray, dimension: int) -> np.ndarray:
        vectors: np.ndarray = self.index.reconstruct_batch(labels)  # one call, not one per row
        return vectors.reshape(len(labels), dimension)


def build_ivf(vectors: np.ndarray, labels: np.ndarray, policy: IndexPolicy) -> faiss.IndexIVFFlat:
    dimension = vectors.shape[1]
    cells = max(1, min(len(vectors) // 39, int(policy.cells_per_sqrt * math.sqrt(len(vectors)))))
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFFlat(quantizer, dimension, cells, faiss.METRIC_INNER_PRODUCT)
    sample = min(len(vectors), policy.train_points_per_cell * cells)
    rows = np.random.default_rng(0).choice(len(vectors), size=sample, replace=False)
    index.train(vectors[np.sort(rows)])
    index.add_with_ids(vectors, labels)
    index.nprobe = policy.nprobe
    # A hash-table id map keeps reconstruct() (for the next rebuild) and remove_ids() working.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    return index


class ScopedFaissIndex:
    """FAISS indexes keyed by scope: flat while small, IVF once large."""

    def __init__(self, dimension: int, policy: IndexPolicy | None = None) -> None:
        self._dimension = dimension
        self._policy = policy or IndexPolicy()
        self._scopes: dict[str, _ScopeIndex] = {}
        self._next_label = 0
        # FAISS indexes are not safe for concurrent add and search.
        self._lock = threading.Lock()

    def add(self, scope: str, entry_id: str, vector: Vector) -> None:
        self.add_many(scope, [entry_id], vector.reshape(1, -1))

    def add_many(self, scope: str, entry_ids: list[str], vectors: np.ndarray) -> None:
        """Bulk insert (index rebuilds at start): one FAISS call instead of one per entry."""
        if vectors.ndim != 2 or vectors.shape[1] != self._dimension:
            # FAISS only fails a bare assertion, once the scope has been made.
            raise ValueError(
                f"vectors of dimension {vectors.shape[-1]}, the index takes {self._dimension}"
            )
        with self._lock:
            self._use_threads()
            index = self._scopes.get(scope) or _ScopeIndex(self._dimension)
            # One row per new id, the last of a repeated one: a second row of the same id would
            # stay in FAISS, unremovable, after the id's label moved on to the other.
            last_row = {e: i for i, e in enumerate(entry_ids) if e not in index.label_of_id}
            fresh = [(i, e) for e, i in last_row.items()]
            if not fresh:
                return  # no scope is made empty: FAISS cannot search one for its 0 best
            self._scopes[scope] = index
            labels = np.arange(self._next_label, self._next_label + len(fresh), dtype=np.int64)
            self._next_label += len(fresh)
            rows = np.ascontiguousarray(vectors[[i for i, _ in fresh]], dtype=np.float32)
            index.index.add_with_ids(rows, labels)
            for label, (_, entry_id) in zip(labels.tolist(), fresh, strict=True):
                index.id_of_label[label] = entry_id
                index.label_of_id[entry_id] = label
            self._maybe_rebuild(index)

    def _use_threads(self) -> None:
        """Sets the policy's OpenMP threads on the calling thread (about 0.1 us): the loop,
        a rebuild thread or a to_thread worker each have their own count, and a set made on
        the thread that built the index (start_service builds off the loop) reaches no other."""
        if self._policy.threads is not None:
            faiss.omp_set_num_threads(self._policy.threads)

    def _maybe_rebuild(self, index: _ScopeIndex) -> None:
        """Called with the lock held. Starts a rebuild when one is due and none is running."""
        size = len(index.label_of_id)
        flat_too_big = index.built_size == 0 and size >= self._policy.ivf_threshold
        # The cells were fitted to the vectors of the build; refit when the scope has doubled.
        due = flat_too_big or (index.built_size and size >= 2 * index.built_size)
        if not due or index.rebuilding is not None:
            return
        index.built_size = size  # no second rebuild is due until the scope doubles again
        if not self._policy.background:
            index.index = build_ivf(*index.vectors_and_labels(self._dimension), self._policy)
            return
        # Training takes seconds to minutes at large sizes: off the caller's thread (the event
        # loop), while the old index keeps serving; the changes made meanwhile are replayed.
        # Even the copy of the vectors is made there: 48 ms at 80k entries held the loop.
        index.rebuilding = threading.Thread(
            target=self._rebuild, args=(index,), name="ivf-rebuild", daemon=True
        )
        index.rebuilding.start()

    def _copy_vectors(self, index: _ScopeIndex) -> tuple[np.ndarray, np.ndarray]:
        """The scope's vectors and labels, copied a slice per lock hold (on the rebuild thread),
        so adds and searches wait at most one slice. A label removed before its slice is
        copied is left out; the rows added or removed meanwhile are reconciled at the swap."""
        with self._lock:
            snapshot = list(index.id_of_label)  # a C-level copy: ~1 ms at 320k
        parts: list[np.ndarray] = []
        kept: list[np.ndarray] = []
        for start in range(0, len(snapshot), _COPY_SLICE):
            with self._lock:
                present = [
                    x for x in snapshot[start : start + _COPY_SLICE] if x in index.id_of_label
                ]
                labels = np.array(present, dtype=np.int64)
                if len(labels):
                    parts.append(index.vectors_of(labels, self._dimension))
                    kept.append(labels)
            # Python's lock is not fair: re-taken at once, it starved the loop's add for the
            # whole copy. A sleep lets a waiting thread take it between slices.
            time.sleep(0)
        if not kept:
            return np.zeros((0, self._dimension), np.float32), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(kept)

    def _rebuild(self, index: _ScopeIndex) -> None:
        self._use_threads()
        try:
            vectors, labels = self._copy_vectors(index)
            if not len(labels):  # all removed meanwhile: the scope is gone
                with self._lock:
                    index.rebuilding = None
                return
            fresh = build_ivf(vectors, labels, self._policy)
        except Exception:
            log.exception("IVF rebuild failed; the scope keeps its previous index")
            with self._lock:
                index.rebuilding = None
            return
        with self._lock:
            index.rebuilding = None
            built = set(labels.tolist())
            now = set(index.id_of_label)
            added = np.array(sorted(now - built), dtype=np.int64)
            removed = np.array(sorted(built - now), dtype=np.int64)
            if len(added):
                fresh.add_with_ids(index.index.reconstruct_batch(added), added)
            if len(removed):
                fresh.remove_ids(removed)  # type: ignore[arg-type]
            index.index = fresh
            self._maybe_rebuild(index)  # the scope may have doubled again meanwhile

    def wait_for_rebuilds(self, timeout: float | None = None) -> None:
        """Block until running rebuilds are done (tests, benchmarks, snapshots)."""
        with self._lock:
            threads = [s.rebuilding for s in self._scopes.values() if s.rebuilding is not None]
        for thread in threads:
            thread.join(timeout)

    def remove(self, scope: str, entry_id: str) -> None:
        with self._lock:
            self._use_threads()
            index = self._scopes.get(scope)
            if index is None or entry_id not in index.label_of_id:
                return
            label = index.label_of_id.pop(entry_id)
            del index.id_of_label[label]
            # FAISS takes an id array here too; its stubs only list the IDSelector form.
            index.index.remove_ids(np.array([label], dtype=np.int64))  # type: ignore[arg-type]
            if not index.label_of_id:
                del self._scopes[scope]

    def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        with self._lock:
            self._use_threads()
            index = self._scopes.get(scope)
            if index is None:
                return []
            row = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
            scores, labels = index.index.search(row, min(k, len(index.label_of_id)))
            return [
                Neighbour(index.id_of_label[int(label)], float(score))
                for score, label in zip(scores[0], labels[0], strict=True)
                if label >= 0
            ]

    def contains(self, scope: str, entry_id: str) -> bool:
        with self._lock:
            index = self._scopes.get(scope)
            return index is not None and entry_id in index.label_of_id

    def rows_of_tenant(self, tenant: str) -> list[tuple[str, str]]:
        """(scope, entry id) of each row of the tenant's entries, by the id's tenant part
        (`<tenant>:<uuid hex>`): a walk of every row, for a rebuild, not for a request."""
        with self._lock:
            return [
                (scope, entry_id)
                for scope, index in self._scopes.items()
                for entry_id in index.label_of_id
                if entry_id.rpartition(":")[0] == tenant
            ]

    def kind(self, scope: str) -> str:
        """ "flat", "ivf" or "none": which index serves a scope (for stats and tests)."""
        with self._lock:
            index = self._scopes.get(scope)
            if index is None:
                return "none"
            return "ivf" if isinstance(index.index, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s.label_of_id) for s in self._scopes.values())

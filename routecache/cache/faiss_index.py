"""FAISS inner-product search, one index per scope so a lookup never sees another scope."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import faiss
import numpy as np

from routecache.cache.ports import Neighbour, Vector


class _ScopeIndex:
    """Exact inner-product search over one scope, with stable int64 ids for removal."""

    def __init__(self, dimension: int) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self.id_of_label: dict[int, str] = {}
        self.label_of_id: dict[str, int] = {}


class ScopedFaissIndex:
    """Flat FAISS indexes keyed by scope.

    Scopes are small (one tenant, one system prompt, one context), where an exact flat search
    costs microseconds; size-based index choice is for large scopes.
    """

    def __init__(self, dimension: int, search_threads: int | None = None) -> None:
        if search_threads is not None:
            # One query at a time gains little from OpenMP, and on a busy machine waking its
            # thread team costs milliseconds (docs/benchmarks.md). The setting is process-wide
            # and shared with torch's OpenMP runtime, so the caller decides.
            faiss.omp_set_num_threads(search_threads)
        self._dimension = dimension
        self._scopes: dict[str, _ScopeIndex] = {}
        self._next_label = 0
        # FAISS indexes are not safe for concurrent add and search.
        self._lock = threading.Lock()

    def add(self, scope: str, entry_id: str, vector: Vector) -> None:
        with self._lock:
            index = self._scopes.get(scope)
            if index is None:
                index = self._scopes[scope] = _ScopeIndex(self._dimension)
            if entry_id in index.label_of_id:
                return
            label = self._next_label
            self._next_label += 1
            row = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
            index.index.add_with_ids(row, np.array([label], dtype=np.int64))
            index.id_of_label[label] = entry_id
            index.label_of_id[entry_id] = label

    def add_many(self, scope: str, entry_ids: Sequence[str], vectors: Vector) -> None:
        """Bulk add (rebuilds): one FAISS call per batch instead of one per entry."""
        with self._lock:
            index = self._scopes.get(scope)
            if index is None:
                index = self._scopes[scope] = _ScopeIndex(self._dimension)
            fresh = [i for i, e in enumerate(entry_ids) if e not in index.label_of_id]
            if not fresh:
                return
            labels = np.arange(self._next_label, self._next_label + len(fresh), dtype=np.int64)
            self._next_label += len(fresh)
            rows = np.ascontiguousarray(vectors[fresh], dtype=np.float32)
            index.index.add_with_ids(rows, labels)
            for position, label in zip(fresh, labels.tolist(), strict=True):
                index.id_of_label[label] = entry_ids[position]
                index.label_of_id[entry_ids[position]] = label

    def remove(self, scope: str, entry_id: str) -> None:
        with self._lock:
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

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s.label_of_id) for s in self._scopes.values())

"""Nearest labelled prompts: how the cheap and the strong model did on requests like this one.

The routing data's outcomes cluster by topic (an MMLU subject the cheap model is weak at, a kind
of word problem), and the embedding finds the topic. So the strongest features are the outcome
rates among the k most similar labelled prompts, for several k. The bank keeps every labelled
prompt's embedding, projected by PCA to PROJECTED_DIMENSION (a 9k x 128 float32 matrix-vector
product costs ~0.15 ms; the full 384 dimensions ~1 ms and ranked no better in cross-validation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.decomposition import PCA

from routecache.unicode_text import uncased_form

KS: tuple[int, ...] = (10, 25, 50, 100)
# Per labelled prompt: did the cheap model fail, did the strong one fail, strong minus cheap.
LABEL_NAMES: tuple[str, ...] = ("cheap_fails", "strong_fails", "gain")
PROJECTED_DIMENSION = 128
_CHUNK = 512

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]


def neighbour_feature_names() -> list[str]:
    rates = [f"knn{k}_{label}" for k in KS for label in LABEL_NAMES]
    return [*rates, "knn_top1_similarity", "knn_top10_similarity"]


def label_matrix(cheap_fails: npt.ArrayLike, strong_fails: npt.ArrayLike) -> FloatArray:
    """Bank labels; an unknown strong outcome (NaN) counts as the known rows' mean."""
    cheap = np.asarray(cheap_fails, dtype=np.float64)
    strong = np.asarray(strong_fails, dtype=np.float64).copy()
    known = ~np.isnan(strong)
    strong[~known] = strong[known].mean() if known.any() else 0.5
    return np.column_stack([cheap, strong, cheap - strong])


def _text_groups(texts: Sequence[str] | None) -> npt.NDArray[np.intp] | None:
    """One id per text as the uncased MiniLM sees it (equal ids: twins, which it embeds
    identically whatever their case, spacing or accents), or None without texts."""
    if texts is None:
        return None
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(uncased_form(t), len(ids)) for t in texts], dtype=np.intp)


def _project(
    embeddings: npt.NDArray[np.floating], mean: Float32Array, components: Float32Array
) -> Float32Array:
    z = (np.asarray(embeddings, dtype=np.float32) - mean) @ components.T
    norms = np.linalg.norm(z, axis=-1, keepdims=True)
    projected: Float32Array = z / np.maximum(norms, 1e-12)
    return projected


class NeighbourBank:
    def __init__(
        self,
        mean: Float32Array,
        components: Float32Array,
        vectors: Float32Array,
        labels: FloatArray,
    ) -> None:
        # A bank read from an artifact is checked whole here: a mismatch found at the first
        # request would fail every request instead of refusing the artifact.
        if (
            components.ndim != 2
            or mean.shape != (components.shape[1],)
            or vectors.ndim != 2
            or vectors.shape[1] != components.shape[0]
        ):
            raise ValueError(
                f"projection {mean.shape} / {components.shape} does not match bank {vectors.shape}"
            )
        if labels.shape != (vectors.shape[0], len(LABEL_NAMES)):
            raise ValueError(f"bank of {vectors.shape} does not match labels {labels.shape}")
        if vectors.shape[0] == 0:
            raise ValueError("the bank holds no labelled prompts")
        self._mean = mean.astype(np.float32)
        self._components = np.ascontiguousarray(components.astype(np.float32))
        self._vectors = np.ascontiguousarray(vectors.astype(np.float32))
        self._labels = labels.astype(np.float64)

    @classmethod
    def fit(cls, embeddings: Float32Array, labels: FloatArray, seed: int = 0) -> NeighbourBank:
        dimension = min(PROJECTED_DIMENSION, embeddings.shape[0], embeddings.shape[1])
        pca = PCA(dimension, random_state=seed).fit(embeddings)
        mean, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        return cls(mean, components, _project(embeddings, mean, components), labels)

    @property
    def input_dimension(self) -> int:
        return int(self._components.shape[1])

    @property
    def size(self) -> int:
        return int(self._vectors.shape[0])

    def project(self, embeddings: npt.NDArray[np.floating]) -> Float32Array:
        """PCA projection, unit-normalised so a dot product is a cosine similarity."""
        return _project(embeddings, self._mean, self._components)

    def features(self, embedding: npt.NDArray[np.floating]) -> FloatArray:
        """Neighbour features of one request (the service's per-request path)."""
        # einsum, not `@`: a BLAS matrix-vector product fans out to every core, which on a
        # busy 2-core host measured ~16 ms; einsum's single-threaded loop ~0.2 ms.
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1) - self._mean
        z = np.einsum("ij,j->i", self._components, vector)
        z /= max(float(np.linalg.norm(z)), 1e-12)
        similarities = np.einsum("ij,j->i", self._vectors, z)
        rates: FloatArray = self._rates(similarities[np.newaxis, :])[0]
        return rates

    def batch_features(
        self,
        embeddings: npt.NDArray[np.floating],
        leave_one_out: bool = False,
        texts: Sequence[str] | None = None,
    ) -> FloatArray:
        """Features of many prompts; leave_one_out for the bank's own prompts (training), in
        bank order. With `texts` (the bank's prompts), a row's twins are left out with it: the
        same request listed twice, or differing only in what the uncased MiniLM does not see
        (case, spacing, accents), whose label is its own."""
        projected = self.project(embeddings)
        if texts is not None and not len(texts) == len(projected) == self.size:
            raise ValueError(f"{len(texts)} texts for {len(projected)} prompts, bank {self.size}")
        twins = _text_groups(texts) if leave_one_out else None
        out = []
        for start in range(0, len(projected), _CHUNK):
            similarities = projected[start : start + _CHUNK] @ self._vectors.T
            if leave_one_out:
                rows = np.arange(similarities.shape[0])
                similarities[rows, rows + start] = -np.inf
            if twins is not None:
                chunk = twins[start : start + _CHUNK]
                similarities[chunk[:, np.newaxis] == twins[np.newaxis, :]] = -np.inf
            # The neighbours every row still has: a left-out one (-inf) must never rank in.
            left_out = int(np.isinf(similarities).sum(axis=1).max()) if leave_one_out else 0
            out.append(self._rates(similarities, left_out))
        return np.vstack(out) if out else np.zeros((0, len(neighbour_feature_names())))

    def _rates(self, similarities: npt.NDArray[np.floating], left_out: int = 0) -> FloatArray:
        """Rates among the nearest; `left_out`: the most neighbours any row leaves out."""
        available = self.size - left_out
        if available < 1:
            raise ValueError("leave-one-out needs a labelled prompt of another text")
        kmax = max(1, min(max(KS), available))
        if kmax < similarities.shape[1]:
            top = np.argpartition(-similarities, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.broadcast_to(np.arange(similarities.shape[1]), similarities.shape).copy()
        top_similarity = np.take_along_axis(similarities, top, 1)
        order = np.argsort(-top_similarity, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)[:, :kmax]
        top_similarity = np.take_along_axis(top_similarity, order, 1)[:, :kmax]
        cumulative = np.cumsum(self._labels[top], axis=1)  # (n, kmax, labels)
        columns = [cumulative[:, min(k, kmax) - 1, :] / min(k, kmax) for k in KS]
        columns.append(top_similarity[:, :1].astype(np.float64))
        columns.append(top_similarity[:, :10].mean(axis=1, keepdims=True).astype(np.float64))
        return np.hstack(columns)

    def to_payload(self) -> dict[str, Any]:
        return {
            "pca_mean": self._mean,
            "pca_components": self._components,
            "vectors": self._vectors,
            "labels": self._labels,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> NeighbourBank:
        return cls(
            np.asarray(payload["pca_mean"]),
            np.asarray(payload["pca_components"]),
            np.asarray(payload["vectors"]),
            np.asarray(payload["labels"]),
        )

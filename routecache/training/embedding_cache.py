"""Embeddings of training prompts kept between retraining runs.

Embedding ~10k prompts with MiniLM on two shared cores takes minutes; fitting the classifier on
them takes seconds. Retraining mostly sees the same prompts again plus a few new ones, so their
vectors are kept in one .npz per embedder, keyed by the SHA-256 of the prompt, and only unseen
prompts are embedded. Runs sharing the file (two retrains on one registry) save one at a time,
under PATH.lock, each merging its new vectors into what is stored then.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.atomic_file import replacing_bytes
from routecache.file_lock import exclusive
from routecache.training.data_files import DataFileError

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class EmbeddingCache:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    def embed(
        self, prompts: Sequence[str], embed: Embed, dimension: int
    ) -> npt.NDArray[np.float32]:
        """Vectors of `prompts`, computing with `embed` only those not stored yet."""
        known = self._load(dimension)
        keys = [prompt_key(p) for p in prompts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
        if missing:
            vectors = embed([prompts[i] for i in missing])
            fresh = {
                keys[i]: np.asarray(vector, dtype=np.float32)
                for i, vector in zip(missing, vectors, strict=True)
            }
            known.update(fresh)
            self._store(fresh, dimension)
        out = np.zeros((len(prompts), dimension), dtype=np.float32)
        for row, key in enumerate(keys):
            out[row] = known[key]
        return out

    def _load(self, dimension: int) -> dict[str, npt.NDArray[np.float32]]:
        if not self._path.exists():
            return {}
        if not self._path.is_file():
            raise DataFileError(f"{self._path}: the embedding cache is not a file")
        try:
            with np.load(self._path) as stored:
                keys, vectors = stored["keys"], stored["vectors"]
            # One key per row of a table, as _save writes them; else the zip below would raise.
            if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors):
                raise ValueError(f"{keys.shape} keys for {vectors.shape} vectors")
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            # Another file given by mistake: say so, and never write over it.
            raise DataFileError(
                f"{self._path}: not an embedding cache (.npz of keys and vectors): {exc}"
            ) from exc
        if vectors.shape[1] != dimension:
            return {}  # another embedder's vectors: start over rather than mix them
        return {str(k): v for k, v in zip(keys, vectors, strict=True)}

    def _store(self, fresh: dict[str, npt.NDArray[np.float32]], dimension: int) -> None:
        """Adds `fresh` to the file as it is now. Under the lock: writers of one path share
        PATH.tmp (atomic_file), and another run may have saved since this one loaded (minutes
        of embedding ago), whose vectors a save of this run's alone would drop."""
        try:
            with exclusive(self._path.with_name(self._path.name + ".lock")):
                self._save({**self._load(dimension), **fresh})
        except OSError as exc:  # the lock's (_load and _save report their own)
            raise DataFileError(f"{self._path}: cannot write the embedding cache ({exc})") from exc

    def _save(self, known: dict[str, npt.NDArray[np.float32]]) -> None:
        # Replaced whole and synced (one sync per training run): _load refuses a torn file
        # rather than write over what may be another file, so a power loss must never leave
        # one, or every later run would stop until it is removed by hand. The caller holds
        # the lock (_store).
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with replacing_bytes(self._path) as out:
                np.savez(out, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        except OSError as exc:
            raise DataFileError(f"{self._path}: cannot write the embedding cache ({exc})") from exc

"""Hot reload: the classifier in service follows the registry's CURRENT pointer.

`refresh()` reads the pointer (a few bytes); when it names another version, the artifact is
loaded in a worker thread, off the event loop, and then swapped in by one reference
assignment on the loop. A request scores with whichever model was active when its (synchronous)
routing step ran, so no request sees half a swap. A version that fails to load is logged and
skipped; the model in service stays, and a later write of the pointer is tried again, even one
naming that version again. So is a version trained on another embedder than the service's:
swapped in, it would fail every routed request (another size) or route on vectors it never
learned from (the same size). A read that fails with
an I/O error (of the pointer or of the artifact) is raised by `refresh()` and retried on the
next poll; `watch()` logs it once per outage, and once when the registry reads again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.classifier.ports import Assessment, DifficultyClassifier
from routecache.classifier.registry import HISTORY, POINTER, ModelRegistry
from routecache.domain import OperatingPoint

log = logging.getLogger(__name__)

Loader = Callable[[Path], DifficultyClassifier]

# Which write of the pointer a poll read: CURRENT's identity (replaced by a rename each time,
# or saved by hand) and the size of the append-only history (grows with each change, so a
# reused inode number within one timestamp tick still tells two writes apart).
_PointerStamp = tuple[tuple[int, int, int] | None, int | None]


def _pointer_stamp(registry: ModelRegistry) -> _PointerStamp:
    def stat(name: str) -> os.stat_result | None:
        try:
            return (registry.root / name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None

    pointer, history = stat(POINTER), stat(HISTORY)
    identity = None if pointer is None else (pointer.st_dev, pointer.st_ino, pointer.st_mtime_ns)
    return identity, None if history is None else history.st_size


class ClassifierMismatch(ValueError):
    """The model cannot score this service's embeddings, or learned from another embedder's."""


def check_fits(model: DifficultyClassifier, dimension: int | None, embedder: str | None) -> None:
    """Raises ClassifierMismatch unless `model` can route on the service's embeddings.

    Another size of vector would fail every routed request; another embedder's vectors of the
    same size would be scored without an error, on geometry the model never learned from.
    """
    if None not in (embedder, model.embedder) and model.embedder != embedder:
        raise ClassifierMismatch(
            f"classifier {model.version} was trained on embedder {model.embedder!r}; "
            f"this service embeds with {embedder!r}"
        )
    if dimension is None:
        return
    try:
        model.assess(np.zeros(dimension, dtype=np.float32), "")
    except Exception as error:
        raise ClassifierMismatch(
            f"classifier {model.version} cannot score this service's {dimension}-d "
            f"embeddings ({error})"
        ) from error


class ReloadingClassifier:
    def __init__(
        self,
        registry: ModelRegistry,
        load: Loader,
        initial: DifficultyClassifier,
        initial_entry: str | None = None,
        embedding_dimension: int | None = None,
        embedder: str | None = None,
    ) -> None:
        self._registry = registry
        self._load = load
        # The service's embedding size and embedder: a new version must fit both to serve.
        self._dimension = embedding_dimension
        self._embedder = embedder
        self._active = initial
        # The registry entry in service: a registry name need not equal the model's own version.
        self._entry = initial_entry
        # A version that failed to load, and the pointer write that named it: a later write
        # naming it again (a roll back and a new promotion, even both between two polls) is a
        # new change to try.
        self._failed: tuple[str, _PointerStamp] | None = None
        self.swaps = 0

    @classmethod
    def from_registry(
        cls,
        registry: ModelRegistry,
        load: Loader,
        fallback: Path,
        embedding_dimension: int | None = None,
        embedder: str | None = None,
    ) -> ReloadingClassifier:
        """Start on the registry's current version, or on `fallback` if none is promoted yet.

        Raises ClassifierMismatch if that model does not fit the service's embeddings: at
        start there is no older model to keep serving with.
        """
        entry = registry.current_version()
        path = fallback if entry is None else registry.artifact_path(entry)
        initial = load(path)
        check_fits(initial, embedding_dimension, embedder)
        return cls(registry, load, initial, entry, embedding_dimension, embedder)

    @property
    def active(self) -> DifficultyClassifier:
        return self._active

    @property
    def version(self) -> str:
        return self._active.version

    @property
    def default_threshold(self) -> float:
        return self._active.default_threshold

    @property
    def embedder(self) -> str | None:
        return self._active.embedder

    def threshold_for(self, point: OperatingPoint) -> float:
        return self._active.threshold_for(point)

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float:
        return self._active.failure_probability(embedding, text)

    def assess(self, embedding: npt.NDArray[np.float32], text: str) -> Assessment:
        return self._active.assess(embedding, text)

    async def refresh(self) -> bool:
        """Swap in the registry's current version if it changed; True if a swap happened.

        Raises what a failed read of the pointer or of a new version's artifact raised (an
        OSError; a RegistryError for a pointer not UTF-8): nothing is recorded, the next call
        reads both again.
        """
        stamp = _pointer_stamp(self._registry)  # before the read: a later write is retried
        wanted = self._registry.current_version()
        if wanted is None or wanted == self._entry or self._failed == (wanted, stamp):
            return False
        path = self._registry.artifact_path(wanted)
        try:
            loaded = await asyncio.to_thread(self._load_checked, path)
        except OSError:
            # A read that failed (a flaky registry mount) says nothing about the artifact: not
            # recorded as failed, so tried again at the next call, or this replica would stay on
            # the old model for good. Raised as a failed pointer read is: watch() logs it once
            # per outage, and the recovery only once a read succeeds.
            raise
        except Exception:  # any broken artifact: keep serving with the model we have
            log.exception("classifier %s could not be loaded; keeping %s", wanted, self.version)
            self._failed = (wanted, stamp)
            return False
        previous, self._active, self._entry = self._active.version, loaded, wanted
        self._failed = None
        self.swaps += 1
        log.info("classifier swapped: %s -> %s", previous, loaded.version)
        return True

    def _load_checked(self, path: Path) -> DifficultyClassifier:
        """Loads a version and has it score one embedding of the service's size (raises if it
        cannot, or was trained on another embedder)."""
        loaded = self._load(path)
        check_fits(loaded, self._dimension, self._embedder)
        return loaded

    async def watch(self, interval_seconds: float) -> None:
        """Poll the pointer until cancelled.

        A registry that cannot be read is logged once per outage, and again when it can: a
        replica silently left on its model is the failure to see, one line per poll is noise.
        """
        unreadable = False
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.refresh()
            except Exception as error:  # a flaky mount, a CURRENT saved in another encoding
                # A watcher that died here would leave this replica on its model for good.
                if not unreadable:
                    log.warning(
                        "classifier registry could not be read (%s); trying again every poll",
                        error,
                        exc_info=not isinstance(error, OSError),
                    )
                unreadable = True
            else:
                if unreadable:
                    log.info("classifier registry readable again")
                unreadable = False

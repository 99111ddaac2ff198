"""Runs the blocking embedder off the event loop, on a dedicated thread."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from routecache.cache.ports import Embedder, Vector


class EmbeddingWorker:
    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder
        # One thread: torch already spreads one forward pass over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._pending = 0

    @property
    def pending(self) -> int:
        """Texts waiting for or in the model: the queue depth operators watch."""
        return self._pending

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    async def embed(self, text: str) -> Vector:
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            rows = await loop.run_in_executor(self._executor, self._embedder.encode, [text])
        finally:
            self._pending -= 1
        vector: Vector = rows[0]
        return vector

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

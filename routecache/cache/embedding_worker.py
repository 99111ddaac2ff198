"""Runs the blocking embedder off the event loop, batching requests that arrive together.

One encoder pass runs at a time on one thread (the encoder already spreads a pass over the
cores). Requests that arrive while a pass runs wait in a queue and go into the next pass
together, so under load the batch size grows with the queue and no request waits longer than
one pass plus its own. Texts of very different lengths are not batched together: padding a
short query to a long one's length costs more than the batching saves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from routecache.cache.ports import Embedder, Vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_wait_seconds: float = 0.0  # extra wait for company once the encoder is free
    max_length_ratio: float = 1.5  # longest / shortest text (in characters) within one batch


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[Vector]


def length_buckets(pending: list[_Pending], policy: BatchPolicy) -> list[list[_Pending]]:
    """Sort by length and cut where the batch is full or the length spread grows too wide."""
    buckets: list[list[_Pending]] = []
    for item in sorted(pending, key=lambda p: len(p.text)):
        current = buckets[-1] if buckets else None
        if (
            current is None
            or len(current) >= policy.max_batch
            or len(item.text) > policy.max_length_ratio * max(len(current[0].text), 16)
        ):
            buckets.append([item])
        else:
            current.append(item)
    return buckets


class EmbeddingWorker:
    def __init__(self, embedder: Embedder, policy: BatchPolicy | None = None) -> None:
        self._embedder = embedder
        self._policy = policy or BatchPolicy()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        # Texts of the current drain, taken off the queue: in the pass or waiting in a later
        # length bucket. Those whose caller is still waiting count as pending.
        self._taken: list[_Pending] = []
        self._closed = False

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def pending(self) -> int:
        """Texts waiting for or in the model: the queue depth operators watch."""
        return len(self._queue) + sum(not p.future.done() for p in self._taken)

    async def embed(self, text: str) -> Vector:
        if self._closed:
            # Queued now, a text would wait for good: close() has cancelled the dispatcher (it
            # may not have stopped yet, in this same tick) and drained the queue already.
            raise RuntimeError("embedding worker is closed")
        future: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(text, future))
        self._ensure_dispatcher().set()
        return await future

    def _ensure_dispatcher(self) -> asyncio.Event:
        if self._wake is None or self._dispatcher is None or self._dispatcher.done():
            self._wake = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(self._wake), name="embedding-dispatcher"
            )
        return self._wake

    async def _dispatch(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            if self._policy.max_wait_seconds > 0:
                await asyncio.sleep(self._policy.max_wait_seconds)
            while self._queue:
                pending = [p for p in self._drain() if not p.future.done()]
                self._taken = pending
                try:
                    for bucket in length_buckets(pending, self._policy):
                        await self._run(bucket)
                finally:
                    # close() cancels this task mid-drain: the callers in the pass and in the
                    # buckets still to run are in no queue close() sees, and would wait forever.
                    for p in pending:
                        if not p.future.done():
                            p.future.cancel()
                    self._taken = []

    def _drain(self) -> list[_Pending]:
        taken = list(self._queue)
        self._queue.clear()
        return taken

    async def _run(self, bucket: list[_Pending]) -> None:
        live = [p for p in bucket if not p.future.done()]  # callers whose deadline passed
        if not live:
            return
        loop = asyncio.get_running_loop()
        texts = [p.text for p in live]
        try:
            rows = await loop.run_in_executor(self._executor, self._embedder.encode, texts)
            if len(rows) != len(live):  # a plug-in embedder's bug must not kill the dispatcher
                raise RuntimeError(f"embedder returned {len(rows)} rows for {len(live)} texts")
        except Exception as error:  # the callers get the error; the dispatcher carries on
            for p in live:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        for p, row in zip(live, rows, strict=True):
            if not p.future.done():
                # A copy, not a view: the cache keeps each vector, and a row view would keep
                # the whole batch's array alive with it (up to max_batch rows an entry).
                p.future.set_result(np.array(row, copy=True))

    def close(self) -> None:
        """Cancels the callers still queued or in a pass; any later embed() fails at once."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for p in self._drain():
            if not p.future.done():
                p.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

"""Runs the blocking embedder off the event loop, batching requests that arrive together.

One encoder pass runs at a time on one thread (the encoder already spreads a pass over the
cores). Requests that arrive while a pass runs wait in a queue and go into the next pass
together, so under load the batch size grows with the queue. Texts of very different lengths
are not batched together: padding a short query to a long one's length costs more than the
batching saves. After every pass the texts still waiting and those that arrived meanwhile are
bucketed again and the shortest bucket goes next, so a short request waits one pass plus its
own; a longer text is overtaken by later arrivals at most `max_overtaken` times.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from routecache.cache.embedder import MAX_TOKENS
from routecache.cache.ports import Embedder, Vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_wait_seconds: float = 0.0  # extra wait for company once the encoder is free
    max_length_ratio: float = 1.5  # longest / shortest text (in characters) within one batch
    # Lengths past this count as this when bucketing: the encoder cuts every text at its
    # window (MAX_TOKENS word pieces), which plain text fills well within 8 characters a piece.
    max_text_chars: int = MAX_TOKENS * 8
    # Passes of texts that arrived later a waiting text may let go first (shortest first):
    # bounds how long a long text waits while short ones keep arriving.
    max_overtaken: int = 2


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[Vector]
    taken_at: int = 0  # passes run (in this busy spell) before it was taken off the queue
    overtaken: int = 0  # passes of texts taken later that ran while it waited


def length_buckets(pending: list[_Pending], policy: BatchPolicy) -> list[list[_Pending]]:
    """Sort by length and cut where the batch is full or the length spread grows too wide."""

    def length(item: _Pending) -> int:
        return min(len(item.text), policy.max_text_chars)

    buckets: list[list[_Pending]] = []
    for item in sorted(pending, key=length):
        current = buckets[-1] if buckets else None
        if (
            current is None
            or len(current) >= policy.max_batch
            or length(item) > policy.max_length_ratio * max(length(current[0]), 16)
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
        # Callers inside embed(): queued, taken off the queue and waiting for their bucket, or
        # in the pass. A plain count: the metrics scrape thread reads it without the loop.
        self._waiting = 0
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
        return self._waiting

    async def embed(self, text: str) -> Vector:
        if self._closed:
            # Queued now, a text would wait for good: close() has cancelled the dispatcher (it
            # may not have stopped yet, in this same tick) and drained the queue already.
            raise RuntimeError("embedding worker is closed")
        future: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(text, future))
        self._ensure_dispatcher().set()
        self._waiting += 1
        try:
            return await future
        finally:  # a caller that gives up (deadline, client gone) stops counting at once
            self._waiting -= 1

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
            taken: list[_Pending] = []
            try:
                passes = 0
                while self._queue or taken:
                    for p in self._drain():
                        p.taken_at = passes
                        taken.append(p)
                    taken = [p for p in taken if not p.future.done()]
                    if not taken:
                        continue
                    bucket = self._next_bucket(taken)
                    await self._run(bucket)
                    passes += 1
                    ran = set(map(id, bucket))
                    taken = [p for p in taken if id(p) not in ran]
                    first_taken = min(p.taken_at for p in bucket)
                    for p in taken:
                        if p.taken_at < first_taken:
                            p.overtaken += 1
            finally:
                # close() cancels this task mid-drain: the callers in the pass and in the
                # buckets still to run are in no queue close() sees, and would wait forever.
                for p in taken:
                    if not p.future.done():
                        p.future.cancel()

    def _next_bucket(self, taken: list[_Pending]) -> list[_Pending]:
        """The shortest bucket, unless a text was overtaken too often: then that text's."""
        buckets = length_buckets(taken, self._policy)
        overdue = [p for p in taken if p.overtaken >= self._policy.max_overtaken]
        if not overdue:
            return buckets[0]
        oldest = min(overdue, key=lambda p: p.taken_at)
        return next(b for b in buckets if any(p is oldest for p in b))

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

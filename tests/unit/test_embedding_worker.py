"""The embedding worker: concurrent requests share encoder passes, lengths are bucketed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.cache.embedding_worker import BatchPolicy, EmbeddingWorker, _Pending, length_buckets


class RecordingEmbedder(HashEmbedder):
    """Hash vectors, but each pass waits on a gate and records its batch."""

    def __init__(self) -> None:
        super().__init__(16)
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.gate.wait(5)
        self.batches.append(list(texts))
        if self.fail:
            raise RuntimeError("encoder broke")
        return super().encode(texts)


async def test_requests_waiting_behind_a_pass_go_into_the_next_pass_together() -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder, BatchPolicy(max_batch=32))
    embedder.gate.clear()
    first = asyncio.ensure_future(worker.embed("the first question"))
    await asyncio.sleep(0.05)  # the first pass is now blocked inside the encoder
    rest = [asyncio.ensure_future(worker.embed(f"question number {i:02d}")) for i in range(10)]
    await asyncio.sleep(0.01)
    embedder.gate.set()
    vectors = await asyncio.gather(first, *rest)
    worker.close()
    assert [len(b) for b in embedder.batches] == [1, 10]
    expected = HashEmbedder(16).encode(["question number 03"])[0]
    assert np.allclose(vectors[4], expected)


async def test_each_caller_gets_its_own_row() -> None:
    worker = EmbeddingWorker(RecordingEmbedder())
    texts = [f"text {i} " + "word " * i for i in range(20)]
    vectors = await asyncio.gather(*(worker.embed(t) for t in texts))
    worker.close()
    for text, vector in zip(texts, vectors, strict=True):
        assert np.allclose(vector, HashEmbedder(16).encode([text])[0])


def test_length_buckets_split_on_size_and_on_spread() -> None:
    loop = asyncio.new_event_loop()
    try:
        items = [_Pending("x" * n, loop.create_future()) for n in (20, 400, 22, 25, 390, 21)]
        buckets = length_buckets(items, BatchPolicy(max_batch=2, max_length_ratio=1.5))
    finally:
        loop.close()
    assert [[len(p.text) for p in b] for b in buckets] == [[20, 21], [22, 25], [390, 400]]


async def test_an_encoder_error_reaches_the_callers_and_the_worker_recovers() -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder)
    embedder.fail = True
    with pytest.raises(RuntimeError, match="encoder broke"):
        await worker.embed("boom")
    embedder.fail = False
    assert (await worker.embed("fine")).shape == (16,)
    worker.close()


async def test_a_caller_that_gave_up_is_not_encoded() -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder)
    embedder.gate.clear()
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.sleep(0.05)
    abandoned = asyncio.ensure_future(worker.embed("nobody waits for me"))
    await asyncio.sleep(0.01)
    abandoned.cancel()
    embedder.gate.set()
    await busy
    await asyncio.sleep(0.05)
    worker.close()
    assert embedder.batches == [["keeps the encoder busy"]]


class ShortEmbedder(RecordingEmbedder):
    """An embedder that returns one row too few, as a broken plug-in might."""

    short = False

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows = super().encode(texts)
        return rows[:-1] if self.short else rows


async def test_an_encoder_giving_the_wrong_number_of_rows_fails_the_callers_not_the_worker() -> (
    None
):
    embedder = ShortEmbedder()
    worker = EmbeddingWorker(embedder)
    embedder.short = True
    with pytest.raises(RuntimeError, match="returned 0 rows for 1 texts"):
        await asyncio.wait_for(worker.embed("one question"), timeout=5)
    embedder.short = False
    assert (await asyncio.wait_for(worker.embed("fine"), timeout=5)).shape == (16,)
    worker.close()

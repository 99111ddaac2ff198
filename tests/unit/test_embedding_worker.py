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
from routecache.router.bootstrap import build_embedding_worker
from routecache.router.settings import load_settings
from tests.fakes import eventually


class RecordingEmbedder(HashEmbedder):
    """Hash vectors, but each pass waits on a gate and records its batch."""

    def __init__(self) -> None:
        super().__init__(16)
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.error: Exception | None = None  # raised by every pass while set
        self.fail_on = "\0"  # a pass with a text containing this fails with RuntimeError
        self.entered = 0  # passes that have reached the encoder (held there while the gate is shut)

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.entered += 1
        self.gate.wait(5)
        self.batches.append(list(texts))
        if self.error is not None:
            raise self.error
        if any(self.fail_on in t for t in texts):
            raise RuntimeError("encoder broke")
        return super().encode(texts)


async def held_in_a_pass(
    embedder: RecordingEmbedder,
) -> tuple[EmbeddingWorker, asyncio.Future[npt.NDArray[np.float32]]]:
    """A worker whose encoder is inside a pass on one text, held there until the gate is set."""
    worker = EmbeddingWorker(embedder)
    embedder.gate.clear()
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await eventually(lambda: embedder.entered == 1, "the first pass is inside the encoder")
    return worker, busy


async def test_requests_waiting_behind_a_pass_go_into_the_next_pass_together() -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder, BatchPolicy(max_batch=32))
    embedder.gate.clear()
    first = asyncio.ensure_future(worker.embed("the first question"))
    await eventually(lambda: embedder.entered == 1, "the first pass is inside the encoder")
    rest = [asyncio.ensure_future(worker.embed(f"question number {i:02d}")) for i in range(10)]
    await eventually(lambda: worker.pending == 11, "the ten queued behind the first pass")
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


async def test_each_caller_owns_its_row_instead_of_keeping_the_whole_batch_alive() -> None:
    # A row view of the batch array kept the whole batch alive in the cache's CacheEntry:
    # up to 32 rows a cached entry instead of its own one.
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    queued = [asyncio.ensure_future(worker.embed(f"queued question {i}")) for i in range(3)]
    await eventually(lambda: worker.pending == 4, "three texts queued behind the pass")
    embedder.gate.set()
    vectors = await asyncio.wait_for(asyncio.gather(busy, *queued), timeout=5)
    worker.close()
    assert [len(b) for b in embedder.batches] == [1, 3]
    assert all(v.base is None and v.flags.owndata for v in vectors)


def bucket_lengths(lengths: Sequence[int], policy: BatchPolicy) -> list[list[int]]:
    """The text lengths of each bucket length_buckets cuts from texts of these lengths."""
    loop = asyncio.new_event_loop()
    try:
        items = [_Pending("x" * n, loop.create_future()) for n in lengths]
        return [[len(p.text) for p in b] for b in length_buckets(items, policy)]
    finally:
        loop.close()


def test_length_buckets_split_on_size_and_on_spread() -> None:
    lengths = (20, 400, 22, 25, 390, 21)
    buckets = bucket_lengths(lengths, BatchPolicy(max_batch=2, max_length_ratio=1.5))
    assert buckets == [[20, 21], [22, 25], [390, 400]]


def test_a_bucket_spans_at_most_the_ratio_from_its_shortest_text_inclusive() -> None:
    lengths = (60, 28, 20, 40, 30)
    buckets = bucket_lengths(lengths, BatchPolicy(max_batch=32, max_length_ratio=1.5))
    assert buckets == [[20, 28, 30], [40, 60]]


def test_texts_shorter_than_sixteen_characters_share_a_bucket() -> None:
    buckets = bucket_lengths((1, 4, 10, 24), BatchPolicy(max_batch=32, max_length_ratio=1.5))
    assert buckets == [[1, 4, 10, 24]]


@pytest.mark.parametrize("error", [RuntimeError, ValueError, OSError])
async def test_an_encoder_error_reaches_the_callers_and_the_worker_recovers(
    error: type[Exception],
) -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder)
    embedder.error = error("encoder broke")
    with pytest.raises(error, match="encoder broke"):
        await asyncio.wait_for(worker.embed("boom"), timeout=5)
    embedder.error = None
    assert (await worker.embed("fine")).shape == (16,)
    worker.close()


async def test_a_caller_that_gave_up_is_not_encoded() -> None:
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    abandoned = asyncio.ensure_future(worker.embed("nobody waits for me"))
    await eventually(lambda: worker.pending == 2, "the abandoned text is queued")
    abandoned.cancel()
    embedder.gate.set()
    await busy
    # Passes run in order: once a later text is answered, a pass of the abandoned one is past.
    await asyncio.wait_for(worker.embed("a later question"), timeout=5)
    worker.close()
    assert embedder.batches == [["keeps the encoder busy"], ["a later question"]]


class ShortEmbedder(RecordingEmbedder):
    """An embedder that returns one row too few, as a broken plug-in might."""

    short = False

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows = super().encode(texts)
        return rows[:-1] if self.short else rows


async def test_an_encoder_returning_too_few_rows_fails_its_callers_not_the_worker() -> None:
    embedder = ShortEmbedder()
    worker = EmbeddingWorker(embedder)
    embedder.short = True
    with pytest.raises(RuntimeError, match="returned 0 rows for 1 texts"):
        await asyncio.wait_for(worker.embed("one question"), timeout=5)
    embedder.short = False
    assert (await asyncio.wait_for(worker.embed("fine"), timeout=5)).shape == (16,)
    worker.close()


async def test_a_request_arriving_within_the_max_wait_joins_the_same_pass() -> None:
    embedder = RecordingEmbedder()
    worker = EmbeddingWorker(embedder, BatchPolicy(max_wait_seconds=0.5))
    first = asyncio.ensure_future(worker.embed("the first question"))
    await asyncio.sleep(0.01)  # the encoder is free, but the worker waits for company
    second = asyncio.ensure_future(worker.embed("the second question"))
    await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    worker.close()
    assert embedder.batches == [["the first question", "the second question"]]


async def test_pending_counts_the_texts_in_the_encoder_and_those_queued_behind_it() -> None:
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    queued = [asyncio.ensure_future(worker.embed(f"queued question {i}")) for i in range(2)]
    await eventually(lambda: worker.pending == 3, "pending counts the pass and the two queued")
    embedder.gate.set()
    await asyncio.wait_for(asyncio.gather(busy, *queued), timeout=5)
    assert worker.pending == 0
    worker.close()


async def test_closing_cancels_the_callers_still_queued() -> None:
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    queued = asyncio.ensure_future(worker.embed("still waiting"))
    await eventually(lambda: worker.pending == 2, "the second text is queued")
    worker.close()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, timeout=5)
    finally:
        embedder.gate.set()
        busy.cancel()


async def test_an_error_in_one_bucket_leaves_the_other_buckets_of_that_drain_answered() -> None:
    embedder = RecordingEmbedder()
    embedder.fail_on = "boom"
    worker, busy = await held_in_a_pass(embedder)
    failing = asyncio.ensure_future(worker.embed("boom"))
    long = asyncio.ensure_future(worker.embed("a much longer question " * 10))
    await eventually(lambda: worker.pending == 3, "both texts are queued")
    embedder.gate.set()
    with pytest.raises(RuntimeError, match="encoder broke"):
        await asyncio.wait_for(failing, timeout=5)
    assert (await asyncio.wait_for(long, timeout=5)).shape == (16,)
    await busy
    worker.close()


async def one_leaving_a_pass_of_two(
    embedder: RecordingEmbedder,
) -> tuple[EmbeddingWorker, asyncio.Future[npt.NDArray[np.float32]]]:
    """A worker whose pass of "question one" and "question two" ends after the first caller
    gave up; returns the worker and the second caller, still waiting."""
    worker = EmbeddingWorker(embedder)
    embedder.gate.clear()
    leaving = asyncio.ensure_future(worker.embed("question one"))
    staying = asyncio.ensure_future(worker.embed("question two"))
    await eventually(lambda: embedder.entered == 1, "both are in the encoder's pass")
    leaving.cancel()
    embedder.gate.set()
    return worker, staying


async def test_a_caller_that_gives_up_during_its_pass_leaves_the_others_their_rows() -> None:
    worker, staying = await one_leaving_a_pass_of_two(RecordingEmbedder())
    expected = HashEmbedder(16).encode(["question two"])[0]
    assert np.allclose(await asyncio.wait_for(staying, timeout=5), expected)
    assert (await asyncio.wait_for(worker.embed("afterwards"), timeout=5)).shape == (16,)
    worker.close()


async def test_a_caller_that_gives_up_during_a_failing_pass_leaves_the_others_the_error() -> None:
    embedder = RecordingEmbedder()
    embedder.error = RuntimeError("encoder broke")
    worker, staying = await one_leaving_a_pass_of_two(embedder)
    with pytest.raises(RuntimeError, match="encoder broke"):
        await asyncio.wait_for(staying, timeout=5)
    embedder.error = None
    assert (await asyncio.wait_for(worker.embed("afterwards"), timeout=5)).shape == (16,)
    worker.close()


class SteppedEmbedder(RecordingEmbedder):
    """Each pass signals that it started and waits for its own step from the test."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Semaphore(0)
        self.steps = threading.Semaphore(0)

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.started.release()
        self.steps.acquire(timeout=5)
        return super().encode(texts)


async def test_a_caller_that_gives_up_while_an_earlier_bucket_runs_is_not_encoded() -> None:
    embedder = SteppedEmbedder()
    worker = EmbeddingWorker(embedder)
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    short = asyncio.ensure_future(worker.embed("short one"))
    abandoned = asyncio.ensure_future(worker.embed("a much longer question " * 10))
    await eventually(lambda: worker.pending == 3, "both texts are queued")
    embedder.steps.release()  # the busy pass ends; the short bucket goes in, the long one waits
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    abandoned.cancel()
    embedder.steps.release()
    await asyncio.wait_for(asyncio.gather(busy, short), timeout=5)
    embedder.steps.release()  # would let a pass of the abandoned text through
    embedder.steps.release()  # the later text's pass
    # Passes run in order: once a later text is answered, a pass of the abandoned one is past.
    await asyncio.wait_for(worker.embed("a later question"), timeout=5)
    worker.close()
    assert embedder.batches == [["keeps the encoder busy"], ["short one"], ["a later question"]]


async def test_pending_stops_counting_callers_that_gave_up_while_queued() -> None:
    # The gauge counted a caller cancelled in the queue until the pass ahead of it ended.
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    queued = [asyncio.ensure_future(worker.embed(f"queued question {i}")) for i in range(3)]
    await eventually(lambda: worker.pending == 4, "three texts queued behind the pass")
    for caller in queued:
        caller.cancel()
    await eventually(lambda: worker.pending == 1, "only the text in the encoder is counted")
    embedder.gate.set()
    await asyncio.wait_for(busy, timeout=5)
    assert worker.pending == 0
    worker.close()


def lengths_of(batches: list[list[str]]) -> list[list[int]]:
    return [[len(t) for t in batch] for batch in batches]


async def test_a_short_text_arriving_mid_drain_waits_one_pass_not_the_whole_drain() -> None:
    # A drain ran all its length buckets before looking at the queue again: a short question
    # arriving meanwhile waited behind every longer bucket of a drain it was no part of.
    embedder = SteppedEmbedder()
    worker = EmbeddingWorker(embedder)
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    drained = [asyncio.ensure_future(worker.embed("y" * n)) for n in (30, 60, 120)]
    await eventually(lambda: worker.pending == 4, "three texts of three buckets queued")
    embedder.steps.release()  # the busy pass ends; the drain's shortest bucket goes in
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    late = asyncio.ensure_future(worker.embed("a late question"))
    await eventually(lambda: worker.pending == 4, "the late text is queued")
    for _ in range(4):
        embedder.steps.release()
    await asyncio.wait_for(asyncio.gather(busy, late, *drained), timeout=5)
    worker.close()
    assert lengths_of(embedder.batches) == [[22], [30], [15], [60], [120]]


async def test_a_long_text_is_overtaken_by_later_shorter_texts_at_most_max_overtaken_times() -> (
    None
):
    embedder = SteppedEmbedder()
    worker = EmbeddingWorker(embedder, BatchPolicy(max_overtaken=2))
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    long = asyncio.ensure_future(worker.embed("z" * 200))
    callers = [busy, long]
    for n in range(4):  # a short text arrives during every pass
        await eventually(lambda: worker.pending == 2, "the long text waits")
        callers.append(asyncio.ensure_future(worker.embed(f"short {n}")))
        await eventually(lambda: worker.pending == 3, "a short text is queued")
        embedder.steps.release()
        await asyncio.to_thread(embedder.started.acquire, timeout=5)
    embedder.steps.release()
    embedder.steps.release()
    await asyncio.wait_for(asyncio.gather(*callers), timeout=5)
    worker.close()
    # short 0 came with the long text; shorts 1 and 2 overtake it; short 3 waits its turn.
    assert lengths_of(embedder.batches) == [[22], [7], [7], [7], [200], [7]]


def test_lengths_past_the_encoders_window_share_a_bucket() -> None:
    # The encoder cuts every text at its window: a 3,000- and a 30,000-character text run as
    # the same number of tokens and need not run as two passes.
    policy = BatchPolicy(max_batch=32, max_length_ratio=1.5, max_text_chars=2048)
    assert bucket_lengths((2100, 3000, 30000), policy) == [[2100, 3000, 30000]]


async def test_closing_cancels_the_callers_whose_texts_were_already_taken_from_the_queue() -> None:
    embedder = RecordingEmbedder()
    worker, busy = await held_in_a_pass(embedder)
    short = asyncio.ensure_future(worker.embed("short one"))
    long = asyncio.ensure_future(worker.embed("a much longer question " * 10))
    await eventually(lambda: worker.pending == 3, "both texts are queued")
    embedder.gate.set()  # the busy pass ends; the next drain takes both, the short bucket first
    embedder.gate.clear()
    await asyncio.wait_for(busy, timeout=5)
    await eventually(lambda: embedder.entered == 2, "the short bucket's pass is held")  # long waits
    worker.close()
    embedder.gate.set()
    for caller in (short, long):  # in no queue, but they must not wait forever
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, timeout=5)


def test_the_worker_built_from_settings_takes_embed_max_wait_ms_in_seconds() -> None:
    settings = load_settings(cache={"embed_max_batch": 7, "embed_max_wait_ms": 50})
    worker = build_embedding_worker(settings, HashEmbedder())
    try:
        assert worker.policy == BatchPolicy(max_batch=7, max_wait_seconds=0.05)
    finally:
        worker.close()


async def test_closing_ends_the_encoder_thread() -> None:
    before = set(threading.enumerate())
    worker = EmbeddingWorker(HashEmbedder())
    await worker.embed("starts the thread")
    [thread] = [t for t in threading.enumerate() if t not in before and t.name.startswith("embed")]
    worker.close()
    thread.join(timeout=5)  # an idle pool thread left running would wait here for good
    assert not thread.is_alive()


async def test_pending_counts_every_text_of_a_pass_of_several() -> None:
    embedder = SteppedEmbedder()
    worker = EmbeddingWorker(embedder)
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    pair = [asyncio.ensure_future(worker.embed(f"queued question {i}")) for i in range(2)]
    await eventually(lambda: worker.pending == 3, "both texts are queued")
    embedder.steps.release()  # the busy pass ends; the two queued texts go in together
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    assert worker.pending == 2
    embedder.steps.release()
    await asyncio.wait_for(asyncio.gather(busy, *pair), timeout=5)
    worker.close()


async def test_pending_counts_the_texts_taken_from_the_queue_that_wait_in_a_later_bucket() -> None:
    # A drain empties the queue; a long text waits for its own bucket's pass after the short
    # one's, and was counted nowhere meanwhile: the gauge read low under mixed lengths.
    embedder = SteppedEmbedder()
    worker = EmbeddingWorker(embedder)
    busy = asyncio.ensure_future(worker.embed("keeps the encoder busy"))
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    texts = ["short one", "a much longer question " * 10]
    callers = [asyncio.ensure_future(worker.embed(text)) for text in texts]
    await eventually(lambda: worker.pending == 3, "both texts are queued")
    embedder.steps.release()  # the busy pass ends; the short bucket goes in, the long one waits
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    assert worker.pending == 2
    embedder.steps.release()
    await asyncio.to_thread(embedder.started.acquire, timeout=5)
    assert worker.pending == 1
    embedder.steps.release()
    await asyncio.wait_for(asyncio.gather(busy, *callers), timeout=5)
    assert worker.pending == 0
    worker.close()


@pytest.mark.parametrize("loop_runs_between", [True, False], ids=["a tick later", "same tick"])
async def test_a_text_sent_after_closing_fails_at_once_instead_of_waiting_for_good(
    loop_runs_between: bool,
) -> None:
    # Sent in the tick of close(), a text was queued for the cancelled dispatcher that had not
    # stopped yet: it woke nothing, and its caller waited for good.
    worker = EmbeddingWorker(HashEmbedder())
    await worker.embed("starts the dispatcher")
    worker.close()
    if loop_runs_between:
        await asyncio.sleep(0)  # the cancelled dispatcher finishes
    # asyncio.timeout, not wait_for: wait_for runs the call in a task of its own, a tick later.
    with pytest.raises(RuntimeError, match="embedding worker is closed"):
        async with asyncio.timeout(5):  # a regression fails here instead of hanging
            await worker.embed("too late")
    assert worker.pending == 0


async def test_closing_before_the_dispatcher_ever_ran_cancels_the_texts_queued() -> None:
    worker = EmbeddingWorker(HashEmbedder())
    queued = [asyncio.ensure_future(worker.embed(f"question {i}")) for i in range(2)]
    await asyncio.sleep(0)  # queued; the dispatcher is made but has not run yet
    worker.close()
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(worker.embed("too late"), timeout=5)

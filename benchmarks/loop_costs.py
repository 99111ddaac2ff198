"""Synchronous work a request does on the event loop: a FAISS search on the loop thread after
start_service's off-loop build, the exact key of a long prompt (and how often a miss makes
it), and the classifier's text features of a long prompt.

    python -m benchmarks.loop_costs

Each number is the fastest of a few runs (the least disturbed by other work on the machine),
but the FAISS search's, a mean of 500.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import faiss
import numpy as np

from routecache.cache import scope
from routecache.classifier.features import text_features
from routecache.domain import ChatRequest, Message, Role
from routecache.replay.recordings import Recordings
from routecache.router.bootstrap import build_vector_index
from routecache.router.settings import embedded_settings
from tests.unit.conftest import KEYS, make_harness

CHARS = 31_000


def fastest_ms(work: Callable[[], object], runs: int = 7, each: int = 20) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(each):
            work()
        best = min(best, (time.perf_counter() - start) / each)
    return best * 1000


def long_prompts(count: int) -> list[str]:
    """Recorded prompts joined to ~31k characters, each ending non-ASCII (the slower key)."""
    recorded, rng = list(Recordings.load().prompts()), random.Random(1)
    return [" ".join(rng.choice(recorded) for _ in range(200))[:CHARS] + " — café"
            for _ in range(count)]  # fmt: skip


async def faiss_on_the_loop() -> None:
    settings = embedded_settings()
    index = await asyncio.to_thread(build_vector_index, settings, 384)  # as start_service
    rows = np.random.default_rng(0).standard_normal((4_900, 384)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    index.add_many("s", [f"e{i}" for i in range(len(rows))], rows)
    # The mean of many, not the fastest: OpenMP's cost is the wake-up and the contention with
    # the rest of the machine's work, which the fastest run leaves out.
    ms = fastest_ms(lambda: index.search("s", rows[0], 4), runs=1, each=500)
    print(f"FAISS flat search, one scope of 4,900 (384-d), on the loop thread: {ms:.2f} ms; "
          f"OpenMP threads there: {faiss.omp_get_max_threads()} "
          f"(cache.faiss_threads = {settings.cache.faiss_threads})")  # fmt: skip


async def keys_per_miss(prompts: list[str]) -> None:
    made: list[float] = []
    normalise = scope.normalise_prompt

    def timed(text: str) -> str:
        start = time.perf_counter()
        try:
            return normalise(text)
        finally:
            made.append(time.perf_counter() - start)

    scope.normalise_prompt = timed
    harness = make_harness(service={"limits": {"max_message_chars": 32_000}})
    harness.cheap.answer = lambda prompt, params: "A short answer."
    try:
        for i, prompt in enumerate(prompts):  # a scope each: misses, never semantic hits
            messages = (Message(Role.SYSTEM, f"scope {i}"), Message(Role.USER, prompt))
            await harness.service.pipeline.complete(ChatRequest(messages=messages), KEYS["acme"])
    finally:
        scope.normalise_prompt = normalise
        await harness.service.aclose()
    print(f"exact key of a {CHARS:,}-char non-ASCII prompt: "
          f"{fastest_ms(lambda: scope.exact_key('acme:s', prompts[0]), each=5):.2f} ms; "
          f"made {len(made) / len(prompts):.1f} times a miss "
          f"({sum(made) / len(prompts) * 1000:.1f} ms a miss)")  # fmt: skip


def features(prompt: str) -> None:
    plain = prompt.encode("ascii", "ignore").decode()
    ascii_ms = fastest_ms(lambda: text_features(plain), runs=15, each=3)
    other_ms = fastest_ms(lambda: text_features(prompt), runs=15, each=3)
    print(f"text_features of a {CHARS:,}-char prompt: ASCII {ascii_ms:.2f} ms, "
          f"non-ASCII {other_ms:.2f} ms")  # fmt: skip


async def main() -> None:
    await faiss_on_the_loop()
    prompts = long_prompts(10)
    await keys_per_miss(prompts)
    features(prompts[0])


if __name__ == "__main__":
    asyncio.run(main())

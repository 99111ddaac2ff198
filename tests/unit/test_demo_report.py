"""The demo's summary: its all-strong baseline for answers that cost nothing (cache hits)."""

from __future__ import annotations

import pytest

from routecache.client import chat_request
from routecache.router.demo_report import DemoResult, prompt_chars, summarise
from routecache.v1 import routecache_pb2 as pb

STRONG_IN, STRONG_OUT = 10.0, 30.0  # USD per million tokens, the demo's strong model


def _exact_hit(prompt: str, answer: str) -> DemoResult:
    response = pb.CompleteResponse(
        text=answer,
        cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_EXACT),
        usage=pb.Usage(),  # a hit reports 0 tokens and 0 USD
    )
    return DemoResult(
        "acme", "exact-repeat", "OK", 1.0, response, prompt_chars(chat_request(prompt))
    )


def test_prompt_chars_counts_every_message_sent() -> None:
    request = chat_request("four", system="sys", history=[("user", "ab"), ("assistant", "c")])

    assert prompt_chars(request) == len("four") + len("sys") + len("ab") + len("c")


def test_all_strong_baseline_of_a_hit_estimates_prompt_tokens_from_the_prompt() -> None:
    # A long question with a short answer: the answer's length says nothing about the prompt.
    result = _exact_hit("q" * 400, "a" * 8)

    text = summarise([result], 1.0, STRONG_IN, STRONG_OUT)

    baseline = (100 * STRONG_IN + 2 * STRONG_OUT) / 1e6  # 400 / 4 prompt, 8 / 4 completion
    assert f"vs {baseline:.4f} USD all-strong" in text
    assert baseline == pytest.approx(0.00106)

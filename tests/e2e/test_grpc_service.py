import json

import grpc
import pytest

from routecache.client import chat_request
from routecache.v1 import routecache_pb2 as pb
from tests.e2e.conftest import Stack

# The stack fixture lives on the package loop; tests must run on that same loop.
pytestmark = pytest.mark.asyncio(loop_scope="package")

# A paraphrase the verifier accepts at the default false-hit budget (0.01); it is strict there:
# "At sea level, what temperature does water boil at?" for the sea-level question is refused.
PROMPT = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


async def test_answer_then_exact_then_semantic_hit_then_other_tenant_miss(stack: Stack) -> None:
    async with stack.client() as acme, stack.client("globex") as globex:
        first = await acme.complete(chat_request(PROMPT))
        assert first.text and first.cache.outcome == pb.CACHE_OUTCOME_MISS
        assert first.tier in (pb.TIER_CHEAP, pb.TIER_STRONG) and first.usage.cost_usd > 0
        assert first.HasField("difficulty") and first.classifier_version

        again = await acme.complete(chat_request(PROMPT))
        assert again.cache.outcome == pb.CACHE_OUTCOME_EXACT and again.text == first.text
        assert again.usage.saved_usd == pytest.approx(first.usage.cost_usd)

        reworded = await acme.complete(chat_request(PARAPHRASE))
        assert reworded.cache.outcome == pb.CACHE_OUTCOME_SEMANTIC
        assert 0.9 <= reworded.cache.similarity < 1.0
        assert reworded.cache.entry_id == first.cache.entry_id
        assert reworded.cache.HasField("verifier_score") and reworded.cache.verifier_score > 0.5
        assert not again.cache.HasField("verifier_score")  # exact hits need no verifier

        other = await globex.complete(chat_request(PROMPT))
        assert other.cache.outcome == pb.CACHE_OUTCOME_MISS


async def test_recorded_gsm8k_answer_comes_back(stack: Stack) -> None:
    prompt = next(iter(stack.replay.recordings.prompts()))
    async with stack.client("globex") as client:
        done = await client.complete(chat_request(prompt, force_tier="strong", no_cache=True))
    assert done.text == stack.replay.recordings.answer("strong", prompt)
    assert done.model == "gpt-4-1106-preview" and done.tier == pb.TIER_STRONG


async def test_json_schema_request_is_validated(stack: Stack) -> None:
    schema = json.dumps({"type": "object", "required": ["answer"]})
    async with stack.client() as client:
        done = await client.complete(chat_request("Name a primary colour.", json_schema=schema))
    assert "answer" in json.loads(done.text)
    assert done.validation.passed
    assert any(r.name == "json_schema" for r in done.validation.results)


async def test_stream_sends_deltas_then_final_metadata(stack: Stack) -> None:
    async with stack.client() as client:
        events = [
            e async for e in client.complete_stream(chat_request("Explain rainbows briefly."))
        ]
    assert events[-1].HasField("final")
    text = "".join(e.delta for e in events[:-1])
    assert text == events[-1].final.text and len(events) >= 2


async def test_empty_messages_is_invalid_argument_naming_the_field(stack: Stack) -> None:
    async with stack.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(pb.CompleteRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in (error.value.details() or "")
    assert ("field", "messages") in tuple(error.value.trailing_metadata() or ())


async def test_wrong_key_is_unauthenticated(stack: Stack) -> None:
    async with stack.client(api_key="not-a-key") as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(chat_request("hello"))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_invalidate_without_a_target_is_refused_and_removes_nothing(stack: Stack) -> None:
    async with stack.client("globex") as client:
        await client.complete(chat_request("Is a walnut a nut?"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.invalidate()
        hit = await client.complete(chat_request("Is a walnut a nut?"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hit.cache.outcome == pb.CACHE_OUTCOME_EXACT


async def test_health_feedback_invalidate_and_stats(stack: Stack) -> None:
    async with stack.client("globex") as client:
        assert await client.health() == "SERVING"
        assert await client.health("routecache.v1.RouteCache") == "SERVING"
        await client.complete(chat_request("Is a tomato a fruit?", tags=["produce"]))
        hit = await client.complete(chat_request("Is a tomato a fruit?"))
        assert hit.cache.outcome == pb.CACHE_OUTCOME_EXACT
        feedback = await client.feedback(hit.response_id, thumbs_up=False)
        assert feedback.recorded and feedback.invalidated_entry_id == hit.cache.entry_id
        await client.complete(chat_request("Is a cucumber a fruit?", tags=["produce"]))
        assert await client.invalidate(tag="produce") == 1
        stats = await client.stats()
    assert stats.tenant == "globex" and stats.exact_hits >= 1 and stats.requests >= 3


async def test_the_verifier_refuses_a_close_question_that_asks_something_else(stack: Stack) -> None:
    stored = "What is the boiling point of water at sea level in Celsius?"
    other = "What is the boiling point of water at sea level in Fahrenheit?"
    async with stack.client() as client:
        await client.complete(chat_request(stored))
        near_miss = await client.complete(chat_request(other))
    assert near_miss.cache.outcome == pb.CACHE_OUTCOME_MISS


async def test_repeats_under_different_earlier_turns_do_not_hit_each_other(stack: Stack) -> None:
    follow_up = "And what is its population?"
    france = [("user", "What is the capital of France?"), ("assistant", "Paris.")]
    japan = [("user", "What is the capital of Japan?"), ("assistant", "Tokyo.")]
    async with stack.client() as client:
        first = await client.complete(chat_request(follow_up, history=france))
        other_conversation = await client.complete(chat_request(follow_up, history=japan))
        same_conversation = await client.complete(chat_request(follow_up, history=france))
    assert first.cache.outcome == pb.CACHE_OUTCOME_MISS
    assert other_conversation.cache.outcome == pb.CACHE_OUTCOME_MISS
    assert same_conversation.cache.outcome == pb.CACHE_OUTCOME_EXACT

"""Every injected upstream fault over real HTTP (two replay servers as two providers), through
the whole pipeline: the documented outcome, within the caller's deadline, nothing bad stored.

The outcomes are the table of docs/failure-semantics.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.domain import CacheOutcome, ChatRequest, Completion, Message, Role, Tier
from routecache.errors import FailedValidation, Unavailable
from routecache.replay import FaultKind, Recordings, ReplayConfig, start_replay_server
from routecache.replay.server import RunningReplayServer
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, build_service
from routecache.router.events import InMemoryEventLog
from routecache.router.settings import load_settings
from routecache.router.upstream.breaker import BreakerState
from tests.fakes import ManualClock

pytestmark = pytest.mark.integration

KEY = "it-key"
WEAK, STRONG = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
DEADLINE = 4.0  # seconds the caller gives each request
PRICES = {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}


@dataclass
class Rig:
    primary: RunningReplayServer
    backup: RunningReplayServer
    service: Service
    events: InMemoryEventLog
    clock: ManualClock

    async def ask(self, prompt: str, stream: bool = False) -> Completion:
        request = ChatRequest(messages=(Message(Role.USER, prompt),))
        pipeline = self.service.pipeline
        if not stream:
            call = pipeline.complete(request, KEY, DEADLINE)
            # The bound is the behaviour under test: an answer or an error, never a hang.
            return await asyncio.wait_for(call, DEADLINE + 1)
        return await asyncio.wait_for(self._streamed(request), DEADLINE + 1)

    async def _streamed(self, request: ChatRequest) -> Completion:
        deltas: list[str] = []
        async for event in self.service.pipeline.complete_stream(request, KEY, DEADLINE):
            if isinstance(event, Completion):
                assert "".join(deltas) == event.text
                return event
            deltas.append(event)
        raise AssertionError("the stream ended without a final message")

    async def entries(self) -> int:
        return (await self.service.pipeline.admin.stats(KEY)).entries


@pytest.fixture(scope="module")
def recordings() -> Recordings:
    return Recordings.load()


@pytest.fixture
async def rig(recordings: Recordings, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """Indirectly parametrized: a dict of ReplayConfig fields for the primary server."""
    config = ReplayConfig(hang_seconds=10.0)
    primary_config = dataclasses.replace(config, **getattr(request, "param", {}))
    primary = await start_replay_server(primary_config, recordings=recordings)
    backup = await start_replay_server(config, recordings=recordings)
    provider = {"timeout_seconds": 1.0, "read_timeout_seconds": 1.0, **PRICES}
    settings = load_settings(
        cache={"embedder": "hash"},
        tenants=[{"name": "acme", "api_key_sha256": [hash_api_key(KEY)]}],
        upstream={
            "cheap": {"base_url": primary.base_url, "model": WEAK, **provider},
            "strong": {"base_url": primary.base_url, "model": STRONG, **provider},
            "providers": {"backup": {"base_url": backup.base_url, "model": WEAK, **provider}},
            "cheap_fallbacks": ["backup"],
            "retry": {"max_attempts": 2, "backoff_initial_seconds": 0.01,
                      "backoff_max_seconds": 0.05},
            "breaker": {"failure_threshold": 3, "open_seconds": 60},
        },
    )  # fmt: skip
    clock, events = ManualClock(), InMemoryEventLog()
    service = build_service(
        settings,
        Overrides(
            embedder=HashEmbedder(),
            classifier=FixedScoreClassifier(0.1, version="v", default_threshold=0.5),
            events=events,
            clock=clock,
        ),
    )
    yield Rig(primary, backup, service, events, clock)
    await service.aclose()
    await primary.close()
    await backup.close()


def prompt_of(recordings: Recordings, index: int) -> str:
    return list(recordings.prompts())[index]


RETRIED_FAULTS = [
    FaultKind.HTTP_429,
    FaultKind.HTTP_500,
    FaultKind.HTTP_503,
    FaultKind.TIMEOUT,
    FaultKind.MALFORMED_JSON,
    FaultKind.TRUNCATED_STREAM,  # without streaming: a body cut short
]


@pytest.mark.parametrize("fault", RETRIED_FAULTS)
async def test_one_fault_is_retried_then_answered(
    rig: Rig, recordings: Recordings, fault: FaultKind
) -> None:
    rig.primary.script_faults(fault)
    done = await rig.ask(prompt_of(recordings, 0))
    assert done.provider == "cheap" and done.model == WEAK
    assert done.text == recordings.answer("weak", prompt_of(recordings, 0))
    assert rig.primary.chat_requests == 2 and rig.backup.chat_requests == 0
    assert rig.primary.injected_faults[fault] == 1
    assert done.cache.entry_id and await rig.entries() == 1


@pytest.mark.parametrize("fault", RETRIED_FAULTS)
async def test_a_persistent_fault_falls_back_to_the_next_provider(
    rig: Rig, recordings: Recordings, fault: FaultKind
) -> None:
    rig.primary.script_faults(fault, fault)  # both attempts
    done = await rig.ask(prompt_of(recordings, 1))
    assert done.provider == "backup" and rig.backup.chat_requests == 1
    assert len(done.upstream_failures) == 1
    assert done.upstream_failures[0].startswith(f"cheap ({WEAK}): upstream model")
    assert await rig.entries() == 1


@pytest.mark.parametrize("rig", [{"retry_after_seconds": 5}], indirect=True)
async def test_a_429_asking_a_pause_past_the_deadline_falls_back_at_once(
    rig: Rig, recordings: Recordings
) -> None:
    # Before: the client retried after its short backoff, ignoring the Retry-After. Sleeping
    # the 5 s would have run past the 4 s deadline, leaving the backup "not tried".
    rig.primary.script_faults(FaultKind.HTTP_429, FaultKind.HTTP_429)
    done = await rig.ask(prompt_of(recordings, 7))
    assert done.provider == "backup" and rig.primary.chat_requests == 1
    assert "(retry after 5s)" in done.upstream_failures[0]


async def test_an_empty_answer_escalates_to_the_strong_model(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(FaultKind.EMPTY_ANSWER)
    done = await rig.ask(prompt_of(recordings, 2))
    assert done.tier is Tier.STRONG and done.model == STRONG and done.validation.escalated
    failed = [r for r in done.validation.results if not r.passed]
    assert [(r.name, r.message, r.action) for r in failed] == [
        ("length", "empty answer", "escalated")
    ]
    assert await rig.entries() == 1


async def test_empty_answers_everywhere_fail_validation_and_store_nothing(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(FaultKind.EMPTY_ANSWER, FaultKind.EMPTY_ANSWER)
    with pytest.raises(FailedValidation, match="empty answer"):
        await rig.ask(prompt_of(recordings, 3))
    assert await rig.entries() == 0
    assert rig.events.events[-1]["kind"] == "error"


async def test_all_providers_down_serves_the_stale_answer(rig: Rig, recordings: Recordings) -> None:
    prompt = prompt_of(recordings, 4)
    first = await rig.ask(prompt)
    rig.clock.advance(7 * 24 * 3600 + 60)  # the entry expired
    rig.primary.script_faults(*[FaultKind.HTTP_503] * 4)  # cheap x2, strong x2
    rig.backup.script_faults(FaultKind.HTTP_500, FaultKind.HTTP_500)
    stale = await rig.ask(prompt)
    assert stale.cache.stale and stale.text == first.text
    assert "no provider answered" in stale.upstream_failures[0]
    assert rig.events.events[-1]["stale"] is True


async def test_all_providers_down_without_a_cached_answer_is_unavailable(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(*[FaultKind.HTTP_503] * 4)
    rig.backup.script_faults(FaultKind.HTTP_429, FaultKind.HTTP_429)
    with pytest.raises(Unavailable) as caught:
        await rig.ask(prompt_of(recordings, 5))
    message = str(caught.value)
    for what in ("cheap (mixtral", "HTTP 503", "backup (mixtral", "HTTP 429", "strong (gpt-4"):
        assert what in message
    assert "no cached answer" in message
    assert await rig.entries() == 0


async def test_hanging_providers_end_unavailable_within_the_deadline(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(*[FaultKind.TIMEOUT] * 4)
    rig.backup.script_faults(FaultKind.TIMEOUT, FaultKind.TIMEOUT)
    with pytest.raises(Unavailable, match=r"timed out|within|deadline"):
        await rig.ask(prompt_of(recordings, 6))  # ask() bounds it by the deadline
    assert await rig.entries() == 0


async def test_open_breaker_sheds_calls_without_reaching_the_provider(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(*[FaultKind.HTTP_503] * 6)  # cheap fails 3 calls x 2 attempts
    for index in range(3):
        done = await rig.ask(prompt_of(recordings, 10 + index))
        assert done.provider == "backup"
    breaker = rig.service.generator.failover.chain(Tier.CHEAP)[0][1].breaker
    assert breaker.state is BreakerState.OPEN
    seen = rig.primary.chat_requests
    done = await rig.ask(prompt_of(recordings, 13))
    assert rig.primary.chat_requests == seen  # shed: never sent
    assert done.provider == "backup" and "circuit open" in done.upstream_failures[0]


# --- CompleteStream over SSE ------------------------------------------------------------------


async def test_stream_passes_deltas_through_and_caches_the_valid_answer(
    rig: Rig, recordings: Recordings
) -> None:
    prompt = prompt_of(recordings, 20)
    done = await rig.ask(prompt, stream=True)
    assert done.text == recordings.answer("weak", prompt) and done.validation.passed
    assert done.cache.entry_id and await rig.entries() == 1


@pytest.mark.parametrize("fault", [FaultKind.HTTP_503, FaultKind.MALFORMED_JSON])
async def test_stream_fault_before_the_first_delta_is_retried(
    rig: Rig, recordings: Recordings, fault: FaultKind
) -> None:
    rig.primary.script_faults(fault)
    done = await rig.ask(prompt_of(recordings, 21), stream=True)
    assert done.provider == "cheap" and rig.primary.chat_requests == 2


async def test_truncated_stream_ends_unavailable_and_stores_nothing(
    rig: Rig, recordings: Recordings
) -> None:
    rig.primary.script_faults(FaultKind.TRUNCATED_STREAM)
    with pytest.raises(Unavailable, match=r"stream broke after .* without finish_reason"):
        await rig.ask(prompt_of(recordings, 22), stream=True)
    assert await rig.entries() == 0


async def test_stream_with_all_providers_down_serves_the_stale_answer(
    rig: Rig, recordings: Recordings
) -> None:
    prompt = prompt_of(recordings, 23)
    await rig.ask(prompt)
    rig.clock.advance(7 * 24 * 3600 + 60)
    rig.primary.script_faults(*[FaultKind.HTTP_500] * 4)
    rig.backup.script_faults(FaultKind.HTTP_500, FaultKind.HTTP_500)
    done = await rig.ask(prompt, stream=True)
    assert done.cache.stale and done.cache.outcome is CacheOutcome.EXACT

"""Test doubles for the ports: small, real implementations with no I/O."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routecache.cache.embedder import HashEmbedder
from routecache.domain import Completion, GenerationParams, Message
from routecache.errors import UpstreamError
from routecache.router.budget import SpendRecord
from routecache.router.keyring import KeyAdmin, KeyRecord
from routecache.router.pipeline import Pipeline
from routecache.router.ports import UpstreamReply
from routecache.router.single_flight import SingleFlight
from routecache.router.telemetry import path_of


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10.0
) -> None:
    """Waits for a condition a background task or thread brings about; fails after `within`
    seconds. Returns as soon as it holds, so a generous `within` costs nothing when all is well
    and only a loaded host's slow task is waited for, instead of a fixed sleep racing it."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.005)


class CountingSingleFlight(SingleFlight[Any]):
    """A SingleFlight that records the key of each caller as it arrives. A caller that arrives
    while an earlier caller's call is held (its upstream gated) waits to share that call."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[str] = []

    async def run(self, key: str, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
        self.arrived.append(key)
        return await super().run(key, *args, **kwargs)


def count_shared_calls(pipeline: Pipeline) -> CountingSingleFlight:
    """Puts a CountingSingleFlight in the pipeline, so a test can wait for a request to reach
    the shared call instead of sleeping while it is embedded on a worker thread."""
    flight = CountingSingleFlight()
    pipeline._single_flight = flight
    return flight


class PartlySeenEmbedder(HashEmbedder):
    """The hash embedder saying which texts it sees whole: it drops the emoji of `UNSEEN`, as
    MiniLM reads them as [UNK], so prompts differing only in them get the same vector."""

    UNSEEN = "😀😡"

    def sees_whole(self, text: str) -> bool:
        return not any(char in self.UNSEEN for char in text)


class ManualClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeUpstream:
    """Answers `answer(prompt)` and records every call; `fail_with` makes every call fail."""

    model_id: str
    answer: Callable[[str, GenerationParams], str] = lambda prompt, params: f"answer to {prompt}"
    fail_with: UpstreamError | None = None
    gate: asyncio.Event | None = None  # when set, calls wait for it: holds calls in flight
    calls: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.model_id

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        prompt = messages[-1].content
        self.calls.append(prompt)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        text = self.answer(prompt, params)
        return UpstreamReply(text, self.model_id, len(prompt) // 4 + 1, len(text) // 4 + 1)

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> AsyncIterator[str]:
        reply = await self.complete(messages, params)
        for word in reply.text.split(" "):
            yield word + " "

    async def aclose(self) -> None:
        pass


def cut_stream_after_two_deltas(upstream: FakeUpstream) -> None:
    """`upstream` streams two deltas, then waits until cancelled (a shutdown cutting the
    call); its close takes a few loop turns, as an HTTP response's does."""

    async def stream(messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[str]:
        try:
            yield "one "
            yield "two "
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)

    setattr(upstream, "stream", stream)  # noqa: B010  # a method, replaced


def json_answer(prompt: str, params: GenerationParams) -> str:
    """A model that follows JSON mode when asked."""
    if params.response_format.wants_json:
        return json.dumps({"answer": prompt})
    return f"answer to {prompt}"


def prose_answer(prompt: str, params: GenerationParams) -> str:
    """A model that ignores JSON mode: its JSON-mode answers fail validation."""
    return f"answer to {prompt}"


@dataclass
class RecordingTelemetry:
    """The telemetry port's fake: keeps every report, reads watched gauges on demand."""

    started: int = 0
    ended: int = 0
    completed: list[tuple[str, str]] = field(default_factory=list)  # (tenant, path)
    failed: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    upstream: list[tuple[str, str | None]] = field(default_factory=list)
    feedback_seen: list[tuple[str, bool, bool]] = field(default_factory=list)
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    budget_alerts: list[tuple[str, str]] = field(default_factory=list)  # (tenant, period)
    cost_controls: list[tuple[str, str]] = field(default_factory=list)  # (tenant, outcome)
    spending: list[tuple[str, str, float]] = field(default_factory=list)  # (tenant, tier, USD)
    escalations: list[str] = field(default_factory=list)  # tenants

    def request_started(self) -> None:
        self.started += 1

    def request_ended(self) -> None:
        self.ended += 1

    def request_completed(self, tenant: str, completion: Completion, seconds: float,
                          failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.completed.append((tenant, path_of(completion).value))

    def escalated(self, tenant: str) -> None:
        self.escalations.append(tenant)

    def request_failed(self, tenant: str, reason: str, seconds: float,
                       failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.failed.append((tenant, reason, failed_validators))

    def admin_call_failed(self, tenant: str, reason: str) -> None:
        self.failed.append((tenant, reason, ()))

    def upstream_call(self, model: str, seconds: float, error: str | None) -> None:
        self.upstream.append((model, error))

    def feedback(self, tenant: str, thumbs_up: bool, invalidated: bool) -> None:
        self.feedback_seen.append((tenant, thumbs_up, invalidated))

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        self.gauges[f"queue:{name}"] = depth

    def watch_breaker(self, provider: str, state: Callable[[], float]) -> None:
        self.gauges[f"breaker:{provider}"] = state

    def watch_dependency(self, name: str, up: Callable[[], bool]) -> None:
        self.gauges[f"dependency:{name}"] = lambda: float(up())

    def watch_count(self, name: str, count: Callable[[], float]) -> None:
        self.gauges[f"count:{name}"] = count

    def budget_alert(self, tenant: str, period: str) -> None:
        self.budget_alerts.append((tenant, period))

    def cost_control(self, tenant: str, outcome: str) -> None:
        self.cost_controls.append((tenant, outcome))

    def spent(self, tenant: str, tier: str, record: SpendRecord) -> None:
        self.spending.append((tenant, tier, record.cost_usd))


class RacedAfterFirstRead:
    """A key admin that another admin races: right after this one first reads the records,
    `race` runs (another admin revokes a key, say, or deletes it by hand). Everything else
    goes to `admin`."""

    def __init__(self, admin: KeyAdmin, race: Callable[[], Awaitable[object]]) -> None:
        self._admin = admin
        self._race: Callable[[], Awaitable[object]] | None = race

    async def records(self) -> list[KeyRecord]:
        found = await self._admin.records()
        if self._race is not None:
            race, self._race = self._race, None
            await race()
        return found

    async def put(self, record: KeyRecord) -> None:
        await self._admin.put(record)

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        also_put: KeyRecord | None = None,
    ) -> KeyRecord:
        return await self._admin.update(key_id, change, also_put=also_put)

    def __getattr__(self, name: str) -> object:
        return getattr(self._admin, name)

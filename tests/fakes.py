"""Test doubles for the ports: small, real implementations with no I/O."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from routecache.domain import GenerationParams, Message
from routecache.errors import UpstreamError
from routecache.router.ports import UpstreamReply


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


def json_answer(prompt: str, params: GenerationParams) -> str:
    """A model that follows JSON mode when asked."""
    if params.response_format.wants_json:
        return json.dumps({"answer": prompt})
    return f"answer to {prompt}"


def prose_answer(prompt: str, params: GenerationParams) -> str:
    """A model that ignores JSON mode: its JSON-mode answers fail validation."""
    return f"answer to {prompt}"

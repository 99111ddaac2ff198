"""The service's outward ports: model providers, validators, limits and the event log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from routecache.domain import ChatRequest, GenerationParams, Message, ValidatorResult
from routecache.router.budget import SpendLedger

__all__ = ["SpendLedger"]  # its home is router/budget.py; re-exported for older imports


@dataclass(frozen=True)
class UpstreamReply:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class ChatUpstream(Protocol):
    """One model behind an OpenAI-compatible chat-completions endpoint."""

    @property
    def model(self) -> str: ...

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        """Raises routecache.errors.UpstreamError when the call fails."""
        ...

    def stream(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[str]:
        """Yields text deltas as the provider sends them."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Pricing:
    input_usd_per_mtok: float
    output_usd_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_usd_per_mtok + completion_tokens * self.output_usd_per_mtok
        ) / 1e6


class Validator(Protocol):
    """Checks one answer; a failing cheap answer is escalated to the strong model."""

    @property
    def name(self) -> str: ...

    def applies_to(self, request: ChatRequest) -> bool: ...

    def check(self, text: str, request: ChatRequest) -> ValidatorResult: ...


class EventSink(Protocol):
    """The event log that analysis, feedback and retraining read."""

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None: ...

"""Getting a validated answer from the models: call the tier, check, escalate cheap → strong."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from routecache.domain import ChatRequest, Tier, ValidationReport, ValidatorResult
from routecache.errors import FailedValidation, Unavailable, UpstreamError
from routecache.router.ports import ChatUpstream, Pricing, UpstreamReply, Validator


@dataclass(frozen=True)
class Provider:
    upstream: ChatUpstream
    pricing: Pricing


@dataclass(frozen=True)
class Generated:
    """A validated answer and what producing it cost (every call, escalations included)."""

    text: str
    model: str
    tier: Tier
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    report: ValidationReport
    upstream_ms: float
    validate_ms: float
    calls: int


class Generator:
    def __init__(self, providers: Mapping[Tier, Provider], validators: Sequence[Validator]) -> None:
        missing = [tier.value for tier in Tier if tier not in providers]
        if missing:
            raise ValueError(f"no provider for tier(s): {', '.join(missing)}")
        self._providers = providers
        self._validators = validators

    async def generate(self, request: ChatRequest, tier: Tier) -> Generated:
        """Raises FailedValidation when no model's answer passes, Unavailable when none answers."""
        results: list[ValidatorResult] = []
        cost = upstream_ms = validate_ms = 0.0
        prompt_tokens = completion_tokens = 0
        tiers = [tier, Tier.STRONG] if tier is Tier.CHEAP else [tier]
        for calls, attempt_tier in enumerate(tiers, start=1):
            provider = self._providers[attempt_tier]
            started = time.perf_counter()
            reply = await self._call(provider, request)
            upstream_ms += (time.perf_counter() - started) * 1000
            cost += provider.pricing.cost(reply.prompt_tokens, reply.completion_tokens)
            prompt_tokens += reply.prompt_tokens
            completion_tokens += reply.completion_tokens
            started = time.perf_counter()
            checks = self.check(reply.text, reply.model, request)
            validate_ms += (time.perf_counter() - started) * 1000
            results.extend(checks)
            if all(r.passed for r in checks):
                report = ValidationReport(tuple(results), escalated=attempt_tier is not tier)
                return Generated(
                    reply.text, reply.model, attempt_tier, prompt_tokens, completion_tokens,
                    cost, report, upstream_ms, validate_ms, calls,
                )  # fmt: skip
        report = ValidationReport(tuple(results), escalated=len(tiers) > 1, passed=False)
        failed = "; ".join(f"{r.model}: {r.name}: {r.message}" for r in results if not r.passed)
        raise FailedValidation(f"no answer passed validation ({failed})", report)

    def check(self, text: str, model: str, request: ChatRequest) -> list[ValidatorResult]:
        return [
            ValidatorResult(r.name, r.passed, r.message, model)
            for r in (v.check(text, request) for v in self._validators if v.applies_to(request))
        ]

    @staticmethod
    async def _call(provider: Provider, request: ChatRequest) -> UpstreamReply:
        try:
            return await provider.upstream.complete(request.messages, request.params)
        except UpstreamError as exc:
            raise Unavailable(f"model {provider.upstream.model} failed: {exc}") from exc

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.upstream.aclose()

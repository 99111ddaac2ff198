"""Getting a validated answer from the models: call a tier through its failover chain, run the
tenant's validators, and act on failures (escalate cheap → strong, retry, redact, flag, block)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from routecache.domain import ChatRequest, Tier, ValidationReport, ValidatorResult
from routecache.errors import FailedValidation, RouteCacheError
from routecache.router.redaction import redact_answer
from routecache.router.releasing import ReleaseStep, release_all
from routecache.router.settings import LimitSettings
from routecache.router.tokens import estimate_tokens, request_prompt_tokens
from routecache.router.upstream.failover import Answered, Failover, Provider
from routecache.router.validation import (
    ACTION_DONE,
    Configured,
    OnFail,
    Redactor,
    RequestValidators,
)
from routecache.router.validators import LengthValidator

__all__ = ["Generated", "Generator", "Provider", "Tally"]

log = logging.getLogger(__name__)

# The answer limit's name in validation reports.
ANSWER_LIMIT = "answer_limit"


@dataclass(frozen=True)
class Generated:
    """The answer served and what producing it cost (every call, escalations included)."""

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
    provider: str = ""
    upstream_failures: tuple[str, ...] = ()  # providers that failed before one answered
    strong_calls: int = 0  # of `calls`, those a strong-tier provider answered (the rest cheap)


@dataclass
class Tally:
    """What a request's calls have cost so far, added to as each one answers."""

    cost: float = 0.0
    upstream_ms: float = 0.0
    validate_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    strong_calls: int = 0
    escalated: bool = False  # a cheap answer failed a validator and went to the strong model
    results: list[ValidatorResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, answered: Answered, elapsed_ms: float) -> None:
        reply = answered.reply
        self.cost += answered.provider.pricing.cost(reply.prompt_tokens, reply.completion_tokens)
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.upstream_ms += elapsed_ms
        self.calls += 1
        self.strong_calls += int(answered.tier is Tier.STRONG)
        self.failures += answered.failures


class Generator:
    def __init__(
        self,
        failover: Failover,
        validators: Sequence[Configured],
        *,
        tenant_validators: Mapping[str, Sequence[Configured]] | None = None,
        default_timeout_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        request_validators: RequestValidators | None = None,
        longest_call_seconds: float = math.inf,
        deliverable_chars: int | None = None,
    ) -> None:
        self._failover = failover
        # An answer past what one response can carry (server.max_message_bytes, at 4 bytes a
        # character) is blocked whatever the tenant's validators (which replace the
        # service-wide ones, a length check included): it would be paid for, cached, and then
        # fail every delivery. None: no bound (a Generator built outside the service).
        self._deliverable = deliverable_chars
        self._answer_limit = Configured(
            LengthValidator(0, deliverable_chars or sys.maxsize, ANSWER_LIMIT), OnFail.BLOCK
        )
        self._validators = validators
        self._request_validators = request_validators or RequestValidators(LimitSettings())
        self._tenant_validators = tenant_validators or {}
        self._default_timeout = default_timeout_seconds
        # The caller's deadline is clamped to this: a call must end while its spend
        # reservation (budgets.reservation_ttl_seconds) still holds the caps.
        self._longest = longest_call_seconds
        self._clock = clock

    @property
    def failover(self) -> Failover:
        return self._failover

    def deadline(self, seconds_left: float | None) -> float:
        """The absolute deadline (on the generator's clock) of a call with this much time, and
        no more than the longest a call may take."""
        wanted = self._default_timeout if seconds_left is None else seconds_left
        return self._clock() + min(wanted, self._longest)

    def validators_for(self, tenant: str, request: ChatRequest | None = None) -> list[Configured]:
        """The tenant's validators plus the request's own; raises InvalidArgument for a bad one."""
        configured = list(self._tenant_validators.get(tenant, self._validators))
        if request is not None and request.validators:
            names = [c.name for c in configured]
            configured += self._request_validators.build(request, names, tenant)
        return configured

    def _applicable(self, tenant: str, request: ChatRequest) -> list[Configured]:
        return [v for v in self.validators_for(tenant, request) if v.validator.applies_to(request)]

    def worst_case_calls(
        self, request: ChatRequest, tier: Tier, *, tenant: str = "", cheap_only: bool = False,
        streaming: bool = False, allowed: Collection[str] | None = None,
    ) -> list[list[Provider]]:  # fmt: skip
        """The providers each call of this request may reach, for the longest sequence of
        calls its validators can cause (retry once, escalate cheap → strong): what a spend
        reservation must cover. `allowed`: as for generate (a provider never tried is not
        paid for)."""
        chain = self._failover.chain
        first = [p for _, p in chain(tier, strong_fallback=not cheap_only, allowed=allowed)]
        if streaming:  # one call: whole-text checks at the end cannot retry or escalate
            return [first]
        actions = {c.on_fail for c in self._applicable(tenant, request)}
        retry = OnFail.RETRY in actions
        calls = [first, first] if retry else [first]
        if tier is Tier.CHEAP and not cheap_only and actions & {OnFail.RETRY, OnFail.ESCALATE}:
            strong = [p for _, p in chain(Tier.STRONG, allowed=allowed)]
            # cheap, cheap (retry), strong or cheap, strong, strong (retry): the first
            # chain reaches the strong providers too, so this covers both.
            calls = [first, first, strong] if retry else [first, strong]
        return calls

    async def generate(
        self, request: ChatRequest, tier: Tier, *, tenant: str = "", deadline: float | None = None,
        cheap_only: bool = False, tally: Tally | None = None,
        allowed: Collection[str] | None = None,
    ) -> Generated:  # fmt: skip
        """Raises FailedValidation when no answer may be served, Unavailable when none came.

        `cheap_only`: the cheap providers only, and an answer that would be escalated is
        refused instead (a tenant downgraded at its spend cap). `allowed`: the names of the
        providers the tenant may use (its models_allowed; None: all): the others are skipped,
        fallbacks included, on every call (retry, escalation). `tally`: the caller's, to know
        what the calls made cost when something fails after one was paid for (an escalation's
        call, a plugin's bug, the caller gone).
        """
        deadline = self.deadline(None) if deadline is None else deadline
        validators = self._applicable(tenant, request)
        tally = Tally() if tally is None else tally
        current, retried = tier, False
        while True:
            started = time.perf_counter()
            try:
                answered = await self._failover.complete(
                    request, current, deadline, strong_fallback=not cheap_only, allowed=allowed
                )
            except RouteCacheError as error:  # the checks already made are the request's too
                if tally.results:
                    error.checks = ValidationReport(tuple(tally.results), tally.escalated, False)
                raise
            tally.add(answered, (time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            text, failing, results = self._verdict(answered, request, validators, retried)
            tally.validate_ms += (time.perf_counter() - started) * 1000
            decision = _decide(failing, retried, answered.tier)
            if decision is OnFail.ESCALATE and cheap_only:
                decision = OnFail.BLOCK
            if decision is None:  # passed, or only redact / flag failures: serve it
                tally.results += _label_own(results, failing)
                return self._served(answered, text, failing, tally)
            tally.results += _label(results, decision)
            if decision is OnFail.BLOCK:
                report = ValidationReport(tuple(tally.results), tally.escalated, passed=False)
                failed = "; ".join(
                    f"{r.model}: {r.name}: {r.message}" for r in tally.results if not r.passed
                )
                raise FailedValidation(
                    f"no answer passed validation ({failed})", report, cost_usd=tally.cost,
                    prompt_tokens=tally.prompt_tokens, calls=tally.calls,
                    completion_tokens=tally.completion_tokens, strong_calls=tally.strong_calls,
                )  # fmt: skip
            retried = retried or decision is OnFail.RETRY
            if decision is OnFail.ESCALATE:
                current, tally.escalated = Tier.STRONG, True
            else:
                current = answered.tier

    async def stream(
        self, request: ChatRequest, tier: Tier, *, tenant: str = "", deadline: float | None = None,
        cheap_only: bool = False, allowed: Collection[str] | None = None,
    ) -> AsyncGenerator[str | Generated, None]:  # fmt: skip
        """Deltas as the provider sends them, then the Generated of the whole text
        (`cheap_only`, `allowed`: as for generate).

        Sent text cannot be taken back, so the whole-text validators run at the end and any
        failure either flags the answer (flag, redact) or ends the stream with
        FailedValidation (escalate, retry, block); neither is cached. Raises Unavailable (an
        AllProvidersFailed before the first delta) when no provider streams.
        """
        deadline = self.deadline(None) if deadline is None else deadline
        validators = self._applicable(tenant, request)
        started = time.perf_counter()
        opened = await self._failover.open_stream(
            request, tier, deadline, strong_fallback=not cheap_only, allowed=allowed
        )
        pieces: list[str] = []
        size, over_limit = 0, False
        # aclosing: this stream closed part-way closes the provider's now (its HTTP response,
        # its breaker ticket), not when the loop finalises the abandoned generator.
        async with contextlib.aclosing(self._failover.deltas(opened, deadline)) as deltas:
            async for delta in deltas:
                pieces.append(delta)
                size += len(delta)
                if over_limit := self._deliverable is not None and size > self._deliverable:
                    break  # what is past the answer limit is neither read on nor sent
                yield delta
        upstream_ms = (time.perf_counter() - started) * 1000
        text, model = "".join(pieces), opened.provider.model
        prompt_tokens = request_prompt_tokens(request)
        completion_tokens = estimate_tokens(text)
        cost = opened.provider.pricing.cost(prompt_tokens, completion_tokens)
        started = time.perf_counter()
        failing, results = self._stream_verdict(text, model, request, validators, over_limit)
        validate_ms = (time.perf_counter() - started) * 1000
        if _decide(failing, True, Tier.STRONG):
            labelled = _label(results, OnFail.BLOCK)
            report = ValidationReport(tuple(labelled), passed=False)
            failed = "; ".join(f"{r.name}: {r.message}" for r in labelled if not r.passed)
            raise FailedValidation(
                f"the streamed answer failed validation ({failed})", report, cost_usd=cost,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, calls=1,
                strong_calls=int(opened.tier is Tier.STRONG),
            )  # fmt: skip
        labelled = [r if r.passed else replace(r, action="flagged") for r in results]
        yield Generated(
            text, model, opened.tier, prompt_tokens, completion_tokens, cost,
            ValidationReport(tuple(labelled), passed=not failing), upstream_ms, validate_ms, 1,
            opened.provider.name, opened.failures, int(opened.tier is Tier.STRONG),
        )  # fmt: skip

    def _verdict(
        self, answered: Answered, request: ChatRequest, validators: Sequence[Configured],
        retried: bool,
    ) -> tuple[str, list[Configured], list[ValidatorResult]]:  # fmt: skip
        """As `_verdict`, the answer limit first: past it, blocked unread by the validators;
        and a redacted text again (a placeholder, or JSON written out in escapes, is longer)."""
        limit, model = self._answer_limit, answered.reply.model
        over = replace(_check(limit, answered.reply.text, request), model=model)
        if not over.passed:
            return answered.reply.text, [limit], [over]
        text, failing, results = _verdict(answered, request, validators, retried)
        if text is not answered.reply.text:
            grown = replace(_check(limit, text, request), model=model)
            if not grown.passed:
                return text, [*failing, limit], [*results, grown]
        return text, failing, results

    def _stream_verdict(
        self, text: str, model: str, request: ChatRequest, validators: Sequence[Configured],
        over_limit: bool,
    ) -> tuple[list[Configured], list[ValidatorResult]]:  # fmt: skip
        """The checks a streamed answer failed, and every result: the answer limit alone when
        the stream was stopped at it (the validators would judge a cut text)."""
        if over_limit:
            message = f"more than {self._deliverable} characters: the stream was stopped"
            return [self._answer_limit], [ValidatorResult(ANSWER_LIMIT, False, message, model)]
        return _judge(text, model, request, validators)

    @staticmethod
    def _served(
        answered: Answered, text: str, failing: Sequence[Configured], tally: Tally
    ) -> Generated:
        flagged = any(c.on_fail is OnFail.FLAG for c in failing)
        report = ValidationReport(tuple(tally.results), tally.escalated, passed=not flagged)
        return Generated(
            text, answered.reply.model, answered.tier, tally.prompt_tokens,
            tally.completion_tokens, tally.cost, report, tally.upstream_ms, tally.validate_ms,
            tally.calls, answered.provider.name, tuple(tally.failures), tally.strong_calls,
        )  # fmt: skip

    def release_steps(self) -> list[ReleaseStep]:
        """One step per provider's client, for a caller that releases a whole service in one
        flat list (a nested release_all would log each failure twice)."""
        return [(f"upstream {p.name}", p.upstream.aclose) for p in self._failover.providers()]

    async def aclose(self) -> None:
        """Closes every provider's client, even after one fails to close."""
        await release_all(self.release_steps())


def _judge(
    text: str, model: str, request: ChatRequest, validators: Sequence[Configured]
) -> tuple[list[Configured], list[ValidatorResult]]:
    results = [replace(_check(v, text, request), model=model) for v in validators]
    failing = [v for v, r in zip(validators, results, strict=True) if not r.passed]
    return failing, results


def _verdict(
    answered: Answered, request: ChatRequest, validators: Sequence[Configured], retried: bool
) -> tuple[str, list[Configured], list[ValidatorResult]]:
    """The text to serve, the validators it fails and every result (one per validator).

    An answer to be served with redact failures is redacted, then judged again by the other
    validators: what is served (and cached) must be what they passed, and a redaction can
    break what they checked (a schema's integer now a string, a required word, a length)."""
    text, model = answered.reply.text, answered.reply.model
    failing, results = _judge(text, model, request, validators)
    redacting = [c for c in failing if c.on_fail is OnFail.REDACT]
    redactors = [c.validator for c in redacting if isinstance(c.validator, Redactor)]
    if not redactors or _decide(failing, retried, answered.tier) is not None:
        return text, failing, results  # nothing to redact, or it will not be served
    wants_json = request.params.response_format.wants_json
    redacted = redact_answer(text, redactors, wants_json)
    if redacted == text:
        return text, failing, results
    done = {id(c) for c in redacting}
    others = [v for v in validators if id(v) not in done]
    failing_again, judged_again = _judge(redacted, model, request, others)
    again = iter(judged_again)  # in the validators' order, the redacting ones left out
    results = [
        r if id(v) in done else next(again) for v, r in zip(validators, results, strict=True)
    ]
    return redacted, [*redacting, *failing_again], results


def _check(configured: Configured, text: str, request: ChatRequest) -> ValidatorResult:
    """A validator's verdict; one that raises (a bug, a plugin's or a library's: jsonschema's
    multipleOf overflowing) fails the answer, whose call was paid for, instead of the request."""
    try:
        return configured.validator.check(text, request)
    except Exception as exc:
        log.exception("validator %s raised on an answer; the answer fails it", configured.name)
        message = f"the check raised {type(exc).__name__}; see the server log"
        return ValidatorResult(configured.name, False, message)


def _decide(failing: Sequence[Configured], retried: bool, tier: Tier) -> OnFail | None:
    """What to do about an answer's failures: None serves it (redacted and/or flagged)."""
    actions = {c.on_fail for c in failing}
    if OnFail.BLOCK in actions:
        return OnFail.BLOCK
    if OnFail.RETRY in actions and not retried:
        return OnFail.RETRY
    if actions & {OnFail.RETRY, OnFail.ESCALATE}:
        return OnFail.ESCALATE if tier is Tier.CHEAP else OnFail.BLOCK
    return None


def _label(results: Sequence[ValidatorResult], decision: OnFail) -> list[ValidatorResult]:
    done = ACTION_DONE[decision]
    return [r if r.passed else replace(r, action=done) for r in results]


def _label_own(
    results: Sequence[ValidatorResult], failing: Sequence[Configured]
) -> list[ValidatorResult]:
    actions = {c.name: ACTION_DONE[c.on_fail] for c in failing}
    return [r if r.passed else replace(r, action=actions.get(r.name, "")) for r in results]

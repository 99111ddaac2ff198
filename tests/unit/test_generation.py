"""Generator on a failover of fake providers: what a request's calls add up to, where a retry or
escalation goes, what a spend reservation must cover, and how a streamed answer is judged."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest

from routecache.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tier,
    ValidatorResult,
)
from routecache.errors import FailedValidation, Unavailable, UpstreamError
from routecache.router.generation import Generated, Generator, Tally
from routecache.router.ports import Pricing, UpstreamReply
from routecache.router.settings import LimitSettings, ValidatorSpec, load_settings
from routecache.router.tokens import estimate_tokens
from routecache.router.upstream.breaker import CircuitBreaker
from routecache.router.upstream.failover import Failover, Provider
from routecache.router.validation import Configured, OnFail, build_validators
from routecache.router.validators import LengthValidator, parse_json
from tests.fakes import FakeUpstream

CHEAP_PRICE, STRONG_PRICE = Pricing(1.0, 2.0), Pricing(10.0, 30.0)
REQUEST = ChatRequest(messages=(Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "q")))


@dataclass(frozen=True)
class Forbids:
    """Fails an answer containing `word`."""

    name: str
    word: str

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        if self.word in text:
            return ValidatorResult(self.name, False, f"contains {self.word!r}")
        return ValidatorResult(self.name, True)


@dataclass(frozen=True)
class Masks(Forbids):
    """A Forbids that can also redact what it forbids."""

    def redact(self, text: str) -> str:
        return text.replace(self.word, "***")


@dataclass(frozen=True)
class Broken:
    """A validator with a bug: its check raises (jsonschema's multipleOf on a huge number did)."""

    name: str = "broken"

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        raise OverflowError("int too large to convert to float")


@dataclass
class Dated(FakeUpstream):
    """A provider whose replies name a dated version of its model, as OpenAI's do."""

    closed: int = 0

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams
    ) -> UpstreamReply:
        reply = await super().complete(messages, params)
        return replace(reply, model=f"{reply.model}-2024")

    async def aclose(self) -> None:
        self.closed += 1


def says(text: str) -> Dated:
    return Dated(text.replace(" ", "-"), lambda prompt, params: text)


def down(name: str) -> FakeUpstream:
    return FakeUpstream(name, fail_with=UpstreamError("HTTP 503", retryable=True))


def generator(
    cheap: Sequence[FakeUpstream], strong: FakeUpstream, *validators: Configured,
    deliverable_chars: int | None = None,
) -> Generator:  # fmt: skip
    def provider(upstream: FakeUpstream, price: Pricing) -> Provider:
        # Named apart from its model: what is reported as the model must be the model.
        return Provider(f"{upstream.model_id}@host", upstream, price, CircuitBreaker())

    chains = {
        Tier.CHEAP: [provider(u, CHEAP_PRICE) for u in cheap],
        Tier.STRONG: [provider(strong, STRONG_PRICE)],
    }
    return Generator(Failover(chains), validators, deliverable_chars=deliverable_chars)


def reply_tokens(prompt: str, text: str) -> tuple[int, int]:
    """What FakeUpstream reports for one call."""
    return len(prompt) // 4 + 1, len(text) // 4 + 1


# --- what a request's calls add up to ------------------------------------------------------


async def test_an_escalated_answer_counts_the_tokens_calls_and_cost_of_both_calls() -> None:
    cheap, strong = says("a bad answer"), says("a good answer")
    gen = generator([cheap], strong, Configured(Forbids("no-bad", "bad"), OnFail.ESCALATE))
    done = await gen.generate(REQUEST, Tier.CHEAP)

    first, second = reply_tokens("q", "a bad answer"), reply_tokens("q", "a good answer")
    assert (done.text, done.tier, done.calls) == ("a good answer", Tier.STRONG, 2)
    assert (done.model, done.provider) == ("a-good-answer-2024", "a-good-answer@host")
    assert done.prompt_tokens == first[0] + second[0]
    assert done.completion_tokens == first[1] + second[1]
    assert done.cost_usd == pytest.approx(CHEAP_PRICE.cost(*first) + STRONG_PRICE.cost(*second))
    assert done.report.escalated and done.report.passed
    assert done.upstream_ms > 0 and done.validate_ms > 0  # the time of both calls and checks
    assert [(r.model, r.passed, r.action) for r in done.report.results] == [
        ("a-bad-answer-2024", False, "escalated"),
        ("a-good-answer-2024", True, ""),
    ]


async def test_providers_that_failed_before_an_escalation_stay_named() -> None:
    gen = generator(
        [down("cheap-down"), says("a bad answer")],
        says("a good answer"),
        Configured(Forbids("no-bad", "bad"), OnFail.ESCALATE),
    )
    done = await gen.generate(REQUEST, Tier.CHEAP)
    assert done.tier is Tier.STRONG
    assert len(done.upstream_failures) == 1 and "cheap-down" in done.upstream_failures[0]


async def test_a_refusal_after_escalation_reports_every_call_and_only_the_failed_checks() -> None:
    cheap, strong = says("a bad answer"), says("still bad")
    gen = generator(
        [cheap],
        strong,
        Configured(Forbids("no-bad", "bad"), OnFail.ESCALATE),
        Configured(Forbids("no-zzz", "zzz"), OnFail.ESCALATE),
    )
    with pytest.raises(FailedValidation) as caught:
        await gen.generate(REQUEST, Tier.CHEAP)

    refused = caught.value
    first, second = reply_tokens("q", "a bad answer"), reply_tokens("q", "still bad")
    assert refused.calls == 2
    assert (refused.prompt_tokens, refused.completion_tokens) == (
        first[0] + second[0],
        first[1] + second[1],
    )
    assert refused.cost_usd == pytest.approx(CHEAP_PRICE.cost(*first) + STRONG_PRICE.cost(*second))
    assert refused.report.escalated and not refused.report.passed
    assert "no-bad" in str(refused) and "no-zzz" not in str(refused)


async def test_a_validator_that_raises_fails_the_answer_and_its_on_fail_applies() -> None:
    # Before: the exception escaped generate() after the call was paid for (INTERNAL).
    gen = generator([says("cheap")], says("strong"), Configured(Broken(), OnFail.ESCALATE))
    with pytest.raises(FailedValidation) as caught:
        await gen.generate(REQUEST, Tier.CHEAP)
    refused = caught.value
    assert refused.calls == 2 and refused.cost_usd > 0  # escalated, then refused
    assert [(r.passed, r.action) for r in refused.report.results] == [
        (False, "escalated"),
        (False, "blocked"),
    ]
    assert "OverflowError" in refused.report.results[0].message


async def test_a_streamed_answer_whose_validator_raises_fails_that_check() -> None:
    gen = generator([says("cheap")], says("strong"), Configured(Broken(), OnFail.FLAG))
    done = await streamed(gen, [])
    assert not done.report.passed and "OverflowError" in done.report.results[0].message


async def test_what_the_calls_cost_is_told_as_they_are_paid_before_a_later_one_fails() -> None:
    # The escalation's call fails after the cheap one was paid: the caller settles the tally.
    cheap = says("a bad answer")
    gen = generator(
        [cheap], down("strong-down"), Configured(Forbids("no-bad", "bad"), OnFail.ESCALATE)
    )
    tally = Tally()
    with pytest.raises(Unavailable):
        await gen.generate(REQUEST, Tier.CHEAP, tally=tally)
    first = reply_tokens("q", "a bad answer")
    assert (tally.calls, tally.prompt_tokens, tally.completion_tokens) == (1, *first)
    assert tally.cost == pytest.approx(CHEAP_PRICE.cost(*first))


# --- where the next call goes --------------------------------------------------------------


async def test_a_retry_asks_the_tier_that_answered_not_the_one_asked() -> None:
    # The cheap provider is down, so the strong one answered: asking the cheap chain again
    # would only fail over to the strong provider once more.
    answers = iter(["a bad answer", "a good answer"])
    cheap = down("cheap-down")
    strong = FakeUpstream("strong", lambda prompt, params: next(answers))
    gen = generator([cheap], strong, Configured(Forbids("no-bad", "bad"), OnFail.RETRY))
    done = await gen.generate(REQUEST, Tier.CHEAP)
    assert (done.text, done.tier, done.calls) == ("a good answer", Tier.STRONG, 2)
    assert len(cheap.calls) == 1 and len(strong.calls) == 2


async def test_a_retry_is_made_once_per_request_not_once_per_tier() -> None:
    # cheap, cheap again, then strong: the calls a spend reservation covers (a second retry
    # on the strong tier would overrun it).
    cheap, strong = says("a bad answer"), says("still bad")
    gen = generator([cheap], strong, Configured(Forbids("no-bad", "bad"), OnFail.RETRY))
    with pytest.raises(FailedValidation) as caught:
        await gen.generate(REQUEST, Tier.CHEAP)
    assert caught.value.calls == 3
    assert (len(cheap.calls), len(strong.calls)) == (2, 1)
    assert [r.action for r in caught.value.report.results] == ["retried", "escalated", "blocked"]


async def test_cheap_only_does_not_fall_back_to_the_strong_provider() -> None:
    strong = says("a good answer")
    gen = generator([down("cheap-down")], strong)
    with pytest.raises(Unavailable):
        await gen.generate(REQUEST, Tier.CHEAP, cheap_only=True)
    with pytest.raises(Unavailable):  # nor does a stream
        _ = [event async for event in gen.stream(REQUEST, Tier.CHEAP, cheap_only=True)]
    assert strong.calls == []


async def test_a_provider_the_tenant_may_not_use_is_not_called() -> None:
    # Its model is not in the tenant's models_allowed: the chain goes past it, for a stream too.
    backup, strong = says("backup"), says("a good answer")
    gen = generator([down("cheap-down"), backup], strong)
    allowed = {"cheap-down@host", "a-good-answer@host"}
    done = await gen.generate(REQUEST, Tier.CHEAP, allowed=allowed)
    assert done.provider == "a-good-answer@host"
    events = [event async for event in gen.stream(REQUEST, Tier.CHEAP, allowed=allowed)]
    assert isinstance(events[-1], Generated) and events[-1].provider == "a-good-answer@host"
    assert backup.calls == []


# --- what a spend reservation must cover ---------------------------------------------------


def names(calls: list[list[Provider]]) -> list[list[str]]:
    return [[p.model for p in call] for call in calls]


@pytest.mark.parametrize(
    ("on_fail", "tier", "cheap_only", "expected"),
    [
        (OnFail.FLAG, Tier.CHEAP, False, [["cheap", "strong"]]),
        (OnFail.ESCALATE, Tier.CHEAP, False, [["cheap", "strong"], ["strong"]]),
        (OnFail.RETRY, Tier.CHEAP, False, [["cheap", "strong"], ["cheap", "strong"], ["strong"]]),
        (OnFail.RETRY, Tier.STRONG, False, [["strong"], ["strong"]]),
        (OnFail.RETRY, Tier.CHEAP, True, [["cheap"], ["cheap"]]),
        (OnFail.ESCALATE, Tier.CHEAP, True, [["cheap"]]),
    ],
    ids=["flag", "escalate", "retry", "retry-strong", "retry-cheap-only", "escalate-cheap-only"],
)
def test_worst_case_calls_follow_what_the_validators_can_cause(
    on_fail: OnFail, tier: Tier, cheap_only: bool, expected: list[list[str]]
) -> None:
    gen = generator([says("cheap")], says("strong"), Configured(Forbids("no-bad", "bad"), on_fail))
    calls = gen.worst_case_calls(REQUEST, tier, cheap_only=cheap_only)
    assert names(calls) == expected


def test_worst_case_calls_leave_out_the_providers_not_allowed() -> None:
    retry = Configured(Forbids("no-bad", "bad"), OnFail.RETRY)
    gen = generator([says("cheap"), says("backup")], says("strong"), retry)
    allowed = {"cheap@host", "strong@host"}
    calls = gen.worst_case_calls(REQUEST, Tier.CHEAP, allowed=allowed)
    assert names(calls) == [["cheap", "strong"], ["cheap", "strong"], ["strong"]]


def test_a_stream_is_one_call_whatever_its_validators() -> None:
    gen = generator(
        [says("cheap")], says("strong"), Configured(Forbids("no-bad", "bad"), OnFail.RETRY)
    )
    assert names(gen.worst_case_calls(REQUEST, Tier.CHEAP, streaming=True)) == [["cheap", "strong"]]


# --- served text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_fail", "text", "passed"),
    [(OnFail.REDACT, "a *** answer", True), (OnFail.FLAG, "a bad answer", False)],
)
async def test_only_a_redact_check_rewrites_the_answer(
    on_fail: OnFail, text: str, passed: bool
) -> None:
    gen = generator(
        [says("a bad answer")], says("strong"), Configured(Masks("pii", "bad"), on_fail)
    )
    done = await gen.generate(REQUEST, Tier.CHEAP)
    assert (done.text, done.report.passed, done.calls) == (text, passed, 1)


JSON_REQUEST = replace(
    REQUEST,
    params=GenerationParams(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)),
)


def json_and_pii(**pii: str) -> list[Configured]:
    specs = [ValidatorSpec(kind="json_schema"), ValidatorSpec(kind="pii", **pii)]
    return build_validators(specs, LimitSettings())


@pytest.mark.parametrize(
    ("answer", "served"),
    [
        ({"note": "write to:\njohn@example.com"}, {"note": "write to:\n[REDACTED EMAIL]"}),
        ({"note": "caf\u00e9john@example.com"}, {"note": "[REDACTED EMAIL]"}),
        ({"id": 4111111111111111}, {"id": "[REDACTED CARD]"}),
        ({"john@example.com": [1, True, None]}, {"[REDACTED EMAIL]": [1, True, None]}),
    ],
    ids=["after an escape", "after a unicode escape", "a number", "a key"],
)
async def test_a_json_answer_is_redacted_inside_its_values_and_stays_json(
    answer: dict[str, object], served: dict[str, object]
) -> None:
    # The answer was redacted as text after json_schema had passed it: "\\n" lost its n to the
    # email ("\\[REDACTED EMAIL]"), a number became a bare word: served and cached as JSON
    # that is not JSON, with passed=True.
    gen = generator([says(json.dumps(answer))], says("strong"), *json_and_pii())
    done = await gen.generate(JSON_REQUEST, Tier.CHEAP)
    assert parse_json(done.text) == served
    assert (done.report.passed, done.tier, done.calls) == (True, Tier.CHEAP, 1)


async def test_a_json_answer_without_pii_is_served_as_it_came() -> None:
    answer = '{ "a" :1.50 }'
    gen = generator([says(answer)], says("strong"), *json_and_pii())
    assert (await gen.generate(JSON_REQUEST, Tier.CHEAP)).text == answer


@pytest.mark.parametrize(
    ("answer", "served"),
    [
        # A lone surrogate escape (valid JSON): written back raw, no UTF-8 (no response, no
        # cache entry) could hold it; the whole answer is written back in ASCII escapes instead.
        ('{"note": "mail john@example.com", "emoji": "\\ud83d"}',
         '{"note": "mail [REDACTED EMAIL]", "emoji": "\\ud83d"}'),
        # Otherwise other scripts stay as they are: 6 characters an escape would be longer.
        ('{"note": "caf\u00e9 john@example.com"}', '{"note": "caf\u00e9 [REDACTED EMAIL]"}'),
        # Nothing to redact: served as it came, the escape its 6 ASCII characters.
        ('{"emoji": "\\ud83d"}', '{"emoji": "\\ud83d"}'),
    ],
    ids=["lone surrogate", "non-ASCII", "not redacted"],
)  # fmt: skip
async def test_a_redacted_json_answer_stays_sendable_as_utf_8(answer: str, served: str) -> None:
    gen = generator([says(answer)], says("strong"), *json_and_pii())
    done = await gen.generate(JSON_REQUEST, Tier.CHEAP)
    assert (done.text, done.report.passed, done.calls) == (served, True, 1)
    done.text.encode("utf-8")


async def test_a_redacted_json_answer_is_judged_again_by_the_schema() -> None:
    # A card number redacted in an integer field makes it a string: the schema now fails it,
    # and its on_fail (escalate) applies; what is served is always what was judged.
    schema = json.dumps({"type": "object", "properties": {"id": {"type": "integer"}}})
    request = replace(
        REQUEST,
        params=GenerationParams(
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
        ),
    )
    gen = generator([says('{"id": 4111111111111111}')], says('{"id": 7}'), *json_and_pii())
    done = await gen.generate(request, Tier.CHEAP)
    assert (done.text, done.tier, done.calls) == ('{"id": 7}', Tier.STRONG, 2)
    cheap = [(r.name, r.passed, r.action) for r in done.report.results if r.model != done.model]
    assert cheap == [("json_schema", False, "escalated"), ("pii", False, "escalated")]


async def test_a_redacted_text_answer_is_judged_again_by_the_other_validators() -> None:
    gen = generator(
        [says("a bad answer")], says("a good answer"),
        Configured(Masks("pii", "bad"), OnFail.REDACT),
        Configured(Forbids("no-stars", "***"), OnFail.ESCALATE),
    )  # fmt: skip
    done = await gen.generate(REQUEST, Tier.CHEAP)
    assert (done.text, done.tier, done.report.passed) == ("a good answer", Tier.STRONG, True)


# --- streaming -----------------------------------------------------------------------------


async def streamed(gen: Generator, sent: list[str], request: ChatRequest = REQUEST) -> Generated:
    async for event in gen.stream(request, Tier.CHEAP):
        if isinstance(event, Generated):
            return event
        sent.append(event)
    raise AssertionError("the stream ended without its Generated")


@pytest.mark.parametrize("on_fail", [OnFail.ESCALATE, OnFail.RETRY, OnFail.BLOCK])
async def test_a_streamed_answer_failing_a_check_that_cannot_be_met_later_is_refused(
    on_fail: OnFail,
) -> None:
    # The text is already sent: neither a retry nor an escalation can replace it.
    gen = generator(
        [says("a bad answer")], says("strong"), Configured(Forbids("no-bad", "bad"), on_fail)
    )
    sent: list[str] = []
    with pytest.raises(FailedValidation) as caught:
        await streamed(gen, sent)
    assert "".join(sent) == "a bad answer "
    refused = caught.value
    assert refused.calls == 1 and refused.cost_usd > 0
    assert [(r.name, r.action) for r in refused.report.results] == [("no-bad", "blocked")]


async def test_a_streamed_answer_failing_a_flag_check_is_served_flagged() -> None:
    gen = generator(
        [says("a bad answer")], says("strong"), Configured(Forbids("no-bad", "bad"), OnFail.FLAG)
    )
    done = await streamed(gen, [])
    assert (done.model, done.report.passed) == ("a-bad-answer", False)
    assert [(r.name, r.model, r.action) for r in done.report.results] == [
        ("no-bad", "a-bad-answer", "flagged")
    ]


async def test_a_streamed_answer_is_costed_on_the_whole_prompt_and_text() -> None:
    gen = generator([says("four words of text")], says("strong"))
    done = await streamed(gen, [])
    prompt_tokens = estimate_tokens("Be brief.\nq")
    completion_tokens = estimate_tokens(done.text)
    assert (done.prompt_tokens, done.completion_tokens) == (prompt_tokens, completion_tokens)
    assert done.cost_usd == pytest.approx(CHEAP_PRICE.cost(prompt_tokens, completion_tokens))
    assert done.calls == 1


async def test_a_streamed_answer_counts_its_json_schema_as_prompt_tokens() -> None:
    schema = '{"type":"object","required":["answer"]}'
    form = ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
    request = replace(REQUEST, params=GenerationParams(response_format=form))
    done = await streamed(generator([says("{}")], says("strong")), [], request)
    assert done.prompt_tokens == estimate_tokens("Be brief.\nq\n" + schema)


async def test_a_stream_names_the_providers_that_failed_before_it_opened() -> None:
    gen = generator([down("cheap-down"), says("an answer")], says("strong"))
    done = await streamed(gen, [])
    assert (done.provider, done.tier) == ("an-answer@host", Tier.CHEAP)
    assert len(done.upstream_failures) == 1 and "cheap-down" in done.upstream_failures[0]


async def test_a_stream_the_strong_provider_took_over_reports_the_strong_tier() -> None:
    gen = generator([down("cheap-down")], says("strong answer"))
    done = await streamed(gen, [])
    assert (done.text, done.model, done.tier) == ("strong answer ", "strong-answer", Tier.STRONG)


async def test_a_stream_keeps_to_the_callers_deadline() -> None:
    # A deadline already reached: no provider is tried (the default 60 s would try them).
    cheap = says("an answer")
    gen = generator([cheap], says("strong"))
    with pytest.raises(Unavailable, match="deadline"):
        async for _ in gen.stream(REQUEST, Tier.CHEAP, deadline=time.monotonic()):
            pass
    assert cheap.calls == []


async def test_aclose_closes_every_provider_once() -> None:
    cheap, strong = says("cheap"), says("strong")
    gen = generator([cheap], strong)
    await gen.aclose()
    assert (cheap.closed, strong.closed) == (1, 1)


# --- the answer limit, whatever the validators ---------------------------------------------

# What one response carries at worst with the default server.max_message_bytes.
ANSWER_LIMIT = load_settings().deliverable_answer_chars()


async def test_an_answer_past_what_a_response_carries_is_refused_with_no_length_validator() -> None:
    # Before: a tenant whose validators had no length check was served (and cached) an answer
    # of any size; one over server.max_message_bytes was paid for and never deliverable.
    over = "word " * (ANSWER_LIMIT // 5 + 1)
    gen = generator([says(over)], says("strong"), deliverable_chars=ANSWER_LIMIT)
    with pytest.raises(FailedValidation) as caught:
        await gen.generate(REQUEST, Tier.CHEAP)
    refused = caught.value
    assert refused.calls == 1 and refused.cost_usd > 0  # paid for, as any refused answer
    assert [(r.name, r.passed, r.action) for r in refused.report.results] == [
        ("answer_limit", False, "blocked")
    ]
    assert f"more than {ANSWER_LIMIT}" in str(refused)
    at_limit = "x" * ANSWER_LIMIT
    done = generator([says(at_limit)], says("strong"), deliverable_chars=ANSWER_LIMIT)
    assert (await done.generate(REQUEST, Tier.CHEAP)).text


async def test_a_length_validator_still_escalates_an_answer_a_response_can_carry() -> None:
    # The answer limit is what a response can carry, not limits.max_answer_chars: a long
    # cheap answer the length validator refuses is escalated as it was, not blocked.
    longest = LimitSettings().max_answer_chars  # the default length validator's bound
    length = Configured(LengthValidator(1, longest), OnFail.ESCALATE)
    long = says("x" * (longest + 1))
    gen = generator([long], says("short"), length, deliverable_chars=ANSWER_LIMIT)
    done = await gen.generate(REQUEST, Tier.CHEAP)
    assert done.text == "short" and done.report.escalated


async def test_a_stream_past_what_a_response_carries_stops_there_and_is_refused() -> None:
    over = "word " * (ANSWER_LIMIT // 5 * 50)  # 50 times the limit
    sent: list[str] = []
    with pytest.raises(FailedValidation) as caught:
        gen = generator([says(over)], says("strong"), deliverable_chars=ANSWER_LIMIT)
        await streamed(gen, sent)
    # The provider's stream is left at the limit, not read to its end; nothing past it is sent.
    assert ANSWER_LIMIT - len("word ") < len("".join(sent)) <= ANSWER_LIMIT
    assert [(r.name, r.action) for r in caught.value.report.results] == [
        ("answer_limit", "blocked")
    ]
    assert caught.value.calls == 1 and caught.value.cost_usd > 0


async def test_an_answer_that_redaction_grows_past_the_answer_limit_is_blocked() -> None:
    # Before: the limit was checked on the answer as it came, and the redacted text (each
    # 6-character address now a 16-character placeholder) was served and cached past it.
    limit = 1000
    answer = "a@b.cd " * (limit // 7)
    assert len(answer) <= limit
    [pii] = build_validators(
        [ValidatorSpec(kind="pii", name="pii", on_fail="redact", pii=["email"])], LimitSettings()
    )
    gen = generator([says(answer)], says("strong"), pii, deliverable_chars=limit)
    with pytest.raises(FailedValidation) as caught:
        await gen.generate(REQUEST, Tier.CHEAP)
    failed = [(r.name, r.action) for r in caught.value.report.results if not r.passed]
    assert ("answer_limit", "blocked") in failed

"""Proto ⇄ domain: every field carried, unset ones left unset, out-of-range enums refused."""

from collections.abc import Callable

import pytest

from routecache.client import chat_request
from routecache.domain import (
    MAX_MODEL_NAME_CHARS,
    CacheInfo,
    CacheOutcome,
    Completion,
    Feedback,
    LatencyBreakdown,
    RequestValidator,
    ResponseFormat,
    ResponseFormatType,
    TenantStats,
    Tier,
    TopEntry,
    Usage,
    ValidationReport,
    ValidatorResult,
)
from routecache.errors import InvalidArgument
from routecache.router.input_validation import validate_feedback, validate_request
from routecache.router.messages import (
    MODEL_PREVIEW_CHARS,
    PROMPT_PREVIEW_CHARS,
    completion_to_pb,
    feedback_from_pb,
    invalidate_target_from_pb,
    request_from_pb,
    stats_to_pb,
)
from routecache.router.settings import LimitSettings, ServerSettings, load_settings
from routecache.router.tenant_admin import InvalidateTarget
from routecache.v1 import routecache_pb2 as pb


def test_unset_params_stay_unset_and_zero_ones_are_kept() -> None:
    unset = request_from_pb(chat_request("q"))
    assert unset.params.temperature is None and unset.params.max_tokens is None
    assert unset.cache.ttl_seconds is None  # 0 on the wire: the tenant's default TTL
    zero = request_from_pb(chat_request("q", temperature=0.0, max_tokens=5, ttl_seconds=60))
    assert zero.params.temperature == 0.0 and zero.params.max_tokens == 5
    assert zero.cache.ttl_seconds == 60
    # An explicit 0 is kept, for validation to refuse, not taken for "unset".
    assert request_from_pb(chat_request("q", max_tokens=0)).params.max_tokens == 0
    assert request_from_pb(chat_request("q", top_p=0.0)).params.top_p == 0.0


def test_cache_flags_and_request_validators_are_carried_field_by_field() -> None:
    validator = pb.RequestValidator(kind="pii", name="mine", on_fail="flag", pii=["email"],
                                    must_match=["a"], must_not_match=["b"],
                                    min_chars=2, max_chars=9)  # fmt: skip
    message = chat_request("q", no_store=True, force_tier="strong", validators=[validator])
    request = request_from_pb(message)
    assert not request.cache.no_cache and request.cache.no_store
    assert request.force_tier is Tier.STRONG
    assert request.validators == (
        RequestValidator("pii", "mine", "flag", ("a",), ("b",), 2, 9, ("email",)),
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: setattr(m.messages[0], "role", pb.ROLE_UNSPECIFIED), "messages[0].role"),
        (lambda m: setattr(m.messages[0], "role", 9), "messages[0].role"),
        (lambda m: setattr(m.params.response_format, "type", 9), "params.response_format.type"),
        (lambda m: setattr(m.routing, "force_tier", 9), "routing.force_tier"),
    ],
)
def test_unknown_enum_values_are_invalid_arguments_on_admission(
    change: Callable[[pb.CompleteRequest], None], field: str
) -> None:
    # Carried, not raised: translation runs before the API key is checked, and a refusal
    # there had no error event and no errors_total (the pipeline records both).
    message = chat_request("q")
    change(message)
    request = request_from_pb(message)
    with pytest.raises(InvalidArgument) as error:
        validate_request(request, LimitSettings())
    assert error.value.field == field


def test_feedback_needs_a_rating() -> None:
    assert not feedback_from_pb(
        pb.FeedbackRequest(response_id="r", rating=pb.RATING_DOWN)
    ).thumbs_up
    unrated = feedback_from_pb(pb.FeedbackRequest(response_id="r"))
    # Refused on validation, after the API key, not while translating.
    with pytest.raises(InvalidArgument) as error:
        validate_feedback(unrated, LimitSettings())
    assert error.value.field == "rating"


def test_invalidate_all_must_be_true() -> None:
    assert invalidate_target_from_pb(pb.InvalidateRequest(all=True)) == InvalidateTarget(
        all_entries=True
    )
    # No target: refused by the invalidation itself, after the API key.
    assert invalidate_target_from_pb(pb.InvalidateRequest(all=False)) == InvalidateTarget()
    assert invalidate_target_from_pb(pb.InvalidateRequest()) == InvalidateTarget()


def test_completion_carries_staleness_actions_and_a_zero_difficulty() -> None:
    done = Completion(
        response_id="r",
        text="t",
        model="m",
        tier=Tier.CHEAP,
        cache=CacheInfo(CacheOutcome.SEMANTIC, 0.9, "e", 5.0, stale=True),
        usage=Usage(),
        validation=ValidationReport(
            (ValidatorResult("pii", False, "1 email", "m", "redacted"),), escalated=True
        ),
        latency=LatencyBreakdown(),
        difficulty=0.0,
    )
    message = completion_to_pb(done)
    assert message.cache.stale and message.validation.escalated
    assert message.validation.results[0].action == "redacted"
    assert message.HasField("difficulty") and message.difficulty == 0.0


def test_completion_carries_every_field_to_the_wire() -> None:
    done = Completion(
        response_id="resp-1",
        text="Paris.",
        model="gpt-4-1106-preview",
        tier=Tier.STRONG,
        cache=CacheInfo(CacheOutcome.SEMANTIC, 0.93, "entry-1", 42.5, verifier_score=0.8),
        usage=Usage(prompt_tokens=11, completion_tokens=3, cost_usd=0.002, saved_usd=0.001),
        validation=ValidationReport(
            (ValidatorResult("json_schema", False, "not JSON", "mixtral", "escalated"),),
            escalated=True,
            passed=False,
        ),
        latency=LatencyBreakdown(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
        classifier_version="clf-7",
        difficulty=0.25,
    )
    assert completion_to_pb(done) == pb.CompleteResponse(
        response_id="resp-1",
        text="Paris.",
        model="gpt-4-1106-preview",
        tier=pb.TIER_STRONG,
        cache=pb.CacheInfo(outcome=pb.CACHE_OUTCOME_SEMANTIC, similarity=0.93,
                           entry_id="entry-1", entry_age_seconds=42.5, verifier_score=0.8),
        usage=pb.Usage(prompt_tokens=11, completion_tokens=3, cost_usd=0.002, saved_usd=0.001),
        validation=pb.ValidationReport(
            passed=False,
            escalated=True,
            results=[pb.ValidatorResult(name="json_schema", passed=False, message="not JSON",
                                        model="mixtral", action="escalated")],
        ),
        latency=pb.LatencyBreakdown(total_ms=1.0, exact_ms=2.0, embed_ms=3.0, search_ms=4.0,
                                    classify_ms=5.0, upstream_ms=6.0, validate_ms=7.0,
                                    store_ms=8.0),
        classifier_version="clf-7",
        difficulty=0.25,
    )  # fmt: skip


def test_feedback_carries_its_correction_and_comment() -> None:
    feedback = feedback_from_pb(pb.FeedbackRequest(
        response_id="r", rating=pb.RATING_UP, correction="Lyon", comment="wrong city"))  # fmt: skip
    assert feedback == Feedback("r", thumbs_up=True, correction="Lyon", comment="wrong city")


def test_invalidate_by_entry_id_or_tag_keeps_which_one_was_asked() -> None:
    by_id = invalidate_target_from_pb(pb.InvalidateRequest(entry_id="e1"))
    by_tag = invalidate_target_from_pb(pb.InvalidateRequest(tag="faq"))
    assert (by_id, by_tag) == (InvalidateTarget(entry_id="e1"), InvalidateTarget(tag="faq"))


def test_a_json_schema_request_carries_its_schema() -> None:
    schema = '{"type": "object", "required": ["answer"]}'
    params = request_from_pb(chat_request("q", json_schema=schema)).params
    assert params.response_format == ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)


def test_no_cache_tags_and_the_end_user_are_carried() -> None:
    message = chat_request("q", no_cache=True, tags=["faq", "billing"], end_user_id="user-9")
    request = request_from_pb(message)
    assert request.cache.no_cache and not request.cache.no_store
    assert request.cache.tags == ("faq", "billing") and request.end_user_id == "user-9"


def test_chat_request_sends_the_system_prompt_then_the_turns_then_the_prompt() -> None:
    message = chat_request("q", system="be brief", history=[("user", "hi"), ("assistant", "yo")])
    assert [(m.role, m.content) for m in message.messages] == [
        (pb.ROLE_SYSTEM, "be brief"), (pb.ROLE_USER, "hi"), (pb.ROLE_ASSISTANT, "yo"),
        (pb.ROLE_USER, "q"),
    ]  # fmt: skip


def test_chat_request_asks_for_a_json_object_unless_a_schema_is_given() -> None:
    json_object = request_from_pb(chat_request("q", json_object=True)).params.response_format
    assert json_object == ResponseFormat(ResponseFormatType.JSON_OBJECT)
    both = request_from_pb(chat_request("q", json_object=True, json_schema="{}")).params
    assert both.response_format == ResponseFormat(ResponseFormatType.JSON_SCHEMA, "{}")


def test_chat_request_refuses_a_role_it_does_not_know_by_name() -> None:
    with pytest.raises(ValueError, match=r"^unknown role 'bot': one of system, user, assistant$"):
        chat_request("q", history=[("user", "hi"), ("bot", "yo")])


def test_chat_request_refuses_a_tier_it_does_not_know_by_name() -> None:
    with pytest.raises(ValueError, match=r"^unknown tier 'medium': one of cheap, strong$"):
        chat_request("q", force_tier="medium")


def test_stats_top_entries_carry_a_prompt_preview_so_max_top_n_fits_the_send_limit() -> None:
    # Before: each top entry carried its whole prompt; max_top_n entries of max_message_chars
    # 4-byte characters were over server.max_message_bytes, so GetStats failed
    # RESOURCE_EXHAUSTED ("Sent message larger than max") and its counters were lost with it.
    limits, server = LimitSettings(), ServerSettings()
    prompt = "🌀" * limits.max_message_chars
    entries = tuple(
        TopEntry(entry_id=f"e{i}", prompt=prompt, model="cheap-model", hits=i, saved_usd=0.1)
        for i in range(limits.max_top_n)
    )
    reply = stats_to_pb(TenantStats(tenant="acme", requests=3, top_entries=entries))
    assert reply.ByteSize() < server.max_message_bytes
    assert reply.requests == 3 and len(reply.top_entries) == limits.max_top_n
    preview = reply.top_entries[0].prompt
    assert preview == "🌀" * PROMPT_PREVIEW_CHARS + "…"
    short = stats_to_pb(TenantStats(tenant="acme", top_entries=(
        TopEntry(entry_id="e", prompt="what is 2+2?", model="m", hits=1, saved_usd=0.0),
    )))  # fmt: skip
    assert short.top_entries[0].prompt == "what is 2+2?"  # a short prompt is whole, no "…"


def test_stats_top_entries_cut_a_model_name_past_its_bound() -> None:
    # An entry cached before provider model names were bounded may carry a model of megabytes:
    # sent whole in each top entry, GetStats failed RESOURCE_EXHAUSTED until the entry expired.
    entry = TopEntry(entry_id="e", prompt="q", model="m" * 1_200_000, hits=1, saved_usd=0.0)
    reply = stats_to_pb(TenantStats(tenant="acme", top_entries=(entry,)))
    assert reply.top_entries[0].model == "m" * MODEL_PREVIEW_CHARS + "…"
    assert reply.ByteSize() < ServerSettings().max_message_bytes


def test_an_answer_at_the_limit_fits_a_response_with_the_worst_validation_report() -> None:
    # Before: validator messages were unbounded and the answer limit's 64 KiB for "the rest"
    # did not count the report: an escalated answer near the limit, served with the cheap
    # answer's failed schema check quoting it, was twice what one message carries.
    settings = load_settings()
    wide = "\U0001f600"  # 4 UTF-8 bytes
    per_call = len(settings.validators) + settings.limits.max_request_validators + 1
    result = ValidatorResult(
        wide * 64, False, wide * 1_000_000, wide * MAX_MODEL_NAME_CHARS, "escalated"
    )
    done = Completion(
        response_id="r" * settings.limits.max_id_chars,
        text=wide * settings.deliverable_answer_chars(),
        model=wide * MAX_MODEL_NAME_CHARS,
        tier=Tier.STRONG,
        cache=CacheInfo(CacheOutcome.MISS, entry_id="e" * settings.limits.max_id_chars),
        usage=Usage(),
        validation=ValidationReport((result,) * (3 * per_call), escalated=True),
        latency=LatencyBreakdown(),
        classifier_version=wide * 256,
        difficulty=0.5,
    )
    assert completion_to_pb(done).ByteSize() <= settings.server.max_message_bytes

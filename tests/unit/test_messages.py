"""Proto ⇄ domain: every field carried, unset ones left unset, out-of-range enums refused."""

from collections.abc import Callable

import pytest

from routecache.client import chat_request
from routecache.domain import (
    CacheInfo,
    CacheOutcome,
    Completion,
    LatencyBreakdown,
    RequestValidator,
    Tier,
    Usage,
    ValidationReport,
    ValidatorResult,
)
from routecache.errors import InvalidArgument
from routecache.router.messages import (
    completion_to_pb,
    feedback_from_pb,
    invalidate_target_from_pb,
    request_from_pb,
)
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
def test_unknown_enum_values_are_invalid_arguments(
    change: Callable[[pb.CompleteRequest], None], field: str
) -> None:
    message = chat_request("q")
    change(message)
    with pytest.raises(InvalidArgument) as error:
        request_from_pb(message)
    assert error.value.field == field


def test_feedback_needs_a_rating() -> None:
    assert not feedback_from_pb(
        pb.FeedbackRequest(response_id="r", rating=pb.RATING_DOWN)
    ).thumbs_up
    with pytest.raises(InvalidArgument) as error:
        feedback_from_pb(pb.FeedbackRequest(response_id="r"))
    assert error.value.field == "rating"


def test_invalidate_all_must_be_true() -> None:
    assert invalidate_target_from_pb(pb.InvalidateRequest(all=True)) == InvalidateTarget(
        all_entries=True
    )
    with pytest.raises(InvalidArgument) as error:
        invalidate_target_from_pb(pb.InvalidateRequest(all=False))
    assert error.value.field == "target"


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

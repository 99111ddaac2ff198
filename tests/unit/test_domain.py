"""The request's derived views (prompt, system prompt, context) and the defaults a tenant gets."""

import pytest

from routecache.domain import (
    Budget,
    ChatRequest,
    Message,
    OverCapPolicy,
    RateLimits,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tenant,
    Tier,
    ValidationReport,
)


def test_a_conversation_splits_into_system_prompt_context_and_prompt() -> None:
    request = ChatRequest((
        Message(Role.SYSTEM, "be brief"),
        Message(Role.USER, "about Rome"),
        Message(Role.SYSTEM, "in French"),
        Message(Role.ASSISTANT, "ok"),
        Message(Role.USER, "and the population?"),
    ))  # fmt: skip
    assert request.prompt == "and the population?"  # the last turn, not the first
    assert request.system_prompt == "be brief\nin French"
    assert request.context == (Message(Role.USER, "about Rome"), Message(Role.ASSISTANT, "ok"))


@pytest.mark.parametrize(
    ("kind", "wants_json"),
    [(ResponseFormatType.TEXT, False), (ResponseFormatType.JSON_OBJECT, True),
     (ResponseFormatType.JSON_SCHEMA, True)],
)  # fmt: skip
def test_both_json_formats_want_json(kind: ResponseFormatType, wants_json: bool) -> None:
    assert ResponseFormat(kind).wants_json is wants_json


def test_a_tenant_left_at_its_defaults_is_unrestricted_and_refuses_over_a_cap() -> None:
    tenant = Tenant("acme", None, 0.9, 3600)
    assert tenant.allowed_tiers == {Tier.CHEAP, Tier.STRONG}  # no models_allowed: every tier
    assert tenant.max_false_hit_rate == 0.01
    assert tenant.rate == RateLimits(window_seconds=60.0)
    assert tenant.budget == Budget(policy=OverCapPolicy.REFUSE)
    assert ValidationReport().passed  # nothing checked: nothing failed

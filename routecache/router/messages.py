"""Translation between the protobuf messages and the domain types; no logic beyond mapping."""

from __future__ import annotations

from routecache.domain import (
    MAX_MODEL_NAME_CHARS,
    CacheControl,
    CacheOutcome,
    ChatRequest,
    Completion,
    Feedback,
    GenerationParams,
    Message,
    RequestValidator,
    ResponseFormat,
    ResponseFormatType,
    Role,
    TenantStats,
    Tier,
    ValidationReport,
)
from routecache.router.tenant_admin import InvalidateTarget
from routecache.v1 import routecache_pb2 as pb

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_TIERS = {pb.TIER_CHEAP: Tier.CHEAP, pb.TIER_STRONG: Tier.STRONG}
_TIERS_PB = {tier: number for number, tier in _TIERS.items()}
_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}
_OUTCOMES = {
    CacheOutcome.MISS: pb.CACHE_OUTCOME_MISS,
    CacheOutcome.EXACT: pb.CACHE_OUTCOME_EXACT,
    CacheOutcome.SEMANTIC: pb.CACHE_OUTCOME_SEMANTIC,
}


def request_from_pb(message: pb.CompleteRequest) -> ChatRequest:
    """An unknown enum number is not refused here, ahead of the API key and of the pipeline's
    error event and metrics: it goes in `problems`, and a stand-in value in its place."""
    messages, problems = [], []
    for position, item in enumerate(message.messages):
        role = _ROLES.get(item.role)
        if role is None:
            problems.append((f"messages[{position}].role", "must be SYSTEM, USER or ASSISTANT"))
        messages.append(Message(role or Role.USER, item.content))
    params = message.params
    response_format = _FORMATS.get(params.response_format.type)
    if response_format is None:
        problems.append(("params.response_format.type", "unknown response format"))
    force_tier = message.routing.force_tier
    if force_tier != pb.TIER_UNSPECIFIED and force_tier not in _TIERS:
        problems.append(("routing.force_tier", "must be CHEAP, STRONG or unspecified"))
    return ChatRequest(
        messages=tuple(messages),
        params=GenerationParams(
            temperature=params.temperature if params.HasField("temperature") else None,
            max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
            response_format=ResponseFormat(
                response_format or ResponseFormatType.TEXT, params.response_format.json_schema
            ),
            top_p=params.top_p if params.HasField("top_p") else None,
        ),
        cache=CacheControl(
            no_cache=message.cache.no_cache,
            no_store=message.cache.no_store,
            ttl_seconds=message.cache.ttl_seconds or None,
            tags=tuple(message.cache.tags),
        ),
        force_tier=_TIERS.get(force_tier),
        end_user_id=message.end_user_id,
        validators=tuple(
            RequestValidator(
                kind=v.kind,
                name=v.name,
                on_fail=v.on_fail,
                must_match=tuple(v.must_match),
                must_not_match=tuple(v.must_not_match),
                min_chars=v.min_chars,
                max_chars=v.max_chars,
                pii=tuple(v.pii),
            )
            for v in message.validators
        ),
        problems=tuple(problems),
    )


def completion_to_pb(done: Completion) -> pb.CompleteResponse:
    response = pb.CompleteResponse(
        response_id=done.response_id,
        text=done.text,
        model=done.model,
        tier=_TIERS_PB[done.tier],
        cache=pb.CacheInfo(
            outcome=_OUTCOMES[done.cache.outcome],
            similarity=done.cache.similarity,
            entry_id=done.cache.entry_id,
            entry_age_seconds=done.cache.entry_age_seconds,
            stale=done.cache.stale,
            verifier_score=done.cache.verifier_score,
        ),
        usage=pb.Usage(
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            cost_usd=done.usage.cost_usd,
            saved_usd=done.usage.saved_usd,
        ),
        validation=report_to_pb(done.validation),
        latency=pb.LatencyBreakdown(**vars(done.latency)),
        classifier_version=done.classifier_version,
    )
    if done.difficulty is not None:
        response.difficulty = done.difficulty
    return response


def report_to_pb(report: ValidationReport) -> pb.ValidationReport:
    return pb.ValidationReport(
        passed=report.passed,
        escalated=report.escalated,
        results=[
            pb.ValidatorResult(
                name=r.name, passed=r.passed, message=r.message, model=r.model, action=r.action
            )
            for r in report.results
        ],
    )


def feedback_from_pb(message: pb.FeedbackRequest) -> Feedback:
    """A rating that is neither up nor down is refused after the API key (Feedback.problems)."""
    rated = message.rating in (pb.RATING_UP, pb.RATING_DOWN)
    return Feedback(
        response_id=message.response_id,
        thumbs_up=message.rating == pb.RATING_UP,
        correction=message.correction,
        comment=message.comment,
        problems=() if rated else (("rating", "must be RATING_UP or RATING_DOWN"),),
    )


def invalidate_target_from_pb(message: pb.InvalidateRequest) -> InvalidateTarget:
    """No target (or all=false) is an empty target, refused after the API key."""
    which = message.WhichOneof("target")
    if which == "entry_id":
        return InvalidateTarget(entry_id=message.entry_id)
    if which == "tag":
        return InvalidateTarget(tag=message.tag)
    return InvalidateTarget(all_entries=which == "all" and message.all)


# GetStats shows each top entry's prompt as a preview: whole prompts (up to
# limits.max_message_chars, 4 UTF-8 bytes a character at worst) times top_n overran
# server.max_message_bytes and the whole reply failed RESOURCE_EXHAUSTED.
PROMPT_PREVIEW_CHARS = 200

# And its model name, as the upstream client bounds it: an entry cached before that bound may
# carry a name of megabytes.
MODEL_PREVIEW_CHARS = MAX_MODEL_NAME_CHARS


def stats_to_pb(stats: TenantStats) -> pb.GetStatsResponse:
    fields = {k: v for k, v in vars(stats).items() if k != "top_entries"}
    top = [
        pb.TopEntry(
            **{
                **vars(entry),
                "prompt": prompt_preview(entry.prompt),
                "model": _cut(entry.model, MODEL_PREVIEW_CHARS),
            }
        )
        for entry in stats.top_entries
    ]
    return pb.GetStatsResponse(**fields, top_entries=top)


def prompt_preview(prompt: str) -> str:
    """The first PROMPT_PREVIEW_CHARS characters and "…" when cut (a str slice cuts between
    code points, never inside a character's UTF-8 bytes)."""
    return _cut(prompt, PROMPT_PREVIEW_CHARS)


def _cut(text: str, limit: int) -> str:
    """The first `limit` characters of `text` and "…" when cut."""
    return text if len(text) <= limit else text[:limit] + "…"

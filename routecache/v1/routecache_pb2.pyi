from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SYSTEM: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_CHEAP: _ClassVar[Tier]
    TIER_STRONG: _ClassVar[Tier]

class CacheOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_OUTCOME_UNSPECIFIED: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_MISS: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_EXACT: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_SEMANTIC: _ClassVar[CacheOutcome]

class ResponseFormatType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FORMAT_TYPE_UNSPECIFIED: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_TEXT: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_JSON_OBJECT: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_JSON_SCHEMA: _ClassVar[ResponseFormatType]

class Rating(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATING_UNSPECIFIED: _ClassVar[Rating]
    RATING_UP: _ClassVar[Rating]
    RATING_DOWN: _ClassVar[Rating]
ROLE_UNSPECIFIED: Role
ROLE_SYSTEM: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role
TIER_UNSPECIFIED: Tier
TIER_CHEAP: Tier
TIER_STRONG: Tier
CACHE_OUTCOME_UNSPECIFIED: CacheOutcome
CACHE_OUTCOME_MISS: CacheOutcome
CACHE_OUTCOME_EXACT: CacheOutcome
CACHE_OUTCOME_SEMANTIC: CacheOutcome
RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType
RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType
RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType
RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType
RATING_UNSPECIFIED: Rating
RATING_UP: Rating
RATING_DOWN: Rating

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: Role
    content: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., content: _Optional[str] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("type", "json_schema")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    type: ResponseFormatType
    json_schema: str
    def __init__(self, type: _Optional[_Union[ResponseFormatType, str]] = ..., json_schema: _Optional[str] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("temperature", "max_tokens", "response_format", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    max_tokens: int
    response_format: ResponseFormat
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ..., top_p: _Optional[float] = ...) -> None: ...

class CacheControl(_message.Message):
    __slots__ = ("no_cache", "no_store", "ttl_seconds", "tags")
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    NO_STORE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    no_cache: bool
    no_store: bool
    ttl_seconds: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, no_cache: _Optional[bool] = ..., no_store: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestValidator(_message.Message):
    __slots__ = ("kind", "name", "on_fail", "must_match", "must_not_match", "min_chars", "max_chars", "pii")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ON_FAIL_FIELD_NUMBER: _ClassVar[int]
    MUST_MATCH_FIELD_NUMBER: _ClassVar[int]
    MUST_NOT_MATCH_FIELD_NUMBER: _ClassVar[int]
    MIN_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    PII_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    on_fail: str
    must_match: _containers.RepeatedScalarFieldContainer[str]
    must_not_match: _containers.RepeatedScalarFieldContainer[str]
    min_chars: int
    max_chars: int
    pii: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., on_fail: _Optional[str] = ..., must_match: _Optional[_Iterable[str]] = ..., must_not_match: _Optional[_Iterable[str]] = ..., min_chars: _Optional[int] = ..., max_chars: _Optional[int] = ..., pii: _Optional[_Iterable[str]] = ...) -> None: ...

class RoutingControl(_message.Message):
    __slots__ = ("force_tier",)
    FORCE_TIER_FIELD_NUMBER: _ClassVar[int]
    force_tier: Tier
    def __init__(self, force_tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("messages", "params", "cache", "routing", "end_user_id", "validators")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATORS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    params: GenerationParams
    cache: CacheControl
    routing: RoutingControl
    end_user_id: str
    validators: _containers.RepeatedCompositeFieldContainer[RequestValidator]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., cache: _Optional[_Union[CacheControl, _Mapping]] = ..., routing: _Optional[_Union[RoutingControl, _Mapping]] = ..., end_user_id: _Optional[str] = ..., validators: _Optional[_Iterable[_Union[RequestValidator, _Mapping]]] = ...) -> None: ...

class CacheInfo(_message.Message):
    __slots__ = ("outcome", "similarity", "entry_id", "entry_age_seconds", "stale", "verifier_score")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_SCORE_FIELD_NUMBER: _ClassVar[int]
    outcome: CacheOutcome
    similarity: float
    entry_id: str
    entry_age_seconds: float
    stale: bool
    verifier_score: float
    def __init__(self, outcome: _Optional[_Union[CacheOutcome, str]] = ..., similarity: _Optional[float] = ..., entry_id: _Optional[str] = ..., entry_age_seconds: _Optional[float] = ..., stale: _Optional[bool] = ..., verifier_score: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cost_usd", "saved_usd")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    saved_usd: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., saved_usd: _Optional[float] = ...) -> None: ...

class ValidatorResult(_message.Message):
    __slots__ = ("name", "passed", "message", "model", "action")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    passed: bool
    message: str
    model: str
    action: str
    def __init__(self, name: _Optional[str] = ..., passed: _Optional[bool] = ..., message: _Optional[str] = ..., model: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("passed", "results", "escalated")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    results: _containers.RepeatedCompositeFieldContainer[ValidatorResult]
    escalated: bool
    def __init__(self, passed: _Optional[bool] = ..., results: _Optional[_Iterable[_Union[ValidatorResult, _Mapping]]] = ..., escalated: _Optional[bool] = ...) -> None: ...

class LatencyBreakdown(_message.Message):
    __slots__ = ("total_ms", "exact_ms", "embed_ms", "search_ms", "classify_ms", "upstream_ms", "validate_ms", "store_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    EXACT_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    exact_ms: float
    embed_ms: float
    search_ms: float
    classify_ms: float
    upstream_ms: float
    validate_ms: float
    store_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., exact_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., classify_ms: _Optional[float] = ..., upstream_ms: _Optional[float] = ..., validate_ms: _Optional[float] = ..., store_ms: _Optional[float] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("response_id", "text", "model", "tier", "cache", "usage", "validation", "latency", "classifier_version", "difficulty")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    model: str
    tier: Tier
    cache: CacheInfo
    usage: Usage
    validation: ValidationReport
    latency: LatencyBreakdown
    classifier_version: str
    difficulty: float
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., cache: _Optional[_Union[CacheInfo, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., validation: _Optional[_Union[ValidationReport, _Mapping]] = ..., latency: _Optional[_Union[LatencyBreakdown, _Mapping]] = ..., classifier_version: _Optional[str] = ..., difficulty: _Optional[float] = ...) -> None: ...

class CompleteStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: str
    final: CompleteResponse
    def __init__(self, delta: _Optional[str] = ..., final: _Optional[_Union[CompleteResponse, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("response_id", "rating", "correction", "comment")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    rating: Rating
    correction: str
    comment: str
    def __init__(self, response_id: _Optional[str] = ..., rating: _Optional[_Union[Rating, str]] = ..., correction: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("recorded", "invalidated_entry_id")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    INVALIDATED_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    recorded: bool
    invalidated_entry_id: str
    def __init__(self, recorded: _Optional[bool] = ..., invalidated_entry_id: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("entry_id", "tag", "all")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    tag: str
    all: bool
    def __init__(self, entry_id: _Optional[str] = ..., tag: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("top_n",)
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    top_n: int
    def __init__(self, top_n: _Optional[int] = ...) -> None: ...

class TopEntry(_message.Message):
    __slots__ = ("entry_id", "prompt", "model", "hits", "saved_usd")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    prompt: str
    model: str
    hits: int
    saved_usd: float
    def __init__(self, entry_id: _Optional[str] = ..., prompt: _Optional[str] = ..., model: _Optional[str] = ..., hits: _Optional[int] = ..., saved_usd: _Optional[float] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("tenant", "requests", "exact_hits", "semantic_hits", "misses", "cheap_calls", "strong_calls", "escalations", "validation_failures", "cost_usd", "saved_usd", "entries", "classifier_version", "thumbs_up", "thumbs_down", "top_entries")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    CHEAP_CALLS_FIELD_NUMBER: _ClassVar[int]
    STRONG_CALLS_FIELD_NUMBER: _ClassVar[int]
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SAVED_USD_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_VERSION_FIELD_NUMBER: _ClassVar[int]
    THUMBS_UP_FIELD_NUMBER: _ClassVar[int]
    THUMBS_DOWN_FIELD_NUMBER: _ClassVar[int]
    TOP_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: int
    exact_hits: int
    semantic_hits: int
    misses: int
    cheap_calls: int
    strong_calls: int
    escalations: int
    validation_failures: int
    cost_usd: float
    saved_usd: float
    entries: int
    classifier_version: str
    thumbs_up: int
    thumbs_down: int
    top_entries: _containers.RepeatedCompositeFieldContainer[TopEntry]
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[int] = ..., exact_hits: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., misses: _Optional[int] = ..., cheap_calls: _Optional[int] = ..., strong_calls: _Optional[int] = ..., escalations: _Optional[int] = ..., validation_failures: _Optional[int] = ..., cost_usd: _Optional[float] = ..., saved_usd: _Optional[float] = ..., entries: _Optional[int] = ..., classifier_version: _Optional[str] = ..., thumbs_up: _Optional[int] = ..., thumbs_down: _Optional[int] = ..., top_entries: _Optional[_Iterable[_Union[TopEntry, _Mapping]]] = ...) -> None: ...

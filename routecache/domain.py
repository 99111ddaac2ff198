"""The vocabulary every part shares: requests, answers and their metadata, free of gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Tier(StrEnum):
    CHEAP = "cheap"
    STRONG = "strong"


class CacheOutcome(StrEnum):
    MISS = "miss"
    EXACT = "exact"
    SEMANTIC = "semantic"


class ResponseFormatType(StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.TEXT
    json_schema: str = ""  # JSON text; only with JSON_SCHEMA

    @property
    def wants_json(self) -> bool:
        return self.type in (ResponseFormatType.JSON_OBJECT, ResponseFormatType.JSON_SCHEMA)


@dataclass(frozen=True)
class GenerationParams:
    temperature: float | None = None
    max_tokens: int | None = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    top_p: float | None = None


@dataclass(frozen=True)
class CacheControl:
    no_cache: bool = False
    no_store: bool = False
    ttl_seconds: int | None = None  # None: the tenant's default
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestValidator:
    """A validator the caller asks for on one request (built-in kinds only, no custom code)."""

    kind: str
    name: str = ""
    on_fail: str = ""
    must_match: tuple[str, ...] = ()
    must_not_match: tuple[str, ...] = ()
    min_chars: int = 0  # 0: the kind's default
    max_chars: int = 0  # 0: the service's limit
    pii: tuple[str, ...] = ()  # empty: every kind


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    cache: CacheControl = field(default_factory=CacheControl)
    force_tier: Tier | None = None
    end_user_id: str = ""
    validators: tuple[RequestValidator, ...] = ()
    # (field, problem): what the wire request held that these types cannot (an unknown enum
    # number), refused on admission, after the API key, like any invalid field.
    problems: tuple[tuple[str, str], ...] = ()

    @property
    def system_prompt(self) -> str:
        return "\n".join(m.content for m in self.messages if m.role is Role.SYSTEM)

    @property
    def prompt(self) -> str:
        """The last user message: the text the cache and the classifier look at."""
        return self.messages[-1].content

    @property
    def context(self) -> tuple[Message, ...]:
        """The earlier non-system turns: a follow-up only means the same under the same ones."""
        return tuple(m for m in self.messages[:-1] if m.role is not Role.SYSTEM)


@dataclass(frozen=True)
class OperatingPoint:
    """What an operator asks of the router; exactly one target is set.

    strong_fraction: share of requests sent to the strong model; quality: fraction of the
    strong model's accuracy gap recovered (PGR); cost_ratio: spend ceiling relative to sending
    every request strong. The classifier maps it to a threshold with its held-out curve.
    """

    strong_fraction: float | None = None
    quality: float | None = None
    cost_ratio: float | None = None

    def __post_init__(self) -> None:
        targets = [
            t for t in (self.strong_fraction, self.quality, self.cost_ratio) if t is not None
        ]
        if len(targets) != 1:
            raise ValueError("set exactly one of strong_fraction, quality, cost_ratio")


@dataclass(frozen=True)
class RateLimits:
    """Token buckets per window: each refills at limit / window and holds at most `limit`."""

    window_seconds: float = 60.0
    requests: float | None = None  # the tenant's, all users together
    tokens: float | None = None  # model tokens: the prompt on admission, the answer after
    user_requests: float | None = None  # each end user's (the request's end_user_id)
    user_tokens: float | None = None


class OverCapPolicy(StrEnum):
    REFUSE = "refuse"  # RESOURCE_EXHAUSTED until the period ends
    DOWNGRADE = "downgrade"  # the cheap tier only (no escalation) while it still fits


@dataclass(frozen=True)
class Budget:
    """Spend limits in USD per UTC day and month; None: no limit."""

    daily_usd: float | None = None  # hard caps: never overrun by more than one request's worth
    monthly_usd: float | None = None
    soft_daily_usd: float | None = None  # soft: an alert when crossed
    soft_monthly_usd: float | None = None
    user_daily_usd: float | None = None  # hard caps of each end user
    user_monthly_usd: float | None = None
    policy: OverCapPolicy = OverCapPolicy.REFUSE


@dataclass(frozen=True)
class Tenant:
    name: str
    routing_threshold: float | None  # None: the threshold stored with the classifier
    similarity_threshold: float
    default_ttl_seconds: int
    max_false_hit_rate: float = 0.01  # with the verifier on: wrong cached answers per lookup
    requests_per_second: float | None = None
    # Used when routing_threshold is None; None too: the classifier's default threshold.
    operating_point: OperatingPoint | None = None
    rate: RateLimits = field(default_factory=RateLimits)
    budget: Budget = field(default_factory=Budget)
    allowed_tiers: frozenset[Tier] = frozenset(Tier)  # from the tenant's models_allowed
    # The names of the providers whose model models_allowed lists, fallbacks included (a
    # tier's first provider goes by the tier's name); None: every provider.
    providers_allowed: frozenset[str] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0


@dataclass(frozen=True)
class CacheInfo:
    outcome: CacheOutcome = CacheOutcome.MISS
    similarity: float = 0.0
    entry_id: str = ""
    entry_age_seconds: float = 0.0
    stale: bool = False
    verifier_score: float | None = None  # the hit verifier's probability; None: not verified


# The longest model name a provider's reply is believed on (real ones are under 100
# characters); a longer one is replaced by the configured name. The name is cached with the
# answer and sent in every reply and validator result that serves it: one of megabytes made
# the reply, each hit on the entry and GetStats fail RESOURCE_EXHAUSTED until the entry expired.
MAX_MODEL_NAME_CHARS = 256
# The longest validator message kept (cut in its middle): a check quoting the answer
# (jsonschema's message holds the whole offending value) put up to the answer's size in each
# result, and an escalated request serves the cheap answer's failed results too: the reply was
# twice what one response carries. The settings count this bound in the answer limit.
MAX_VALIDATOR_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class ValidatorResult:
    name: str
    passed: bool
    message: str = ""
    model: str = ""
    action: str = ""  # what a failure led to: escalated, retried, redacted, flagged, blocked

    def __post_init__(self) -> None:
        # Here, so that every check's message is bounded, a plugin's included.
        object.__setattr__(self, "message", _cut_middle(self.message, MAX_VALIDATOR_MESSAGE_CHARS))


def _cut_middle(text: str, limit: int) -> str:
    """`text`, at most `limit` characters: its start and its end, joined by "…" when cut (a
    check's message often says what is wrong after quoting the value, as jsonschema's does)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


@dataclass(frozen=True)
class ValidationReport:
    """Every check made, on every model tried; `passed` says whether the answer served passed."""

    results: tuple[ValidatorResult, ...] = ()
    escalated: bool = False
    passed: bool = True


@dataclass
class LatencyBreakdown:
    total_ms: float = 0.0
    exact_ms: float = 0.0
    embed_ms: float = 0.0
    search_ms: float = 0.0
    classify_ms: float = 0.0
    upstream_ms: float = 0.0
    validate_ms: float = 0.0
    store_ms: float = 0.0


@dataclass(frozen=True)
class Completion:
    response_id: str
    text: str
    model: str
    tier: Tier
    cache: CacheInfo
    usage: Usage
    validation: ValidationReport
    latency: LatencyBreakdown
    classifier_version: str = ""
    difficulty: float | None = None
    provider: str = ""  # the configured provider that answered; empty for a cache hit
    upstream_failures: tuple[str, ...] = ()  # what failed on the way (fallbacks, stale)
    # Another identical request's call in flight answered it (SingleFlight), or its failure
    # led to this stale answer: the checks and escalation are that request's, counted there.
    shared: bool = False


@dataclass(frozen=True)
class Feedback:
    response_id: str
    thumbs_up: bool
    correction: str = ""
    comment: str = ""
    # (field, problem): what the wire request held that these types cannot (no rating), refused
    # after the API key, as ChatRequest.problems are.
    problems: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TopEntry:
    entry_id: str
    prompt: str
    model: str
    hits: int
    saved_usd: float  # hits times the cost of the call that produced the answer


@dataclass(frozen=True)
class TenantStats:
    tenant: str
    requests: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    cheap_calls: int = 0
    strong_calls: int = 0
    escalations: int = 0
    validation_failures: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    entries: int = 0
    classifier_version: str = ""
    thumbs_up: int = 0
    thumbs_down: int = 0
    top_entries: tuple[TopEntry, ...] = ()

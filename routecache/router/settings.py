"""One settings object, read from ROUTECACHE_* environment variables and an optional TOML file.

Nested sections use `__` in variable names, e.g. ROUTECACHE_SERVER__PORT=50051. Environment
variables override the TOML file, which overrides the defaults.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Literal, Self, get_origin
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from redis.connection import parse_url

from routecache.domain import (
    MAX_MODEL_NAME_CHARS,
    MAX_VALIDATOR_MESSAGE_CHARS,
    OperatingPoint,
)
from routecache.router.auth import reused_digest

CONFIG_ENV_VAR = "ROUTECACHE_CONFIG"

# A spend reservation expires budgets.reservation_ttl_seconds after it is made, whether its
# call still runs or not: each call's deadline ends it this long before (Settings.
# longest_call_seconds), time to validate the answer and settle the spend, a Redis timeout or
# two included, while the reservation still holds the caps.
SETTLE_MARGIN_SECONDS = 30.0


class _Section(BaseModel):
    # A misspelt key must fail at start, not silently fall back to a default. No setting
    # means anything at inf or nan (valid TOML): `tenants.rate.tokens = inf` loaded, and Redis
    # refused every take (its PEXPIRE), each replica falling back to its own buckets.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    max_message_bytes: int = Field(
        1 << 20, gt=0, description="largest message the server sends (requests: limits)"
    )
    grace_seconds: float = Field(5.0, ge=0, description="drain time for in-flight calls on stop")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mTLS)"
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set tls_cert_file and tls_key_file together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self


def check_http_url(url: str) -> str:
    """An http(s) URL httpx can call, or ValueError. Checked when the settings load: httpx
    raises on a port past 65535 (an OverflowError inside each call), an unclosed IPv6 bracket
    (building the client) or no scheme (each call) only once the URL is used. The messages
    never quote the URL: a webhook's may hold its token."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError("the URL does not start with http:// or https://")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        raise ValueError("not a valid URL") from None
    try:
        port = parts.port  # reading it raises ValueError past 65535
    except ValueError:
        port = 0
    if port == 0:  # no server listens on port 0: nothing could be called there
        raise ValueError("the URL's port is not one of 1-65535")
    if not parts.hostname or any(c.isspace() for c in url):
        raise ValueError("the URL names no host, or holds a space")
    try:
        httpx.URL(url)
    except httpx.InvalidURL:  # its message may quote the URL
        raise ValueError("not a valid URL") from None
    return url


class ProviderSettings(_Section):
    """An OpenAI-compatible chat-completions endpoint serving one model."""

    base_url: str = "http://127.0.0.1:8089/v1"
    model: str
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="read the key from this variable")
    api_key_file: Path | None = Field(None, description="read the key from this secret file")
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="total time of one attempt: a whole completion, or a stream's opening up to "
        "its first text delta (the rest of a stream is bounded by read_timeout_seconds)",
    )
    connect_timeout_seconds: float = Field(2.0, gt=0)
    read_timeout_seconds: float = Field(
        20.0, gt=0, description="longest wait for the next bytes (a stalled stream)"
    )
    # 4 MiB: far above limits.max_answer_chars (20 000) characters JSON-escaped at their worst
    # (under 240 KiB), low enough that a runaway or hostile provider cannot exhaust memory.
    max_response_bytes: int = Field(
        4 << 20,
        ge=64 << 10,
        description="longest response body, and stream line or event, read (a whole stream: "
        "four times it); past it the attempt fails",
    )
    max_connections: int = Field(
        100,
        gt=0,
        description="calls open to this provider at a time; more wait for a free connection "
        "(up to timeout_seconds, not counted against the provider's breaker)",
    )

    @field_validator("base_url")
    @classmethod
    def _callable_base_url(cls, url: str) -> str:
        # A URL httpx cannot call failed each call of the tier INTERNAL (an error of no
        # provider, so neither its fallbacks nor the strong chain were tried), or the build.
        return check_http_url(url)

    def resolve_api_key(self, where: str | None = None) -> str | None:
        """The key from api_key, then api_key_env, then api_key_file; raises ConfigError,
        naming `where` (the provider's setting, upstream.cheap say), else its model."""
        where = where or f"provider {self.model}"
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
            if not key.strip():  # it would override the other sources and send no key: 401s
                raise ConfigError(
                    f"{where}: api_key is empty (leave it out for a provider that takes no key)"
                )
            return key
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ConfigError(f"{where}: ${self.api_key_env} is not set")
            if not value.strip():  # sent as "Bearer   ", which httpx refuses: every call fails
                raise ConfigError(f"{where}: ${self.api_key_env} is empty (white space only)")
            return value
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{where}: cannot read api_key_file {self.api_key_file}: {exc.strerror}"
                ) from exc
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{where}: cannot read api_key_file {self.api_key_file}: "
                    f"not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc
            if not key:  # like an empty api_key_env: "Bearer " would fail every call
                raise ConfigError(f"{where}: api_key_file {self.api_key_file} is empty")
            return key
        return None


def _default_cheap() -> ProviderSettings:
    return ProviderSettings(
        model="mixtral-8x7b-instruct", input_usd_per_mtok=0.6, output_usd_per_mtok=0.6
    )


def _default_strong() -> ProviderSettings:
    return ProviderSettings(
        model="gpt-4-1106-preview", input_usd_per_mtok=10.0, output_usd_per_mtok=30.0
    )


def _onto_default(given: dict[str, object], default: ProviderSettings) -> dict[str, object]:
    """`given` over the fields the default provider sets. The default prices are its model's:
    a tier given another model keeps only the field defaults, and must bring its own prices."""
    if given.get("model", default.model) != default.model:
        return given
    return {**default.model_dump(exclude_unset=True), **given}


class RetrySettings(_Section):
    max_attempts: int = Field(2, ge=1, description="tries per provider, first one included")
    backoff_initial_seconds: float = Field(0.05, ge=0)
    backoff_max_seconds: float = Field(0.5, ge=0)
    max_retry_after_seconds: float = Field(
        5.0,
        ge=0,
        description="longest Retry-After (408/409/429/5xx) waited out before the retry; a longer "
        "one, or one past half the time the provider has left, moves on to the next provider at "
        "once",
    )


class BreakerSettings(_Section):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    open_seconds: float = Field(10.0, gt=0, description="how long it sheds before a probe")
    half_open_probes: int = Field(1, ge=1, description="calls let through while half-open")


class UpstreamSettings(_Section):
    """Each tier calls its provider (`cheap`, `strong`), then its fallbacks in order."""

    cheap: ProviderSettings = Field(default_factory=_default_cheap)
    strong: ProviderSettings = Field(default_factory=_default_strong)
    providers: dict[str, ProviderSettings] = Field(
        default_factory=dict, description="named providers that fallback lists refer to"
    )
    cheap_fallbacks: list[str] = Field(default_factory=list)
    strong_fallbacks: list[str] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    request_timeout_seconds: float = Field(
        60.0, gt=0, description="deadline of a call whose gRPC caller set none"
    )
    stale_grace_seconds: int = Field(
        24 * 3600, ge=0, description="how long an expired entry may still be served as stale"
    )

    @model_validator(mode="before")
    @classmethod
    def _tiers_on_their_defaults(cls, data: object) -> object:
        # pydantic-settings hands a section over as one dict, which replaces the default_factory
        # value whole: ROUTECACHE_UPSTREAM__CHEAP__API_KEY alone (deploy/k8s) left cheap without
        # its model and prices, and the start was refused. Each field given overrides that field.
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for tier, default in (("cheap", _default_cheap), ("strong", _default_strong)):
            given = merged.get(tier)
            if isinstance(given, dict):
                merged[tier] = _onto_default(given, default())
        return merged

    @model_validator(mode="after")
    def _known_fallbacks(self) -> UpstreamSettings:
        for tier in ("cheap", "strong"):
            # A provider's name keys its client and breaker, and a tier's first provider goes
            # by the tier's name: one defined under that name would never be called.
            if tier in self.providers:
                raise ValueError(
                    f"upstream.providers: '{tier}' is a tier's name (upstream.{tier}); "
                    "give the fallback provider another name"
                )
            unknown = [n for n in getattr(self, f"{tier}_fallbacks") if n not in self.providers]
            if unknown:
                raise ValueError(
                    f"{tier}_fallbacks names unknown provider(s) {', '.join(unknown)}; "
                    "define them under upstream.providers"
                )
        return self

    def check_keys(self, given: Collection[str] = ()) -> None:
        """Reads the API key of every provider a chain calls, but those `given` (by name: a
        client supplied in code needs none); raises ConfigError for the first that is missing."""
        for tier in ("cheap", "strong"):
            for name, provider in self.chain(tier):
                if name not in given:
                    provider.resolve_api_key(provider_setting(name))

    def chain(self, tier: str) -> list[tuple[str, ProviderSettings]]:
        """The providers of a tier, in the order they are tried."""
        first: ProviderSettings = getattr(self, tier)
        names: list[str] = getattr(self, f"{tier}_fallbacks")
        return [(tier, first), *((name, self.providers[name]) for name in names)]


def provider_setting(name: str) -> str:
    """Where a provider of a chain is configured: a tier's first (named as the tier) or one of
    upstream.providers."""
    return f"upstream.{name}" if name in ("cheap", "strong") else f"upstream.providers.{name}"


class CacheSettings(_Section):
    embedder: Literal["minilm-onnx", "minilm", "hash"] = Field(
        "minilm-onnx",
        description="the packaged all-MiniLM-L6-v2 in ONNX Runtime (minilm-onnx) or torch "
        "(minilm); hash: tests only",
    )
    onnx_dir: Path | None = Field(
        None, description="where the ONNX export is kept; default ~/.cache/routecache/onnx"
    )
    embed_max_batch: int = Field(32, gt=0, description="texts per encoder pass at most")
    embed_max_wait_ms: float = Field(
        0.0, ge=0, le=50, description="extra wait for a fuller batch once the encoder is free"
    )
    ivf_threshold: int = Field(
        5_000, gt=0, description="entries in one scope before its flat index becomes IVF"
    )
    ivf_nprobe: int = Field(32, gt=0, description="IVF cells searched per lookup")
    faiss_threads: int = Field(1, gt=0, description="OpenMP threads for FAISS")
    similarity_threshold: float = Field(
        0.9, gt=0, le=1, description="cosine threshold when no verifier runs (verifier=off)"
    )
    verifier: Literal["auto", "cross-encoder", "off"] = Field(
        "auto",
        description="re-check the nearest candidate with the cross-encoder; auto: on unless "
        "the embedder is hash (its cosines mean nothing to the calibrated floor)",
    )
    verifier_dir: Path | None = Field(
        None, description="graph + hit_policy.json to use; default: the ones in the package"
    )
    max_false_hit_rate: float = Field(
        0.01, gt=0, lt=1, description="wrong cached answers accepted per lookup (verifier on)"
    )
    default_ttl_seconds: int = Field(7 * 24 * 3600, gt=0)
    max_entries: int = Field(100_000, gt=0)
    feedback_radius: float = Field(
        0.8, gt=0, le=1, description="entries this similar to a thumbs-downed one lose trust"
    )
    feedback_penalty: float = Field(
        0.05, ge=0, le=1, description="similarity each such thumbs-down adds to their threshold"
    )


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(url: str) -> str:
    """redis-py refuses any other URL only when the first connection is made (a traceback)."""
    if not url.startswith(REDIS_URL_SCHEMES):
        raise ValueError(f"a Redis URL starts with {', '.join(REDIS_URL_SCHEMES)}")
    try:  # a bad port, an unclosed IPv6 bracket, a bad query value: the same, parsed now
        parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    except ValueError as exc:  # its messages name the part, never the password
        raise ValueError(f"not a valid Redis URL: {exc}") from exc
    return url


def redis_url_for_display(url: str) -> str:
    """`url` fit to print or log: its scheme, host and port or socket path, and database, never
    its user, password (`user:pass@`, or `?password=` as redis-py's unix-socket form has it)
    or any other query value."""
    scheme = url.partition("://")[0]
    try:
        parts = parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    except ValueError:  # refused when the settings load: shown by its scheme alone
        return f"{scheme}://"
    db = parts.get("db")  # the query's db, else the path's, as redis-py connects to
    if scheme == "unix":
        return f"unix://{parts.get('path', '')}" + ("" if db is None else f"?db={db}")
    host = parts.get("host", "")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    port = f":{parts['port']}" if "port" in parts else ""
    return f"{scheme}://{host}{port}" + ("" if db is None else f"/{db}")


class StoreSettings(_Section):
    """Where cache entries, limits and events live: this process, or Redis shared by replicas."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: embedded, one process; redis: shared by replicas"
    )
    snapshot_path: Path | None = Field(
        None, description="memory backend: restore from and save to this file; None: off"
    )
    snapshot_interval_seconds: float = Field(300.0, gt=0)
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = Field("rc", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    timeout_seconds: float = Field(
        0.25, gt=0, description="a Redis call slower than this counts as Redis down"
    )
    # Opening a connection is the TCP connect plus redis-py's set-up commands (CLIENT SETINFO,
    # AUTH, SELECT): several round trips, so a burst of them on a busy event loop needs more than
    # one call's allowance. Never less than timeout_seconds.
    connect_timeout_seconds: float = Field(
        1.0, gt=0, description="opening a connection slower than this counts as Redis down"
    )
    max_connections: int = Field(64, gt=0)
    probe_interval_seconds: float = Field(0.5, gt=0, description="ping period while down")
    purge_interval_seconds: float = Field(5.0, gt=0, description="expired-entry sweep period")
    sync_stream_max_len: int = Field(100_000, gt=0)
    event_stream_max_len: int = Field(1_000_000, gt=0)
    event_buffer_max: int = Field(
        10_000, gt=0, description="events held in memory, all tenants together, while Redis is down"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr) -> SecretStr:
        check_redis_url(url.get_secret_value())
        return url


class _OperatingTargets(_Section):
    """At most one routing target; each maps to a threshold via the model's held-out curve."""

    target_strong_fraction: float | None = Field(
        None, ge=0, le=1, description="share of requests sent to the strong model"
    )
    target_quality: float | None = Field(
        None, ge=0, le=1.5, description="fraction of the strong model's accuracy gap recovered"
    )
    max_cost_ratio: float | None = Field(
        None, ge=0, le=1, description="spend ceiling relative to sending every request strong"
    )

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        targets = [self.target_strong_fraction, self.target_quality, self.max_cost_ratio]
        if sum(t is not None for t in targets) > 1:
            raise ValueError(
                "set at most one of target_strong_fraction, target_quality, max_cost_ratio"
            )
        return self

    def operating_point(self) -> OperatingPoint | None:
        targets = (self.target_strong_fraction, self.target_quality, self.max_cost_ratio)
        return None if all(t is None for t in targets) else OperatingPoint(*targets)


class ClassifierSettings(_OperatingTargets):
    artifact: Path | None = Field(None, description="a .skops file; default: the packaged model")
    routing_threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="routing score (P(cheap fails) - P(strong fails)) at or above which "
        "STRONG is used; default: the operating point below, else the model's stored threshold",
    )
    registry_dir: Path | None = Field(
        None,
        description="model registry (see classifier/registry.py); when set, the service "
        "serves its CURRENT version and hot-reloads promotions and rollbacks",
    )
    reload_interval_seconds: float = Field(
        5.0, gt=0, description="how often the registry's CURRENT pointer is checked"
    )


# What an answer of limits.max_answer_chars takes in a response at worst: 4 UTF-8 bytes a
# character, plus the rest of the message (ids, model, cache info), plus the validation report
# (counted apart, by the validators configured: see Settings.report_bytes).
UTF8_MAX_BYTES = 4
RESPONSE_OVERHEAD_BYTES = 64 << 10
# One validator result at worst: its message (cut at MAX_VALIDATOR_MESSAGE_CHARS), the model
# (a provider's name is believed up to MAX_MODEL_NAME_CHARS), its name (a request's validator's
# is at most 64 characters; an operator's own are taken to be no longer) and the action, at 4
# bytes a character, plus protobuf's tags and lengths.
VALIDATOR_NAME_CHARS = 64
VALIDATOR_RESULT_BYTES = (
    UTF8_MAX_BYTES * (MAX_VALIDATOR_MESSAGE_CHARS + MAX_MODEL_NAME_CHARS + VALIDATOR_NAME_CHARS)
    + 64
)
# The calls one request's report covers at worst: cheap, cheap retried, strong (see
# Generator.worst_case_calls); each adds a result per validator, and the answer limit's own.
REPORTED_CALLS = 3


class LimitSettings(_Section):
    max_messages: int = Field(64, gt=0)
    max_message_chars: int = Field(32_000, gt=0)
    max_total_chars: int = Field(128_000, gt=0)
    max_tags: int = Field(16, ge=0)
    max_output_tokens: int = Field(4096, gt=0)
    max_answer_chars: int = Field(
        20_000,
        gt=0,
        description="the length validator's bound (it must fit server.max_message_bytes)",
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=4096,
        description="the gRPC server refuses a larger request message before parsing it",
    )
    max_temperature: float = Field(2.0, ge=0, description="temperature must be 0 to this")
    max_ttl_seconds: int = Field(30 * 24 * 3600, gt=0, description="cache.ttl_seconds bound")
    max_tag_chars: int = Field(128, gt=0)
    max_end_user_id_chars: int = Field(256, gt=0)
    max_request_validators: int = Field(8, ge=0, description="validators on one request")
    max_validator_patterns: int = Field(16, gt=0, description="regexes in one request validator")
    max_schema_chars: int = Field(32_000, gt=0, description="a request's JSON Schema text")
    max_id_chars: int = Field(256, gt=0, description="response ids, entry ids, tags to invalidate")
    max_feedback_chars: int = Field(8_000, gt=0, description="a feedback correction or comment")
    max_top_n: int = Field(100, gt=0, description="GetStats top_n")


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="serve Prometheus metrics over HTTP")
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0: any free port")


class LoggingSettings(_Section):
    format: Literal["text", "json"] = Field("text", description="json: one object a line")
    level: Literal["debug", "info", "warning", "error"] = "info"


class EventSettings(_Section):
    path: Path | None = Field(
        None, description="append events to this JSONL file; default: in memory only"
    )


ValidatorKind = Literal["json_schema", "regex", "length", "pii", "refusal", "custom"]
OnFailAction = Literal["escalate", "retry", "redact", "flag", "block"]
PiiKind = Literal["email", "phone", "card", "iban", "ssn"]


def _all_pii_kinds() -> list[PiiKind]:
    return ["email", "phone", "card", "iban", "ssn"]


class ValidatorSpec(_Section):
    """One output validator and what to do when an answer fails it (see docs/validators.md)."""

    kind: ValidatorKind
    name: str | None = Field(None, description="default: the kind")
    on_fail: OnFailAction | None = Field(None, description="default: redact for pii, else escalate")
    must_match: list[str] = Field(default_factory=list, description="regex: each must match")
    must_not_match: list[str] = Field(default_factory=list, description="regex: none may match")
    min_chars: int = Field(1, ge=0, description="length: shorter fails (all blank: 0)")
    max_chars: int | None = Field(None, gt=0, description="length: default limits.max_answer_chars")
    pii: list[PiiKind] = Field(default_factory=_all_pii_kinds)
    import_path: str | None = Field(None, description="custom: 'package.module:Factory'")
    options: dict[str, object] = Field(default_factory=dict, description="custom: factory kwargs")

    @model_validator(mode="after")
    def _consistent(self) -> ValidatorSpec:
        if self.kind == "custom" and not self.import_path:
            raise ValueError("a custom validator needs import_path ('package.module:Factory')")
        if self.kind == "regex" and not (self.must_match or self.must_not_match):
            raise ValueError("a regex validator needs must_match or must_not_match")
        if self.on_fail == "redact" and self.kind not in ("pii", "custom"):
            raise ValueError(f"on_fail=redact needs a validator that can redact, not {self.kind}")
        if self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars: no answer could pass")
        return self


def _default_validators() -> list[ValidatorSpec]:
    return [ValidatorSpec(kind="length"), ValidatorSpec(kind="json_schema")]


# A tenant name starts every scope, exact key and entry id, split at ':', and is the Redis
# hash tag in braces: those characters in a name could put one tenant's keys in another's.
TENANT_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class TenantRateSettings(_Section):
    """Token buckets: each refills at limit / window_seconds and holds at most one window."""

    window_seconds: float = Field(60.0, gt=0)
    requests: float | None = Field(None, gt=0, description="requests per window, all users")
    tokens: float | None = Field(None, gt=0, description="model tokens per window, all users")
    user_requests: float | None = Field(None, gt=0, description="per end_user_id")
    user_tokens: float | None = Field(None, gt=0, description="per end_user_id")


class TenantBudgetSettings(_Section):
    """USD per UTC day / month. Hard caps reserve each request's worst case before the call."""

    daily_usd: float | None = Field(None, ge=0, description="hard cap per UTC day")
    monthly_usd: float | None = Field(None, ge=0, description="hard cap per UTC month")
    soft_daily_usd: float | None = Field(None, ge=0, description="alert when crossed")
    soft_monthly_usd: float | None = Field(None, ge=0, description="alert when crossed")
    user_daily_usd: float | None = Field(None, ge=0, description="hard cap per end user")
    user_monthly_usd: float | None = Field(None, ge=0, description="hard cap per end user")
    policy: Literal["refuse", "downgrade"] = Field(
        "refuse", description="at a hard cap: refuse, or serve the cheap tier while it fits"
    )


class KeySettings(_Section):
    """The API key registry: keys added, rotated and revoked at run time (routecache keys)."""

    source: Literal["auto", "file", "redis", "none"] = Field(
        "auto", description="auto: redis on the redis backend, else file when registry_path is set"
    )
    registry_path: Path | None = Field(None, description="the JSON key registry file")
    rotation_overlap_seconds: int = Field(
        86400, ge=0, description="how long a rotated-out key stays valid (CLI default)"
    )


class BudgetSettings(_Section):
    # A secret: a webhook (Slack's, say) carries its token in the URL.
    alert_webhook_url: SecretStr | None = Field(
        None, description="http(s) URL POSTed a JSON body when a soft budget is crossed"
    )
    webhook_timeout_seconds: float = Field(2.0, gt=0)
    reservation_ttl_seconds: float = Field(
        600.0, gt=0, description="a reservation a crashed replica left behind expires after this"
    )
    day_retention_days: int = Field(40, gt=0, description="how long daily spend keys are kept")
    # Each settle renews a key's expiry: a monthly key kept for less than the longest month
    # would vanish in a quiet spell mid-month, and with it the spend its hard cap counts.
    month_retention_days: int = Field(400, ge=31, description="how long monthly ones are kept")

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, secret: SecretStr | None) -> SecretStr | None:
        # Checked now, not at the first alert: httpx raises on a port past 65535 or a missing
        # host inside the delivery task, where the alert is lost long after the start. The
        # messages never quote the URL: its path may hold the webhook's token.
        if secret is not None:
            check_http_url(secret.get_secret_value())
        return secret


class TenantSettings(_OperatingTargets):
    name: str = Field(pattern=TENANT_NAME_PATTERN)
    api_key_sha256: list[str] = Field(
        default_factory=list,
        description="hex SHA-256 of each static API key (the key registry holds the others)",
    )
    models_allowed: list[str] | None = Field(
        None,
        min_length=1,  # [] would turn every tier off: refused here rather than at the build
        description="models this tenant may use; a tier whose model is not listed is off",
    )
    rate: TenantRateSettings = Field(default_factory=TenantRateSettings)
    budget: TenantBudgetSettings = Field(default_factory=TenantBudgetSettings)
    routing_threshold: float | None = Field(None, ge=-1, le=1)
    similarity_threshold: float | None = Field(None, gt=0, le=1)
    max_false_hit_rate: float | None = Field(
        None, gt=0, lt=1, description="the tenant's false-hit budget; default cache's"
    )
    default_ttl_seconds: int | None = Field(None, gt=0)
    requests_per_second: float | None = Field(None, gt=0)
    daily_budget_usd: float | None = Field(None, ge=0)
    validators: list[ValidatorSpec] | None = Field(
        None, description="replaces the service-wide validators for this tenant"
    )

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("each entry must be a lowercase hex SHA-256 (64 characters)")
        return digests


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROUTECACHE_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    tenants: list[TenantSettings] = Field(default_factory=list)
    validators: list[ValidatorSpec] = Field(default_factory=_default_validators)
    keys: KeySettings = Field(default_factory=KeySettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)

    @field_validator("tenants")
    @classmethod
    def _one_entry_per_tenant(cls, tenants: list[TenantSettings]) -> list[TenantSettings]:
        # A name keys the spend, buckets and cache: two entries would share them while each
        # entry's API keys carried its own caps and limits.
        seen: set[str] = set()
        for tenant in tenants:
            if tenant.name in seen:
                raise ValueError(f"tenant {tenant.name} is configured twice")
            seen.add(tenant.name)
        # A key authenticates as one tenant: refused here, not by the authenticator once the
        # port is open and the models are loaded (a traceback from serve).
        owner: dict[str, str] = {}
        for tenant in tenants:
            for digest in tenant.api_key_sha256:
                if digest in owner:
                    raise ValueError(reused_digest(owner[digest], tenant.name, digest))
                owner[digest] = tenant.name
        return tenants

    def deliverable_answer_chars(self) -> int:
        """The longest answer one response carries at worst (4 UTF-8 bytes a character, plus
        the rest of the message and the validation report): the generator blocks any longer,
        whatever the validators."""
        room = self.server.max_message_bytes - RESPONSE_OVERHEAD_BYTES - self.report_bytes()
        return max(room, 0) // UTF8_MAX_BYTES

    def report_bytes(self) -> int:
        """The most a served answer's validation report takes: a result for each validator
        (the longest list, a tenant's or the service's, plus a request's own) and the answer
        limit, on each call a request can make. An escalated answer is served with the cheap
        answer's failed results, so they count too."""
        lists = [self.validators, *(t.validators for t in self.tenants if t.validators is not None)]
        per_call = max(map(len, lists)) + self.limits.max_request_validators + 1
        return REPORTED_CALLS * per_call * VALIDATOR_RESULT_BYTES

    @model_validator(mode="after")
    def _answer_limit_fits_a_message(self) -> Self:
        # An answer the length validator passes must fit a response (the generator blocks
        # those that cannot: paid for, they would be cached and fail every delivery).
        limit, report = self.limits.max_answer_chars, self.report_bytes()
        worst = limit * UTF8_MAX_BYTES + RESPONSE_OVERHEAD_BYTES + report
        if limit > self.deliverable_answer_chars():
            raise ValueError(
                f"limits.max_answer_chars {limit} (up to {worst} bytes in a response: "
                f"{UTF8_MAX_BYTES} a character, plus {report} for the validation report and "
                f"{RESPONSE_OVERHEAD_BYTES} for the rest) exceeds server.max_message_bytes "
                f"({self.server.max_message_bytes})"
            )
        return self

    @model_validator(mode="after")
    def _length_bounds_reachable(self) -> Self:
        # Without max_chars a length validator's bound is limits.max_answer_chars, another
        # section: a minimum above it would fail every answer, after both models were paid.
        answer_limit = self.limits.max_answer_chars
        specs = [*self.validators, *(v for t in self.tenants for v in t.validators or ())]
        for spec in specs:
            if spec.max_chars is None and spec.min_chars > answer_limit:
                raise ValueError(
                    f"validator {spec.name or spec.kind}: min_chars {spec.min_chars} exceeds "
                    f"limits.max_answer_chars ({answer_limit}); no answer could pass"
                )
        return self

    @model_validator(mode="after")
    def _allowed_models_served(self) -> Self:
        # Refused when the settings load, not when the service is built (the port open, the
        # models loaded): a tenant allowed neither tier could be answered by nothing.
        served = {self.upstream.cheap.model, self.upstream.strong.model}
        for tenant in self.tenants:
            if tenant.models_allowed is not None and served.isdisjoint(tenant.models_allowed):
                raise ValueError(
                    f"tenant {tenant.name}: models_allowed {tenant.models_allowed} names neither "
                    f"the cheap ({self.upstream.cheap.model}) nor the strong "
                    f"({self.upstream.strong.model}) model"
                )
        return self

    @model_validator(mode="after")
    def _reservations_outlast_calls(self) -> Self:
        # Refused rather than a default deadline clamped without a word: a call whose caller
        # set no deadline would end sooner than upstream.request_timeout_seconds says.
        ttl, timeout = self.budgets.reservation_ttl_seconds, self.upstream.request_timeout_seconds
        if ttl <= timeout + SETTLE_MARGIN_SECONDS:
            raise ValueError(
                f"budgets.reservation_ttl_seconds ({ttl:g}) must exceed "
                f"upstream.request_timeout_seconds ({timeout:g}) by more than "
                f"{SETTLE_MARGIN_SECONDS:g} s (the time to settle a call): a call's spend "
                "reservation would expire while the call runs, and stop holding the caps"
            )
        return self

    def longest_call_seconds(self) -> float:
        """The most time a call may take, whatever its caller's deadline: it ends while its
        spend reservation still holds, with time left to settle it."""
        return self.budgets.reservation_ttl_seconds - SETTLE_MARGIN_SECONDS

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file (see load_settings) ranks below the environment.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class ConfigError(Exception):
    """The configuration cannot start a service; the message says what to fix."""


def _refuse_unknown_env_sections() -> None:
    """A ROUTECACHE_SECTION__KEY variable whose SECTION is no setting is a typo: pydantic-settings
    would ignore it without a word. Single-level names (ROUTECACHE_CONFIG, a provider's
    api_key_env) are not settings and are left alone."""
    prefix = "routecache_"
    for name in os.environ:
        lowered = name.lower()
        if lowered.startswith(prefix) and "__" in lowered:
            section = lowered[len(prefix) :].split("__", 1)[0]
            if section not in Settings.model_fields:
                raise ConfigError(
                    f"invalid configuration: environment variable {name}: "
                    f"no settings section {section!r}"
                )


def _refuse_indexed_list_variables() -> None:
    """ROUTECACHE_TENANTS__0__NAME: pydantic-settings reads a list section's nested variable as a
    mapping, refused as "tenants: Input should be a valid list", naming no variable."""
    prefix = "routecache_"
    lists = {name for name, f in Settings.model_fields.items() if get_origin(f.annotation) is list}
    for name in os.environ:
        lowered = name.lower()
        section, nested, _ = lowered[len(prefix) :].partition("__")
        if lowered.startswith(prefix) and nested and section in lists:
            raise ConfigError(
                f"invalid configuration: environment variable {name}: {section} is a list, "
                f"set whole: in the config file, or as JSON in ROUTECACHE_{section.upper()}"
            )


def _refuse_single_underscore_sections(settings: Settings) -> None:
    """ROUTECACHE_SERVER_PORT (one underscore) is ROUTECACHE_SERVER__PORT mistyped, and would
    be ignored without a word. A provider's api_key_env may be named so on purpose."""
    prefix = "routecache_"
    upstream = settings.upstream
    providers = [upstream.cheap, upstream.strong, *upstream.providers.values()]
    key_variables = {p.api_key_env for p in providers if p.api_key_env}
    for name in os.environ:
        lowered = name.lower()
        if not lowered.startswith(prefix) or name in key_variables:
            continue
        rest = lowered[len(prefix) :]
        for section in Settings.model_fields:
            if rest.startswith(section + "_") and not rest.startswith(section + "__"):
                raise ConfigError(
                    f"invalid configuration: environment variable {name}: nested settings "
                    f"take two underscores (ROUTECACHE_{section.upper()}__"
                    f"{name[len(prefix) + len(section) + 1 :]})"
                )


def _problem(error: ErrorDetails) -> str:
    """'section.field: message'; a check across sections (of Settings itself) names no field."""
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read settings, failing fast with one readable message per problem; without
    `config_file`, from the file ROUTECACHE_CONFIG names, if it names one."""
    if config_file is None and (named := os.environ.get(CONFIG_ENV_VAR)):
        config_file = Path(named)
    return read_settings(config_file, **overrides)


def read_settings(config_file: Path | None, **overrides: object) -> Settings:
    """As load_settings, from `config_file` alone: ROUTECACHE_CONFIG is not read."""
    _refuse_unknown_env_sections()
    _refuse_indexed_list_variables()
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        settings_cls = type("FileSettings", (Settings,), {"model_config": config})
    settings = _validated(settings_cls, config_file, overrides)
    _refuse_single_underscore_sections(settings)
    return settings


class _EmbeddedSettings(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def embedded_settings(**overrides: object) -> Settings:
    """The embedded default with `overrides` only: no ROUTECACHE_* variable, no config file
    (the demo's settings, whatever the shell running it exports)."""
    return _validated(_EmbeddedSettings, None, overrides)


def _validated(settings_cls: type[Settings], config_file: Path | None,
               overrides: dict[str, object]) -> Settings:  # fmt: skip
    try:
        return settings_cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib reads UTF-8 only (environment values are text)
        raise ConfigError(f"config file {config_file} is not UTF-8 text ({exc})") from exc
    except OSError as exc:  # permission denied, an I/O error
        if config_file is None:  # no file was read: not one to name
            raise
        raise ConfigError(f"cannot read config file {config_file}: {exc.strerror or exc}") from exc
    except SettingsError as exc:  # a section's variable that is not JSON (ROUTECACHE_SERVER=x)
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"invalid configuration: {exc}{cause}") from exc

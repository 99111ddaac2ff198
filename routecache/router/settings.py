"""One settings object, read from ROUTECACHE_* environment variables and an optional TOML file.

Nested sections use `__` in variable names, e.g. ROUTECACHE_SERVER__PORT=50051. Environment
variables override the TOML file, which overrides the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV_VAR = "ROUTECACHE_CONFIG"


class _Section(BaseModel):
    # A misspelt key must fail at start, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    max_message_bytes: int = Field(1 << 20, gt=0, description="larger gRPC messages are refused")
    grace_seconds: float = Field(5.0, ge=0, description="drain time for in-flight calls on stop")


class ProviderSettings(_Section):
    """An OpenAI-compatible chat-completions endpoint serving one model."""

    base_url: str = "http://127.0.0.1:8089/v1"
    model: str
    api_key: SecretStr | None = None
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    timeout_seconds: float = Field(30.0, gt=0)


def _default_cheap() -> ProviderSettings:
    return ProviderSettings(
        model="mixtral-8x7b-instruct", input_usd_per_mtok=0.6, output_usd_per_mtok=0.6
    )


def _default_strong() -> ProviderSettings:
    return ProviderSettings(
        model="gpt-4-1106-preview", input_usd_per_mtok=10.0, output_usd_per_mtok=30.0
    )


class UpstreamSettings(_Section):
    cheap: ProviderSettings = Field(default_factory=_default_cheap)
    strong: ProviderSettings = Field(default_factory=_default_strong)


class CacheSettings(_Section):
    embedder: Literal["minilm", "hash"] = Field(
        "minilm", description="minilm: the packaged all-MiniLM-L6-v2; hash: tests only"
    )
    similarity_threshold: float = Field(0.9, gt=0, le=1)
    default_ttl_seconds: int = Field(7 * 24 * 3600, gt=0)
    max_entries: int = Field(100_000, gt=0)


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
    max_connections: int = Field(64, gt=0)
    probe_interval_seconds: float = Field(0.5, gt=0, description="ping period while down")
    purge_interval_seconds: float = Field(5.0, gt=0, description="expired-entry sweep period")
    sync_stream_max_len: int = Field(100_000, gt=0)
    event_stream_max_len: int = Field(1_000_000, gt=0)
    event_buffer_max: int = Field(
        10_000, gt=0, description="events held in memory while Redis is down"
    )


class ClassifierSettings(_Section):
    artifact: Path | None = Field(None, description="a .skops file; default: the packaged model")
    routing_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="P(cheap fails) at or above which STRONG is used; "
        "default: the threshold stored with the model",
    )


class LimitSettings(_Section):
    max_messages: int = Field(64, gt=0)
    max_message_chars: int = Field(32_000, gt=0)
    max_total_chars: int = Field(128_000, gt=0)
    max_tags: int = Field(16, ge=0)
    max_output_tokens: int = Field(4096, gt=0)
    max_answer_chars: int = Field(20_000, gt=0, description="the length validator's bound")


class TenantSettings(_Section):
    name: str = Field(min_length=1)
    api_key_sha256: list[str] = Field(min_length=1, description="hex SHA-256 of each API key")
    routing_threshold: float | None = Field(None, ge=0, le=1)
    similarity_threshold: float | None = Field(None, gt=0, le=1)
    default_ttl_seconds: int | None = Field(None, gt=0)
    requests_per_second: float | None = Field(None, gt=0)
    daily_budget_usd: float | None = Field(None, ge=0)

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
    tenants: list[TenantSettings] = Field(default_factory=list)

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


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read settings, failing fast with one readable message per problem."""
    if config_file is None and (named := os.environ.get(CONFIG_ENV_VAR)):
        config_file = Path(named)
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        settings_cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc

"""Validators as configured plugins: which ones run for a tenant, and what a failure leads to.

A validator is anything with `name`, `applies_to(request)` and `check(text, request)` (the
Validator port); one that can also clean an answer has `redact(text)`. Custom ones are loaded
by import path ("package.module:Factory", called with the spec's options).
"""

from __future__ import annotations

import importlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import regex
from pydantic import ValidationError

from routecache.domain import ChatRequest, RequestValidator
from routecache.errors import InvalidArgument
from routecache.router.pii import PiiValidator
from routecache.router.ports import Validator
from routecache.router.settings import ConfigError, LimitSettings, ValidatorSpec
from routecache.router.validators import (
    JsonSchemaValidator,
    LengthValidator,
    RefusalValidator,
    RegexValidator,
    check_pattern_size,
)


class OnFail(StrEnum):
    ESCALATE = "escalate"  # ask the strong model instead; fails the request if it was strong
    RETRY = "retry"  # ask the same tier once more, then escalate
    REDACT = "redact"  # serve (and cache) the answer with the offending parts replaced
    FLAG = "flag"  # serve the answer marked failed; never cached
    BLOCK = "block"  # fail the request at once (FAILED_PRECONDITION)


# What a failure led to, as reported in ValidatorResult.action.
ACTION_DONE = {
    OnFail.ESCALATE: "escalated",
    OnFail.RETRY: "retried",
    OnFail.REDACT: "redacted",
    OnFail.FLAG: "flagged",
    OnFail.BLOCK: "blocked",
}


@runtime_checkable
class Redactor(Protocol):
    def redact(self, text: str) -> str: ...


@dataclass(frozen=True)
class Configured:
    validator: Validator
    on_fail: OnFail

    @property
    def name(self) -> str:
        return self.validator.name


def default_on_fail(spec: ValidatorSpec) -> OnFail:
    if spec.on_fail is not None:
        return OnFail(spec.on_fail)
    return OnFail.REDACT if spec.kind == "pii" else OnFail.ESCALATE


def build_validator(spec: ValidatorSpec, limits: LimitSettings) -> Configured:
    """Raises ConfigError for a custom validator that cannot be loaded or cannot redact, or a
    regex pattern that cannot be compiled or that the two engines read differently."""
    name = spec.name or spec.kind
    validator: Validator
    if spec.kind == "json_schema":
        validator = JsonSchemaValidator(name=name)
    elif spec.kind == "regex":
        validator = _regex_validator(spec, name)
    elif spec.kind == "length":
        validator = LengthValidator(spec.min_chars, spec.max_chars or limits.max_answer_chars, name)
    elif spec.kind == "pii":
        validator = PiiValidator(spec.pii, name)
    elif spec.kind == "refusal":
        validator = RefusalValidator(name)
    else:
        validator = _custom_validator(spec)
    on_fail = default_on_fail(spec)
    if on_fail is OnFail.REDACT and not isinstance(validator, Redactor):
        raise ConfigError(f"validator {name}: on_fail=redact, but it has no redact(text)")
    return Configured(validator, on_fail)


def _custom_validator(spec: ValidatorSpec) -> Validator:
    """A plugin names its own results, so a configured name it does not carry is refused: it
    would be the metric label and the report name of nothing."""
    validator = load_custom(spec.import_path or "", spec.options)
    if spec.name is not None and spec.name != validator.name:
        raise ConfigError(
            f"validator {spec.name}: a custom validator is named by its plugin "
            f"({validator.name!r}); leave out name or set it to that"
        )
    return validator


def _regex_validator(spec: ValidatorSpec, name: str) -> RegexValidator:
    """Raises ConfigError for a pattern it cannot take: a configured one is then a one-line
    refusal to start (exit 2), not a traceback."""
    try:
        return RegexValidator(spec.must_match, spec.must_not_match, name)
    # OverflowError: what `re` raises for a repeat count past its limit (a{4294967296}).
    except (re.error, regex.error, OverflowError) as exc:
        pattern = getattr(exc, "pattern", None)
        which = f" pattern {pattern!r}:" if isinstance(pattern, str) else ""
        raise ConfigError(f"validator {name}:{which} {exc}") from exc


def load_custom(import_path: str, options: Mapping[str, object]) -> Validator:
    module_name, _, attribute = import_path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        validator = factory(**options)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"custom validator {import_path!r}: {exc}") from exc
    missing = [a for a in ("name", "applies_to", "check") if not hasattr(validator, a)]
    if missing:
        raise ConfigError(f"custom validator {import_path!r} lacks {', '.join(missing)}")
    return validator  # type: ignore[no-any-return]


def build_validators(specs: Sequence[ValidatorSpec], limits: LimitSettings) -> list[Configured]:
    built = [build_validator(spec, limits) for spec in specs]
    names = [c.name for c in built]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"validator names must be unique; repeated: {', '.join(duplicates)}")
    return built


MAX_REQUEST_PATTERN_CHARS = 200  # a caller's regex runs on our CPU: keep it small


def spec_of(requested: RequestValidator) -> ValidatorSpec:
    """The settings form of a per-request validator; raises ValueError for a bad one."""
    if requested.kind == "custom":
        raise ValueError("custom validators are configured per tenant, not per request")
    patterns = (*requested.must_match, *requested.must_not_match)
    if any(len(p) > MAX_REQUEST_PATTERN_CHARS for p in patterns):
        raise ValueError(f"patterns are limited to {MAX_REQUEST_PATTERN_CHARS} characters")
    for pattern in patterns:
        check_pattern_size(pattern)
    fields: dict[str, object] = {"kind": requested.kind}
    optional = {
        "name": requested.name,
        "on_fail": requested.on_fail,
        "must_match": list(requested.must_match),
        "must_not_match": list(requested.must_not_match),
        "min_chars": requested.min_chars,
        "max_chars": requested.max_chars,
        "pii": list(requested.pii),
    }
    fields.update({key: value for key, value in optional.items() if value})
    return ValidatorSpec.model_validate(fields)


class RequestValidators:
    """Builds the validators a request asks for, each distinct one compiled once per tenant.

    Per tenant: with one shared cache, how fast a request's validators were ready would tell a
    tenant whether another had just used the same ones, and one tenant could flush another's.
    """

    def __init__(self, limits: LimitSettings, max_cached: int = 512) -> None:
        self._limits = limits
        self._built: defaultdict[str, dict[RequestValidator, Configured]] = defaultdict(dict)
        self._max_cached = max_cached

    def build(
        self, request: ChatRequest, reserved: Sequence[str], tenant: str = ""
    ) -> list[Configured]:
        """Raises InvalidArgument naming the bad validator; `reserved`: the tenant's names."""
        built: list[Configured] = []
        cache = self._built[tenant]
        for index, requested in enumerate(request.validators):
            field = f"validators[{index}]"
            try:
                configured = cache.get(requested) or self._compile(cache, requested)
            # OverflowError: what `re` raises for a repeat count past its limit (a{4294967296}).
            except (ValueError, ConfigError, re.error, regex.error, OverflowError) as exc:
                raise InvalidArgument(field, _short(exc)) from exc
            if configured.name in reserved or configured.name in [c.name for c in built]:
                raise InvalidArgument(field, f"the name {configured.name!r} is already in use")
            built.append(configured)
        return built

    def _compile(
        self, cache: dict[RequestValidator, Configured], requested: RequestValidator
    ) -> Configured:
        configured = build_validator(spec_of(requested), self._limits)
        if len(cache) >= self._max_cached:
            cache.clear()
        cache[requested] = configured
        return configured


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)

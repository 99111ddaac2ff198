"""Validators as configured plugins: which ones run for a tenant, and what a failure leads to.

A validator is anything with `name`, `applies_to(request)` and `check(text, request)` (the
Validator port); one that can also clean an answer has `redact(text)`. Custom ones are loaded
by import path ("package.module:Factory", called with the spec's options).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from routecache.router.pii import PiiValidator
from routecache.router.ports import Validator
from routecache.router.settings import ConfigError, LimitSettings, ValidatorSpec
from routecache.router.validators import (
    JsonSchemaValidator,
    LengthValidator,
    RefusalValidator,
    RegexValidator,
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
    """Raises ConfigError for a custom validator that cannot be loaded or cannot redact."""
    name = spec.name or spec.kind
    validator: Validator
    if spec.kind == "json_schema":
        validator = JsonSchemaValidator()
    elif spec.kind == "regex":
        validator = RegexValidator(spec.must_match, spec.must_not_match, name)
    elif spec.kind == "length":
        validator = LengthValidator(spec.min_chars, spec.max_chars or limits.max_answer_chars, name)
    elif spec.kind == "pii":
        validator = PiiValidator(spec.pii, name)
    elif spec.kind == "refusal":
        validator = RefusalValidator(name)
    else:
        validator = load_custom(spec.import_path or "", spec.options)
    on_fail = default_on_fail(spec)
    if on_fail is OnFail.REDACT and not isinstance(validator, Redactor):
        raise ConfigError(f"validator {name}: on_fail=redact, but it has no redact(text)")
    return Configured(validator, on_fail)


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

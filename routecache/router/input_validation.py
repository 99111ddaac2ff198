"""Reject bad requests before they cost anything; every error names the offending field."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import regex
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

from routecache.domain import ChatRequest, Feedback, ResponseFormatType, Role
from routecache.errors import InvalidArgument
from routecache.router.settings import LimitSettings
from routecache.router.validators import (
    NotJsonError,
    check_pattern_size,
    check_schema_pattern,
    parse_json,
)
from routecache.unicode_text import check_encodable

# jsonschema's meta-schema check costs about 0.7 ms a subschema, on the event loop and before
# the rate limit: 10,000 of them (30 kB) held every tenant's calls for 4.5 s. A real schema
# (100 typed properties: about 100 objects) is far below; at the limit the check takes < 1 s.
MAX_SCHEMA_SUBSCHEMAS = 1000
# Admission compiles every pattern of a schema with `regex` (below, _SCHEMA_FORMATS), at about
# 0.5 us an unrolled item: 1,000 patterns of 10,000 items each held the loop for seconds. A real
# schema's patterns ("^[A-Z]{3}$", a UUID's) unroll to tens of items each.
MAX_SCHEMA_PATTERN_ITEMS = 100_000
_SCHEMA_FIELD = "params.response_format.json_schema"
DIALECT = "https://json-schema.org/draft/2020-12/schema"  # the only one request schemas use

# Why a response_format JSON Schema (its text) is refused, or None if it is admitted.
SchemaCheck = Callable[[str], str | None]


def validate_request(
    request: ChatRequest, limits: LimitSettings, schema_check: SchemaCheck | None = None
) -> None:
    """Raises InvalidArgument naming the field. `schema_check`: the caller's (cached) check of
    a response_format JSON Schema, such as SchemaVerdicts.for_tenant; None checks it afresh."""
    if request.problems:  # found while translating; refused here, after the API key
        field, problem = request.problems[0]
        raise InvalidArgument(field, problem)
    _check_messages(request, limits)
    _check_params(request, limits, schema_check or _schema_problem)
    _check_cache_control(request, limits)
    _check_text("end_user_id", request.end_user_id, limits.max_end_user_id_chars)
    _check_validators(request, limits)


def validate_feedback(feedback: Feedback, limits: LimitSettings) -> None:
    if feedback.problems:  # found while translating; refused here, after the API key
        field, problem = feedback.problems[0]
        raise InvalidArgument(field, problem)
    if not feedback.response_id:
        raise InvalidArgument("response_id", "required")
    _check_text("response_id", feedback.response_id, limits.max_id_chars)
    _check_text("correction", feedback.correction, limits.max_feedback_chars)
    _check_text("comment", feedback.comment, limits.max_feedback_chars)


def validate_invalidation(entry_id: str, tag: str, limits: LimitSettings) -> None:
    _check_text("entry_id", entry_id, limits.max_id_chars)
    _check_text("tag", tag, limits.max_id_chars)


def validate_top_n(top_n: int, limits: LimitSettings) -> None:
    if not 0 <= top_n <= limits.max_top_n:
        raise InvalidArgument("top_n", f"must be 0 to {limits.max_top_n}")


def _check_text(field: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidArgument(field, f"longer than {max_chars} characters")


def _check_messages(request: ChatRequest, limits: LimitSettings) -> None:
    messages = request.messages
    if not messages:
        raise InvalidArgument("messages", "must hold at least one message")
    if len(messages) > limits.max_messages:
        raise InvalidArgument("messages", f"at most {limits.max_messages} messages allowed")
    total = 0
    for position, message in enumerate(messages):
        field = f"messages[{position}].content"
        if not message.content.strip():
            raise InvalidArgument(field, "must not be empty")
        if len(message.content) > limits.max_message_chars:
            raise InvalidArgument(field, f"longer than {limits.max_message_chars} characters")
        total += len(message.content)
    if total > limits.max_total_chars:
        raise InvalidArgument("messages", f"more than {limits.max_total_chars} characters in all")
    if messages[-1].role is not Role.USER:
        raise InvalidArgument(
            f"messages[{len(messages) - 1}].role", "the last message must be USER"
        )


def _check_params(request: ChatRequest, limits: LimitSettings, schema_check: SchemaCheck) -> None:
    params = request.params
    hottest = limits.max_temperature
    if params.temperature is not None and not (
        math.isfinite(params.temperature) and 0.0 <= params.temperature <= hottest
    ):
        raise InvalidArgument("params.temperature", f"must be between 0 and {hottest:g}")
    if params.top_p is not None and not (math.isfinite(params.top_p) and 0.0 < params.top_p <= 1):
        raise InvalidArgument("params.top_p", "must be above 0 and at most 1")
    if params.max_tokens is not None and not 1 <= params.max_tokens <= limits.max_output_tokens:
        raise InvalidArgument("params.max_tokens", f"must be 1 to {limits.max_output_tokens}")
    response_format = params.response_format
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
        _check_text(_SCHEMA_FIELD, response_format.json_schema, limits.max_schema_chars)
        if problem := schema_check(response_format.json_schema):
            raise InvalidArgument(_SCHEMA_FIELD, problem)
    elif response_format.json_schema:
        raise InvalidArgument(_SCHEMA_FIELD, "only allowed with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")


def _schema_problem(schema_text: str) -> str | None:
    """Why a request's JSON Schema is refused, or None if it is admitted."""
    if not schema_text.strip():
        return "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA"
    try:
        schema = parse_json(schema_text)
    except NotJsonError as exc:
        return str(exc)
    if not _encodable(schema):
        return "not valid Unicode: a lone surrogate escape"
    # Counted before the meta-schema check, whose cost grows with it.
    if _subschemas(schema) > MAX_SCHEMA_SUBSCHEMAS:
        return f"more than {MAX_SCHEMA_SUBSCHEMAS} subschemas (objects and true/false)"
    if other := next(foreign_dialects(schema), None):
        return f"$schema may only name JSON Schema 2020-12 ({DIALECT!r}), not {other!r}"
    # Sized before the meta-schema check, which compiles them.
    if problem := _patterns_problem(schema):
        return problem
    try:
        Draft202012Validator.check_schema(schema, format_checker=_SCHEMA_FORMATS)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {_schema_error(exc)}"
    except RecursionError:
        return "nested too deeply"
    if remote := next(non_local_refs(schema), None):
        # A caller's schema must never make the service fetch a URL (SSRF).
        return f"only local references ('#...') allowed, not {remote!r}"
    return None


def _patterns_problem(schema: object) -> str | None:
    """Why a schema's patterns are too costly to compile, each or all together; None if not.
    Those in data (a `const` holding {"pattern": ...}) count too: an upper bound."""
    total = 0
    for pattern in schema_patterns(schema):
        try:
            total += check_pattern_size(pattern)
        except (re.error, OverflowError):
            continue  # never compiled: the meta-schema check refuses it if it is a pattern
        except ValueError as exc:
            return str(exc)
    if total > MAX_SCHEMA_PATTERN_ITEMS:
        return (
            f"patterns too large in all ({total} items once their repeats are unrolled, at "
            f"most {MAX_SCHEMA_PATTERN_ITEMS})"
        )
    return None


def _admissible_pattern(pattern: object) -> bool:
    if isinstance(pattern, str):
        check_schema_pattern(pattern)
    return True  # raises for a bad one: its message is the refusal's


# The meta-schema check's own format checks, but "regex" (every `pattern` value and
# `patternProperties` key, no pattern in data) gets check_schema_pattern: `re` alone admitted
# patterns that the `regex` engine checking answers refuses ([[:foo:]]) or reads as a fuzzy
# match ({e}), and every answer's check then raised, after paying for both calls.
_SCHEMA_FORMATS = FormatChecker(Draft202012Validator.FORMAT_CHECKER.checkers)
_SCHEMA_FORMATS.checks("regex", raises=(ValueError, OverflowError, re.error, regex.error))(
    _admissible_pattern
)


def _schema_error(exc: SchemaError) -> str:
    """What a meta-schema check error says; a refused pattern is named with where it is."""
    if exc.validator == "format" and exc.cause is not None:
        where = "".join(f"/{_pointer_part(part)}" for part in exc.absolute_path) or "/"
        # check_pattern_size's message quotes the pattern too
        detail = str(exc.cause).removeprefix(f"pattern {exc.instance!r}: ")
        return f"the pattern {exc.instance!r} at {where}: {detail}"
    return exc.message


def _pointer_part(part: object) -> str:
    """A path step as JSON Pointer writes it (RFC 6901): "~" and "/" escaped."""
    return str(part).replace("~", "~0").replace("/", "~1")


def _subschemas(schema: object) -> int:
    """Objects and booleans anywhere in a schema: an upper bound on its subschemas (those in
    data, such as a `const`, count too)."""
    return sum(isinstance(value, dict | bool) for value in _values(schema))


def _encodable(schema: object) -> bool:
    """Whether every string in a parsed schema, keys included, can be written as UTF-8.

    JSON may escape half a surrogate pair ("\\ud800"); json reads it as a lone surrogate, which
    no UTF-8 holds: the schema sent to the provider failed to encode, every call INTERNAL."""
    for value in _values(schema):
        texts = value if isinstance(value, dict) else (value,)  # a dict: its keys
        for text in texts:
            if isinstance(text, str):
                try:
                    check_encodable(text)
                except ValueError:
                    return False
    return True


class SchemaVerdicts:
    """The outcome of _schema_problem per (tenant, schema text), the latest `size` kept.

    Tenants send the same few schemas again and again; the meta-schema check is the costly
    part of admission. Per tenant, so how fast a schema is admitted says nothing about what
    other tenants sent (docs/security.md, Timing). Owned by a Pipeline, not the module: its
    memory goes with the service, and services in one process share nothing."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def problem(self, tenant: str, schema_text: str) -> str | None:
        key = (tenant, schema_text)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        verdict = self._verdicts[key] = _schema_problem(schema_text)
        if len(self._verdicts) > self._size:
            self._verdicts.popitem(last=False)
        return verdict

    def for_tenant(self, tenant: str) -> SchemaCheck:
        """The check validate_request runs for `tenant`'s requests, cached under its name."""
        return partial(self.problem, tenant)


def _check_cache_control(request: ChatRequest, limits: LimitSettings) -> None:
    tags = request.cache.tags
    if len(tags) > limits.max_tags:
        raise InvalidArgument("cache.tags", f"at most {limits.max_tags} tags allowed")
    for position, tag in enumerate(tags):
        if not tag or len(tag) > limits.max_tag_chars:
            raise InvalidArgument(
                f"cache.tags[{position}]", f"must be 1 to {limits.max_tag_chars} characters"
            )
    ttl = request.cache.ttl_seconds
    if ttl is not None and ttl > limits.max_ttl_seconds:
        raise InvalidArgument("cache.ttl_seconds", f"at most {limits.max_ttl_seconds} seconds")


def _check_validators(request: ChatRequest, limits: LimitSettings) -> None:
    """Sizes only; RequestValidators checks what each one means."""
    if len(request.validators) > limits.max_request_validators:
        raise InvalidArgument("validators", f"at most {limits.max_request_validators} per request")
    for position, validator in enumerate(request.validators):
        field = f"validators[{position}]"
        for name in ("kind", "name", "on_fail"):
            _check_text(f"{field}.{name}", getattr(validator, name), 64)
        for name in ("must_match", "must_not_match", "pii"):
            if len(getattr(validator, name)) > limits.max_validator_patterns:
                raise InvalidArgument(
                    f"{field}.{name}", f"at most {limits.max_validator_patterns} entries"
                )
        # Unset, max_chars is the service's answer limit: a minimum above it fails every answer,
        # after paying for the cheap and the strong model.
        ceiling = validator.max_chars or limits.max_answer_chars
        if validator.min_chars > ceiling:
            bound = "max_chars" if validator.max_chars else f"the answer limit ({ceiling})"
            raise InvalidArgument(f"{field}.min_chars", f"must not exceed {bound}")


def schema_patterns(schema: object) -> Iterator[str]:
    """Every regex a JSON Schema holds: `pattern` values and `patternProperties` keys."""
    for node in _objects(schema):
        if isinstance(pattern := node.get("pattern"), str):
            yield pattern
        if isinstance(properties := node.get("patternProperties"), dict):
            yield from properties


def non_local_refs(schema: object) -> Iterator[str]:
    """Every $ref / $dynamicRef in a JSON Schema that does not point inside the document."""
    for node in _objects(schema):
        for key in ("$ref", "$dynamicRef"):
            if isinstance(ref := node.get(key), str) and not ref.startswith("#"):
                yield ref


def foreign_dialects(schema: object) -> Iterator[str]:
    """Every "$schema" in a JSON Schema that names a dialect other than 2020-12.

    jsonschema checks a subschema that names another draft with that draft's validator: its
    `pattern` is `re`, with no timeout, and the check has no budget. A "$schema" in data (a
    `const` object) is refused too: what is schema and what is data is jsonschema's call."""
    for node in _objects(schema):
        if isinstance(dialect := node.get("$schema"), str) and dialect.rstrip("#") != DIALECT:
            yield dialect


def _objects(document: object) -> Iterator[dict[str, Any]]:
    """Every JSON object in a parsed document, nested ones included."""
    return (value for value in _values(document) if isinstance(value, dict))


def _values(document: object) -> Iterator[Any]:
    """Every value in a parsed document, itself and nested ones included (no recursion: a
    document may nest deeper than Python's stack)."""
    pending = [document]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)

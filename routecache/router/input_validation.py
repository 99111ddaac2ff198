"""Reject bad requests before they cost anything; every error names the offending field."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from routecache.domain import ChatRequest, Feedback, ResponseFormatType, Role
from routecache.errors import InvalidArgument
from routecache.router.settings import LimitSettings
from routecache.router.validators import NotJsonError, check_pattern_size, parse_json


def validate_request(request: ChatRequest, limits: LimitSettings) -> None:
    if request.problems:  # found while translating; refused here, after the API key
        field, problem = request.problems[0]
        raise InvalidArgument(field, problem)
    _check_messages(request, limits)
    _check_params(request, limits)
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


def _check_params(request: ChatRequest, limits: LimitSettings) -> None:
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
        _check_text(
            "params.response_format.json_schema", response_format.json_schema,
            limits.max_schema_chars,
        )  # fmt: skip
        _check_schema(response_format.json_schema)
    elif response_format.json_schema:
        raise InvalidArgument(
            "params.response_format.json_schema",
            "only allowed with RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
        )


def _check_schema(schema_text: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    field = "params.response_format.json_schema"
    if not schema_text.strip():
        raise InvalidArgument(field, "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
    try:
        schema = parse_json(schema_text)
    except NotJsonError as exc:
        raise InvalidArgument(field, str(exc)) from exc
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidArgument(field, f"not a valid JSON Schema: {exc.message}") from exc
    except OverflowError as exc:  # `re`, checking a pattern's repeat count (a{4294967296})
        raise InvalidArgument(field, f"not a valid JSON Schema: a pattern: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgument(field, "nested too deeply") from exc
    if remote := next(non_local_refs(schema), None):
        # A caller's schema must never make the service fetch a URL (SSRF).
        raise InvalidArgument(field, f"only local references ('#...') allowed, not {remote!r}")
    for pattern in schema_patterns(schema):
        try:
            check_pattern_size(pattern)
        except (re.error, OverflowError):
            continue  # a "pattern" in data (const, default): jsonschema never compiles it
        except ValueError as exc:
            raise InvalidArgument(field, str(exc)) from exc


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
        # The service's answer limit bounds every answer (and is max_chars when unset): a
        # minimum above either fails every answer, after paying for the cheap and strong model.
        answer_limit = limits.max_answer_chars
        own = 0 < validator.max_chars <= answer_limit
        ceiling = validator.max_chars if own else answer_limit
        if validator.min_chars > ceiling:
            bound = "max_chars" if own else f"the answer limit ({ceiling})"
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


def _objects(document: object) -> Iterator[dict[str, Any]]:
    """Every JSON object in a parsed document, nested ones included."""
    pending = [document]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            yield node
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)

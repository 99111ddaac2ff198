"""Reject bad requests before they cost anything; every error names the offending field."""

from __future__ import annotations

import json
import math

from routecache.domain import ChatRequest, ResponseFormatType, Role
from routecache.errors import InvalidArgument
from routecache.router.settings import LimitSettings


def validate_request(request: ChatRequest, limits: LimitSettings) -> None:
    _check_messages(request, limits)
    _check_params(request, limits)
    _check_cache_control(request, limits)


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
    if params.temperature is not None and not (
        math.isfinite(params.temperature) and 0.0 <= params.temperature <= 2.0
    ):
        raise InvalidArgument("params.temperature", "must be between 0 and 2")
    if params.max_tokens is not None and not 1 <= params.max_tokens <= limits.max_output_tokens:
        raise InvalidArgument("params.max_tokens", f"must be 1 to {limits.max_output_tokens}")
    response_format = params.response_format
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
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
        Draft202012Validator.check_schema(json.loads(schema_text))
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except SchemaError as exc:
        raise InvalidArgument(field, f"not a valid JSON Schema: {exc.message}") from exc


def _check_cache_control(request: ChatRequest, limits: LimitSettings) -> None:
    tags = request.cache.tags
    if len(tags) > limits.max_tags:
        raise InvalidArgument("cache.tags", f"at most {limits.max_tags} tags allowed")
    for position, tag in enumerate(tags):
        if not tag or len(tag) > 128:
            raise InvalidArgument(f"cache.tags[{position}]", "must be 1 to 128 characters")

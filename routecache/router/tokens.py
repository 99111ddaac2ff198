"""The service's token estimate: len/4 of the text a model is sent, in one place.

The cost controls (a request's worst case, its prompt's take from the token buckets, a stream's
settlement), the OpenAI client where a provider reports no usage, the demo's all-strong baseline
and the replay upstream's `usage` all count a prompt with `prompt_tokens_estimate`, so the
figures they report agree. Kept free of heavy imports: the replay upstream imports it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from routecache.domain import ChatRequest, ResponseFormat, ResponseFormatType

# What a json_schema request that names no schema sends the model.
DEFAULT_SCHEMA = '{"type": "object"}'


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def sent_schema(response_format: ResponseFormat) -> object | None:
    """The JSON Schema a response_format sends the model; None for text and json_object.

    Raises json.JSONDecodeError where the schema text is not JSON."""
    if response_format.type is not ResponseFormatType.JSON_SCHEMA:
        return None
    parsed: object = json.loads(response_format.json_schema or DEFAULT_SCHEMA)
    return parsed


def body_schema(response_format: object) -> object | None:
    """The JSON Schema an OpenAI request body's `response_format` sends the model
    (`json_schema.schema` of a json_schema format), if it has one."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    json_schema = response_format.get("json_schema")
    return json_schema.get("schema") if isinstance(json_schema, dict) else None


def prompt_tokens_estimate(contents: Iterable[str], schema: object | None = None) -> int:
    """The prompt tokens of a chat call: its messages' text, joined by newlines, and the JSON
    Schema of a json_schema response_format, which a provider sends the model and bills as
    prompt tokens. The schema is counted as compact UTF-8 JSON whatever its spacing on the wire
    (httpx's differs between versions), so the router's estimate and the replay upstream's
    usage count the same text."""
    text = "\n".join(contents)
    if schema is not None:
        text += "\n" + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return estimate_tokens(text)


def request_prompt_tokens(request: ChatRequest) -> int:
    """`prompt_tokens_estimate` of the call a request makes."""
    contents = (m.content for m in request.messages)
    try:
        schema = sent_schema(request.params.response_format)
    except json.JSONDecodeError:
        # Never sent (input validation and the client refuse it); count its text all the same.
        return prompt_tokens_estimate([*contents, request.params.response_format.json_schema])
    return prompt_tokens_estimate(contents, schema)

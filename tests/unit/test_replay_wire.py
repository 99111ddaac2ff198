"""The replay upstream's reading of chat-completions request bodies."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from routecache.replay.wire import (
    RequestError,
    StreamEvents,
    parse_chat_call,
    shape_answer,
    usage,
)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 9}, 9),
        ({"max_completion_tokens": 9, "max_tokens": None}, 9),
        ({"max_completion_tokens": None, "max_tokens": 7}, 7),
        ({"max_completion_tokens": None, "max_tokens": None}, None),
    ],
)
def test_a_null_token_limit_counts_as_not_given(
    fields: dict[str, Any], expected: int | None
) -> None:
    assert parse_chat_call(body(**fields)).max_tokens == expected


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "7"])
def test_a_bad_token_limit_is_refused_naming_its_field(field: str, value: object) -> None:
    with pytest.raises(RequestError, match="positive integer") as caught:
        parse_chat_call(body(**{field: value}))
    assert caught.value.param == field


def test_both_token_limits_at_once_are_refused_as_openai_does() -> None:
    with pytest.raises(RequestError, match="at the same time") as caught:
        parse_chat_call(body(max_tokens=7, max_completion_tokens=9))
    assert (caught.value.param, caught.value.code) == (
        "max_tokens",
        "invalid_parameter_combination",
    )


def chat(*messages: object) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages)}


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": "Sure."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "function", "name": "f", "content": None},
    ],
    ids=[
        "system",
        "developer",
        "assistant",
        "assistant-tool-calls",
        "assistant-function-call",
        "tool",
        "function",
    ],
)
def test_every_openai_role_is_accepted(message: dict[str, Any]) -> None:
    assert parse_chat_call(chat(message, USER)).prompt == "hi"


@pytest.mark.parametrize(
    ("message", "names"),
    [
        ({"role": "bot", "content": "hi"}, "'messages[1].role' must be one of"),
        ({"role": "User", "content": "hi"}, "'messages[1].role' must be one of"),
        ({"role": "", "content": "hi"}, "'messages[1].role' must be one of"),
        ({"role": ["user"], "content": "hi"}, "string 'role'"),
        ("hi", "must be an object"),
        ({"role": "user"}, "'messages[1].content' is required"),
        ({"role": "system", "content": None}, "'messages[1].content' is required"),
        ({"role": "assistant", "content": None}, "'messages[1].content' is required"),
        ({"role": "tool", "content": "42"}, "'messages[1].tool_call_id' must be a string"),
        ({"role": "function", "content": "42"}, "'messages[1].name' must be a string"),
        ({"role": "user", "content": 42}, "'messages[1].content' must be a string"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "'messages[1].content' must be a string or an array of text parts",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            "'messages[1].content' must be a string or an array of text parts",
        ),
    ],
    ids=[
        "unknown",
        "wrong-case",
        "empty",
        "not-a-string",
        "not-an-object",
        "user-no-content",
        "system-null-content",
        "assistant-nothing",
        "tool-no-id",
        "function-no-name",
        "number-content",
        "image-part",
        "text-then-image-part",
    ],
)
def test_an_unknown_role_or_malformed_message_is_refused(message: object, names: str) -> None:
    with pytest.raises(RequestError, match=re.escape(names)) as caught:
        parse_chat_call(chat(USER, message))
    assert caught.value.param == "messages[1]"


def test_the_prompt_is_the_last_user_message_else_the_last_message() -> None:
    later = {"role": "assistant", "content": "an answer"}
    assert parse_chat_call(chat(USER, later)).prompt == "hi"
    follow_up = {"role": "user", "content": "and then?"}
    assert parse_chat_call(chat(USER, later, follow_up)).prompt == "and then?"
    system = {"role": "system", "content": "Be brief."}
    assert parse_chat_call(chat(system, later)).prompt == "an answer"


def test_text_parts_are_joined_into_one_prompt() -> None:
    parts = [{"type": "text", "text": "How many "}, {"type": "text", "text": "apples?"}]
    assert parse_chat_call(chat({"role": "user", "content": parts})).prompt == "How many apples?"


def test_usage_counts_the_text_of_every_message() -> None:
    call = parse_chat_call(chat({"role": "system", "content": "x" * 40}, USER))
    counted = usage(call, "y" * 9)  # 40 + 1 + 2 prompt characters, 9 answer characters
    assert counted == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@pytest.mark.parametrize(
    ("response_format", "prompt_tokens"),
    [({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, 5),
     ({"type": "json_schema", "json_schema": {"schema": {"title": "Größe"}}}, 5),
     ({"type": "json_schema", "json_schema": {"name": "a"}}, 1),
     ({"type": "json_object", "json_schema": {"schema": {"type": "object"}}}, 1),
     ({"type": "json_object"}, 1), ({"type": "text"}, 1)],
    ids=["schema", "non-ascii", "no-schema", "json_object-with-schema", "json_object", "text"],
)  # fmt: skip
def test_usage_counts_the_json_schema_sent_as_prompt_tokens(
    response_format: dict[str, Any], prompt_tokens: int
) -> None:
    # 'hi\n{"type":"object"}', 20 characters: the schema counted as compact JSON
    # (UTF-8, not \u escapes); json_object sends the model no schema.
    call = parse_chat_call(body(response_format=response_format))
    assert usage(call, "")["prompt_tokens"] == prompt_tokens


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": ""}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json_object"}, "response_format"),
        ({"response_format": {"type": ["text"]}}, "response_format"),
        ({"response_format": {"type": {"a": 1}}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user", "content": "hi"}}, "messages"),
        ({"stream": True, "stream_options": "include_usage"}, "stream_options"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"stream": True, "stream_options": False}, "stream_options"),
    ],
    ids=["empty-model", "string-stream", "number-stream", "unknown-format", "format-not-object",
         "format-type-array", "format-type-object", "no-messages", "messages-not-array",
         "stream-options-text", "stream-options-empty-array", "stream-options-false"],
)  # fmt: skip
def test_a_malformed_field_is_refused_naming_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_chat_call(body(**fields))
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_value"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"n": 1.0}, "n", "invalid_type"),
        ({"n": True}, "n", "invalid_type"),
        ({"temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": math.nan}, "temperature", "invalid_type"),
        ({"top_p": 1.5}, "top_p", "decimal_above_max_value"),
        ({"top_p": -1}, "top_p", "decimal_below_min_value"),
        # Past a float's range: math.isfinite raised OverflowError, a text/plain 500.
        ({"temperature": 10**400}, "temperature", "decimal_above_max_value"),
        ({"top_p": -(10**400)}, "top_p", "decimal_below_min_value"),
        ({"top_p": False}, "top_p", "invalid_type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
         "missing_required_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": "{}"}},
         "response_format.json_schema", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": False, "stream_options": {}}, "stream_options", "invalid_value"),
    ],
    ids=["n-2", "n-0", "n-float", "n-bool", "temperature-over-2", "temperature-negative",
         "temperature-text", "temperature-nan", "top-p-over-1", "top-p-negative",
         "temperature-huge-int", "top-p-huge-negative-int", "top-p-bool",
         "json-schema-missing", "json-schema-not-object", "stream-options-no-stream",
         "stream-options-stream-false"],
)  # fmt: skip
def test_what_openai_refuses_is_refused_with_its_param_and_code(
    fields: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(RequestError) as caught:
        parse_chat_call(body(**fields))
    assert (caught.value.param, caught.value.code) == (param, code)


@pytest.mark.parametrize(
    "fields",
    [{"n": 1}, {"n": None}, {"temperature": 0}, {"temperature": 2}, {"temperature": None},
     {"top_p": 0}, {"top_p": 1.0}, {"top_p": None},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
     {"stream": True, "stream_options": {"include_usage": True}}, {"stream_options": None}],
    ids=["n-1", "n-null", "temperature-0", "temperature-2", "temperature-null", "top-p-0",
         "top-p-1", "top-p-null", "json-schema", "stream-options-streamed", "stream-options-null"],
)  # fmt: skip
def test_the_bounds_openai_accepts_are_accepted(fields: dict[str, Any]) -> None:
    parse_chat_call(body(**fields))


@pytest.mark.parametrize("role", ["user", "system", "tool"])
def test_only_an_assistant_turn_that_calls_tools_may_lack_content(role: str) -> None:
    message = {"role": role, "content": None, "tool_calls": [{"id": "c1"}], "tool_call_id": "c1"}
    with pytest.raises(RequestError, match=re.escape("'messages[1].content' is required")):
        parse_chat_call(chat(USER, message))


@pytest.mark.parametrize(
    ("options", "expected"),
    [(None, False), ({}, False), ({"include_usage": False}, False),
     ({"include_usage": True}, True), ({"include_usage": "yes"}, False)],
)  # fmt: skip
def test_include_usage_is_read_from_stream_options(options: object, expected: bool) -> None:
    call = parse_chat_call(body(stream=True, stream_options=options))
    assert call.include_usage is expected


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [(3, ("abcdefghijkl", "stop")), (2, ("abcdefgh", "length")), (None, ("abcdefghijkl", "stop"))],
)
def test_an_answer_is_cut_only_when_it_is_longer_than_max_tokens(
    max_tokens: int | None, expected: tuple[str, str]
) -> None:
    call = parse_chat_call(body(max_tokens=max_tokens))
    assert shape_answer("abcdefghijkl", "strong", call) == expected  # 4 characters a token


def test_stream_events_carry_one_id_and_the_usage_chunk_has_no_choices() -> None:
    call = parse_chat_call(body(stream=True, stream_options={"include_usage": True}))
    events = StreamEvents(call, "chatcmpl-1", created=1700000000)

    def decoded(event: bytes) -> dict[str, Any]:
        text = event.decode()
        assert text.startswith("data: ") and text.endswith("\n\n")
        chunk: dict[str, Any] = json.loads(text[len("data: ") :])
        return chunk

    first = decoded(events.delta({"content": "x"}))
    assert (first["id"], first["created"], first["model"]) == ("chatcmpl-1", 1700000000, "m")
    assert first["choices"] == [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]
    assert decoded(events.delta({}, "stop"))["choices"][0]["finish_reason"] == "stop"
    last = decoded(events.usage("y" * 9))
    assert last["choices"] == [] and last["usage"] == usage(call, "y" * 9)


@pytest.mark.parametrize(
    ("response_format", "wants_json"),
    [(None, False), ({"type": "text"}, False), ({"type": "json_object"}, True),
     ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}, True)],
)  # fmt: skip
def test_json_mode_is_asked_for_by_either_json_format(
    response_format: dict[str, Any] | None, wants_json: bool
) -> None:
    assert parse_chat_call(body(response_format=response_format)).wants_json is wants_json

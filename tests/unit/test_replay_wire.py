"""The replay upstream's reading of chat-completions request bodies."""

import re
from typing import Any

import pytest

from routecache.replay.wire import RequestError, parse_chat_call


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
    ],
)
def test_an_unknown_role_or_malformed_message_is_refused(message: object, names: str) -> None:
    with pytest.raises(RequestError, match=re.escape(names)) as caught:
        parse_chat_call(chat(USER, message))
    assert caught.value.param == "messages[1]"

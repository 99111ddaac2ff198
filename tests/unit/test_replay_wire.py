"""The replay upstream's reading of chat-completions request bodies."""

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

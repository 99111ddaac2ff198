"""The OpenAI chat-completions wire format, as far as the replay upstream speaks it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from routecache.replay.recordings import ModelRole, weak_breaks_json
from routecache.router.tokens import body_schema, estimate_tokens, prompt_tokens_estimate

JSON_FORMATS = frozenset({"json_object", "json_schema"})
_FORMATS = JSON_FORMATS | {"text"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_NEEDED_FIELD = {"tool": "tool_call_id", "function": "name"}  # a string each must carry
DONE_EVENT = b"data: [DONE]\n\n"


class RequestError(ValueError):
    """The request body is malformed; the message is what a 400 tells the caller."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatCall:
    """The parts of a chat-completions request that decide the replayed answer."""

    model: str
    prompt: str  # the last user message: what recordings are keyed on
    prompt_tokens: int  # the router's estimate of what was sent: messages and JSON schema
    stream: bool = False
    max_tokens: int | None = None
    wants_json: bool = False
    include_usage: bool = False


def parse_chat_call(body: object) -> ChatCall:
    """Validate a decoded request body; raises RequestError naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string", "model")
    contents = _message_contents(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    max_tokens = _max_tokens(body)
    options = _stream_options(body, stream)
    _one_choice(body.get("n"))
    _number_in(body, "temperature", 2)
    _number_in(body, "top_p", 1)
    response_format = body.get("response_format")
    return ChatCall(
        model=model,
        prompt=_prompt(contents),
        prompt_tokens=prompt_tokens_estimate(
            (text for _, text in contents), body_schema(response_format)
        ),
        stream=stream,
        max_tokens=max_tokens,
        wants_json=_format_type(response_format) in JSON_FORMATS,
        include_usage=options.get("include_usage") is True,
    )


def _stream_options(body: Mapping[str, Any], stream: bool) -> Mapping[str, Any]:
    """stream_options, {} when absent or null; like OpenAI, a 400 when it is no object (a
    client that sent ["include_usage"] would otherwise get no usage chunk and no word why) or
    comes without stream: true (the usage it asks for would never be sent)."""
    options = body.get("stream_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options", "invalid_type")
    if not stream:
        raise RequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            "invalid_value",
        )
    return options


def _is_number(value: object) -> bool:
    """A finite JSON number: json reads NaN and Infinity, which no range check would refuse.
    An int is finite however large; math.isfinite raises OverflowError past a float's range."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _one_choice(n: object) -> None:
    """n, null or 1: the replay upstream answers one choice, so it refuses more rather than
    send one where the caller reads several; below 1 OpenAI refuses too."""
    if n is None:
        return
    if not isinstance(n, int) or isinstance(n, bool):
        raise RequestError("'n' must be an integer", "n", "invalid_type")
    if n < 1:
        raise RequestError(f"'n' must be at least 1, got {n}", "n", "integer_below_min_value")
    if n != 1:
        raise RequestError(
            f"'n' must be 1: the replay upstream answers one choice, got {n}",
            "n",
            "unsupported_value",
        )


def _number_in(body: Mapping[str, Any], name: str, maximum: float) -> None:
    """A sampling parameter in [0, maximum] as OpenAI takes it (temperature 2, top_p 1); null
    means not given."""
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise RequestError(f"'{name}' must be a number", name, "invalid_type")
    if value < 0:
        raise RequestError(f"'{name}' must be at least 0, got {value}", name,
                           "decimal_below_min_value")  # fmt: skip
    if value > maximum:
        raise RequestError(f"'{name}' must be at most {maximum}, got {value}", name,
                           "decimal_above_max_value")  # fmt: skip


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """max_completion_tokens or the deprecated max_tokens; null means not given.

    Like OpenAI, refuses both at once rather than letting one silently win.
    """
    given = {n: body[n] for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None}
    if len(given) > 1:
        raise RequestError(
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            "max_tokens",
            code="invalid_parameter_combination",
        )
    for name, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"'{name}' must be a positive integer", name)
        return value
    return None


def _message_contents(messages: object) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", "messages")
    return [_role_and_text(message, f"messages[{index}]") for index, message in enumerate(messages)]


def _role_and_text(message: object, param: str) -> tuple[str, str]:
    """One message's role and text, refusing what the OpenAI chat API refuses."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"'{param}' must be an object with a string 'role'", param)
    role = message["role"]
    if role not in CHAT_ROLES:
        roles = ", ".join(CHAT_ROLES)
        raise RequestError(f"'{param}.role' must be one of {roles}, got {role!r}", param)
    needed = _NEEDED_FIELD.get(role)
    if needed is not None and not isinstance(message.get(needed), str):
        raise RequestError(f"'{param}.{needed}' must be a string in a {role} message", param)
    if message.get("content") is None and not _may_lack_content(message):
        raise RequestError(f"'{param}.content' is required in a {role} message", param)
    return role, _text(message.get("content"), param)


def _may_lack_content(message: Mapping[str, Any]) -> bool:
    """A function result, or an assistant turn that only calls tools, may have null content."""
    if message["role"] == "function":
        return True
    calls = message.get("tool_calls") is not None or message.get("function_call") is not None
    return message["role"] == "assistant" and calls


def _text(content: object, param: str) -> str:
    if content is None:  # checked by the caller: only where the role allows it
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise RequestError(f"'{param}.content' must be a string or an array of text parts", param)


def _prompt(contents: Sequence[tuple[str, str]]) -> str:
    for role, text in reversed(contents):
        if role == "user":
            return text
    return contents[-1][1]


def _format_type(response_format: object) -> str:
    if response_format is None:
        return "text"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    # Not a string (a list, an object) is refused too: unhashable, `in` raised a TypeError (a 500).
    if not isinstance(kind, str) or kind not in _FORMATS:
        raise RequestError(
            f"'response_format.type' must be one of {', '.join(sorted(_FORMATS))}",
            "response_format",
        )
    if kind == "json_schema" and isinstance(response_format, dict):  # a dict: kind is set
        _json_schema_object(response_format)
    return str(kind)


def _json_schema_object(response_format: Mapping[str, Any]) -> None:
    """A json_schema format must carry its json_schema object, as OpenAI requires."""
    param = "response_format.json_schema"
    schema = response_format.get("json_schema")
    if schema is None:
        raise RequestError(f"Missing required parameter: '{param}'.", param,
                           "missing_required_parameter")  # fmt: skip
    if not isinstance(schema, dict):
        raise RequestError(f"'{param}' must be an object", param, "invalid_type")


def shape_answer(text: str, role: ModelRole, call: ChatCall) -> tuple[str, str]:
    """Apply JSON mode and max_tokens to a recorded answer; returns (text, finish_reason).

    In JSON mode the weak model ignores the instruction for about half the prompts (fixed per
    prompt), which is what lets the service show a validator escalating to the strong model.
    """
    if call.wants_json and not (role == "weak" and weak_breaks_json(call.prompt)):
        text = json.dumps({"answer": text}, ensure_ascii=False)
    if call.max_tokens is not None and len(text) > call.max_tokens * 4:
        return text[: call.max_tokens * 4], "length"
    return text, "stop"


def usage(call: ChatCall, answer: str) -> dict[str, int]:
    prompt_tokens = call.prompt_tokens
    completion_tokens = estimate_tokens(answer)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    call: ChatCall, answer: str, finish_reason: str, *, response_id: str, created: int
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(call, answer),
    }


@dataclass(frozen=True)
class StreamEvents:
    """The server-sent events of one streamed answer, all under one id."""

    call: ChatCall
    response_id: str
    created: int

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.call.model,
            "choices": choices,
        }

    def delta(self, delta: Mapping[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": dict(delta), "finish_reason": finish_reason}
        return sse(self._chunk([choice]))

    def usage(self, answer: str) -> bytes:
        """The choice-less chunk OpenAI sends when stream_options.include_usage is set."""
        return sse(self._chunk([]) | {"usage": usage(self.call, answer)})


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(payload: object) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

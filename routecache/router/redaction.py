"""Redacting an answer before it is served: a JSON answer inside its values, so it stays JSON.

Redacting a JSON answer as text cut through its syntax: a finding could start inside an escape
(`"to:\\njohn@example.com"` became `"to:\\[REDACTED EMAIL]"`) or be a bare number
(`{"id": [REDACTED CARD]}`), and the answer was served and cached as JSON that is not JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from routecache.router.validation import Redactor
from routecache.router.validators import NotJsonError, parse_json


def redact_answer(text: str, redactors: Sequence[Redactor], wants_json: bool) -> str:
    """`text` with what each redactor finds replaced; a JSON answer (the request asks for
    JSON) in its keys, strings and numbers, then written out again, unchanged if clean.

    Text that is not JSON, or too deep to walk, is redacted as text: the caller judges the
    redacted answer again, and json_schema then refuses what redacting broke."""

    def clean(piece: str) -> str:
        for redactor in redactors:
            piece = redactor.redact(piece)
        return piece

    if wants_json:
        try:
            value = parse_json(text)
            cleaned = _redact_value(value, clean)
            return text if cleaned == value else _as_json(cleaned)
        except (NotJsonError, RecursionError):
            pass
    return clean(text)


def _as_json(value: Any) -> str:
    """`value` written as JSON text that UTF-8 can hold, so it can be served and cached.

    Other scripts are written as they are (an escape is 6 characters, against the answer's
    length limits); but a string the answer escaped as a lone UTF-16 surrogate ("\\ud83d",
    valid JSON) would be written raw, which no response can carry: then all in ASCII escapes."""
    written = json.dumps(value, ensure_ascii=False)
    try:
        written.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return written


def _redact_value(value: Any, clean: Callable[[str], str]) -> Any:
    """A parsed JSON value with its strings cleaned; a number that holds a finding (a card
    number written as a number) becomes the cleaned string. Two keys that clean to the same
    text keep the last one's value, as a JSON parser would."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k): _redact_value(v, clean) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, clean) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    literal = json.dumps(value)  # an int or a finite float
    cleaned = clean(literal)
    return value if cleaned == literal else cleaned

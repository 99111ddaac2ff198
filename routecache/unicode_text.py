"""Lone UTF-16 surrogates: text a Python str holds and JSON may escape ("\\ud83d", half of a
pair), but that no UTF-8 can carry. Where outside text enters, a lone surrogate is replaced
(answers, provider texts, events: they were paid for or must be logged) or refused with a
clear error (a caller's schema, a training file's prompt)."""

from __future__ import annotations

import re

# A str holds a surrogate pair whole, as one code point: every surrogate left in it is lone.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def check_encodable(text: str, what: str = "prompt") -> None:
    """ValueError if `text` holds a lone surrogate, naming `what` it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate, not text ({exc})") from exc

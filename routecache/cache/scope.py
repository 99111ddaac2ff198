"""Cache scope and exact keys: what must match before two requests may share an answer."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

from routecache.domain import ChatRequest

_SPACE = re.compile(r"\s+")
_TRAILING_PUNCT = re.compile(r"[\s?.!]+$")
# Format characters (Unicode Cf) that show nothing by themselves, left in by pasting from a web
# page or a word processor: soft hyphen, zero-width space and (non-)joiners, direction marks and
# embeddings, word joiner and invisible operators, byte-order mark. The (non-)joiners may change
# how an emoji sequence or an Indic or Persian word is drawn, yet a prompt differing only by them
# asks the same. The other Cf characters change what is said (tag characters make England's
# flag, not Scotland's; Arabic number signs) and stay.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]")


def scope_key(tenant: str, request: ChatRequest) -> str:
    """A digest of everything besides the prompt that changes the answer.

    The tenant comes first so no two tenants can ever share a scope; the earlier turns make a
    follow-up ("and in Paris?") match only under the same conversation.
    """
    params = request.params
    parts: dict[str, object] = {
        "tenant": tenant,
        "system": request.system_prompt,
        "context": [[m.role.value, m.content] for m in request.context],
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "format": params.response_format.type.value,
        "schema": params.response_format.json_schema,
    }
    if params.top_p is not None:  # only when set, so existing scopes keep their digests
        parts["top_p"] = params.top_p
    if request.validators:  # an answer cached under other checks must not pass for these
        parts["validators"] = [vars(v) for v in request.validators]
    encoded = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
    return f"{tenant}:{hashlib.sha256(encoded).hexdigest()[:32]}"


def normalise_prompt(text: str) -> str:
    """Fold differences that never change meaning: invisible characters, Unicode form, case,
    spacing, end punctuation. Only exact keys use it (what is embedded and cached is the prompt
    as sent); a key changes only for a prompt that held an invisible character, and an entry
    stored under such a key is no longer found by it (never another prompt's answer)."""
    # Removed first: a combining mark after one ("e", U+200B, U+0301) then composes ("é").
    text = _INVISIBLE.sub("", text)
    # Normalised again after folding: case folding can leave a form NFKC would compose (it
    # folds "ΐ" to iota + two combining marks), so equal text in other forms would keep two keys.
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _TRAILING_PUNCT.sub("", _SPACE.sub(" ", folded).strip())


def exact_key(scope: str, prompt: str) -> str:
    digest = hashlib.sha256(normalise_prompt(prompt).encode()).hexdigest()
    return f"{scope}:{digest}"

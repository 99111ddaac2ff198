"""Cache scope and exact keys: what must match before two requests may share an answer."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from typing import NamedTuple

from routecache.domain import ChatRequest

_SPACE = re.compile(r"\s+")
_END_PUNCTUATION = "?.! \n"
# What a factorial's "!" follows: a digit, a closing parenthesis, or a letter standing alone.
_FACTORIAL_OPERAND = re.compile(r"(?:[\d)]|(?<!\w)[^\W\d_])\Z")
# Compatibility decompositions that change what a character says (unicodedata tags).
_MEANINGFUL_FORMS = ("<super>", "<sub>", "<fraction>", "<circle>")
# The characters with such a decomposition, as a splitting pattern (a scan of every code point,
# once at import: under a fifth of a second, never on a request).
_KEPT_FORMS = re.compile(
    "(["
    + "".join(
        re.escape(chr(c))
        for c in range(sys.maxunicode + 1)
        if unicodedata.decomposition(chr(c)).startswith(_MEANINGFUL_FORMS)
    )
    + "])"
)
# Format characters (Unicode Cf) that show nothing by themselves, left in by pasting from a web
# page or a word processor: soft hyphen, zero-width space and (non-)joiners, direction marks and
# embeddings, word joiner and invisible operators, byte-order mark. The (non-)joiners may change
# how an emoji sequence or an Indic or Persian word is drawn, yet a prompt differing only by them
# asks the same. The other Cf characters change what is said (tag characters make England's
# flag, not Scotland's; Arabic number signs) and stay.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]")


def without_invisible(text: str) -> str:
    """`text` less the characters that show nothing (_INVISIBLE): what is left is what a reader
    sees, so an answer of only these is as empty as a blank one."""
    return _INVISIBLE.sub("", text)


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
    """Fold invisible characters, Unicode form, spacing within a line, common indentation and
    end punctuation, which never change meaning, and case, which can ("ls -R" / "ls -r") but
    which the uncased embedder and verifier cannot see either: the semantic tier would match
    such a pair at cosine 1.0 (docs/cache-verifier.md). Only exact keys use it (what is
    embedded and cached is the prompt as sent); a prompt whose key changes (an invisible
    character, a line break, a superscript) misses its old entry once, never another prompt's
    answer.

    Linear in the length of the text: no regex here may backtrack over a run of characters
    (a 32,000-character prompt is keyed on the event loop, once a request: CacheKeys)."""
    # Removed first: a combining mark after one ("e", U+200B, U+0301) then composes ("é").
    text = without_invisible(text)
    # Normalised again after folding: case folding can leave a form NFKC would compose (it
    # folds "ΐ" to iota + two combining marks), so equal text in other forms would keep two keys.
    folded = _fold_forms(_fold_forms(text).casefold())
    return _strip_end_punctuation(_fold_layout(folded))


def _fold_forms(text: str) -> str:
    """NFKC, except for the characters whose compatibility form says something else: "2³" is
    not "23", "H₂O" not "H2O", "½" not "1" + fraction slash + "2", "①" not "1". Full-width
    letters, ligatures and no-break spaces still fold."""
    if text.isascii():
        return text  # nothing to fold, and the common case
    pieces = _KEPT_FORMS.split(text)  # the kept characters at the odd indices
    pieces[::2] = [unicodedata.normalize("NFKC", piece) for piece in pieces[::2]]
    # Already NFC as a whole: a kept character is a starter that composes with no mark.
    return "".join(pieces)


def _fold_layout(text: str) -> str:
    """Line breaks and indentation stay (they are syntax in code, YAML and lists: two snippets
    differing only in indentation ask different things). Within a line, runs of white space
    become one space; trailing white space, blank lines at either end, runs of blank lines and
    the indentation all lines share go."""
    # Every boundary str.splitlines knows is a line break (CR LF and CR as before; U+2028,
    # U+2029, NEL, VT, FF, FS, GS, RS too): split on LF alone, the white-space fold took them,
    # with the next line's indentation, for one space ("items:<LS>  - a" keyed as "items: - a").
    lines = [line.rstrip() for line in text.splitlines()]
    indents = [line[: len(line) - len(line.lstrip())] for line in lines if line]
    # The common prefix of all is that of the least and the greatest.
    low, high = (min(indents), max(indents)) if indents else ("", "")
    common = next((i for i, (a, b) in enumerate(zip(low, high, strict=False)) if a != b), len(low))
    kept: list[str] = []
    for line in lines:
        if not line and (not kept or not kept[-1]):
            continue  # a blank line at the start or after another
        body = line[common:]
        indent = body[: len(body) - len(body.lstrip())]
        kept.append(indent + _SPACE.sub(" ", body.lstrip()))
    return "\n".join(kept).rstrip()


def _strip_end_punctuation(text: str) -> str:
    """Drop end punctuation ("?", ".", "!") and the spaces among it, with rstrip: linear,
    where an anchored regex over a long run of it inside the prompt is quadratic. A "!" right
    after a number, a single letter or a closing parenthesis is a factorial ("5!", "n!", "(n+1)!")
    and stays."""
    stripped = text.rstrip(_END_PUNCTUATION)
    bangs = len(text) - len(stripped) - len(text[len(stripped) :].lstrip("!"))
    if bangs and _FACTORIAL_OPERAND.search(stripped[-2:]):  # the last two: the letter alone?
        return text[: len(stripped) + bangs]
    return stripped


def exact_key(scope: str, prompt: str) -> str:
    digest = hashlib.sha256(normalise_prompt(prompt).encode()).hexdigest()
    return f"{scope}:{digest}"


class CacheKeys(NamedTuple):
    """A request's scope and its prompt's exact key, made once a request and passed on: the
    exact lookup, the single-flight key, the stale lookup and the store all need the exact
    key, and normalising a 32,000-character prompt takes milliseconds on the event loop."""

    scope: str
    exact: str

    @classmethod
    def of(cls, tenant: str, request: ChatRequest) -> CacheKeys:
        scope = scope_key(tenant, request)
        return cls(scope, exact_key(scope, request.prompt))

"""Output validators: each checks one answer and says why it fails."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from re import _parser  # type: ignore[attr-defined]  # the stdlib's parser of `re` syntax
from typing import Any, NoReturn

import regex
from jsonschema import Draft202012Validator, ValidationError, validators
from referencing import Registry
from referencing.exceptions import Unresolvable

from routecache.cache.scope import without_invisible
from routecache.domain import ChatRequest, ResponseFormatType, ValidatorResult

# json.loads refuses longer integers (CPython's guard on int parsing, 4,300 digits unless
# PYTHONINTMAXSTRDIGITS says otherwise); its own message tells a Python programmer which call
# lifts the limit, which means nothing to an API caller.
TOO_MANY_DIGITS = f"a number longer than {sys.get_int_max_str_digits():,} digits"


class NotJsonError(ValueError):
    """Text that is not JSON, or JSON Python cannot hold; the message is for an API caller."""


def _refuse_constant(name: str) -> Any:
    raise NotJsonError(f"not JSON: {name} is not a number JSON allows (only finite ones)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: Python reads it as inf, which no JSON number is
        # Not quoted: the digits may run to the answer's whole length.
        raise NotJsonError("not JSON the service can read: a number too large to be finite")
    return value


def parse_json(text: str) -> Any:
    """A caller's JSON text (a request's schema, an answer) as a value, or NotJsonError saying
    why not, in the same words wherever the text came from.

    Strict as RFC 8259: json.loads takes NaN and Infinity and reads 1e999 as inf, which a
    strict parser refuses (an answer served as JSON) and which make a schema's bounds pass
    everything ({"maximum": NaN})."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except NotJsonError:
        raise
    except json.JSONDecodeError as exc:
        raise NotJsonError(f"not JSON: {exc.msg} at position {exc.pos}") from exc
    except ValueError as exc:  # Python's limit on integers; its message suggests a call to make
        raise NotJsonError(f"not JSON the service can read: {TOO_MANY_DIGITS}") from exc
    except RecursionError as exc:
        raise NotJsonError("not JSON the service can read: nested too deeply") from exc


# jsonschema's default registry fetches unknown $ref URLs: a caller's schema could make the
# service call any address (SSRF). An empty referencing Registry resolves nothing outside the
# schema itself.
_NO_RETRIEVAL: Registry[Any] = Registry()
# One check of an answer against a caller's schema, patterns included: jsonschema's own work
# can be exponential in the answer's nesting ({"anyOf": [two recursive branches]}: 50 s for 33
# characters), and it runs on the loop that serves every tenant.
SCHEMA_BUDGET_SECONDS = 0.2
# When the running check must stop (time.monotonic()); set by JsonSchemaValidator.check, read
# by every keyword of _BoundedValidator. Unset: no check is running, so no time at all.
_SCHEMA_DEADLINE: ContextVar[float] = ContextVar("schema_deadline", default=-math.inf)
# `regex` unrolls a counted repeat's minimum when it compiles, nested ones multiplied, before
# any search timeout applies: (a{1000}){1000} takes 1.2 s and 275 MB on the event loop. 10,000
# unrolled items compile in about 10 ms.
MAX_PATTERN_SIZE = 10_000
_REPEATS = (_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT)


def check_pattern_size(pattern: str) -> int:
    """How many items a caller's pattern unrolls to (what compiling it costs); ValueError if
    too many to compile, re.error (or OverflowError) if it is not a regex."""
    with _no_nested_set_warning():
        size = _unrolled(_parser.parse(pattern))
    if size > MAX_PATTERN_SIZE:
        raise ValueError(
            f"pattern {pattern!r}: repeats too large ({size} items unrolled, at most "
            f"{MAX_PATTERN_SIZE})"
        )
    return size


def _unrolled(node: Any) -> int:
    """How many items a parsed pattern (or a part of one) unrolls to."""
    if isinstance(node, _parser.SubPattern):
        return sum(_unrolled_item(op, value) for op, value in node.data)
    if isinstance(node, list | tuple):  # branches, groups, conditionals: their sub-patterns
        return sum(_unrolled(part) for part in node)
    return 0


def _unrolled_item(op: Any, value: Any) -> int:
    if op in _REPEATS:
        least: int = value[0]
        return max(least, 1) * _unrolled(value[2])
    return max(1, _unrolled(value))


class _OutOfTime(Exception):
    """The schema check's budget is spent; the message says so, for the answer's report."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("the schema check took too long" + (f": {detail}" if detail else ""))


def _time_left() -> float:
    """Seconds left to the running schema check; _OutOfTime if none."""
    left = _SCHEMA_DEADLINE.get() - time.monotonic()
    if left <= 0:
        raise _OutOfTime
    return left


def _on_the_clock(keyword: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
    """A jsonschema keyword function that first checks the running check's deadline: every
    step of the walk (each subschema, each branch, each item) passes through one."""

    def timed(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[Any]:
        _time_left()
        yield from keyword(validator, value, instance, schema) or ()

    return timed


def _schema_search(pattern: str, text: str, what: str) -> regex.Match[str] | None:
    """A schema pattern's search, on the check's remaining time. A search out of time is
    neither match nor mismatch (under `not` or `anyOf` a mismatch can pass the answer): it
    ends the whole check."""
    try:
        return regex.search(pattern, text, timeout=_time_left())
    except TimeoutError:
        raise _OutOfTime(f"pattern {pattern!r} on {what}") from None


def check_schema_pattern(pattern: str) -> None:
    """Raises ValueError, OverflowError, re.error or regex.error for a schema pattern that the
    answer check (_schema_search) could not run, or would read otherwise than Python's `re`:
    the checks a request validator's pattern gets, in the same order (its size first: `regex`
    unrolls repeats as it compiles)."""
    check_pattern_size(pattern)
    check_python_syntax(pattern)
    regex.compile(pattern)  # as _schema_search compiles it: no flags


def _bounded_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """JSON Schema `pattern` with the `regex` module and a timeout: a caller's schema runs on
    the loop that serves every tenant (jsonschema's own uses `re`, unbounded)."""
    if not validator.is_type(instance, "string"):
        return
    if _schema_search(pattern, instance, "this value") is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _bounded_pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _schema_search(pattern, key, f"key {key!r}"):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_BoundedValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        keyword: _on_the_clock(function)
        for keyword, function in {
            **Draft202012Validator.VALIDATORS,
            "pattern": _bounded_pattern,
            "patternProperties": _bounded_pattern_properties,
        }.items()
    },
)
_INIT_FIELDS = [(f.name, f.alias) for f in _BoundedValidator.__attrs_attrs__ if f.init]


def _stay_bounded(self: Any, **changes: Any) -> Any:
    """jsonschema's evolve (used for every subschema and $ref) without its switch to the class
    a subschema's "$schema" names: another draft's validator has `re` patterns, no timeout and
    no budget. Admission refuses any dialect but 2020-12; this holds even if one gets by."""
    changes.setdefault("schema", self.schema)
    for name, alias in _INIT_FIELDS:
        changes.setdefault(alias, getattr(self, name))
    return _BoundedValidator(**changes)


_BoundedValidator.evolve = _stay_bounded


class JsonSchemaValidator:
    """When the request asks for JSON: the answer must parse, and match the schema if given."""

    def __init__(
        self, max_compiled: int = 256, budget_seconds: float = SCHEMA_BUDGET_SECONDS,
        name: str = "json_schema",
    ) -> None:  # fmt: skip
        self.name = name
        # Tenants send the same few schemas again and again: compile each once.
        self._compiled: dict[str, Draft202012Validator] = {}
        self._max_compiled = max_compiled
        self._budget = budget_seconds

    def applies_to(self, request: ChatRequest) -> bool:
        return request.params.response_format.wants_json

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        try:
            value = parse_json(text)
        except NotJsonError as exc:  # fails the answer, never raises
            return ValidatorResult(self.name, False, str(exc))
        response_format = request.params.response_format
        if response_format.type is ResponseFormatType.JSON_OBJECT:
            ok = isinstance(value, dict)
            return ValidatorResult(self.name, ok, "" if ok else "JSON, but not an object")
        validator = self._validator(response_format.json_schema)
        deadline = _SCHEMA_DEADLINE.set(time.monotonic() + self._budget)
        try:
            error = next(iter(validator.iter_errors(value)), None)
        except _OutOfTime as exc:  # fails the answer: its on_fail applies
            return ValidatorResult(self.name, False, str(exc))
        except Unresolvable as exc:  # a local $ref to nowhere; remote ones are never fetched
            return ValidatorResult(self.name, False, f"schema reference unresolvable: {exc}")
        except RecursionError:  # a recursive schema ({"$ref": "#"}) down a deep answer
            return ValidatorResult(self.name, False, "answer nested too deeply to check")
        except OverflowError:  # multipleOf: an integer past a double's range over a float
            return ValidatorResult(
                self.name, False, "a number too large to check against the schema"
            )
        finally:
            _SCHEMA_DEADLINE.reset(deadline)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return ValidatorResult(
                self.name, False, f"schema violation at {where}: {error.message}"
            )
        return ValidatorResult(self.name, True)

    def _validator(self, schema_text: str) -> Draft202012Validator:
        compiled = self._compiled.get(schema_text)
        if compiled is None:
            if len(self._compiled) >= self._max_compiled:
                self._compiled.clear()
            schema: Any = parse_json(schema_text)  # checked on admission: it parses
            compiled = self._compiled[schema_text] = _BoundedValidator(
                schema, registry=_NO_RETRIEVAL
            )
        return compiled


def _blank(text: str) -> bool:
    """Nothing a reader would see: spaces, and the invisible characters the cache's keys drop
    (zero-width space, BOM...), which str.strip keeps: an answer of them passed as text."""
    return not without_invisible(text).strip()


class LengthValidator:
    """Bounds on the answer's length; a blank answer has length 0 (an empty answer fails)."""

    def __init__(self, min_chars: int, max_chars: int, name: str = "length") -> None:
        self.name = name
        self._min = min_chars
        self._max = max_chars

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        size = 0 if _blank(text) else len(text)
        if size < self._min:
            what = "empty answer" if size == 0 else f"{size} characters, fewer than {self._min}"
            return ValidatorResult(self.name, False, what)
        if size > self._max:
            return ValidatorResult(self.name, False, f"{size} characters, more than {self._max}")
        return ValidatorResult(self.name, True)


class RegexValidator:
    """Every `must_match` pattern must occur in the answer and no `must_not_match` one may.

    Patterns may come from a caller's request and run on the event loop that serves every
    tenant: they are compiled by the `regex` module and one check gets `budget_seconds` in
    all, so a pattern that backtracks catastrophically fails its own request instead of
    stalling everyone else's."""

    def __init__(
        self,
        must_match: Sequence[str],
        must_not_match: Sequence[str],
        name: str = "regex",
        budget_seconds: float = 0.1,
    ) -> None:
        self.name = name
        for pattern in (*must_match, *must_not_match):
            check_python_syntax(pattern)
        self._must = [regex.compile(p) for p in must_match]
        self._must_not = [regex.compile(p) for p in must_not_match]
        self._budget = budget_seconds

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        deadline = time.monotonic() + self._budget
        try:
            for pattern in self._must:
                if _search(pattern, text, deadline) is None:
                    return ValidatorResult(self.name, False, f"does not match {pattern.pattern!r}")
            for pattern in self._must_not:
                if (found := _search(pattern, text, deadline)) is not None:
                    return ValidatorResult(
                        self.name, False, f"matches {pattern.pattern!r} at {found.start()}"
                    )
        except TimeoutError:
            return ValidatorResult(
                self.name, False, f"patterns took longer than {self._budget:g} s on this answer"
            )
        return ValidatorResult(self.name, True)


# What `regex` reads otherwise than Python's `re`, whose syntax is documented and checked: a
# POSIX class ("[[:digit:]]": in `re` the characters "[:digt", then "]") and a fuzzy match
# ("a{e<=1}": in `re` literal text). A POSIX class is found from an unescaped "[:" on (a
# literal one can be escaped); one outside a set is one in neither, but surely meant.
_POSIX_CLASS = re.compile(r"(?<!\\)(?:\\\\)*(\[:[^\[\]]*:\])")

# A "{" that is no count is one `regex` reads as a fuzzy constraint once its first item parses
# (items: "e", "d<=2", "1<=s<3", "2i+d<4"; after them "}" or ":test}", anything else is its
# error), unless an item after a "," does not parse: then it falls back to the literal "{". A
# copy of its parser's grammar (regex/_regex_core.py, parse_fuzzy), atomic as that parser is;
# a repeated letter ("{e,e}", literal there) is refused too, which escaping the "{" mends. A
# bad cost before a "," that falls back ("{e<,x}") passes here: regex.compile refuses it.
_FUZZY_ITEM = (
    r"(?>[deis](?:<=?[0-9]*)?"  # "e", "d<=2": its letter, then an optional maximum
    r"|[0-9]+<=?[deis]<=?[0-9]*"  # "1<=s<3"
    r"|[0-9]*[dis](?:\+[0-9]*[dis])*<=?[0-9]*)"  # a cost equation: "2i+d<4"
)
_FUZZY_CONSTRAINT = re.compile(rf"\{{{_FUZZY_ITEM}(?:,{_FUZZY_ITEM})*+(?!,)")
# (?x) anywhere: `regex` skips spaces and "#" comments in a constraint too ("{ e }").
_VERBOSE_FLAG = re.compile(r"\(\?[a-zA-Z]*x")
_SPACE_OR_COMMENT = re.compile(r"\s+|#[^\n]*")


def check_python_syntax(pattern: str) -> None:
    """Raises re.error for a pattern that is not Python's syntax, or that the `regex` module
    matching it would read otherwise (the same pattern must mean one thing)."""
    with _no_nested_set_warning():
        re.compile(pattern)  # Python's syntax and error messages, as documented
    if found := _POSIX_CLASS.search(pattern):
        _refuse("a POSIX class", found.group(1), pattern, found.start(1))
    if (at := _fuzzy_constraint_at(pattern)) is not None:
        closing = pattern.find("}", at)
        _refuse("a fuzzy match", pattern[at : closing + 1 if closing >= 0 else None], pattern, at)


@contextlib.contextmanager
def _no_nested_set_warning() -> Iterator[None]:
    """Without Python's FutureWarning for "[[" (a possible nested set): check_python_syntax
    refuses the POSIX class it is, so the warning would only reach the log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _refuse(what: str, text: str, pattern: str, at: int) -> NoReturn:
    raise re.error(
        f"{what} ({text}): the matching engine (the `regex` module) reads it differently from "
        "Python's `re`; escape its [ or { for the literal text",
        pattern,
        at,
    )


def _fuzzy_constraint_at(pattern: str) -> int | None:
    """Where the first "{" that `regex` reads as a fuzzy constraint stands, if one does."""
    verbose = _VERBOSE_FLAG.search(pattern) is not None
    for at in _braces_outside_sets(pattern, verbose):
        rest = _SPACE_OR_COMMENT.sub("", pattern[at:]) if verbose else pattern[at:]
        if _FUZZY_CONSTRAINT.match(rest):
            return at
    return None


def _braces_outside_sets(pattern: str, verbose: bool) -> Iterator[int]:
    """The "{"s both engines parse as syntax: not escaped, in a set ("[{]") or in a comment."""
    at = 0
    while at < len(pattern):
        if pattern[at] == "\\":
            at = _after_escape(pattern, at)
        elif pattern[at] == "[":
            at = _after_set(pattern, at)
        elif pattern.startswith("(?#", at) or (verbose and pattern[at] == "#"):
            end = pattern.find(")" if pattern[at] == "(" else "\n", at)
            at = len(pattern) if end < 0 else end + 1
        else:
            if pattern[at] == "{":
                yield at
            at += 1


def _after_escape(pattern: str, at: int) -> int:
    if pattern.startswith("N{", at + 1):  # a named character: "\N{digit one}"
        return pattern.index("}", at) + 1  # re.compile has checked that it is closed
    return at + 2


def _after_set(pattern: str, at: int) -> int:
    """Past the "]" that closes the set opened at `at` ("[]x]", "[^]x]": the first "]" is a
    member). re.compile has checked that it is closed; a POSIX class in it is refused above."""
    at += 2 if pattern.startswith("[^", at) else 1
    at += pattern.startswith("]", at)
    while pattern[at] != "]":
        at += 2 if pattern[at] == "\\" else 1
    return at + 1


def _search(pattern: regex.Pattern[str], text: str, deadline: float) -> regex.Match[str] | None:
    return pattern.search(text, timeout=max(0.001, deadline - time.monotonic()))


# How models decline; matched at the start of the answer only, so an answer that quotes such
# a phrase further on is not taken for a refusal.
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry,? but i (?:can(?:'|no)?t|am unable)|i (?:can(?:'|no)?t|cannot|am unable"
    r" to|won'?t) (?:help|assist|provide|comply|do that|answer)|as an ai(?: language model)?,? i"
    r"|i'?m (?:not able|unable) to (?:help|assist|provide|answer))",
    re.IGNORECASE,
)


class RefusalValidator:
    """Empty answers and refusals: a model declining is not an answer worth serving or caching."""

    def __init__(self, name: str = "refusal") -> None:
        self.name = name

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        if _blank(text):
            return ValidatorResult(self.name, False, "empty answer")
        if _REFUSAL.search(text[:300].replace("\u2019", "'")):
            return ValidatorResult(self.name, False, "the model refused to answer")
        return ValidatorResult(self.name, True)

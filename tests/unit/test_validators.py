import asyncio
import json
import time
from collections.abc import Callable

import pytest

from routecache.domain import (
    MAX_VALIDATOR_MESSAGE_CHARS,
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tier,
    ValidatorResult,
)
from routecache.errors import FailedValidation
from routecache.router.settings import LimitSettings, ValidatorSpec
from routecache.router.validation import build_validators
from routecache.router.validators import (
    SCHEMA_BUDGET_SECONDS,
    JsonSchemaValidator,
    LengthValidator,
    RefusalValidator,
    RegexValidator,
    check_pattern_size,
)
from tests.unit.test_generation import generator, says

SCHEMA = json.dumps(
    {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
)


def request(kind: ResponseFormatType = ResponseFormatType.TEXT, schema: str = "") -> ChatRequest:
    fmt = ResponseFormat(kind, schema)
    return ChatRequest((Message(Role.USER, "q"),), GenerationParams(response_format=fmt))


def test_max_length() -> None:
    validator = LengthValidator(1, 10)
    assert validator.check("short", request()).passed
    result = validator.check("x" * 11, request())
    assert not result.passed and "11 characters" in result.message
    assert not validator.check("  ", request()).passed


@pytest.mark.parametrize("text", ["\u200b\u200b", "\ufeff", " \u00ad\u2060\n"])
def test_an_answer_of_invisible_characters_only_is_empty(text: str) -> None:
    # str.strip keeps format characters (zero-width space, BOM): such an answer passed both
    # "empty answer" checks and could be cached, though the cache's keys count it as nothing.
    assert LengthValidator(1, 100).check(text, request()).message == "empty answer"
    assert RefusalValidator().check(text, request()).message == "empty answer"
    assert LengthValidator(1, 100).check("\u200bok", request()).passed


def test_json_validator_applies_only_when_json_is_asked() -> None:
    validator = JsonSchemaValidator()
    assert not validator.applies_to(request())
    assert validator.applies_to(request(ResponseFormatType.JSON_OBJECT))


def test_json_object() -> None:
    validator = JsonSchemaValidator()
    assert validator.check('{"a": 1}', request(ResponseFormatType.JSON_OBJECT)).passed
    assert not validator.check("[1, 2]", request(ResponseFormatType.JSON_OBJECT)).passed
    bad = validator.check("Sure! {", request(ResponseFormatType.JSON_OBJECT))
    assert not bad.passed and bad.message.startswith("not JSON")


def test_a_schema_violation_quoting_a_huge_value_is_cut_and_keeps_what_is_wrong() -> None:
    # Before: jsonschema's message quotes the whole value: 245 000 emoji (980 KB) went into the
    # report, which an escalated request serves with the strong answer: the reply was twice
    # what one message carries (RESOURCE_EXHAUSTED after two paid calls).
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    answer = json.dumps({"a": "\U0001f600" * 245_000}, ensure_ascii=False)
    result = JsonSchemaValidator().check(answer, request(ResponseFormatType.JSON_SCHEMA, schema))
    assert not result.passed
    assert len(result.message) <= MAX_VALIDATOR_MESSAGE_CHARS
    assert result.message.startswith("schema violation at a: '\U0001f600")
    assert result.message.endswith("is not of type 'integer'")  # the end says what is wrong
    assert "…" in result.message


def test_a_validator_result_message_within_the_bound_is_kept_whole() -> None:
    message = "x" * MAX_VALIDATOR_MESSAGE_CHARS
    assert ValidatorResult("v", False, message).message == message


RECURSIVE = json.dumps({"type": "array", "items": {"$ref": "#"}})


@pytest.mark.parametrize(
    ("kind", "schema", "depth"),
    [
        (ResponseFormatType.JSON_OBJECT, "", 100_000),  # past json.loads
        (ResponseFormatType.JSON_SCHEMA, SCHEMA, 100_000),
        (ResponseFormatType.JSON_SCHEMA, RECURSIVE, 900),  # parses; the schema recurses
    ],
)
def test_an_answer_nested_too_deeply_for_python_fails_instead_of_raising(
    kind: ResponseFormatType, schema: str, depth: int
) -> None:
    # Before: RecursionError escaped the validator, from json.loads or from the schema check.
    result = JsonSchemaValidator().check("[" * depth + "]" * depth, request(kind, schema))
    assert not result.passed and "nested too deeply" in result.message


@pytest.mark.parametrize("kind", [ResponseFormatType.JSON_OBJECT, ResponseFormatType.JSON_SCHEMA])
def test_an_answer_with_a_number_too_long_for_python_fails_as_not_json(
    kind: ResponseFormatType,
) -> None:
    # Before: json.loads raised ValueError (over 4,300 digits), not JSONDecodeError, and the
    # validator's exception escaped instead of failing the answer.
    result = JsonSchemaValidator().check('{"answer": ' + "9" * 5000 + "}", request(kind, SCHEMA))
    assert not result.passed and result.message.startswith("not JSON")
    assert "4,300 digits" in result.message and "set_int_max_str_digits" not in result.message


@pytest.mark.parametrize("kind", [ResponseFormatType.JSON_OBJECT, ResponseFormatType.JSON_SCHEMA])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_an_answer_with_a_non_finite_number_fails_as_not_json(
    kind: ResponseFormatType, number: str
) -> None:
    # RFC 8259 has no NaN or Infinity; Python's json.loads took them (and 1e999 as inf), so an
    # answer a strict parser refuses was served and cached as valid JSON.
    result = JsonSchemaValidator().check('{"answer": ' + number + "}", request(kind, SCHEMA))
    assert not result.passed and result.message.startswith("not JSON")
    assert "finite" in result.message


def test_a_number_too_large_for_the_schemas_check_fails_the_answer_instead_of_raising() -> None:
    # Before: jsonschema's multipleOf divided a 401-digit integer by 0.1, and the float
    # division raised OverflowError out of the validator (an INTERNAL error, the call unpaid).
    req = request(ResponseFormatType.JSON_SCHEMA, json.dumps({"multipleOf": 0.1}))
    result = JsonSchemaValidator().check("1" + "0" * 400, req)
    assert not result.passed and "too large" in result.message
    assert JsonSchemaValidator().check("0.5", req).passed


def test_json_schema_reports_where_it_fails() -> None:
    validator = JsonSchemaValidator()
    req = request(ResponseFormatType.JSON_SCHEMA, SCHEMA)
    assert validator.check('{"answer": "ok"}', req).passed
    wrong = validator.check('{"answer": 3}', req)
    assert not wrong.passed and "answer" in wrong.message
    missing = validator.check("{}", req)
    assert not missing.passed and "(root)" in missing.message


def test_length_bounds_are_inclusive() -> None:
    validator = LengthValidator(3, 5)
    assert validator.check("abc", request()).passed
    assert validator.check("abcde", request()).passed


def test_compiled_schemas_are_bounded() -> None:
    # Each tenant may send any schema: the compiled ones must not pile up without end.
    validator = JsonSchemaValidator(max_compiled=2)
    for field in ("a", "b", "c"):
        schema = json.dumps({"type": "object", "required": [field]})
        assert validator.check(
            json.dumps({field: 1}), request(ResponseFormatType.JSON_SCHEMA, schema)
        ).passed
    assert len(validator._compiled) <= 2


@pytest.mark.parametrize(
    ("pattern", "allowed"),
    [
        ("a{10000}", True),  # exactly the limit
        ("a{10001}", False),
        ("(?:ab){5001}", False),  # the group's items, times the count
        # An optional item still unrolls once per counted repeat when `regex` compiles.
        ("(?:a?){10001}", False),
        ("(?:a*){20000}", False),
        ("x{0,200000}", True),  # no minimum: nothing to unroll
        ("a{10001}?", False),  # lazy and possessive repeats unroll the same
        ("a{10001}+", False),
    ],
)
def test_pattern_size_counts_what_compiling_unrolls(pattern: str, allowed: bool) -> None:
    if allowed:
        check_pattern_size(pattern)
    else:
        with pytest.raises(ValueError, match="repeats too large"):
            check_pattern_size(pattern)


def test_schema_patterns_apply_to_strings_only() -> None:
    schema = json.dumps({"properties": {"n": {"pattern": "^a"}}, "patternProperties": {"^x": {}}})
    validator = JsonSchemaValidator()
    assert validator.check('{"n": 5}', request(ResponseFormatType.JSON_SCHEMA, schema)).passed
    assert not validator.check('{"n": "b"}', request(ResponseFormatType.JSON_SCHEMA, schema)).passed


def test_pattern_properties_apply_to_objects_only() -> None:
    # A keyword applies to the values of its type only: a list is no object with keys to match.
    schema = json.dumps({"patternProperties": {"^x": {"type": "string"}}})
    validator = JsonSchemaValidator()
    assert validator.check("[1, 2]", request(ResponseFormatType.JSON_SCHEMA, schema)).passed
    assert not validator.check('{"x": 1}', request(ResponseFormatType.JSON_SCHEMA, schema)).passed


CATASTROPHIC = r"(a|aa)+$"  # backtracks for minutes on the text below
NASTY = "a" * 34 + "b"


def elapsed(check: Callable[[], ValidatorResult]) -> tuple[ValidatorResult, float]:
    started = time.monotonic()
    result = check()
    return result, time.monotonic() - started


def test_the_pattern_budgets_bound_how_long_a_check_takes() -> None:
    result, took = elapsed(lambda: RegexValidator([CATASTROPHIC], []).check(NASTY, request()))
    assert "longer than 0.1 s" in result.message and took < 1.0  # the default budget
    # A budget spent by the patterns before still bounds the next one: a search given no
    # time at all (or less) would run unbounded in `regex`.
    spent = RegexValidator(["a", CATASTROPHIC], [], budget_seconds=1e-6)
    result, took = elapsed(lambda: spent.check(NASTY, request()))
    assert "longer than" in result.message and took < 1.0
    schema = json.dumps({"type": "string", "pattern": CATASTROPHIC})
    asked = request(ResponseFormatType.JSON_SCHEMA, schema)
    result, took = elapsed(lambda: JsonSchemaValidator().check(json.dumps(NASTY), asked))
    assert "took too long" in result.message and took < 1.0


# The schema check's budget, with room for a loaded machine (`regex` overshoots its timeout
# when the CPU is shared); unbounded, these checks took from 4 to 50 s.
IN_BUDGET = SCHEMA_BUDGET_SECONDS * 5

# Two recursive branches: jsonschema's work doubles with each level of the answer's nesting.
EXPONENTIAL = json.dumps(
    {"anyOf": [{"type": "array", "items": {"$ref": "#"}},
               {"type": "array", "items": {"$ref": "#"}}, {"type": "string"}]}
)  # fmt: skip


def test_a_schema_check_has_one_budget_for_the_whole_answer() -> None:
    # Before: a 29-character answer held the event loop for seconds (50 s at 33 characters):
    # nothing bounded jsonschema's own work, only each regex search.
    asked = request(ResponseFormatType.JSON_SCHEMA, EXPONENTIAL)
    result, took = elapsed(lambda: JsonSchemaValidator().check("[" * 14 + "1" + "]" * 14, asked))
    assert not result.passed and result.message == "the schema check took too long"
    assert took < IN_BUDGET
    assert JsonSchemaValidator().check('[["a"], "b"]', asked).passed  # shallow: still checked


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "contains": {"type": "string", "pattern": "^(a|aa)+$"}},
        {"type": "array", "items": {"anyOf": [{"pattern": "^(a|aa)+$"}, {"type": "number"}]}},
    ],
)
def test_the_pattern_timeout_is_spent_from_the_checks_budget(schema: dict[str, object]) -> None:
    # Before: each search had its own 50 ms, so `contains` over 100 items took 11 s.
    answer = json.dumps(["a" * 30 + "!"] * 100)
    asked = request(ResponseFormatType.JSON_SCHEMA, json.dumps(schema))
    result, took = elapsed(lambda: JsonSchemaValidator().check(answer, asked))
    assert not result.passed and "took too long" in result.message
    assert took < IN_BUDGET


def test_a_timed_out_pattern_under_not_fails_the_answer() -> None:
    # A search that ran out of time is no match and no mismatch: under `not` (or anyOf) an
    # error meant "passes"; the whole check fails instead.
    schema = json.dumps({"not": {"type": "string", "pattern": CATASTROPHIC}})
    asked = request(ResponseFormatType.JSON_SCHEMA, schema)
    result = JsonSchemaValidator().check(json.dumps(NASTY), asked)
    assert not result.passed and "took too long" in result.message


async def test_a_schema_check_out_of_time_applies_its_on_fail_without_stalling_the_loop() -> None:
    # Through Generator.generate: the check runs on the event loop that serves every tenant.
    answer = "[" * 14 + "1" + "]" * 14
    gen = generator([says(answer)], says(answer), *build_validators(
        [ValidatorSpec(kind="json_schema", on_fail="block")], LimitSettings()))  # fmt: skip
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beating = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.03)
    with pytest.raises(FailedValidation, match="took too long"):
        await gen.generate(request(ResponseFormatType.JSON_SCHEMA, EXPONENTIAL), Tier.CHEAP)
    done.set()
    await beating
    assert max(gaps) < IN_BUDGET


def test_a_nested_dialect_is_checked_with_the_bounded_validator() -> None:
    # Admission refuses any other "$schema"; should one get through, a subschema naming
    # draft-07 must still not switch to jsonschema's Draft7Validator (`re`, no timeout).
    sub = {"$schema": "http://json-schema.org/draft-07/schema#", "pattern": "^(a+)+$"}
    schema = json.dumps({"type": "object", "properties": {"x": sub}})
    asked = request(ResponseFormatType.JSON_SCHEMA, schema)
    result, took = elapsed(
        lambda: JsonSchemaValidator().check(json.dumps({"x": "a" * 26 + "!"}), asked)
    )
    assert not result.passed  # `regex` answers at once; `re` backtracked for seconds
    assert took < IN_BUDGET
    assert JsonSchemaValidator().check('{"x": "aaa"}', asked).passed

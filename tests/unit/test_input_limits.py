"""Every input limit: a violation is INVALID_ARGUMENT naming the field, before any cost."""

import http.server
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from routecache.domain import (
    CacheControl,
    ChatRequest,
    Feedback,
    GenerationParams,
    Message,
    RequestValidator,
    ResponseFormat,
    ResponseFormatType,
    Role,
)
from routecache.errors import InvalidArgument
from routecache.router.input_validation import (
    MAX_SCHEMA_PATTERN_ITEMS,
    MAX_SCHEMA_SUBSCHEMAS,
    SchemaVerdicts,
    validate_feedback,
    validate_invalidation,
    validate_request,
    validate_top_n,
)
from routecache.router.settings import ConfigError, LimitSettings, load_settings
from routecache.router.tenant_admin import InvalidateTarget
from routecache.router.validators import JsonSchemaValidator, RegexValidator
from tests.unit.conftest import KEYS, Harness, make_harness

LIMITS = LimitSettings(
    max_messages=3,
    max_message_chars=50,
    max_total_chars=80,
    max_tags=2,
    max_output_tokens=100,
    max_temperature=1.5,
    max_ttl_seconds=3600,
    max_tag_chars=10,
    max_end_user_id_chars=20,
    max_request_validators=2,
    max_validator_patterns=2,
    max_schema_chars=200,
)


def user(text: str = "hello") -> Message:
    return Message(Role.USER, text)


def schema_request(schema: object) -> ChatRequest:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, text)
    return ChatRequest((user(),), GenerationParams(response_format=fmt))


VIOLATIONS = [
    (ChatRequest(()), "messages"),
    (ChatRequest((user(),) * 4), "messages"),
    (ChatRequest((user("x" * 51),)), "messages[0].content"),
    (ChatRequest((user(" \n\t"),)), "messages[0].content"),
    (ChatRequest((user("x" * 45), user("y" * 45))), "messages"),
    (ChatRequest((user(), Message(Role.ASSISTANT, "hi"))), "messages[1].role"),
    (ChatRequest((user(), Message(Role.SYSTEM, "be brief"))), "messages[1].role"),
    (ChatRequest((user(),), GenerationParams(temperature=1.6)), "params.temperature"),
    (ChatRequest((user(),), GenerationParams(temperature=-0.1)), "params.temperature"),
    (ChatRequest((user(),), GenerationParams(temperature=float("nan"))), "params.temperature"),
    (ChatRequest((user(),), GenerationParams(temperature=float("inf"))), "params.temperature"),
    (ChatRequest((user(),), GenerationParams(max_tokens=0)), "params.max_tokens"),
    (ChatRequest((user(),), GenerationParams(max_tokens=101)), "params.max_tokens"),
    (schema_request("{not json"), "params.response_format.json_schema"),
    (
        ChatRequest((user(),), GenerationParams(response_format=ResponseFormat(json_schema="{}"))),
        "params.response_format.json_schema",
    ),
    (schema_request({"type": "nope"}), "params.response_format.json_schema"),
    # Non-finite numbers: {"maximum": NaN} passed check_schema and then every answer passed.
    (schema_request('{"maximum": NaN}'), "params.response_format.json_schema"),
    (schema_request('{"minimum": -Infinity}'), "params.response_format.json_schema"),
    (schema_request('{"maximum": 1e999}'), "params.response_format.json_schema"),
    (schema_request({"description": "x" * 200}), "params.response_format.json_schema"),
    (schema_request("[" * 5000 + "]" * 5000), "params.response_format.json_schema"),
    (schema_request({"pattern": "a{4294967296}"}), "params.response_format.json_schema"),
    (
        schema_request({"patternProperties": {"(a{1000}){1000}": {}}}),
        "params.response_format.json_schema",
    ),
    (
        schema_request({"properties": {"p": {"pattern": "(a{1000}){1000}"}}}),
        "params.response_format.json_schema",
    ),
    (ChatRequest((user(),), cache=CacheControl(tags=("a", "b", "c"))), "cache.tags"),
    (ChatRequest((user(),), cache=CacheControl(tags=("",))), "cache.tags[0]"),
    (ChatRequest((user(),), cache=CacheControl(tags=("a", "x" * 11))), "cache.tags[1]"),
    (ChatRequest((user(),), cache=CacheControl(ttl_seconds=3601)), "cache.ttl_seconds"),
    (ChatRequest((user(),), end_user_id="u" * 21), "end_user_id"),
    (ChatRequest((user(),), validators=(RequestValidator("pii"),) * 3), "validators"),
    (
        ChatRequest((user(),), validators=(RequestValidator("regex", must_match=("a",) * 3),)),
        "validators[0].must_match",
    ),
    (
        ChatRequest((user(),), validators=(RequestValidator("length", min_chars=9, max_chars=3),)),
        "validators[0].min_chars",
    ),
    (  # no max_chars: limits.max_answer_chars (20,000) is the bound no answer may pass
        ChatRequest((user(),), validators=(RequestValidator("length", min_chars=20_001),)),
        "validators[0].min_chars",
    ),
    (ChatRequest((user(),), validators=(RequestValidator("k" * 65),)), "validators[0].kind"),
    (
        ChatRequest((user(),), validators=(RequestValidator("pii", name="n" * 65),)),
        "validators[0].name",
    ),
    (
        ChatRequest((user(),), validators=(RequestValidator("pii", on_fail="f" * 65),)),
        "validators[0].on_fail",
    ),
    (
        ChatRequest((user(),), validators=(RequestValidator("regex", must_not_match=("a",) * 3),)),
        "validators[0].must_not_match",
    ),
    (
        ChatRequest((user(),), validators=(RequestValidator("pii", pii=("email",) * 3),)),
        "validators[0].pii",
    ),
]


@pytest.mark.parametrize(("request_", "field"), VIOLATIONS)
def test_each_violation_names_its_field(request_: ChatRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_request(request_, LIMITS)
    assert error.value.field == field
    assert field in str(error.value)


def test_a_request_at_every_limit_passes() -> None:
    validate_request(
        ChatRequest(
            (Message(Role.SYSTEM, "s" * 15), user("q" * 15), user("x" * 50)),
            GenerationParams(temperature=1.5, max_tokens=100),
            CacheControl(ttl_seconds=3600, tags=("a" * 10, "b")),
            end_user_id="u" * 20,
            validators=(RequestValidator("regex", must_match=("a", "b")),) * 2,
        ),
        LIMITS,
    )


@pytest.mark.parametrize(
    "ref", ["http://127.0.0.1:1/schema.json", "file:///etc/passwd", "other.json#/a"]
)
@pytest.mark.parametrize(
    "where",
    [
        lambda ref: {"type": "object", "properties": {"a": {"$ref": ref}}},
        lambda ref: {"anyOf": [{"type": "null"}, {"$ref": ref}]},  # inside a list
        lambda ref: {"$dynamicRef": ref},
    ],
)
def test_a_schema_may_not_reference_anything_outside_itself(
    ref: str, where: Callable[[str], object]
) -> None:
    schema = where(ref)
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema), LIMITS)
    assert error.value.field == "params.response_format.json_schema"
    assert "local references" in str(error.value)


@pytest.mark.parametrize(
    "validator",
    [
        RequestValidator("length", min_chars=5, max_chars=5),
        RequestValidator("length", min_chars=5),  # no max_chars: the tenant's limit applies
    ],
)
def test_length_bounds_that_can_be_met_pass(validator: RequestValidator) -> None:
    validate_request(ChatRequest((user(),), validators=(validator,)), LIMITS)


@pytest.mark.parametrize("ref", ["#/$defs/n", "#n"])  # a JSON pointer or an $anchor
def test_local_references_are_allowed(ref: str) -> None:
    schema = {
        "$defs": {"n": {"$anchor": "n", "type": "number"}},
        "properties": {"a": {"$ref": ref}},
    }
    validate_request(schema_request(schema), LIMITS)


@pytest.mark.parametrize(
    "request_",
    [
        ChatRequest((user(),), GenerationParams(temperature=0.0)),  # greedy decoding
        ChatRequest(
            (user(),),
            GenerationParams(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)),
        ),
        ChatRequest(
            (user(),),
            validators=(RequestValidator("pii", name="n" * 64, on_fail="f" * 64),),
        ),
    ],
)
def test_requests_at_the_other_edges_pass(request_: ChatRequest) -> None:
    validate_request(request_, LIMITS)


def test_an_empty_json_schema_is_reported_as_missing() -> None:
    with pytest.raises(InvalidArgument, match="required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA"):
        validate_request(schema_request("  "), LIMITS)


def test_admin_fields_pass_at_their_own_limits() -> None:
    # A comment may be as long as feedback allows, not only as long as an id; a tag to
    # invalidate is bounded like an id, so one stored before max_tag_chars was lowered can go.
    longest = "c" * LIMITS.max_feedback_chars
    validate_feedback(Feedback("r", True, correction=longest, comment=longest), LIMITS)
    validate_invalidation("", "t" * LIMITS.max_id_chars, LIMITS)
    validate_top_n(LIMITS.max_top_n, LIMITS)
    validate_top_n(0, LIMITS)  # GetStats' "0 means 10"


def test_request_size_limit_defaults_to_one_mebibyte_and_has_a_floor() -> None:
    assert load_settings().limits.max_request_bytes == 1 << 20
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_settings(limits={"max_request_bytes": 100})


async def test_feedback_invalidate_and_stats_fields_are_bounded(harness: Harness) -> None:
    pipeline, key = harness.service.pipeline, KEYS["acme"]
    limits = harness.service.settings.limits
    long_id = "r" * (limits.max_id_chars + 1)
    long_text = "c" * (limits.max_feedback_chars + 1)
    cases: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: pipeline.admin.feedback(Feedback("", False), key), "response_id"),
        (lambda: pipeline.admin.feedback(Feedback(long_id, False), key), "response_id"),
        (
            lambda: pipeline.admin.feedback(Feedback("r", True, correction=long_text), key),
            "correction",
        ),
        (lambda: pipeline.admin.feedback(Feedback("r", True, comment=long_text), key), "comment"),
        (lambda: pipeline.admin.invalidate(InvalidateTarget(entry_id=long_id), key), "entry_id"),
        (lambda: pipeline.admin.invalidate(InvalidateTarget(tag=long_id), key), "tag"),
        (lambda: pipeline.admin.stats(key, limits.max_top_n + 1), "top_n"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as error:
            await call()
        assert error.value.field == field


@pytest.mark.parametrize(
    "schema_text", ["[" * 5000 + "]" * 5000, '{"items":' * 3000 + "{}" + "}" * 3000]
)
def test_a_deeply_nested_schema_is_invalid_not_a_crash(schema_text: str) -> None:
    # Before: RecursionError escaped the checks and the call ended INTERNAL.
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema_text), LimitSettings(max_schema_chars=100_000))
    assert error.value.field == "params.response_format.json_schema"


def test_a_schema_number_too_long_for_python_is_invalid_not_a_crash() -> None:
    # Before: json.loads raised ValueError (over 4,300 digits), not JSONDecodeError: INTERNAL.
    schema_text = '{"maxLength": ' + "9" * 5000 + "}"
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema_text), LimitSettings())
    assert error.value.field == "params.response_format.json_schema"
    assert "not JSON the service can read: a number longer than 4,300 digits" in str(error.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON: Expecting property name enclosed in double quotes at position 1"),
        ('{"maxLength": ' + "9" * 5000 + "}", "not JSON the service can read: a number longer"
         " than 4,300 digits"),
        ("[" * 5000 + "]" * 5000, "not JSON the service can read: nested too deeply"),
    ],
    ids=["not JSON", "a number too long", "nested too deeply"],
)  # fmt: skip
def test_a_schema_and_an_answer_that_cannot_be_read_as_json_are_reported_in_the_same_words(
    text: str, problem: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(text), LimitSettings(max_schema_chars=100_000))
    assert str(error.value) == f"params.response_format.json_schema: {problem}"
    answer = JsonSchemaValidator().check(text, schema_request({"type": "object"}))
    assert (answer.passed, answer.message) == (False, problem)


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    fetched: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.fetched.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"type": "string"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("ref", ["REMOTE", "#/$defs/missing"])
def test_the_schema_validator_never_fetches_and_never_raises(ref: str) -> None:
    # Before: jsonschema fetched the URL (SSRF), and a dangling local ref raised (INTERNAL).
    server = http.server.HTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s.json"
        request = schema_request({"$ref": url if ref == "REMOTE" else ref})
        result = JsonSchemaValidator().check("5", request)
    finally:
        server.shutdown()
        server.server_close()
    assert not result.passed and "unresolvable" in result.message
    assert _CountingHandler.fetched == []


def test_a_catastrophic_request_pattern_fails_its_own_request_within_its_budget() -> None:
    # Before: `re` backtracked on the event loop for minutes, stalling every tenant's calls.
    validator = RegexValidator([r"(a|aa)+$"], [], budget_seconds=0.05)
    result = validator.check("a" * 60 + "b", ChatRequest((user(),)))
    assert not result.passed and "longer than 0.05 s" in result.message
    assert RegexValidator([r"colou?r"], []).check("a colour", ChatRequest((user(),))).passed


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "(a|aa)+$"},
        {"type": "object", "patternProperties": {"(a|aa)+$": {"type": "number"}}},
    ],
)
def test_a_catastrophic_schema_pattern_fails_the_answer_instead_of_hanging(
    schema: dict[str, object],
) -> None:
    # Before: jsonschema's `re` search on the answer ran for minutes on the event loop.
    nasty = "a" * 60 + "b"
    answer = json.dumps(nasty if schema["type"] == "string" else {nasty: 1})
    result = JsonSchemaValidator().check(answer, schema_request(schema))
    assert not result.passed and "took too long" in result.message


def test_schema_patterns_still_work() -> None:
    schema = {"type": "object", "patternProperties": {"^n": {"type": "number"}},
              "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}  # fmt: skip
    validator = JsonSchemaValidator()
    assert validator.check('{"code": "ABC", "n1": 2}', schema_request(schema)).passed
    assert not validator.check('{"code": "abc"}', schema_request(schema)).passed
    assert not validator.check('{"n1": "two"}', schema_request(schema)).passed


def test_a_pattern_in_schema_data_is_not_checked_as_a_regex() -> None:
    # Only `pattern` values and `patternProperties` keys are compiled; this is a value.
    schema = {
        "const": {"pattern": "("},
        "default": {"pattern": "a{4294967296}"},
        "properties": {"n": {"pattern": "^[0-9]{1,9}$"}},
    }
    validate_request(schema_request(schema), LimitSettings())


@pytest.mark.parametrize(
    "schema",
    [
        {"anyOf": [{}] * 9999 + [{"type": 5}]},  # refused at the end, after seconds
        {"anyOf": [True] * MAX_SCHEMA_SUBSCHEMAS},  # booleans are subschemas too
        {"$defs": {str(i): {} for i in range(MAX_SCHEMA_SUBSCHEMAS)}},
    ],
)
def test_a_schema_with_too_many_subschemas_is_refused_before_the_meta_schema_check(
    schema: dict[str, object],
) -> None:
    # Before: check_schema cost ~0.7 ms a subschema on the event loop, before the rate limit:
    # a 30 kB schema held every tenant's calls for 4.5 s and was refused for free.
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema), LimitSettings(max_schema_chars=100_000))
    assert time.monotonic() - started < 0.5
    assert error.value.field == "params.response_format.json_schema"
    assert f"more than {MAX_SCHEMA_SUBSCHEMAS} subschemas" in str(error.value)


def test_a_schema_at_the_subschema_limit_is_admitted() -> None:
    # The root object and its anyOf's booleans: exactly the limit.
    validate_request(
        schema_request({"anyOf": [True] * (MAX_SCHEMA_SUBSCHEMAS - 1)}), LimitSettings()
    )


def count_schema_checks(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every schema jsonschema's meta-schema check is run on, in order."""
    from jsonschema import Draft202012Validator

    checked: list[dict[str, Any]] = []
    real = Draft202012Validator.check_schema

    def counting(schema: dict[str, Any], **options: Any) -> None:
        checked.append(schema)
        real(schema, **options)

    monkeypatch.setattr(Draft202012Validator, "check_schema", counting)
    return checked


def test_a_schemas_check_is_cached_per_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    # The meta-schema check is the costly part of admission; tenants send the same few
    # schemas again and again. Per tenant: how fast a schema is admitted must not tell one
    # tenant that another sent it.
    checked = count_schema_checks(monkeypatch)
    verdicts = SchemaVerdicts()
    good = {"type": "object", "description": f"cache test {uuid.uuid4()}"}
    bad = {"type": 5, "description": f"cache test {uuid.uuid4()}"}
    for _ in range(3):
        validate_request(schema_request(good), LimitSettings(), verdicts.for_tenant("acme"))
        with pytest.raises(InvalidArgument, match="not a valid JSON Schema"):
            validate_request(schema_request(bad), LimitSettings(), verdicts.for_tenant("acme"))
    assert len(checked) == 2  # one check each, then the cached verdict
    validate_request(schema_request(good), LimitSettings(), verdicts.for_tenant("globex"))
    assert len(checked) == 3


async def test_each_pipeline_keeps_its_own_schema_verdicts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No process-wide cache: a pipeline's verdicts live and die with it, and what one
    # pipeline was sent says nothing to another one in the same process.
    checked = count_schema_checks(monkeypatch)
    bad = schema_request({"type": 5, "description": f"pipelines {uuid.uuid4()}"})
    for _ in range(2):
        built = make_harness()
        try:
            for _ in range(2):
                with pytest.raises(InvalidArgument, match="not a valid JSON Schema"):
                    await built.service.pipeline.complete(bad, KEYS["acme"])
        finally:
            await built.service.aclose()
    assert len(checked) == 2  # once per pipeline, then that pipeline's cached verdict


@pytest.mark.parametrize(
    "where",
    [
        lambda dialect: {"$schema": dialect, "type": "string"},
        lambda dialect: {"properties": {"x": {"$schema": dialect, "pattern": "^(a+)+$"}}},
        lambda dialect: {"$defs": {"d": {"$schema": dialect}}, "$ref": "#/$defs/d"},
    ],
)
@pytest.mark.parametrize(
    "dialect",
    ["http://json-schema.org/draft-07/schema#", "https://json-schema.org/draft/2019-09/schema",
     "http://json-schema.org/draft-04/schema#", "https://example.com/my-dialect"],
)  # fmt: skip
def test_a_schema_may_not_switch_to_another_dialect(
    where: Callable[[str], object], dialect: str
) -> None:
    # Before: a nested "$schema" made jsonschema check that part with another draft's
    # validator, whose `pattern` is `re`, unbounded: ^(a+)+$ ran for minutes on the loop.
    with pytest.raises(InvalidArgument, match="2020-12") as error:
        validate_request(schema_request(where(dialect)), LimitSettings())
    assert error.value.field == "params.response_format.json_schema"


@pytest.mark.parametrize(
    "dialect",
    ["https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2020-12/schema#"],
)  # fmt: skip
def test_a_schema_may_name_the_2020_12_dialect(dialect: str) -> None:
    validate_request(
        schema_request({"$schema": dialect, "properties": {"x": {"$schema": dialect}}}),
        LimitSettings(),
    )


@pytest.mark.parametrize(
    "schema_text",
    [
        '{"type": "object", "description": "\\ud800"}',
        '{"type": "object", "properties": {"answer": {"const": "x\\udfff"}}}',
        '{"type": "object", "\\ud800": 1}',
    ],
    ids=["description", "const", "key"],
)
def test_a_schema_with_a_lone_surrogate_escape_is_refused_at_admission(schema_text: str) -> None:
    # Before: admitted (valid JSON), then every call failed INTERNAL when the schema was
    # encoded as UTF-8 for the provider, counted as an internal error.
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema_text), LimitSettings())
    assert str(error.value) == (
        "params.response_format.json_schema: not valid Unicode: a lone surrogate escape"
    )


def test_a_schema_with_an_escaped_surrogate_pair_is_admitted() -> None:
    # A pair escaped in JSON ("\ud83d\ude00") is one character: UTF-8 holds it.
    validate_request(schema_request('{"description": "\\ud83d\\ude00"}'), LimitSettings())


@pytest.mark.parametrize(
    ("schema", "where", "problem"),
    [
        (
            {"properties": {"answer": {"type": "string", "pattern": "[[:foo:]]"}}},
            "/properties/answer/pattern",
            "a POSIX class ([:foo:])",
        ),
        ({"properties": {"a": {"pattern": "[[:alpha:]]"}}}, "/properties/a/pattern", "POSIX"),
        ({"items": {"pattern": "{e}"}}, "/items/pattern", "a fuzzy match ({e})"),
        ({"pattern": "a{e<=1}x"}, "/pattern", "a fuzzy match"),
        ({"patternProperties": {"[[:foo:]]": {}}}, "/patternProperties", "POSIX"),
        ({"propertyNames": {"pattern": "{e}"}}, "/propertyNames/pattern", "fuzzy"),
        # Python's syntax, but `regex` refuses the fuzzy cost before the "," (validators.py).
        ({"pattern": "a{e<,x}"}, "/pattern", "fuzzy"),
    ],
)
def test_a_schema_pattern_the_matching_engine_reads_otherwise_is_refused_at_admission(
    schema: dict[str, object], where: str, problem: str
) -> None:
    # Before: `re` parsed these, so they were admitted; the `regex` engine that checks the
    # answer raised on each one (or read it as a fuzzy match): both calls paid, then
    # FAILED_PRECONDITION, with a traceback logged every time.
    with pytest.raises(InvalidArgument) as error:
        validate_request(schema_request(schema), LimitSettings())
    assert error.value.field == "params.response_format.json_schema"
    assert f"at {where}" in str(error.value)
    assert problem in str(error.value)


def test_a_schema_pattern_too_large_to_compile_is_refused_before_it_is_compiled() -> None:
    # `regex` unrolls counted repeats when it compiles: (a{1000}){1000} took 1.2 s and 275 MB.
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="repeats too large"):
        validate_request(
            schema_request({"properties": {"p": {"pattern": "(a{1000}){1000}"}}}), LimitSettings()
        )
    assert time.monotonic() - started < 0.5


def test_a_schemas_patterns_too_large_in_all_are_refused_before_they_are_compiled() -> None:
    # Admission compiles each pattern with `regex`: 1,000 patterns of 10,000 items each, every
    # one under the per-pattern limit, held the event loop for seconds.
    patterns = [f"a{{9990}}{i}" for i in range(MAX_SCHEMA_PATTERN_ITEMS // 10_000 + 1)]
    schema = {"anyOf": [{"pattern": pattern} for pattern in patterns]}
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="patterns too large in all"):
        validate_request(schema_request(schema), LimitSettings())
    assert time.monotonic() - started < 0.1


def test_a_schemas_patterns_at_the_limit_in_all_are_admitted() -> None:
    patterns = [f"a{{9990}}{i}" for i in range(MAX_SCHEMA_PATTERN_ITEMS // 10_000)]
    validate_request(schema_request({"anyOf": [{"pattern": p} for p in patterns]}), LimitSettings())


async def test_a_schema_pattern_regex_cannot_compile_costs_no_call(harness: Harness) -> None:
    # Before: the cheap answer failed its check (it raised), escalated, and the strong one
    # failed too: FAILED_PRECONDITION after paying for both.
    request = schema_request({"properties": {"answer": {"pattern": "[[:foo:]]"}}})
    with pytest.raises(InvalidArgument):
        await harness.service.pipeline.complete(request, KEYS["acme"])
    assert (harness.cheap.calls, harness.strong.calls) == ([], [])

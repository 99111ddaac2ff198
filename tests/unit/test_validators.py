import json

from routecache.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)
from routecache.router.validators import JsonSchemaValidator, LengthValidator

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


def test_json_schema_reports_where_it_fails() -> None:
    validator = JsonSchemaValidator()
    req = request(ResponseFormatType.JSON_SCHEMA, SCHEMA)
    assert validator.check('{"answer": "ok"}', req).passed
    wrong = validator.check('{"answer": 3}', req)
    assert not wrong.passed and "answer" in wrong.message
    missing = validator.check("{}", req)
    assert not missing.passed and "(root)" in missing.message

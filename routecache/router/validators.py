"""Output validators: each checks one answer and says why it fails."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from routecache.domain import ChatRequest, ResponseFormatType, ValidatorResult


class MaxLengthValidator:
    """Rejects answers longer than the operator allows (runaway or padded generations)."""

    name = "max_length"

    def __init__(self, max_chars: int) -> None:
        self._max_chars = max_chars

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        if len(text) > self._max_chars:
            return ValidatorResult(
                self.name, False, f"{len(text)} characters, more than {self._max_chars}"
            )
        if not text.strip():
            return ValidatorResult(self.name, False, "empty answer")
        return ValidatorResult(self.name, True)


class JsonSchemaValidator:
    """When the request asks for JSON: the answer must parse, and match the schema if given."""

    name = "json_schema"

    def __init__(self, max_compiled: int = 256) -> None:
        # Tenants send the same few schemas again and again: compile each once.
        self._compiled: dict[str, Draft202012Validator] = {}
        self._max_compiled = max_compiled

    def applies_to(self, request: ChatRequest) -> bool:
        return request.params.response_format.wants_json

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return ValidatorResult(self.name, False, f"not JSON: {exc.msg} at position {exc.pos}")
        response_format = request.params.response_format
        if response_format.type is ResponseFormatType.JSON_OBJECT:
            ok = isinstance(value, dict)
            return ValidatorResult(self.name, ok, "" if ok else "JSON, but not an object")
        error = next(iter(self._validator(response_format.json_schema).iter_errors(value)), None)
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
            schema: Any = json.loads(schema_text)
            compiled = self._compiled[schema_text] = Draft202012Validator(schema)
        return compiled

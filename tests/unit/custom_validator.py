"""A custom validator loaded by import path in the tests (tests.unit.custom_validator:Banned)."""

from routecache.domain import ChatRequest, ValidatorResult


class Banned:
    def __init__(self, word: str) -> None:
        self.name = "banned_word"
        self._word = word

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        ok = self._word not in text.lower()
        return ValidatorResult(self.name, ok, "" if ok else f"mentions {self._word}")

    def redact(self, text: str) -> str:
        return text.replace(self._word, "***")


class Broken:
    """A plugin with a bug: `fails_in` ("check" or "redact") raises; its check fails otherwise."""

    def __init__(self, fails_in: str = "check") -> None:
        self.name = "broken"
        self._fails_in = fails_in

    def applies_to(self, request: ChatRequest) -> bool:
        return True

    def check(self, text: str, request: ChatRequest) -> ValidatorResult:
        if self._fails_in == "check":
            raise OverflowError("int too large to convert to float")
        return ValidatorResult(self.name, False, "always fails")

    def redact(self, text: str) -> str:
        raise RuntimeError("the redactor broke")

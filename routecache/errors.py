"""One exception tree for the whole service; router/error_mapping.py turns it into gRPC codes."""

from __future__ import annotations

from routecache.domain import ValidationReport


class RouteCacheError(Exception):
    """Base of every error the service reports to a caller."""

    # The checks the request's calls made before it failed this way: a cheap answer that failed
    # a validator and was escalated before the strong call failed (None: no answer was checked).
    # FailedValidation has its own `report`.
    checks: ValidationReport | None = None


class InvalidArgument(RouteCacheError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unauthenticated(RouteCacheError):
    pass


class NotFound(RouteCacheError):
    pass


class ResourceExhausted(RouteCacheError):
    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class FailedValidation(RouteCacheError):
    """Every model's answer failed a validator; the report says which and why."""

    def __init__(
        self, message: str, report: ValidationReport, *, cost_usd: float = 0.0,
        prompt_tokens: int = 0, completion_tokens: int = 0, calls: int = 0, strong_calls: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.report = report
        # What the refused answers cost: paid for even though nothing is served.
        self.cost_usd = cost_usd
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.calls = calls
        self.strong_calls = strong_calls  # of `calls`, those a strong-tier provider answered


class UpstreamError(RouteCacheError):
    """A provider call failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Unavailable(RouteCacheError):
    pass

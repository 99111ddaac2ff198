"""A circuit breaker per provider: stop calling a provider that keeps failing, probe it later.

CLOSED lets every call through and counts consecutive failures; at the threshold it OPENs and
sheds calls (a clock read and a comparison: microseconds) for `open_seconds`; then it
is HALF_OPEN and lets `half_open_probes` calls through: a success closes it, a failure opens it
again for another full period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        open_seconds: float = 10.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or open_seconds <= 0:
            raise ValueError("failure_threshold, half_open_probes >= 1 and open_seconds > 0")
        self._threshold = failure_threshold
        self._open_seconds = open_seconds
        self._probes = half_open_probes
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probes_in_flight = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._open_seconds:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def seconds_until_probe(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._open_seconds - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether a call may go out now; a True in HALF_OPEN takes one probe slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probes_in_flight >= self._probes:
            return False
        self._probes_in_flight += 1
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probes_in_flight = 0

    def record_failure(self) -> None:
        if self._opened_at is not None:  # a failed probe: shed for another full period
            self._opened_at = self._clock()
            self._probes_in_flight = 0
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._opened_at = self._clock()

    def release(self) -> None:
        """A call that neither succeeded nor failed the provider (cancelled): free its slot."""
        if self._probes_in_flight:
            self._probes_in_flight -= 1

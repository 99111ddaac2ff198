"""A circuit breaker per provider: stop calling a provider that keeps failing, probe it later.

CLOSED lets every call through and counts consecutive failures; at the threshold it OPENs and
sheds calls (a clock read and a comparison: microseconds) for `open_seconds`; then it
is HALF_OPEN and lets `half_open_probes` calls through: a success closes it, a failure opens it
again for another full period.

Each call let through holds a ticket of the breaker's generation, which moves on whenever it
opens or closes: the outcome of a call sent before (an attempt may outlast `open_seconds`)
says nothing of the provider now and moves nothing, nor frees a probe's slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerTicket:
    """A call let through, for its outcome: the breaker's generation when it went out."""

    generation: int


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
        self._generation = 0  # moves on at each open and close

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

    def allow(self) -> BreakerTicket | None:
        """A ticket when a call may go out now (in HALF_OPEN it takes one probe slot), for
        the call's outcome; None when it is shed."""
        state = self.state
        if state is BreakerState.OPEN:
            return None
        if state is BreakerState.HALF_OPEN:
            if self._probes_in_flight >= self._probes:
                return None
            self._probes_in_flight += 1
        return BreakerTicket(self._generation)

    def _stale(self, ticket: BreakerTicket | None) -> bool:
        """Whether the call went out before the breaker last opened or closed (its slot, if it
        was a probe, went with that change). No ticket: a call of the current generation."""
        return ticket is not None and ticket.generation != self._generation

    def record_success(self, ticket: BreakerTicket | None = None) -> None:
        if self._stale(ticket):
            return
        if self._opened_at is not None:
            self._generation += 1
        self._failures = 0
        self._opened_at = None
        self._probes_in_flight = 0

    def record_failure(self, ticket: BreakerTicket | None = None) -> None:
        if self._stale(ticket):
            return
        if self._opened_at is not None:  # a failed probe: shed for another full period
            self._open()
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes_in_flight = 0
        self._generation += 1

    def release(self, ticket: BreakerTicket | None = None) -> None:
        """A call that neither succeeded nor failed the provider (cancelled): free its slot."""
        if not self._stale(ticket) and self._probes_in_flight:
            self._probes_in_flight -= 1

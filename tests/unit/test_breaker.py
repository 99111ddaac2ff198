import pytest

from routecache.router.upstream.breaker import BreakerState, CircuitBreaker
from tests.fakes import ManualClock


def breaker(clock: ManualClock, threshold: int = 3, probes: int = 1) -> CircuitBreaker:
    return CircuitBreaker(threshold, open_seconds=10.0, half_open_probes=probes, clock=clock)


def test_opens_after_consecutive_failures_only() -> None:
    clock = ManualClock()
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between resets the count
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    assert b.seconds_until_probe() == pytest.approx(10.0)


def test_half_open_lets_limited_probes_through_and_a_success_closes() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1, probes=2)
    b.record_failure()
    clock.advance(9.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and b.allow()
    assert not b.allow()  # both probe slots taken
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_failed_probe_opens_for_a_full_period() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.advance(10.0)
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.advance(9.0)
    assert not b.allow()
    clock.advance(1.0)
    assert b.allow()


def test_released_probe_frees_its_slot() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.advance(10.0)
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.allow()


@pytest.mark.parametrize(
    "parameters",
    [{"failure_threshold": 0}, {"half_open_probes": 0}, {"open_seconds": 0.0}],
)
def test_bad_parameters_are_refused(parameters: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(**parameters)  # type: ignore[arg-type]

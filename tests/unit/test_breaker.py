import pytest

from routecache.router.upstream.breaker import BreakerState, CircuitBreaker
from tests.fakes import ManualClock


def state_of(b: CircuitBreaker) -> BreakerState:
    """The state read anew: mypy would keep the one an earlier assert narrowed to."""
    return b.state


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
    assert state_of(b) is BreakerState.OPEN
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
    assert state_of(b) is BreakerState.CLOSED and b.allow()


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


def test_a_breaker_a_probe_closed_lets_a_probe_through_when_it_opens_again() -> None:
    # The probe's slot must be given back when it closes the breaker: held over, it would
    # count against the next half-open period, which would then shed every call for good.
    clock = ManualClock()
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.advance(10.0)
    assert b.allow()
    b.record_success()
    b.record_failure()
    clock.advance(10.0)
    assert b.state is BreakerState.HALF_OPEN and b.allow()


def test_releases_while_closed_bank_no_extra_probes() -> None:
    # A refused (4xx) or cancelled call releases whatever the state; when closed there is
    # no slot to give back, and the later half-open period still lets one probe through.
    clock = ManualClock()
    b = breaker(clock, threshold=1)
    b.release()
    b.release()
    b.record_failure()
    clock.advance(10.0)
    assert b.allow()
    assert not b.allow()


def test_the_wait_for_a_probe_is_never_negative() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1)
    assert b.seconds_until_probe() == 0.0
    b.record_failure()
    clock.advance(4.0)
    assert b.seconds_until_probe() == pytest.approx(6.0)
    clock.advance(20.0)  # half-open, its probe out: the failover's message says 0.0s
    assert b.allow() and not b.allow()
    assert b.seconds_until_probe() == 0.0

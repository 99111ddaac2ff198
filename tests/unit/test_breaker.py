import pytest

from routecache.router.upstream.breaker import BreakerState, BreakerTicket, CircuitBreaker
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


def opened_with_a_call_still_out(clock: ManualClock) -> tuple[CircuitBreaker, BreakerTicket]:
    """A breaker (threshold 2) two failures opened while a third call sent when it was
    closed is still out (an attempt timeout of 30 s outlasts open_seconds); and that call."""
    b = breaker(clock, threshold=2)
    first, second, late = b.allow(), b.allow(), b.allow()
    assert first and second and late
    b.record_failure(first)
    b.record_failure(second)
    return b, late


@pytest.mark.parametrize("end", ["failure", "release"])
def test_a_late_end_of_a_call_sent_while_closed_leaves_the_probe_its_slot(end: str) -> None:
    # Before: its failure opened the breaker again and zeroed the probes in flight, so a
    # second probe went out while the first was still out; its release freed a probe slot.
    clock = ManualClock()
    b, late = opened_with_a_call_still_out(clock)
    clock.advance(10.0)
    assert b.allow()  # the probe
    clock.advance(2.0)
    b.record_failure(late) if end == "failure" else b.release(late)
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # the probe still holds its slot


def test_a_late_success_of_a_call_sent_while_closed_does_not_close_the_breaker() -> None:
    clock = ManualClock()
    b, late = opened_with_a_call_still_out(clock)
    b.record_success(late)
    assert b.state is BreakerState.OPEN and not b.allow()


def test_a_probes_outcome_still_moves_the_breaker_and_an_older_probes_does_not() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1, probes=2)
    b.record_failure()
    clock.advance(10.0)
    failing, slow = b.allow(), b.allow()
    assert failing and slow
    b.record_failure(failing)  # open again, for a full period
    clock.advance(10.0)
    assert b.allow()  # the next period's probe
    b.record_success(slow)  # of the period before: no verdict now
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # two probe slots, both taken now


def test_a_probe_ending_after_another_probe_closed_the_breaker_moves_nothing() -> None:
    clock = ManualClock()
    b = breaker(clock, threshold=1, probes=2)
    b.record_failure()
    clock.advance(10.0)
    answering, failing = b.allow(), b.allow()
    assert answering and failing
    b.record_success(answering)
    b.record_failure(failing)  # of the half-open period: the provider has answered since
    assert b.state is BreakerState.CLOSED

import argparse

import pytest

from routecache.replay.config import (
    FaultKind,
    FaultSchedule,
    ReplayConfig,
    add_cli_arguments,
    config_from_args,
)


def parse(*argv: str) -> ReplayConfig:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_fault_script_comes_before_the_random_draw() -> None:
    config = parse("--fault-script", "http_503,none,timeout", "--fault-rate", "1",
                   "--fault-kinds", "empty_answer")  # fmt: skip
    assert config.fault_script == (FaultKind.HTTP_503, None, FaultKind.TIMEOUT)
    schedule = FaultSchedule(config)
    drawn = [schedule.next_fault(None) for _ in range(4)]
    assert drawn == [FaultKind.HTTP_503, None, FaultKind.TIMEOUT, FaultKind.EMPTY_ANSWER]


def test_scripted_faults_can_be_queued_and_cleared() -> None:
    schedule = FaultSchedule(ReplayConfig())
    schedule.script([FaultKind.HTTP_429, FaultKind.MALFORMED_JSON])
    assert schedule.next_fault(None) is FaultKind.HTTP_429
    assert schedule.next_fault("none") is None  # a header still overrides, script untouched
    schedule.clear_script()
    assert schedule.next_fault(None) is None


def test_bad_fault_script_is_refused() -> None:
    with pytest.raises(ValueError, match="--fault-script"):
        parse("--fault-script", "http_418")


@pytest.mark.parametrize("flag", ["--latency-ms", "--hang-seconds"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_timings_must_be_finite_and_not_negative(flag: str, value: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse(flag, value)

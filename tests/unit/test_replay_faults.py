import argparse
from pathlib import Path

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


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ('{"prompt": "p"}\n', "recording 1: needs"), ("", "no recordings")],
    ids=["missing", "not recordings", "empty"],
)
def test_replay_upstream_reports_a_bad_recordings_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    from routecache.router.cli import main

    recordings = tmp_path / "rec.jsonl"
    if content is not None:
        recordings.write_text(content)
    assert main(["replay-upstream", "--port", "0", "--recordings", str(recordings)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: --recordings {recordings}: ") and message in err


def test_replay_upstream_reports_a_taken_or_impossible_port_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    from routecache.router.cli import main

    assert main(["replay-upstream", "--port", "70000"]) == 2
    assert "--port 70000: must be 0 to 65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["replay-upstream", "--port", str(port)]) == 2
    assert f"routecache: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

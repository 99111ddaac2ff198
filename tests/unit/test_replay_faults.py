import argparse
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from routecache.replay.config import (
    FaultKind,
    FaultSchedule,
    ReplayConfig,
    add_cli_arguments,
    config_from_args,
    header_latency_ms,
)


def parse(*argv: str) -> ReplayConfig:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_fault_script_comes_before_the_random_draw() -> None:
    # Any case, as the x-replay-fault header takes them.
    config = parse("--fault-script", "http_503,None,TIMEOUT", "--fault-rate", "1",
                   "--fault-kinds", "Empty_Answer")  # fmt: skip
    assert config.fault_script == (FaultKind.HTTP_503, None, FaultKind.TIMEOUT)
    assert config.fault_kinds == (FaultKind.EMPTY_ANSWER,)
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


def test_no_fault_kinds_at_fault_rate_zero_draws_no_fault() -> None:
    schedule = FaultSchedule(parse("--fault-kinds", ""))
    assert [schedule.next_fault(None) for _ in range(3)] == [None, None, None]


@pytest.mark.parametrize("flag", ["--fault-script", "--fault-kinds"])
def test_an_unknown_fault_name_is_refused_naming_the_flag_and_the_known_faults(
    flag: str,
) -> None:
    with pytest.raises(ValueError, match=rf"{flag}: no fault is named 'http_418' \(known: .*"):
        parse(flag, "timeout,HTTP_418")


def test_none_is_a_fault_script_step_but_no_fault_kind() -> None:
    assert parse("--fault-script", "none").fault_script == (None,)
    with pytest.raises(ValueError, match="--fault-kinds: 'none' is no fault kind"):
        parse("--fault-kinds", "timeout, None")


@pytest.mark.parametrize("flag", ["--latency-ms", "--hang-seconds"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_timings_must_be_finite_and_not_negative(flag: str, value: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse(flag, value)


def routecache_replay_upstream(*argv: str) -> int:
    from routecache.router.cli import main

    return main(["replay-upstream", *argv])


def python_m_routecache_replay(*argv: str) -> int:
    from routecache.replay.server import main

    return main(argv)


# The two ways to start the replay upstream; both must refuse a bad start in one line.
entry_points = pytest.mark.parametrize(
    "run", [routecache_replay_upstream, python_m_routecache_replay],
    ids=["routecache replay-upstream", "python -m routecache.replay"],
)  # fmt: skip


@entry_points
@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ('{"prompt": "p"}\n', "rec.jsonl:1: needs"), ("", "no recordings")],
    ids=["missing", "not recordings", "empty"],
)
def test_replay_upstream_reports_a_bad_recordings_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str,
    run: Callable[..., int],
) -> None:  # fmt: skip
    recordings = tmp_path / "rec.jsonl"
    if content is not None:
        recordings.write_text(content)
    assert run("--port", "0", "--recordings", str(recordings)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: --recordings {recordings}: ") and message in err


@entry_points
def test_replay_upstream_reports_a_taken_or_impossible_port_in_one_line(
    capsys: pytest.CaptureFixture[str], run: Callable[..., int]
) -> None:
    import socket

    assert run("--port", "70000") == 2
    assert "--port 70000: must be 0 to 65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run("--port", str(port)) == 2
    assert f"routecache: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fault_rate": 1.5}, "fault_rate must lie in"),
        ({"fault_rate": -0.1}, "fault_rate must lie in"),
        ({"fault_rate": 0.1, "fault_kinds": ()}, "needs at least one fault kind"),
        ({"stream_chunk_chars": 0}, "stream_chunk_chars must be >= 1"),
        ({"default_role": "medium"}, "model roles must be weak or strong, got medium"),
    ],
)
def test_an_unusable_config_is_refused_naming_the_problem(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReplayConfig(**fields)  # type: ignore[arg-type]


def test_rates_zero_and_one_and_a_chunk_of_one_character_are_usable() -> None:
    ReplayConfig(fault_rate=0.0, fault_kinds=(), stream_chunk_chars=1)
    assert FaultSchedule(ReplayConfig(fault_rate=1.0, fault_kinds=(FaultKind.TIMEOUT,))
                         ).next_fault(None) is FaultKind.TIMEOUT  # fmt: skip


def test_models_given_on_the_command_line_add_to_the_defaults() -> None:
    config = parse("--model", "local-llama=weak", "--model", "gpt-4-1106-preview=weak")
    assert config.role_of("local-llama") == "weak"
    assert config.role_of("gpt-4-1106-preview") == "weak"  # a default re-assigned
    assert config.role_of("mixtral-8x7b-instruct") == "weak"
    assert config.role_of("anything-else") == "strong"
    for bad in ("=weak", "local-llama", "local-llama=medium"):
        with pytest.raises(ValueError, match="--model expects ID=weak or ID=strong"):
            parse("--model", bad)


def test_the_api_key_comes_from_the_flag_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTECACHE_REPLAY_API_KEY", "sk-env")
    assert parse().api_key == "sk-env"
    assert parse("--api-key", "sk-flag").api_key == "sk-flag"
    monkeypatch.setenv("ROUTECACHE_REPLAY_API_KEY", "")
    assert parse().api_key is None


def test_fault_kinds_and_seed_come_from_their_flags() -> None:
    config = parse(
        "--fault-kinds", " http_500, timeout,", "--fault-seed", "7", "--fault-rate", "0.5"
    )
    assert config.fault_kinds == (FaultKind.HTTP_500, FaultKind.TIMEOUT)
    assert config.fault_seed == 7
    # Both numbers are drawn for every request, fault or not.
    rng = random.Random(7)
    expected = []
    for _ in range(20):
        roll, pick = rng.random(), rng.randrange(2)
        expected.append(config.fault_kinds[pick] if roll < 0.5 else None)
    schedule = FaultSchedule(config)
    assert [schedule.next_fault(None) for _ in range(20)] == expected
    assert len(set(expected)) == 3


def test_a_fault_header_is_read_without_case_or_surrounding_space() -> None:
    schedule = FaultSchedule(ReplayConfig())
    assert schedule.next_fault(" HTTP_503 ") is FaultKind.HTTP_503
    assert schedule.next_fault("None") is None
    with pytest.raises(ValueError):
        schedule.next_fault("http_418")


def test_scripted_faults_queue_after_those_still_queued() -> None:
    schedule = FaultSchedule(ReplayConfig(fault_script=(FaultKind.HTTP_429,)))
    schedule.script([FaultKind.HTTP_500, None, FaultKind.TIMEOUT])
    drawn = [schedule.next_fault(None) for _ in range(4)]
    assert drawn == [FaultKind.HTTP_429, FaultKind.HTTP_500, None, FaultKind.TIMEOUT]


@pytest.mark.parametrize(("value", "expected"), [("0", 0.0), ("60000", 60_000.0), ("2.5", 2.5)])
def test_a_latency_header_from_zero_to_a_minute_is_taken(value: str, expected: float) -> None:
    assert header_latency_ms(value) == expected


@pytest.mark.parametrize("value", ["60000.5", "-0.1", "soon", "nan"])
def test_a_latency_header_outside_zero_to_a_minute_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="x-replay-latency-ms must be a number"):
        header_latency_ms(value)

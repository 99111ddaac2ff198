"""Bad values on the `routecache` command line: a usage error or one line, exit 2."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from routecache.cache.cross_encoder import GRAPH_FILE
from routecache.cli_args import at_least, fraction, fractions, listed, number_between, random_seed
from routecache.router.auth import hash_api_key
from routecache.router.cli import main
from routecache.training import train_verifier
from routecache.training.pair_data import load_pairs, split_pairs


@pytest.mark.parametrize(
    "flags",
    [["--concurrency", "0"], ["--concurrency", "-1"], ["--recorded", "0"],
     ["--upstream-latency-ms", "-5"]],
    ids=["concurrency 0", "negative concurrency", "nothing recorded", "negative latency"],
)  # fmt: skip
def test_demo_refuses_counts_that_cannot_run(
    capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    # --concurrency 0 was a Semaphore(0): the demo hung for ever after starting the service.
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_ask_reports_an_unreadable_schema_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was a FileNotFoundError traceback, before any connection was tried.
    missing = tmp_path / "schema.json"
    assert main(["ask", "--api-key", "k", "--json-schema", f"@{missing}", "hi"]) == 2
    assert capsys.readouterr().err.startswith(f"routecache: --json-schema @{missing}: ")


@pytest.mark.parametrize("verb", ["train-classifier", "retrain"])
@pytest.mark.parametrize("fraction", ["0", "1.5", "nan"])
def test_training_verbs_refuse_a_fraction_outside_0_to_1(
    capsys: pytest.CaptureFixture[str], verb: str, fraction: str
) -> None:
    # retrain took 0 and 1.5 and failed inside sklearn with a message about test_size.
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--data", "x.jsonl", "--registry", "r", "--holdout-fraction", fraction])
    assert exit_.value.code == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("strength", ["0", "-1", "nan", "inf", "x"])
def test_train_classifier_refuses_a_regularisation_strength_that_is_not_above_0(
    capsys: pytest.CaptureFixture[str], strength: str
) -> None:
    # sklearn refused 0, -1 and nan, but only after the minutes of embedding every prompt.
    with pytest.raises(SystemExit) as exit_:
        main(["train-classifier", "--data", "x.jsonl", "--c", strength])
    assert exit_.value.code == 2
    assert "argument --c" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["train-verifier", "--data", "p.tsv", "--out", "o", "--epochs", "0"],
     ["train-classifier", "--data", "x.jsonl", "--hash-dimension", "0"],
     ["retrain", "--data", "x.jsonl", "--registry", "r", "--hash-dimension", "0"],
     ["eval-cache", "--pairs", "p.tsv", "--limit", "0"]],
    ids=["no epochs", "no hash dimension", "no retrain hash dimension", "no pairs"],
)  # fmt: skip
def test_training_verbs_refuse_a_count_of_0_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    # Zero epochs or dimensions trains nothing; --limit 0 evaluates no pair at all.
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert f"argument {args[-2]}: 0: must be 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    "verb", [["train-classifier"], ["retrain", "--registry", "r"]], ids=["train", "retrain"]
)
@pytest.mark.parametrize("seed", ["-5", str(2**32), "x"])
def test_training_verbs_refuse_a_seed_sklearn_cannot_take(
    capsys: pytest.CaptureFixture[str], verb: list[str], seed: str
) -> None:
    # sklearn takes 0 to 2**32 - 1, and refused -5 only after the minutes of embedding.
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--data", "x.jsonl", "--seed", seed])
    assert exit_.value.code == 2
    assert "argument --seed" in capsys.readouterr().err


def test_a_seed_takes_0_to_2_to_the_32_less_1() -> None:
    assert (random_seed("0"), random_seed(str(2**32 - 1))) == (0, 2**32 - 1)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^-1: must be from 0 to 4294967295$"):
        random_seed("-1")


def _verifier_folders(tmp_path: Path) -> list[str]:
    """--out and --work-dir under tmp_path: the default work folder is runs/ in the cwd."""
    return ["--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "work")]


def test_train_verifier_reports_a_missing_pairs_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was a DataFileError traceback: the one job whose run lacked the one-line wrapper.
    missing = tmp_path / "pairs.jsonl"
    assert main(["train-verifier", "--data", str(missing), *_verifier_folders(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"routecache: {missing}: cannot read it")


def test_train_verifier_refuses_cuda_where_torch_sees_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a?", "cached": "b?", "duplicate": true}\n', encoding="utf-8")
    args = ["train-verifier", "--data", str(pairs), *_verifier_folders(tmp_path)]
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "routecache: --device cuda: torch sees no CUDA device\n"


def pairs_file(tmp_path: Path, count: int) -> Path:
    """`count` labelled pairs, each on a cached question of its own, every other a duplicate."""
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"query": f"a{i}?", "cached": f"b{i}?", "duplicate": i % 2 == 0} for i in range(count)]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return pairs


def test_train_verifier_reports_a_holdout_too_small_to_calibrate_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Four cached questions cannot make five folds: it was sklearn's ValueError traceback
    # (an IndexError with no held-out pair), after the cross-encoder's training.
    pairs = pairs_file(tmp_path, 4)
    held = len(split_pairs(load_pairs(pairs), 0.5)[1])
    scores = tmp_path / "scores.npz"
    np.savez(scores, cosines=np.full(held, 0.5), forward=np.zeros(held), backward=np.zeros(held))
    out = tmp_path / "o"
    out.mkdir()
    (out / GRAPH_FILE).write_bytes(b"graph")
    args = [
        "train-verifier",
        "--data",
        str(pairs),
        *_verifier_folders(tmp_path),
        "--holdout",
        "0.5",
    ]
    assert main([*args, "--scores", str(scores)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: {held} held-out pairs on {held} cached questions")
    assert err.count("\n") == 1


def test_train_verifier_refuses_a_holdout_too_small_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same refusal came only after the cross-encoder's training: an hour on this machine.
    def no_training(*args: object) -> None:
        raise AssertionError("trained on data it cannot calibrate on")

    monkeypatch.setattr(train_verifier, "_holdout_scores", no_training)
    pairs = pairs_file(tmp_path, 4)
    args = ["train-verifier", "--data", str(pairs), *_verifier_folders(tmp_path)]
    assert main([*args, "--holdout", "0.5", "--device", "cpu"]) == 2
    assert "cached questions: calibration needs 5 or more" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--weights", "--init-weights"])
@pytest.mark.parametrize(
    "content",
    [None, b"not a torch file", b"junk\n", "another model"],
    ids=["missing", "corrupt", "junk", "another model"],
)
def test_train_verifier_reports_unreadable_weights_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, content: bytes | str | None
) -> None:
    # It was a FileNotFoundError, UnpicklingError or (weights of another model) load_state_dict
    # RuntimeError traceback, after the model had loaded.
    torch = pytest.importorskip("torch")
    pairs = pairs_file(tmp_path, 40)  # a holdout it could calibrate on
    weights = tmp_path / "ce.pt"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    elif content is not None:
        torch.save({"head.weight": torch.zeros(3, 3)}, weights)
    args = ["train-verifier", "--data", str(pairs), *_verifier_folders(tmp_path)]
    assert main([*args, "--holdout", "0.5", "--device", "cpu", flag, str(weights)]) == 2
    err = capsys.readouterr().err
    last = re.split(r"[\r\n]", err.rstrip("\n"))[-1]  # after the model loader's progress bar
    assert last.startswith(f"routecache: {weights}: ") and "Traceback" not in err


def test_at_least_takes_its_bound_and_refuses_below_it_or_a_non_integer() -> None:
    parse = at_least(1)
    assert parse("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0: must be 1 or more$"):
        parse("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^not an integer: 1\.5$"):
        parse("1.5")


@pytest.mark.parametrize(
    ("low", "high", "text", "message"),
    [(0, math.inf, "inf", "inf: must be 0 or more (finite)"),
     (0, math.inf, "-1", "-1: must be 0 or more (finite)"),
     (-math.inf, math.inf, "-inf", "-inf: must be finite"),
     (-math.inf, math.inf, "nan", "nan: must be finite"),
     (0, 1.5, "1.6", "1.6: must be from 0 to 1.5"),
     (0, 1, "x", "not a number: x")],
)  # fmt: skip
def test_number_between_refuses_what_is_outside_or_not_finite(
    low: float, high: float, text: str, message: str
) -> None:
    # An open upper bound is no licence for an infinity: "0 or more" means a finite number.
    with pytest.raises(argparse.ArgumentTypeError) as error:
        number_between(low, high)(text)
    assert str(error.value) == message


def test_number_between_takes_both_bounds() -> None:
    assert number_between(0, 1.5)("0") == 0.0
    assert number_between(0, 1.5)("1.5") == 1.5
    assert number_between(-math.inf, math.inf)("-1e300") == -1e300


def test_a_listed_number_type_takes_a_list_and_names_a_bad_one() -> None:
    parse = listed(number_between(0, 1))
    assert parse("0, 0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^1\.5: must be from 0 to 1$"):
        parse("0.5,1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected numbers separated by commas"):
        parse(" , ")


def test_number_between_above_low_refuses_low_and_says_so() -> None:
    parse = number_between(0, 1, above_low=True)
    assert parse("1") == 1.0 and parse("1e-9") == 1e-9
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0: must be above 0 and at most 1$"):
        parse("0")
    unbounded = number_between(0, math.inf, above_low=True)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0: must be above 0 \(finite\)$"):
        unbounded("0")


@pytest.mark.parametrize("text", ["0", "1", "0.5,1", "nan"])
def test_fractions_refuse_0_and_1(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="strictly between 0 and 1"):
        fractions(text)


def test_a_fraction_that_is_not_a_number_is_named() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^not a number: half$"):
        fraction("half")


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--max-tokens", "-1"], "argument --max-tokens: -1: must be 1 or more"),
     (["--max-tokens", "0"], "argument --max-tokens: 0: must be 1 or more"),
     (["--ttl", "-1"], "argument --ttl: -1: must be 0 or more"),
     (["--timeout", "0"], "argument --timeout: 0: must be above 0 and at most 86400"),
     (["--timeout", "inf"], "argument --timeout: inf: must be above 0 and at most 86400"),
     (["--timeout", "nan"], "argument --timeout: nan: must be above 0 and at most 86400"),
     # Past ~7.4e9 s, gRPC's deadline overflowed into one already past: DEADLINE_EXCEEDED.
     (["--timeout", "1e10"], "argument --timeout: 1e10: must be above 0 and at most 86400")],
    ids=["negative max tokens", "no max tokens", "negative ttl", "no time", "infinite time",
         "nan time", "huge time"],
)  # fmt: skip
def test_ask_refuses_a_negative_token_count_ttl_or_timeout_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # They were a protobuf "Value out of range: -1" traceback: the fields are uint32. A timeout
    # of 0, inf or nan was sent as a deadline already past: "Deadline Exceeded", exit 1.
    with pytest.raises(SystemExit) as exit_:
        main(["ask", "--api-key", "k", *flags, "hi"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--turn", "bot", "hello"], "unknown role 'bot': one of system, user, assistant"),
     (["--max-tokens", "4294967296"], "Value out of range: 4294967296")],
    ids=["unknown role", "max tokens over uint32"],
)  # fmt: skip
def test_ask_reports_a_request_it_cannot_build_in_one_line(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # An unknown --turn role was a KeyError traceback, before any connection was tried.
    assert main(["ask", "--api-key", "k", *flags, "hi"]) == 2
    assert capsys.readouterr().err == f"routecache: cannot build the request: {message}\n"


def test_ask_refuses_an_api_key_with_a_control_character_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A key pasted with a trailing CR was a grpc ExecuteBatchError traceback.
    assert main(["ask", "--api-key", "sk-secret\r", "hi"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "routecache: --api-key: the API key has '\\r' at position 9: only printable "
        "ASCII can be sent\n"
    )
    assert "secret" not in err


def test_ask_names_the_target_when_grpc_cannot_encode_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: "routecache: --api-key: 'utf-8' codec can't encode ...", blaming the key.
    assert main(["ask", "--api-key", "k", "--target", "127.0.0.1:1\udcff", "hi"]) == 2
    assert capsys.readouterr().err.startswith("routecache: --target: ")


def test_ask_refuses_a_validator_with_a_lone_surrogate_key_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: protobuf's SystemError traceback.
    assert main(["ask", "--api-key", "k", "--validator", '{"\\ud800": 1}', "hi"]) == 2
    assert capsys.readouterr().err.startswith("routecache: --validator: ")


@pytest.mark.parametrize("port", ["65536", "-1"])
def test_replay_upstream_refuses_a_port_past_65535_in_one_line(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    assert main(["replay-upstream", "--port", port]) == 2
    assert capsys.readouterr().err == f"routecache: --port {port}: must be 0 to 65535\n"


def fake_demo(monkeypatch: pytest.MonkeyPatch, interrupt: bool = False) -> None:
    """`routecache demo` without its 80 s run: a report at once, or Ctrl-C during the run."""
    from routecache.router import demo
    from routecache.router.demo_report import tally

    async def run_demo(**options: object) -> demo.DemoReport:
        if interrupt:
            raise KeyboardInterrupt
        return demo.DemoReport("the summary", tally([]), "routecache_requests_total 0\n", (0, 0))

    monkeypatch.setattr(demo, "run_demo", run_demo)


@pytest.mark.parametrize(
    ("where", "problem"), [("missing/metrics.txt", "no folder"), (".", "is a folder")]
)
def test_demo_refuses_a_metrics_out_it_cannot_write_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    where: str, problem: str,
) -> None:  # fmt: skip
    # It was a FileNotFoundError traceback, then one line, both at the end of the whole run.
    fake_demo(monkeypatch)
    metrics = tmp_path / where
    assert main(["demo", "--metrics-out", str(metrics)]) == 2
    out, err = capsys.readouterr()
    assert "the summary" not in out  # refused before the run
    assert err == f"routecache: --metrics-out {metrics}: {problem}" + (
        f" {metrics.parent}\n" if problem == "no folder" else "\n"
    )


def test_demo_writes_the_metrics_scraped_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_demo(monkeypatch)
    metrics = tmp_path / "metrics.txt"
    assert main(["demo", "--metrics-out", str(metrics)]) == 0
    assert metrics.read_text(encoding="utf-8") == "routecache_requests_total 0\n"


def test_ctrl_c_exits_130_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_demo(monkeypatch, interrupt=True)
    assert main(["demo"]) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["0", "1.5", "nan", "x"])
def test_demo_refuses_a_similarity_threshold_outside_0_to_1_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], threshold: str
) -> None:
    # It started the replay upstream, then failed on cache.similarity_threshold, a setting the
    # command line never named.
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--similarity-threshold", threshold])
    assert exit_.value.code == 2
    assert "argument --similarity-threshold" in capsys.readouterr().err


def test_hash_key_prints_the_digest_a_config_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "dev-key-acme"]) == 0
    assert capsys.readouterr().out == f"{hash_api_key('dev-key-acme')}\n"


@pytest.mark.parametrize(
    ("key", "said"),
    [("", "the API key is empty"),
     (" dev-key", "the API key starts or ends with a space"),
     ("dev-key ", "the API key starts or ends with a space"),
     ("dev\tkey", "the API key has '\\t' at position 3"),
     ("clé", "the API key has 'é' at position 2")],
    ids=["empty", "leading space", "trailing space", "tab", "not ASCII"],
)  # fmt: skip
def test_hash_key_refuses_a_key_no_request_can_present(
    capsys: pytest.CaptureFixture[str], key: str, said: str
) -> None:
    # Before: a digest printed, exit 0, that no request could match: the server strips the
    # Bearer token and refuses an empty one as missing, and gRPC metadata is printable ASCII.
    assert main(["hash-key", "--", key]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.startswith(f"routecache: hash-key: {said}") and captured.err.count("\n") == 1
    )


def test_replay_upstream_reports_a_bad_model_flag_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay-upstream", "--model", "gpt-4"]) == 2
    assert capsys.readouterr().err == (
        "routecache: --model expects ID=weak or ID=strong, got 'gpt-4'\n"
    )

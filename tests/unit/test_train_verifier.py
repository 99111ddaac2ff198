"""train-verifier from saved scores: the calibration step on synthetic pairs, with no training."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from routecache.cache.cross_encoder import GRAPH_FILE, POLICY_FILE
from routecache.cache.hit_policy import PolicyCalibration
from routecache.router.cli import main
from routecache.training.cross_encoder import (
    learning_rate_factor,
    length_batches,
    load_weights,
    restore_weights,
    training_device,
)
from routecache.training.data_files import DataFileError
from routecache.training.pair_data import LabelledPair, split_pairs
from tests.unit.conftest import record_fsyncs

PAIRS = [
    LabelledPair(f"how do i solve puzzle number {i}", f"what is puzzle {i} about", i % 3 == 0)
    for i in range(600)
]


def _saved_run(tmp_path: Path, holdout: float = 0.5) -> list[str]:
    """A pairs file, a stand-in graph and saved scores of its holdout: only the backward order
    tells duplicates apart (the forward logit is noise), the cosine barely does."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(asdict(p)) + "\n" for p in PAIRS), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / GRAPH_FILE).write_bytes(b"not really a graph")
    held = split_pairs(PAIRS, holdout)[1]
    rng = np.random.default_rng(0)
    labels = np.array([p.duplicate for p in held])
    n = len(held)
    scores = {
        "cosines": np.clip(0.8 + 0.05 * labels + rng.normal(0, 0.05, n), -1, 1),
        "forward": rng.normal(0, 0.01, n),
        "backward": np.where(labels, 4.0, -4.0) + rng.normal(0, 1.0, n),
        # cache mode: each query's nearest entry is its own pair's question
        "cache_cosines": np.full(n, 0.85),
        "cache_forward": rng.normal(0, 0.01, n),
        "cache_backward": np.where(labels, 4.0, -4.0) + rng.normal(0, 1.0, n),
        "cache_found": np.array([p.cached for p in held]),
        "cache_right": labels,
    }
    np.savez(tmp_path / "scores.npz", allow_pickle=True, **scores)
    return ["train-verifier", "--data", str(data), "--out", str(out), "--holdout", str(holdout),
            "--scores", str(tmp_path / "scores.npz"),
            "--work-dir", str(tmp_path / "work")]  # fmt: skip


def _policy(tmp_path: Path) -> PolicyCalibration:
    return PolicyCalibration.from_json((tmp_path / "out" / POLICY_FILE).read_text("utf-8"))


def test_saved_scores_calibrate_both_orders_without_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _saved_run(tmp_path)
    weights = [str(tmp_path / "trained.safetensors"), str(tmp_path / "start.safetensors")]
    settings = ["--epochs", "3", "--learning-rate", "1e-5"]
    settings += ["--weights", weights[0], "--init-weights", weights[1]]  # recorded, unused
    assert main([*argv, "--budgets", "0.1,0.05", "--confidence", "0.9", *settings]) == 0
    rule = _policy(tmp_path)
    assert rule.symmetric is True
    assert [t.max_false_hit_rate for t in rule.thresholds] == [0.05, 0.1]
    # both orders averaged: the backward logit's signal tells the duplicates apart
    assert all(np.isfinite(t.threshold) and t.holdout_recall > 0.9 for t in rule.thresholds)
    data, graph = Path(argv[2]), tmp_path / "out" / GRAPH_FILE
    assert rule.metadata["training_data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert rule.metadata["graph_sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert rule.metadata["holdout_fraction"] == 0.5
    assert rule.metadata["confidence"] == 0.9
    assert rule.metadata["calibration_pairs"] == len(split_pairs(PAIRS, 0.5)[1])
    assert "cache_mode_lookups" not in rule.metadata
    # provenance: what the policy was calibrated from, and with which training settings
    assert rule.metadata["training_data"] == str(data)
    assert (rule.metadata["epochs"], rule.metadata["learning_rate"]) == (3, 1e-5)
    assert [rule.metadata["weights"], rule.metadata["init_weights"]] == weights
    summary = json.loads(capsys.readouterr().out)
    assert summary["symmetric"] is True and summary["confidence"] == 0.9
    assert set(summary["holdout_recall"]) == {"0.05", "0.1"}
    assert summary["cache_mode_recall"] is None


def test_one_order_scores_the_forward_logit_only(tmp_path: Path) -> None:
    assert main([*_saved_run(tmp_path), "--budgets", "0.1", "--one-order"]) == 0
    rule = _policy(tmp_path)
    assert rule.symmetric is False
    # the forward logit is noise: without the backward order little is told apart
    assert rule.thresholds[0].holdout_recall < 0.6


def test_one_order_scores_cache_lookups_by_the_forward_logit_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_saved_run(tmp_path), "--budgets", "0.1", "--cache-mode", "--one-order"]
    assert main(argv) == 0
    # the service scores cache lookups in one order too: their forward logit is noise here
    assert json.loads(capsys.readouterr().out)["cache_mode_recall"]["0.1"] < 0.6


def test_both_orders_are_averaged_on_the_scale_of_one(tmp_path: Path) -> None:
    # The service averages the two logits: weights fitted on their sum would weigh the
    # average it feeds them at half its worth. Equal orders: averaged or not, the same rule.
    argv = _saved_run(tmp_path)
    with np.load(tmp_path / "scores.npz") as saved:
        scores = {name: saved[name] for name in saved.files}
    scores["forward"] = scores["backward"]
    np.savez(tmp_path / "scores.npz", **scores)
    rules = []
    for order in ([], ["--one-order"]):
        assert main([*argv, "--budgets", "0.1", *order]) == 0
        rules.append(_policy(tmp_path))
    both, one = rules
    assert both.weights == pytest.approx(one.weights) and both.bias == pytest.approx(one.bias)
    assert both.thresholds[0].threshold == pytest.approx(one.thresholds[0].threshold)


def test_cache_mode_calibrates_on_the_saved_cache_lookups_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_saved_run(tmp_path), "--budgets", "0.1", "--cache-mode"]) == 0
    rule = _policy(tmp_path)
    held = len(split_pairs(PAIRS, 0.5)[1])
    assert rule.metadata["cache_mode_lookups"] == held
    assert set(rule.metadata["cache_mode_recall"]) == {"0.1"}
    assert json.loads(capsys.readouterr().out)["cache_mode_recall"]["0.1"] > 0.9


@pytest.mark.parametrize("confidence", ["1.5", "99", "0", "nan"])
def test_a_confidence_outside_zero_to_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], confidence: str
) -> None:
    # 1.5 or 99 (a percentage) made every upper bound NaN, which no budget test broke: each
    # budget's threshold was the lowest score, a policy that serves every candidate.
    with pytest.raises(SystemExit) as exit_:
        main([*_saved_run(tmp_path), "--confidence", confidence])
    assert exit_.value.code == 2
    assert "argument --confidence" in capsys.readouterr().err
    assert not (tmp_path / "out" / POLICY_FILE).exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--holdout", "0"),
        ("--holdout", "1"),
        ("--budgets", "0.01,1.5"),
        ("--budgets", "0.01,x"),
        ("--epochs", "0"),
        ("--epochs", "-2"),
        ("--learning-rate", "-1"),
        ("--learning-rate", "0"),
        ("--learning-rate", "nan"),
        ("--learning-rate", "inf"),
        ("--learning-rate", "fast"),
    ],
)
def test_a_holdout_budget_or_epoch_count_out_of_range_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    # --holdout 0 left nothing to calibrate on: a ValueError traceback after the hour of
    # training; --budgets 1.5 shipped a serve-everything threshold, "x" was a traceback;
    # --epochs 0 shipped the untrained weights; --learning-rate -1 or nan was a traceback at
    # the first step, 0 or inf trained an hour for nothing.
    with pytest.raises(SystemExit) as exit_:
        main([*_saved_run(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_saved_scores_that_cannot_be_read_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A missing file was a FileNotFoundError traceback.
    argv = _saved_run(tmp_path)
    (tmp_path / "scores.npz").unlink()
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"routecache: --scores {tmp_path / 'scores.npz'}")


def test_saved_scores_that_are_not_an_npz_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _saved_run(tmp_path)
    (tmp_path / "scores.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"routecache: --scores {tmp_path / 'scores.npz'}")


def test_saved_scores_without_the_graph_they_came_from_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The policy names the graph it describes by hash: a missing graph was a
    # FileNotFoundError traceback, after every score was read.
    argv = _saved_run(tmp_path)
    graph = tmp_path / "out" / GRAPH_FILE
    graph.unlink()
    assert main(argv) == 2
    beside = tmp_path / GRAPH_FILE  # beside the scores, where a run's work folder keeps it
    assert capsys.readouterr().err.startswith(
        f"routecache: --scores needs the graph it scored: neither {beside} nor {graph} is there"
    )
    assert not (tmp_path / "out" / POLICY_FILE).exists()


def test_saved_scores_of_another_holdout_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Scores saved for --holdout 0.5, reused with 0.3: a zip() ValueError traceback.
    argv = _saved_run(tmp_path, holdout=0.5)
    assert main([*argv, "--holdout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: --scores {tmp_path / 'scores.npz'}: ")
    assert "another --data or --holdout" in err
    assert not (tmp_path / "out" / POLICY_FILE).exists()


def test_without_cache_mode_saved_pair_scores_are_enough(tmp_path: Path) -> None:
    # Nothing to compute: no embedder, no graph run (the graph here is not one).
    argv = _saved_run(tmp_path)
    with np.load(tmp_path / "scores.npz") as saved:
        pair_only = {name: saved[name] for name in ("cosines", "forward", "backward")}
    np.savez(tmp_path / "scores.npz", **pair_only)
    assert main([*argv, "--budgets", "0.1"]) == 0
    assert _policy(tmp_path).thresholds[0].holdout_recall > 0.9


@pytest.mark.parametrize(("total_steps", "warmup"), [(1, 1), (10, 10)])
def test_a_run_that_is_all_warm_up_trains_at_the_full_rate_at_its_last_step(
    total_steps: int, warmup: int
) -> None:
    # One epoch of pairs that fit one batch (or a warm-up fraction of 1) left no decay steps.
    assert learning_rate_factor(total_steps - 1, total_steps, warmup) == 1.0
    assert learning_rate_factor(total_steps, total_steps, warmup) == 0.0


def test_the_learning_rate_rises_over_the_warm_up_then_falls_to_zero() -> None:
    factors = [learning_rate_factor(step, 10, 2) for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[2:] == sorted(factors[2:], reverse=True)
    assert factors[-1] == 0.0


def test_training_batches_hold_each_pair_once_with_pairs_of_similar_length() -> None:
    lengths = list(range(101))
    random.Random(1).shuffle(lengths)
    batches = length_batches(lengths, 4, random.Random(13))
    assert sorted(i for batch in batches for i in batch) == list(range(101))
    assert sorted(len(b) for b in batches) == [1] + [4] * 25
    spans = {max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches}
    assert spans == {0, 3}  # neighbours in length
    assert batches != sorted(batches, key=lambda b: lengths[b[0]])  # but in no length order


def test_each_epoch_groups_pairs_of_one_length_differently() -> None:
    # The shuffle before the sort: without it, equal lengths keep their order and every epoch
    # sees the same batches (only in another order).
    rng = random.Random(5)
    first, second = ({frozenset(b) for b in length_batches([7] * 40, 4, rng)} for _ in range(2))
    assert first != second


@pytest.mark.parametrize("device", ["gpu", "CUDA", ""])
def test_a_training_device_other_than_auto_cpu_or_cuda_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        training_device(device)


def test_weights_that_cannot_be_read_or_are_no_weights_say_which_in_one_line(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    weights = tmp_path / "ce.pt"
    with pytest.raises(DataFileError, match=r"ce\.pt: cannot read it \(No such file"):
        load_weights(weights)
    weights.write_bytes(b"not a torch file")
    with pytest.raises(DataFileError, match=r"ce\.pt: not weights saved by train-verifier"):
        load_weights(weights)


def test_weights_of_another_model_name_the_first_mismatch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    weights = tmp_path / "ce.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, weights)
    with pytest.raises(DataFileError, match=r"not weights of this cross-encoder \(Missing key"):
        restore_weights(torch.nn.Linear(2, 1), load_weights(weights), weights)


class _Module:
    def __init__(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False


def _fake_export(monkeypatch: pytest.MonkeyPatch, module: _Module) -> None:
    """export_cross_encoder with no model: the exporter writes the graph's training mode."""
    import transformers

    from routecache.training import export_cross_encoder as export

    def tokenizer(*_: object, **__: object) -> dict[str, list[list[int]]]:
        return {
            name: [[1, 2], [3, 4]] for name in ("input_ids", "attention_mask", "token_type_ids")
        }

    def exporter(traced: _Module, _args: object, path: Path, _output: str) -> None:
        path.write_text(f"fp32 training={traced.training}")

    monkeypatch.setattr(export, "load_weights", lambda _: {})
    monkeypatch.setattr(export, "build_module", lambda _: module)
    monkeypatch.setattr(export, "restore_weights", lambda *_: None)
    monkeypatch.setattr(export, "export_transformer", exporter)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *_, **__: tokenizer)


def _fake_quantiser(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_dynamic writes "int8 of" the fp32 graph's text."""
    from onnxruntime import quantization

    def quantise(fp32: str, int8_path: str, **_: object) -> None:
        Path(int8_path).write_text(f"int8 of {Path(fp32).read_text()}")

    monkeypatch.setattr(quantization, "quantize_dynamic", quantise)


@pytest.mark.parametrize("int8", [False, True])
def test_the_export_traces_the_module_in_eval_mode_and_leaves_only_the_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8: bool
) -> None:
    from routecache.training.export_cross_encoder import export_cross_encoder

    _fake_export(monkeypatch, _Module())
    _fake_quantiser(monkeypatch)
    out = tmp_path / "new" / "ce.onnx"
    assert export_cross_encoder(tmp_path / "w.pt", tmp_path, out, int8=int8) == out
    graph = "fp32 training=False"  # dropout off, as the service runs it
    assert out.read_text() == (f"int8 of {graph}" if int8 else graph)
    assert list(out.parent.iterdir()) == [out]  # the scratch folder is gone, fp32 and all


@pytest.mark.parametrize("int8", [False, True])
def test_the_exported_graph_is_synced_then_renamed_then_its_folder_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8: bool
) -> None:
    # Before: renamed into place unsynced, so a power loss could leave the shipped verifier
    # graph torn, and the service then failed to load it.
    from routecache.training.export_cross_encoder import export_cross_encoder

    _fake_export(monkeypatch, _Module())
    _fake_quantiser(monkeypatch)
    out = tmp_path / "ce.onnx"
    synced = record_fsyncs(monkeypatch, out)
    export_cross_encoder(tmp_path / "w.pt", tmp_path, out, int8=int8)
    assert synced == [(False, False), (True, True)]  # the graph, then its folder


def test_the_export_gives_back_the_logging_level_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It reset logging.disable to NOTSET: a caller's own silencing was switched off by an export.
    import logging

    from routecache.training.export_cross_encoder import export_cross_encoder

    _fake_export(monkeypatch, _Module())
    logging.disable(logging.CRITICAL)
    try:
        export_cross_encoder(tmp_path / "w.pt", tmp_path, tmp_path / "ce.onnx", int8=False)
        assert logging.root.manager.disable == logging.CRITICAL
    finally:
        logging.disable(logging.NOTSET)


def test_the_policy_replaces_the_old_one_whole_and_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: written in place, so a crash mid-write left a torn hit_policy.json beside the
    # graph, which the service then refused to start with.
    argv = _saved_run(tmp_path)
    policy = tmp_path / "out" / POLICY_FILE
    policy.write_text("the old policy", encoding="utf-8")
    old_inode = policy.stat().st_ino
    synced = record_fsyncs(monkeypatch, policy)
    assert main(argv) == 0
    assert policy.stat().st_ino != old_inode  # a new file renamed over the old one
    assert synced[-2:] == [(False, True), (True, True)]  # the new file, then its folder
    assert _policy(tmp_path).thresholds


def _pairs_file(tmp_path: Path) -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(asdict(p)) + "\n" for p in PAIRS), encoding="utf-8")
    return data


def test_a_run_that_fails_after_the_export_leaves_out_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the graph was exported straight into --out and the policy written only at the
    # end, so a run that failed in between left a new graph beside the old graph's policy,
    # and the service loaded the mismatched pair. Here scoring fails: the graph is fake.
    _fake_export(monkeypatch, _Module())
    _fake_quantiser(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / GRAPH_FILE).write_bytes(b"the old graph")
    (out / POLICY_FILE).write_text("the old policy", encoding="utf-8")
    argv = ["train-verifier", "--data", str(_pairs_file(tmp_path)), "--out", str(out),
            "--weights", str(tmp_path / "w.pt"), "--holdout", "0.5"]  # fmt: skip
    with pytest.raises(ValueError, match="not a graph ONNX Runtime can load"):
        main(argv)
    assert (out / GRAPH_FILE).read_bytes() == b"the old graph"
    assert (out / POLICY_FILE).read_text("utf-8") == "the old policy"
    # exported into the default work folder, outside --out (which ships in the package)
    work = tmp_path / "runs" / "train-verifier"
    assert (work / GRAPH_FILE).read_text() == "int8 of fp32 training=False"


def test_a_calibrated_run_publishes_the_graph_it_scored_with_its_policy(tmp_path: Path) -> None:
    # Saved scores beside the graph they came from (a run's work folder): --out gets that
    # graph and a policy naming it, never the old graph under the new policy.
    argv = _saved_run(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "scores.npz").rename(work / "calibration_scores.npz")
    (work / GRAPH_FILE).write_bytes(b"the new graph")
    argv[argv.index("--scores") + 1] = str(work / "calibration_scores.npz")
    assert main([*argv, "--work-dir", str(work)]) == 0
    published = tmp_path / "out" / GRAPH_FILE
    assert published.read_bytes() == b"the new graph"
    graph_sha = hashlib.sha256(b"the new graph").hexdigest()
    assert _policy(tmp_path).metadata["graph_sha256"] == graph_sha
    assert not (tmp_path / "out" / "calibration_scores.npz").exists()


@pytest.mark.parametrize("flag", ["--out", "--work-dir"])
def test_an_out_or_work_folder_that_cannot_be_made_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    # Before: a NotADirectoryError traceback once a whole epoch had been trained.
    taken = tmp_path / "a-file"
    taken.write_text("", encoding="utf-8")
    folders = {"--out": tmp_path / "out", "--work-dir": tmp_path / "work", flag: taken / "below"}
    argv = ["train-verifier", "--data", str(_pairs_file(tmp_path)), "--holdout", "0.5",
            "--weights", str(tmp_path / "missing.pt")]  # fmt: skip
    argv += [part for name, folder in folders.items() for part in (name, str(folder))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: {flag} {taken / 'below'}: cannot make the folder"), err

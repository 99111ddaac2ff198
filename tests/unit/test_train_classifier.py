"""The training and evaluation CLIs on a tiny synthetic routing file, with the hash embedder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import load_artifact
from routecache.training import eval_router, retrain, train_classifier
from routecache.training.routing_data import (
    RoutingRow,
    holdout_mask,
    read_routing_rows,
    request_cost,
)


def _write_routing_file(path: Path, n: int = 120) -> Path:
    """Hard prompts (cheap model fails, strong succeeds) share words; easy ones others."""
    with path.open("w") as out:
        for i in range(n):
            hard = i % 3 == 0
            row = {
                "prompt": f"{'prove the theorem about integrals' if hard else 'count apples'} {i}",
                "source": "gsm8k" if i % 2 else "mmlu",
                "subject": "synthetic",
                "weak_correct": not hard,
                "strong_correct": i % 5 != 1,
            }
            if i % 2:
                row.update(weak_response="w" * 40, strong_response="s" * 80)
            out.write(json.dumps(row) + "\n")
    return path


@pytest.fixture()
def trained_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    data = _write_routing_file(tmp_path / "routing.jsonl")
    out = tmp_path / "artifacts"
    argv = ["--data", str(data), "--out", str(out), "--name", "tiny", "--embedder", "hash"]
    assert train_classifier.main([*argv, "--holdout-fraction", "0.3", "--c", "1.0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["holdout"]["apgr"] > 0.8  # the words give the difficulty away
    return out / "tiny.skops"


def test_training_writes_a_loadable_artifact(trained_artifact: Path) -> None:
    classifier = load_artifact(trained_artifact)
    metadata = classifier.metadata
    data = trained_artifact.parent.parent / "routing.jsonl"
    assert metadata["training_data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert metadata["n_train"] + metadata["n_holdout"] == 120
    assert metadata["embedder"] == "hash-64"
    assert metadata["holdout"]["cpt80"] <= metadata["holdout"]["strong_fraction"] + 0.05
    assert len(metadata["operating_curve"]) > 10
    assert metadata["calibration"] and "brier_cheap_fails" in metadata
    embedder = HashEmbedder(64)
    hard, easy = "prove the theorem about integrals 999", "count apples 998"
    p_hard = classifier.assess(embedder.encode([hard])[0], hard)
    p_easy = classifier.assess(embedder.encode([easy])[0], easy)
    assert p_easy.routing_score < classifier.default_threshold < p_hard.routing_score
    assert p_easy.failure_probability < 0.5 < p_hard.failure_probability


def test_eval_router_reports_routing_and_cost(
    trained_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained_artifact.parent.parent / "routing.jsonl"
    argv = ["--data", str(data), "--artifact", str(trained_artifact), "--json"]
    assert eval_router.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 120
    assert report["apgr"] > 0.8 and report["cpt80"] < 0.5
    assert report["operating_point"] == {
        "quality": 0.8,
        "strong_fraction": None,
        "cost_ratio": None,
    }
    gap = report["strong_accuracy"] - report["weak_accuracy"]
    assert report["accuracy"] >= report["weak_accuracy"] + 0.75 * gap  # the 80% target, ~met
    assert 0.0 < report["cost_vs_all_strong"] < 1.0
    assert set(report["by_source"]) == {"gsm8k", "mmlu"}
    assert report["scoring_p50_us"] > 0
    assert eval_router.main([*argv, "--strong-fraction", "1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["strong_fraction"] == 1.0
    assert eval_router.main([*argv, "--threshold", "1.01"]) == 0
    all_cheap = json.loads(capsys.readouterr().out)
    assert all_cheap["strong_fraction"] == 0.0
    assert 0.0 < all_cheap["cost_vs_all_strong"] < 0.06  # list prices: 0.6/10 in, 0.6/30 out


def test_request_cost_uses_list_prices_and_recorded_responses() -> None:
    mmlu = RoutingRow(prompt="x" * 400, source="mmlu", weak_correct=True, strong_correct=True)
    assert request_cost(mmlu, strong=True) == pytest.approx((100 * 10 + 30) / 1e6)
    assert request_cost(mmlu, strong=False) == pytest.approx((100 * 0.6 + 0.6) / 1e6)
    gsm = RoutingRow("x" * 40, "gsm8k", True, True, weak_response="w" * 8, strong_response="s" * 80)
    assert request_cost(gsm, strong=True) == pytest.approx((10 * 10 + 20 * 30) / 1e6)
    assert request_cost(gsm, strong=False) == pytest.approx((10 + 2) * 0.6 / 1e6)


def test_holdout_is_a_deterministic_hash_of_the_prompt() -> None:
    prompts = [f"prompt {i}" for i in range(2000)] + ["prompt 7"]
    mask = holdout_mask(prompts, 0.2, seed=0)
    assert mask.mean() == pytest.approx(0.2, abs=0.03)
    assert (mask == holdout_mask(prompts, 0.2, seed=0)).all()
    assert mask[7] == mask[-1]
    assert (mask != holdout_mask(prompts, 0.2, seed=1)).any()


def test_bad_rows_and_arguments_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "weak_correct": true}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_routing_rows([bad])
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    argv = ["--data", str(data), "--out", str(tmp_path), "--embedder", "hash"]
    with pytest.raises(SystemExit) as exit_:  # a usage error, before any work
        train_classifier.main([*argv, "--holdout-fraction", "1.0"])
    assert exit_.value.code == 2
    assert not (tmp_path / "difficulty.skops").exists()


@pytest.mark.parametrize(
    "content",
    [None, "not json\n", '{"prompt": "p", "weak_correct": true}\n', b"\xff\xfe\n", ""],
    ids=["missing file", "not JSON", "missing field", "not UTF-8", "empty"],
)
def test_a_bad_data_file_is_a_message_and_exit_2_not_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes | None,
) -> None:
    data = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    argv = ["--data", str(data), "--embedder", "hash"]
    assert train_classifier.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert eval_router.main(["--data", str(data)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert retrain.main([*argv, "--registry", str(tmp_path / "registry")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_a_bad_event_log_given_to_retrain_is_a_message_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    events = tmp_path / "events.jsonl"
    events.write_text("{torn\n")
    argv = ["--data", str(data), "--events", str(events), "--embedder", "hash"]
    assert retrain.main([*argv, "--registry", str(tmp_path / "registry")]) == 2
    assert "events.jsonl:1" in capsys.readouterr().err


def test_eval_router_reports_a_missing_artifact_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    missing = tmp_path / "missing.skops"
    assert eval_router.main(["--data", str(data), "--artifact", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routecache: --artifact: ") and "missing.skops" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags",
    [["--quality", "5"], ["--strong-fraction", "-1"], ["--max-cost-ratio", "2"],
     ["--threshold", "nan"]],
    ids=["quality", "strong fraction", "cost ratio", "threshold"],
)  # fmt: skip
def test_eval_router_refuses_targets_outside_the_settings_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    # They were reported on as if valid: a threshold of -1 (all strong) or 1 (all cheap).
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    with pytest.raises(SystemExit) as exit_:
        eval_router.main(["--data", str(data), *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_an_embedding_cache_that_is_another_file_is_reported_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    before = data.read_bytes()
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--embedder", "hash"]
    # The data file itself given as the cache: np.load's ValueError was a traceback.
    assert train_classifier.main([*argv, "--embedding-cache", str(data)]) == 2
    assert "ok.jsonl: not an embedding cache" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_an_embedding_cache_path_that_is_a_folder_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    folder = tmp_path / "cache"
    folder.mkdir()
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--embedder", "hash"]
    assert train_classifier.main([*argv, "--embedding-cache", str(folder)]) == 2
    assert "cache: the embedding cache is not a file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial*"))


def test_an_unwritable_embedding_cache_removes_its_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.training.embedding_cache import EmbeddingCache

    # A folder where the cache's own name should be renamed over: the save fails after the
    # partial file was written.
    target = tmp_path / "cache.npz"
    target.mkdir()
    (target / "x").write_text("")
    cache = EmbeddingCache(target)
    with pytest.raises(ValueError, match=r"cache\.npz"):
        cache._save({"k": HashEmbedder().encode(["a"])[0]})
    assert not list(tmp_path.glob("*.partial*"))


def test_an_unusable_out_folder_is_reported_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was found only when the artifact was saved, after the embedding and the fit.
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    argv = ["--data", str(data), "--embedder", "hash", "--out", str(a_file)]
    assert train_classifier.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"routecache: --out {a_file}: not a folder")


def test_retrain_reports_a_registry_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    a_file = tmp_path / "registry"
    a_file.write_text("")
    assert retrain.main(["--data", str(data), "--embedder", "hash", "--registry", str(a_file)]) == 2
    assert "--registry" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [["--hash-dimension", "0"], ["--name", "../elsewhere"]],
    ids=["hash dimension 0", "name with a path"],
)
def test_train_classifier_refuses_a_zero_dimension_and_a_name_with_a_path(
    tmp_path: Path, flags: list[str]
) -> None:
    # A zero dimension was a ZeroDivisionError; a name with '/' wrote outside --out.
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    argv = ["--data", str(data), "--embedder", "hash", "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_:
        train_classifier.main(argv)
    assert exit_.value.code == 2
    assert not list(tmp_path.glob("*.skops"))


def test_retrain_refuses_a_zero_hash_dimension(tmp_path: Path) -> None:
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    argv = ["--data", str(data), "--embedder", "hash", "--registry", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_:
        retrain.main([*argv, "--hash-dimension", "0"])
    assert exit_.value.code == 2

"""The training and evaluation CLIs on a tiny synthetic routing file, with the hash embedder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier, load_artifact, load_classifier
from routecache.classifier.operating_point import OperatingCurve
from routecache.training import eval_router, retrain, train_classifier
from routecache.training.data_files import DataFileError
from routecache.training.routing_data import (
    RoutingRow,
    files_sha256,
    holdout_mask,
    read_routing_rows,
    request_cost,
)
from routecache.training.train_classifier import LabelledSet


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
    silent = RoutingRow("x" * 40, "gsm8k", False, True, weak_response="")  # recorded: no output
    assert request_cost(silent, strong=False) == pytest.approx(10 * 0.6 / 1e6)


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
    # A mistyped grade (a torn line is skipped and counted, as export-events does).
    events.write_text('{"kind": "feedback", "response_id": "r1", "thumbs_up": "no"}\n')
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
    assert [p.name for p in tmp_path.iterdir() if "cache" in p.name] == ["cache"]


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
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]  # the temp file is gone


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
    [
        ["--hash-dimension", "0"],
        ["--name", "../elsewhere"],
        ["--name", "sub\\name"],
        ["--name", ".hidden"],
    ],
    ids=["hash dimension 0", "name with a path", "name with a Windows path", "hidden name"],
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


def test_rows_keep_each_models_recorded_response_and_outcomes(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    gsm = {"prompt": "p", "source": "gsm8k", "weak_correct": False, "strong_correct": True,
           "weak_response": "w" * 8, "strong_response": "s" * 80}  # fmt: skip
    mmlu = {"prompt": "q", "weak_correct": True, "strong_correct": False}
    data.write_text(f"{json.dumps(gsm)}\n\n{json.dumps(mmlu)}\n")
    first, second = read_routing_rows([data])
    assert first == RoutingRow("p", "gsm8k", False, True, "w" * 8, "s" * 80)
    # No recorded response (MMLU): costed as a one-token answer letter, not as an empty one.
    assert second == RoutingRow("q", "", True, False, None, None)


def test_the_training_data_digest_covers_every_file_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("one\n")
    second.write_text("two\n")
    both = hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert files_sha256([first, second]) == both != files_sha256([first])


def test_a_data_file_given_twice_trains_as_if_given_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: every row had a twin, leave-one-out saw it at similarity 1, the scaled features
    # saturated and the "trained" router was a constant (APGR 0.5), with exit 0.
    data = _write_routing_file(tmp_path / "routing.jsonl")
    monkeypatch.chdir(tmp_path)
    summaries = []
    for paths in (["routing.jsonl"], ["routing.jsonl", str(data), "./routing.jsonl"]):
        argv = [arg for path in paths for arg in ("--data", path)]
        argv += ["--out", "out", "--embedder", "hash", "--holdout-fraction", "0.3", "--c", "1.0"]
        assert train_classifier.main(argv) == 0
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        metadata = load_artifact(tmp_path / "out" / "difficulty.skops").metadata
        assert metadata["training_files"] == ["routing.jsonl"]
        assert metadata["training_data_sha256"] == files_sha256([data])
    once, thrice = summaries
    assert thrice["n_train"] == once["n_train"]
    assert thrice["holdout"] == once["holdout"]


def test_repeated_prompts_in_the_data_do_not_give_a_row_its_own_label(tmp_path: Path) -> None:
    # Twins within the data (routing_train has 63 repeated prompts) or between data and events:
    # each row's twin is left out with it, so the router still learns.
    rows = read_routing_rows([_write_routing_file(tmp_path / "routing.jsonl")])
    held = holdout_mask([r.prompt for r in rows], 0.3, 0)
    train = [r for r, h in zip(rows, held, strict=True) if not h]
    test = [r for r, h in zip(rows, held, strict=True) if h]
    embedder = HashEmbedder(64)
    twice = LabelledSet.from_rows(train + train, embedder.encode([r.prompt for r in train] * 2))
    test_embeddings = embedder.encode([r.prompt for r in test])
    candidate = train_classifier.train_candidate(twice, test, test_embeddings, 1.0, 0)
    assert candidate.metadata["holdout"]["apgr"] > 0.8  # type: ignore[index]


def test_router_report_costs_what_it_routes_with_a_tie_going_strong() -> None:
    # The cost must follow the same rule as strong_fraction: score >= threshold is strong.
    hard = RoutingRow("x" * 400, "mmlu", weak_correct=False, strong_correct=True)
    easy = RoutingRow("y" * 400, "mmlu", weak_correct=True, strong_correct=True)
    report = eval_router.router_report(np.array([0.5, 0.1]), [hard, easy], threshold=0.5)
    routed = request_cost(hard, strong=True) + request_cost(easy, strong=False)
    all_strong = 2 * request_cost(hard, strong=True)
    assert report["strong_fraction"] == 0.5 and report["accuracy"] == 1.0
    assert report["cost_usd"] == pytest.approx(routed)
    assert report["cost_all_strong_usd"] == pytest.approx(all_strong)
    assert report["cost_vs_all_strong"] == pytest.approx(routed / all_strong)


def test_scoring_latency_is_the_median_call_in_microseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [RoutingRow(f"p{i}", "mmlu", True, True) for i in range(3)]
    # Three calls of 1, 3 and 100 microseconds: the median is 3, the mean would be 34.7.
    stamps = iter([0, 1_000, 10_000, 13_000, 20_000, 120_000])
    monkeypatch.setattr(
        "routecache.training.eval_router.time.perf_counter_ns", lambda: next(stamps)
    )
    classifier = FixedScoreClassifier(0.3, by_text={"p1": 0.9})
    scores, p50_us = eval_router.timed_scores(
        classifier,  # type: ignore[arg-type]
        np.zeros((3, 4), dtype=np.float32),
        rows,
    )
    assert p50_us == 3.0
    np.testing.assert_array_equal(scores, [0.3, 0.9, 0.3])


def _eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert eval_router.main([*argv, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_eval_router_reports_at_the_operating_point_asked_for_and_says_where_it_came_from(
    trained_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained_artifact.parent.parent / "routing.jsonl"
    argv = ["--data", str(data), "--artifact", str(trained_artifact)]
    default = _eval(argv, capsys)
    assert default["operating_point_from"] == "model default"
    assert default["threshold"] == load_artifact(trained_artifact).default_threshold
    # Zero is a target (all cheap), not "unset": it must not fall back to the model default.
    for flag, field in (
        ("--quality", "quality"),
        ("--strong-fraction", "strong_fraction"),
        ("--max-cost-ratio", "cost_ratio"),
    ):
        report = _eval([*argv, flag, "0"], capsys)
        assert report["operating_point_from"] == "command line"
        assert report["operating_point"][field] == 0.0
    assert _eval([*argv, "--strong-fraction", "0"], capsys)["strong_fraction"] == 0.0
    at_zero = _eval([*argv, "--threshold", "0"], capsys)
    assert at_zero["threshold"] == 0.0
    assert at_zero["operating_point_from"] == "command line threshold"
    config = tmp_path / "settings.toml"
    config.write_text("[classifier]\ntarget_strong_fraction = 1.0\n")
    configured = _eval([*argv, "--config", str(config)], capsys)
    assert configured["operating_point_from"] == "settings"
    assert configured["operating_point"]["strong_fraction"] == 1.0
    assert configured["strong_fraction"] == 1.0


def test_eval_router_reports_at_the_settings_routing_threshold_which_overrides_their_target(
    trained_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The service routes at classifier.routing_threshold whatever the operating point says;
    # eval-router ignored it and reported the target's (or the model's default) threshold.
    data = trained_artifact.parent.parent / "routing.jsonl"
    config = tmp_path / "settings.toml"
    config.write_text("[classifier]\nrouting_threshold = 0.9\ntarget_strong_fraction = 1.0\n")
    argv = ["--data", str(data), "--artifact", str(trained_artifact), "--config", str(config)]
    report = _eval(argv, capsys)
    assert (report["threshold"], report["operating_point"]) == (0.9, None)
    assert report["operating_point_from"] == "settings threshold"
    # A threshold on the command line still wins over the settings.
    assert _eval([*argv, "--threshold", "0.2"], capsys)["threshold"] == 0.2


def test_eval_router_reports_a_bad_config_before_scoring_and_a_given_threshold_as_no_target(
    trained_artifact: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = trained_artifact.parent.parent / "routing.jsonl"
    argv = ["--data", str(data), "--artifact", str(trained_artifact)]
    # --threshold sets the cut itself: reporting --quality's target beside it was wrong.
    given = _eval([*argv, "--threshold", "0.1", "--quality", "0.9"], capsys)
    assert (given["operating_point"], given["threshold"]) == (None, 0.1)
    assert given["operating_point_from"] == "command line threshold"
    # The config was read only after every prompt was embedded and scored (minutes on real
    # data), and then as a traceback through `python -m routecache.training.eval_router`.
    config = tmp_path / "settings.toml"
    config.write_text("[classifier]\ntarget_strong_fraction = 2.0\n")

    def must_not_embed(*_: object) -> None:
        raise AssertionError("embedded before the config was read")

    monkeypatch.setattr(eval_router, "embed_prompts", must_not_embed)
    assert eval_router.main([*argv, "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("routecache: --config: ")


def test_eval_router_source_slices_split_the_rows_at_the_reported_threshold(
    trained_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained_artifact.parent.parent / "routing.jsonl"
    argv = ["--data", str(data), "--artifact", str(trained_artifact)]
    for threshold in ("1.01", "-1.01"):  # all cheap, all strong: unlike the model's default
        report = _eval([*argv, "--threshold", threshold], capsys)
        slices = list(report["by_source"].values())
        assert sum(s["n"] for s in slices) == report["n"]
        assert sum(s["cost_usd"] for s in slices) == pytest.approx(report["cost_usd"])
        assert {s["strong_fraction"] for s in slices} == {report["strong_fraction"]}


def test_eval_router_embeds_with_the_artifacts_own_hash_dimension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_routing_file(tmp_path / "routing.jsonl", n=60)
    out = tmp_path / "artifacts"
    argv = ["--data", str(data), "--out", str(out), "--embedder", "hash", "--c", "1.0"]
    assert train_classifier.main([*argv, "--hash-dimension", "32", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    artifact = out / "difficulty.skops"
    metadata = load_artifact(artifact).metadata
    assert summary["n_train"] == metadata["n_train"] < 60
    assert (metadata["seed"], metadata["embedding_dimension"]) == (3, 32)
    report = _eval(["--data", str(data), "--artifact", str(artifact)], capsys)
    assert report["n"] == 60


def test_eval_router_refuses_an_artifact_trained_on_another_embedder(
    trained_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Scores of vectors from an embedder the model never learned from would look valid.
    metadata_file = trained_artifact.with_suffix(".json")
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "embedder": "hash-64-v0"}))
    data = trained_artifact.parent.parent / "routing.jsonl"
    assert eval_router.main(["--data", str(data), "--artifact", str(trained_artifact)]) == 2
    err = capsys.readouterr().err
    assert "trained with embedder 'hash-64-v0'" in err and "'hash-64'" in err


@pytest.mark.parametrize("stored", [{"bogus": 1}, {}, [0.8]], ids=["unknown key", "none", "a list"])
def test_eval_router_refuses_a_damaged_stored_operating_point_before_scoring(
    trained_artifact: Path, capsys: pytest.CaptureFixture[str], stored: object
) -> None:
    # A hand-edited default_operating_point was a TypeError traceback after the scoring.
    metadata_file = trained_artifact.with_suffix(".json")
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "default_operating_point": stored}))
    data = trained_artifact.parent.parent / "routing.jsonl"
    assert eval_router.main(["--data", str(data), "--artifact", str(trained_artifact)]) == 2
    assert "is not an operating point" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["0.16", "0.95"], ids=["one held out", "one to train on"])
def test_training_needs_two_rows_on_each_side_of_the_holdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fraction: str
) -> None:
    # Ten rows: 0.16 holds exactly one out, 0.95 all but one (the hash of these prompts).
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    argv = ["--data", str(data), "--embedder", "hash", "--out", str(tmp_path / "out")]
    assert train_classifier.main([*argv, "--holdout-fraction", fraction]) == 2
    assert "need at least 2 training and 2 held-out rows" in capsys.readouterr().err
    assert not (tmp_path / "out" / "difficulty.skops").exists()


def test_the_artifacts_figures_describe_the_shipped_model_on_the_held_out_rows(
    trained_artifact: Path,
) -> None:
    # Recomputed from scratch: the held-out rows (fraction 0.3, seed 0, as trained_artifact)
    # scored by the artifact itself, since the model shipped is the one that was measured.
    classifier = load_artifact(trained_artifact)
    metadata = classifier.metadata
    rows = read_routing_rows([trained_artifact.parent.parent / "routing.jsonl"])
    held = holdout_mask([r.prompt for r in rows], 0.3, seed=0)
    held_rows = [r for r, h in zip(rows, held, strict=True) if h]
    assert metadata["n_holdout"] == metadata["holdout"]["n"] == len(held_rows)
    assert metadata["n_train"] == len(rows) - len(held_rows) == classifier.model.bank.size
    embeddings = HashEmbedder(64).encode([r.prompt for r in held_rows])
    scores, failure = train_classifier.score_rows(classifier, embeddings, held_rows)
    threshold = classifier.default_threshold
    curve = OperatingCurve.from_json(metadata["operating_curve"])
    assert threshold == curve.threshold_for(train_classifier.DEFAULT_OPERATING_POINT)
    assert metadata["holdout"] == pytest.approx(
        train_classifier.routing_report(scores, held_rows, threshold)
    )
    for source, report in metadata["holdout_by_source"].items():
        mask = [r.source == source for r in held_rows]
        on_source = [r for r in held_rows if r.source == source]
        assert report == pytest.approx(
            train_classifier.routing_report(scores[mask], on_source, threshold)
        )
    assert set(metadata["holdout_by_source"]) == {"gsm8k", "mmlu"}
    failed = np.array([not r.weak_correct for r in held_rows])
    assert metadata["brier_cheap_fails"] == pytest.approx(np.mean((failure - failed) ** 2))
    assert metadata["calibration"] == [
        pytest.approx(row) for row in train_classifier.calibration_table(failure, failed)
    ]
    # The curve's costs are relative to sending every held-out row to the strong model.
    assert curve.points[-1].cost_vs_all_strong == pytest.approx(1.0)
    assert 0.0 < curve.points[0].cost_vs_all_strong < 0.06
    assert (metadata["holdout_fraction"], metadata["seed"]) == (0.3, 0)
    assert metadata["training_files"] == ["routing.jsonl"]


def test_calibration_bins_predictions_in_increasing_order_against_what_happened() -> None:
    probabilities = np.array([0.9, 0.1, 0.8, 0.2])
    failed = np.array([True, False, False, False])
    table = train_classifier.calibration_table(probabilities, failed, bins=2)
    assert table == [
        {"n": 2.0, "predicted": pytest.approx(0.15), "observed": 0.0},
        {"n": 2.0, "predicted": pytest.approx(0.85), "observed": 0.5},
    ]
    # Fewer rows than bins: no empty (NaN) bins.
    assert train_classifier.calibration_table(np.array([0.3]), np.array([True])) == [
        {"n": 1.0, "predicted": 0.3, "observed": 1.0}
    ]


def test_embedding_in_length_batches_keeps_each_texts_vector_in_its_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(train_classifier, "EMBED_BATCH", 2)  # several batches, sorted by length
    texts = ["a much longer text", "b", "a medium text", "cc", "x"]
    embedder = HashEmbedder(16)
    np.testing.assert_array_equal(
        train_classifier.embed_texts(embedder, texts), embedder.encode(texts)
    )


def _labelled_set(strong_fails: list[float]) -> LabelledSet:
    """Every third prompt hard for the cheap model; the strong model's labels as given."""
    n = len(strong_fails)
    texts = [f"{'prove the theorem' if i % 3 == 0 else 'count apples'} {i}" for i in range(n)]
    cheap_fails = np.array([float(i % 3 == 0) for i in range(n)])
    return LabelledSet(texts, HashEmbedder(16).encode(texts), cheap_fails, np.array(strong_fails))


def test_rows_without_a_strong_outcome_train_the_cheap_head_only() -> None:
    # Labels from event logs often lack the strong model's outcome (NaN), not a strong failure.
    strong_fails = [np.nan if i % 4 == 0 else float(i % 5 == 1) for i in range(40)]
    model = train_classifier.fit_model(_labelled_set(strong_fails), c=1.0)
    seen = {name: head.named_steps["scale"].n_samples_seen_ for name, head in model.heads.items()}
    assert seen == {"cheap_fails": 40, "strong_fails": 30}


def test_a_label_with_one_outcome_only_cannot_be_trained() -> None:
    with pytest.raises(ValueError, match="each label needs both outcomes"):
        train_classifier.fit_model(_labelled_set([0.0] * 30), c=1.0)


def test_adding_labelled_sets_keeps_each_prompts_labels_with_it() -> None:
    first = LabelledSet(["a"], np.zeros((1, 2), np.float32), np.array([1.0]), np.array([0.0]))
    second = LabelledSet(
        ["b", "c"], np.ones((2, 2), np.float32), np.array([0.0, 1.0]), np.array([np.nan, 1.0])
    )
    both = first + second
    assert both.texts == ["a", "b", "c"]
    np.testing.assert_array_equal(both.embeddings[:, 0], [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(both.cheap_fails, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(both.strong_fails, [0.0, np.nan, 1.0])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "p", "strong_correct": true}', "weak_correct"),
        ('["p", true, true]', "list indices"),
        ('{"prompt": "p", "weak_correct": "false", "strong_correct": true}', "true or false"),
        ('{"prompt": "p", "weak_correct": null, "strong_correct": true}', "true or false"),
        ('{"prompt": "p", "weak_correct": true, "strong_correct": 2}', "true or false"),
        ('{"prompt": null, "weak_correct": true, "strong_correct": true}', "prompt must be"),
        (
            '{"prompt": "p", "weak_correct": true, "strong_correct": true, "weak_response": 7}',
            "weak_response must be text",
        ),
        (
            '{"prompt": "half \\ud800 a pair", "weak_correct": 1, "strong_correct": 1}',
            "surrogates not allowed",
        ),
        ("[" * 100_000, "recursion"),
        ('{"prompt": ' + "9" * 5_000 + "}", "digits"),
    ],
    ids=[
        "missing weak_correct",
        "not an object",
        "outcome as text",
        "null outcome",
        "outcome not 0 or 1",
        "null prompt",
        "response not text",
        "lone surrogate",
        "nested too deeply",
        "too many digits",
    ],
)
def test_a_row_with_a_missing_or_mistyped_field_is_refused_with_its_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    # bool("false") is True: such a row was read as the cheap model being right, silently.
    data = tmp_path / "rows.jsonl"
    good = '{"prompt": "q", "weak_correct": 1, "strong_correct": 0}'
    data.write_text(f"{good}\n{line}\n")
    with pytest.raises(DataFileError, match=rf"rows\.jsonl:2: not a routing row .*{problem}"):
        read_routing_rows([data])
    data.write_text(f"{good}\n")
    assert read_routing_rows([data]) == [RoutingRow("q", "", True, False)]


def test_eval_router_embeds_with_the_embedder_family_the_artifact_was_trained_on(
    trained_artifact: Path,
) -> None:
    # A hash-trained artifact is scored on hash vectors of its size, the packaged one on MiniLM;
    # a hash embedder for both would make eval-router refuse MiniLM artifacts as mismatched.
    assert eval_router._embedder_for(load_artifact(trained_artifact)) == ("hash", 64)
    assert eval_router._embedder_for(load_classifier()) == ("minilm", 0)

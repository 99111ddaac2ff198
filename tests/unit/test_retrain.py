"""Retraining into a registry: promote only if not worse, events as labels, CLI rollback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from routecache.classifier.model import load_artifact
from routecache.classifier.registry import ModelRegistry
from routecache.router.cli import main as cli_main
from routecache.router.events import JsonlEventLog
from routecache.training import retrain
from routecache.training.outcomes import EventLabel
from routecache.training.routing_data import RoutingRow, holdout_mask, read_routing_rows
from tests.unit.test_registry_reload import _registry_with
from tests.unit.test_train_classifier import _write_routing_file


def _retrain(data: Path, registry: Path, *extra: str) -> int:
    # The packaged model, the first incumbent, learned from MiniLM: these hash-embedder
    # registries start with an embedder change, allowed explicitly.
    argv = ["--data", str(data), "--registry", str(registry), "--embedder", "hash", *extra]
    argv += ["--allow-embedder-change"]
    return retrain.main([*argv, "--holdout-fraction", "0.3", "--c", "1.0"])


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write_routing_file(tmp_path / "routing.jsonl", n=150)


def _summary(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    result: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return result


def test_first_retrain_promotes_and_a_worse_candidate_is_kept_out(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_dir = tmp_path / "registry"
    code = _retrain(data, registry_dir)
    first = _summary(capsys)
    # The packaged model uses MiniLM, so with the hash embedder there is no comparable incumbent.
    assert code == 0 and first["promoted"] is True and first["incumbent_apgr"] is None
    registry = ModelRegistry(registry_dir)
    assert registry.current_version() == first["candidate"]
    assert (registry_dir / "embeddings").is_dir()  # embeddings kept for the next run

    # Events that contradict the data make the next candidate worse on the same holdout.
    events = _contradicting_events(tmp_path / "events.jsonl")
    code = _retrain(data, registry_dir, "--events", str(events))
    second = _summary(capsys)
    assert second["n_event_labels"] == 150
    assert second["incumbent"] == first["candidate"]
    assert code == 3 and second["promoted"] is False
    assert registry.current_version() == first["candidate"]
    assert str(second["candidate"]) in registry.versions()  # kept, not served


def test_equal_candidate_is_promoted_and_rollback_restores_the_previous(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_dir = tmp_path / "registry"
    _retrain(data, registry_dir)
    first = _summary(capsys)
    registry = ModelRegistry(registry_dir)
    # Same data, same seed: the same model under a new version, "not worse", so promoted.
    (registry_dir / "embeddings").rename(tmp_path / "moved")  # also: works without the cache
    code = _retrain(data, registry_dir, "--seed", "0")
    second = _summary(capsys)
    assert code == 0 and second["promoted"] is True
    assert second["candidate_apgr"] == pytest.approx(second["incumbent_apgr"])
    assert cli_main(["rollback-classifier", "--registry", str(registry_dir)]) == 0
    assert registry.current_version() == first["candidate"]
    assert load_artifact(registry.current_artifact()).version == first["candidate"]  # type: ignore[arg-type]
    assert cli_main(["rollback-classifier", "--registry", str(registry_dir)]) == 1


def _contradicting_events(path: Path, n: int = 150) -> Path:
    """Outcomes on new prompts that say the opposite of the data: hard ones are easy."""
    log = JsonlEventLog(path)
    for i in range(n):
        hard = i % 3 == 0
        prompt = f"{'prove the theorem about integrals' if hard else 'count apples'} ev{i}"
        log.emit("outcome", {"prompt": prompt, "weak_correct": hard, "strong_correct": True})
    log.close()
    return path


def test_event_labels_mark_cheap_failures_and_keep_unknown_strong_outcomes_unknown() -> None:
    labels = [
        EventLabel("thumbs up", weak_correct=True),
        EventLabel("both graded", weak_correct=False, strong_correct=True),
        EventLabel("both failed", weak_correct=False, strong_correct=False),
    ]
    events = retrain.event_set(labels, np.zeros((3, 4), dtype=np.float32))
    assert events.texts == ["thumbs up", "both graded", "both failed"]
    np.testing.assert_array_equal(events.cheap_fails, [0.0, 1.0, 1.0])
    # NaN: such a row trains the cheap head only, never counts as a strong success or failure.
    np.testing.assert_array_equal(events.strong_fails, [np.nan, 0.0, 1.0])


def test_held_out_prompts_train_nothing_whether_in_the_data_or_in_events(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [row.prompt for row in read_routing_rows([data])]
    held = [p for p, h in zip(prompts, holdout_mask(prompts, 0.3, 0), strict=True) if h]
    assert held  # the data's own holdout at the fraction and seed _retrain uses
    log = JsonlEventLog(tmp_path / "events.jsonl")
    for prompt in [*held, *(f"count apples new {i}" for i in range(10))]:
        log.emit("outcome", {"prompt": prompt, "weak_correct": False})
    log.close()
    registry_dir = tmp_path / "registry"
    assert _retrain(data, registry_dir, "--events", str(tmp_path / "events.jsonl")) == 0
    summary = _summary(capsys)
    assert summary["n_event_labels"] == 10
    artifact = ModelRegistry(registry_dir).current_artifact()
    assert artifact is not None
    candidate = load_artifact(artifact)
    assert candidate.metadata["n_event_labels"] == 10
    # Nor do the held-out rows themselves train it: its neighbour bank holds only the rest.
    n_train = len(prompts) - len(held) + 10
    assert summary["n_train"] == candidate.model.bank.size == n_train


@pytest.mark.parametrize(
    "variant",
    [
        lambda p: p.upper(),
        lambda p: "  " + p.replace(" ", " \t ") + " \n",
        lambda p: p + "?",  # the exact cache key's normalisation drops end punctuation
    ],
    ids=["case", "spacing", "end punctuation"],
)
def test_event_prompts_held_out_but_for_case_or_spacing_train_nothing(
    variant: Callable[[str], str],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: only a prompt equal to a held-out one was dropped; the embedders give a case or
    # spacing variant the same vector, so its grade sat in the bank at similarity 1 and
    # inflated the candidate's holdout APGR.
    prompts = [row.prompt for row in read_routing_rows([data])]
    held = [p for p, h in zip(prompts, holdout_mask(prompts, 0.3, 0), strict=True) if h]
    log = JsonlEventLog(tmp_path / "events.jsonl")
    for prompt in [*held, "count apples new"]:
        log.emit("outcome", {"prompt": variant(prompt), "weak_correct": False})
    log.close()
    assert _retrain(data, tmp_path / "registry", "--events", str(tmp_path / "events.jsonl")) == 0
    assert _summary(capsys)["n_event_labels"] == 1


def test_same_request_keys_fold_what_the_embedders_and_the_exact_key_cannot_see() -> None:
    def same(a: str, b: str) -> bool:
        return not retrain.same_request_keys(a).isdisjoint(retrain.same_request_keys(b))

    assert same("Caf\u00e9  AU lait", "cafe\u0301 au\nlait")  # NFC, case, white space
    assert same("What is 5 + 3?", "what is 5 + 3")  # the exact key's end punctuation
    assert not same("count apples 1", "count apples 10")


def test_same_request_keys_fold_the_accents_the_uncased_model_drops() -> None:
    # Before: "zählen" and "zahlen" (cosine 1.0 under the uncased MiniLM, which strips
    # accents) were two requests, so an event label of the one graded a held-out other.
    held = RoutingRow("Wie zählen wir das?", "x", True, True)
    labels = [
        EventLabel("Wie zahlen wir das?", weak_correct=False),
        EventLabel("wie ZA\u0308HLEN  wir das?", weak_correct=False),
        EventLabel("Wie zahlen wir es?", weak_correct=False),
    ]
    kept = retrain.outside_holdout(labels, [held])
    assert [label.prompt for label in kept] == ["Wie zahlen wir es?"]


def test_a_candidate_worse_by_less_than_the_tolerance_is_promoted(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_dir = tmp_path / "registry"
    _retrain(data, registry_dir)
    first = _summary(capsys)
    events = str(_contradicting_events(tmp_path / "events.jsonl"))
    assert _retrain(data, registry_dir, "--events", events) == 3
    refused = _summary(capsys)
    incumbent, candidate = refused["incumbent_apgr"], refused["candidate_apgr"]
    assert isinstance(incumbent, float) and isinstance(candidate, float)
    shortfall = incumbent - candidate
    assert shortfall > 0 and refused["current"] == first["candidate"]
    tolerance = str(shortfall + 0.01)
    assert _retrain(data, registry_dir, "--events", events, "--tolerance", tolerance) == 0
    admitted = _summary(capsys)
    assert admitted["promoted"] is True and admitted["current"] == admitted["candidate"]


def test_a_model_in_service_that_cannot_be_loaded_is_compared_with_none(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_dir = tmp_path / "registry"
    _retrain(data, registry_dir)
    first = _summary(capsys)
    current = ModelRegistry(registry_dir).current_artifact()
    assert current is not None
    current.with_suffix(".json").write_text("{")  # a damaged version in service
    # A broken incumbent must not block its own replacement.
    assert _retrain(data, registry_dir) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["incumbent"] is None and summary["promoted"] is True
    assert summary["current"] == summary["candidate"] != first["candidate"]
    assert err.count("the model in service cannot be loaded") == 1  # not again per check


def test_rollback_of_a_registry_that_is_a_file_is_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Reading FILE/CURRENT raised NotADirectoryError: a traceback.
    a_file = tmp_path / "registry"
    a_file.write_text("")
    assert cli_main(["rollback-classifier", "--registry", str(a_file)]) == 1
    assert "is this the registry folder?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage",
    [
        "a history line not UTF-8",
        "CURRENT not UTF-8",
        "CURRENT a folder",
        "under a file",
        "mistyped",
    ],
)
def test_rollback_of_an_unreadable_or_missing_registry_is_a_one_line_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    # Each ended in a traceback (UnicodeDecodeError, NotADirectoryError); a mistyped
    # --registry was made on disk with a .lock in it.
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.promote("v2")
    target = registry.root
    if damage == "a history line not UTF-8":
        with (registry.root / "history.jsonl").open("ab") as history:
            history.write(b"\xff\n")
    elif damage == "CURRENT not UTF-8":
        (registry.root / "CURRENT").write_bytes(b"\xff\n")
    elif damage == "CURRENT a folder":  # any file it cannot read: an OSError
        (registry.root / "CURRENT").unlink()
        (registry.root / "CURRENT").mkdir()
    elif damage == "under a file":
        target = registry.root / "CURRENT" / "registry"
    else:
        target = tmp_path / "registyr"
    assert cli_main(["rollback-classifier", "--registry", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("routecache: ") and err.count("\n") == 1
    assert not (tmp_path / "registyr").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--c", "0"), ("--c", "nan"), ("--tolerance", "nan"), ("--tolerance", "2")]
)
def test_a_bad_regularisation_or_tolerance_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    # --c 0 failed in sklearn after every prompt was embedded; --tolerance nan never promoted.
    registry = tmp_path / "registry"
    argv = ["--data", str(tmp_path / "missing.jsonl"), "--registry", str(registry), flag, value]
    with pytest.raises(SystemExit) as exit_:
        retrain.main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not registry.exists()


def test_data_with_one_outcome_only_is_a_message_and_registers_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cheap model answered every prompt right: there is nothing to tell apart.
    data = tmp_path / "routing.jsonl"
    rows = ({"prompt": f"count apples {i}", "source": "mmlu", "subject": "synthetic",
             "weak_correct": True, "strong_correct": True} for i in range(60))  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    registry_dir = tmp_path / "registry"
    assert _retrain(data, registry_dir) == 2
    assert capsys.readouterr().err.startswith("cannot train: ")
    assert ModelRegistry(registry_dir).versions() == []
    assert ModelRegistry(registry_dir).current_version() is None


def test_a_registry_that_is_a_file_is_refused_before_any_embedding(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "registry"
    a_file.write_text("")
    assert _retrain(data, a_file) == 2
    assert capsys.readouterr().err.startswith(f"routecache: --registry {a_file}: not a folder")
    assert a_file.read_text() == ""


def test_a_candidate_on_another_embedder_than_the_model_in_service_is_refused_unless_allowed(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hash-embedder candidate was promoted over the packaged MiniLM model: every replica
    # embedding with MiniLM refuses it (or, on a fresh start, cannot start).
    registry_dir = tmp_path / "registry"
    argv = ["--data", str(data), "--registry", str(registry_dir), "--embedder", "hash"]
    assert retrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "all-MiniLM-L6-v2" in err and "'hash-64'" in err and "--allow-embedder-change" in err
    registry = ModelRegistry(registry_dir)
    assert registry.versions() == [] and registry.current_version() is None
    assert retrain.main([*argv, "--allow-embedder-change"]) == 0
    first = _summary(capsys)
    assert first["promoted"] is True and registry.current_version() == first["candidate"]
    # The model in service now learned from the same embedder: no flag needed.
    assert retrain.main(argv) in (0, 3)
    assert _summary(capsys)["incumbent"] == first["candidate"]
    assert retrain.main([*argv, "--hash-dimension", "32"]) == 2
    assert "'hash-32'" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["0.16", "0.95"], ids=["one held out", "one to train on"])
def test_retraining_needs_two_rows_on_each_side_of_the_holdout_as_training_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fraction: str
) -> None:
    # A tiny holdout failed in the metrics: "cannot train: need equal, non-empty lengths".
    data = _write_routing_file(tmp_path / "ok.jsonl", n=10)
    registry_dir = tmp_path / "registry"
    argv = ["--data", str(data), "--registry", str(registry_dir), "--embedder", "hash"]
    assert retrain.main([*argv, "--holdout-fraction", fraction]) == 2
    assert "need at least 2 training and 2 held-out rows" in capsys.readouterr().err
    assert ModelRegistry(registry_dir).versions() == []


def test_a_registry_whose_current_is_not_utf8_is_a_one_line_message(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "CURRENT").write_bytes(b"\xff\xfev\x001\x00")  # saved as UTF-16
    assert _retrain(data, registry) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("routecache: ") and "CURRENT" in error and "\n" not in error


def test_a_version_put_in_service_while_a_retrain_compares_is_not_overridden(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The incumbent was read without the registry's lock and the promotion did not check it
    # was still in service: an operator's rollback (or another retrain's promotion) in the
    # meantime was overridden by a candidate compared with the model it replaced.
    registry_dir = tmp_path / "registry"
    assert _retrain(data, registry_dir) == 0
    first = _summary(capsys)
    assert _retrain(data, registry_dir, "--seed", "0") == 0  # same model, a new version
    second = _summary(capsys)
    registry = ModelRegistry(registry_dir)
    compare = retrain.incumbent_apgr

    def operator_rolls_back(*args: object, **kwargs: object) -> object:
        result = compare(*args, **kwargs)  # type: ignore[arg-type]
        registry.rollback()
        return result

    monkeypatch.setattr(retrain, "incumbent_apgr", operator_rolls_back)
    assert _retrain(data, registry_dir, "--seed", "0") == 3
    out, err = capsys.readouterr()
    third = json.loads(out.strip().splitlines()[-1])
    assert third["incumbent"] == second["candidate"] and third["promoted"] is False
    assert registry.current_version() == first["candidate"] == third["current"]
    assert str(third["candidate"]) in registry.versions()  # kept, to promote by hand
    assert err.count("\n") == 1 and "not promoted" in err and "in service" in err


def test_torn_event_lines_are_skipped_and_said_in_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a line torn by a crash (left in place by the service's log) stopped retrain,
    # exit 2, though export-events skips and counts it.
    log = tmp_path / "events.jsonl"
    outcome = json.dumps({"kind": "outcome", "prompt": "count pears", "weak_correct": False})
    log.write_text(f'{outcome}\n{{"kind": "outco\n[1]\n', encoding="utf-8")
    assert _retrain(data, tmp_path / "registry", "--events", str(log)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["n_event_labels"] == 1
    said = [line for line in captured.err.splitlines() if "skipped" in line]
    assert said == [f"routecache: 2 lines of {log} skipped: not a JSON object (torn by a crash?)"]


def test_an_event_prompt_with_a_lone_surrogate_is_a_one_line_message_and_exit_2(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a UnicodeEncodeError traceback from the embedding cache, after the split.
    grades = tmp_path / "grades.jsonl"
    grades.write_text('{"kind": "outcome", "prompt": "caf\\ud800 q", "weak_correct": false}\n')
    assert _retrain(data, tmp_path / "registry", "--events", str(grades)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: {grades}:1: prompt ") and err.count("\n") == 1

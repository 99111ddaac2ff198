"""Retraining into a registry: promote only if not worse, events as labels, CLI rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routecache.classifier.model import load_artifact
from routecache.classifier.registry import ModelRegistry
from routecache.router.cli import main as cli_main
from routecache.router.events import JsonlEventLog
from routecache.training import retrain
from tests.unit.test_train_classifier import _write_routing_file


def _retrain(data: Path, registry: Path, *extra: str) -> int:
    argv = ["--data", str(data), "--registry", str(registry), "--embedder", "hash", *extra]
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
    log = JsonlEventLog(tmp_path / "events.jsonl")
    for i in range(150):
        hard = i % 3 == 0
        prompt = f"{'prove the theorem about integrals' if hard else 'count apples'} ev{i}"
        log.emit("outcome", {"prompt": prompt, "weak_correct": hard, "strong_correct": True})
    log.close()
    code = _retrain(data, registry_dir, "--events", str(tmp_path / "events.jsonl"))
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


def test_rollback_of_a_registry_that_is_a_file_is_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Reading FILE/CURRENT raised NotADirectoryError: a traceback.
    a_file = tmp_path / "registry"
    a_file.write_text("")
    assert cli_main(["rollback-classifier", "--registry", str(a_file)]) == 1
    assert "is this the registry folder?" in capsys.readouterr().err

"""The service wired with a registry (bootstrap): it serves CURRENT and follows promotions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.registry import ModelRegistry
from routecache.classifier.reloading import ReloadingClassifier
from routecache.domain import ChatRequest, Message, Role, Tier
from routecache.router.bootstrap import Overrides, build_classifier, start_service
from routecache.router.settings import ConfigError
from routecache.training import train_classifier
from tests.fakes import FakeUpstream, eventually, json_answer, prose_answer
from tests.unit.conftest import KEYS, unit_settings
from tests.unit.test_train_classifier import _write_routing_file


def _train(tmp_path: Path, name: str, seed: int, capsys: pytest.CaptureFixture[str]) -> Path:
    """A tiny hash-embedder artifact; its own version is difficulty-TIMESTAMP-SUFFIX."""
    data = _write_routing_file(tmp_path / "routing.jsonl")
    out = tmp_path / name
    argv = ["--data", str(data), "--out", str(out), "--embedder", "hash", "--c", "1.0"]
    assert train_classifier.main([*argv, "--seed", str(seed)]) == 0
    capsys.readouterr()
    return out / "difficulty.skops"


async def test_the_service_follows_the_registry_without_failing_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    models = {}
    for entry, seed in (("v1", 0), ("v2", 1)):
        artifact = _train(tmp_path, entry, seed, capsys)
        models[entry] = json.loads(artifact.with_suffix(".json").read_text())["version"]
        registry.add(artifact, entry)  # registry names differ from the models' own versions
    registry.promote("v1")
    settings = unit_settings()
    settings.server.port = 0
    settings.classifier.registry_dir = registry.root
    settings.classifier.reload_interval_seconds = 0.01
    service = await start_service(
        settings,
        Overrides(
            embedder=HashEmbedder(),  # 64-d, as the artifacts were trained
            upstreams={
                Tier.CHEAP: FakeUpstream("cheap-model", prose_answer),
                Tier.STRONG: FakeUpstream("strong-model", json_answer),
            },
        ),
    )
    assert isinstance(service.classifier, ReloadingClassifier)
    classifier, pipeline = service.classifier, service.pipeline
    key = KEYS["acme"]
    try:
        versions = []
        for i, promote in enumerate(["v2", None, "v1", None, None]):
            if promote:
                registry.promote(promote)
                wanted = models[promote]
                await eventually(  # the watcher checks every 10 ms; awaited within this turn
                    lambda: classifier.version == wanted,  # noqa: B023
                    "the watcher's swap",
                )
            request = ChatRequest(messages=(Message(Role.USER, f"count apples {i}"),))
            versions.append((await pipeline.complete(request, key)).classifier_version)
        v1, v2 = models["v1"], models["v2"]
        assert versions == [v2, v2, v1, v1, v1]
        assert service.classifier.swaps == 2  # no reload loop while the pointer stays put
        assert (await pipeline.admin.stats(key)).classifier_version == v1
        assert (
            json.loads(registry.root.joinpath("history.jsonl").read_text().splitlines()[-1])[
                "version"
            ]
            == "v1"
        )
    finally:
        await service.aclose()
    assert all(task.done() for task in service.background)  # the watcher stops with the service


def test_a_service_whose_classifier_learned_from_another_embedder_does_not_start() -> None:
    # The packaged model learned from MiniLM's 384-d vectors; a service embedding with the
    # 64-d hash embedder would have failed every routed request (it did, before this check).
    settings = unit_settings()
    with pytest.raises(ConfigError, match=r"all-MiniLM-L6-v2@model.*'hash-64'.*train-classifier"):
        build_classifier(settings, HashEmbedder())


def test_a_registry_whose_current_version_learned_from_another_embedder_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    registry.add(_train(tmp_path, "v1", 0, capsys), "v1")  # trained on hash-64 vectors
    registry.promote("v1")
    settings = unit_settings()
    settings.classifier.registry_dir = registry.root
    with pytest.raises(ConfigError, match=r"'hash-64'; this service embeds with 'hash-32'"):
        build_classifier(settings, HashEmbedder(32))
    assert isinstance(build_classifier(settings, HashEmbedder()), ReloadingClassifier)


def test_a_classifier_artifact_that_cannot_be_loaded_is_a_config_error_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A ClassifierArtifactError escaped build_classifier: `serve` printed a traceback, exit 1.
    settings = unit_settings()
    settings.classifier.artifact = tmp_path / "missing.skops"
    with pytest.raises(ConfigError, match=r"cannot start: classifier\.artifact: .*missing\.skops"):
        build_classifier(settings, HashEmbedder())
    artifact = _train(tmp_path, "v1", 0, capsys)
    artifact.with_suffix(".json").write_text("{")
    settings.classifier.artifact = artifact
    with pytest.raises(ConfigError, match=r"classifier\.artifact: .*not valid JSON"):
        build_classifier(settings, HashEmbedder())


@pytest.mark.parametrize("current", [b"v9\n", b"v1\n", b"\xff\xfev\x001\x00"])
def test_a_registry_current_that_names_no_usable_version_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], current: bytes
) -> None:
    # A version that is not there, one whose files are broken, a CURRENT saved as UTF-16.
    registry = ModelRegistry(tmp_path / "registry")
    artifact = registry.add(_train(tmp_path, "v1", 0, capsys), "v1")
    artifact.with_suffix(".json").write_text("{")
    (registry.root / "CURRENT").write_bytes(current)
    settings = unit_settings()
    settings.classifier.registry_dir = registry.root
    with pytest.raises(ConfigError, match=r"cannot start: classifier\.registry_dir: "):
        build_classifier(settings, HashEmbedder())


async def test_the_runbooks_classifier_rollback_with_a_registry_needs_no_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/operations.md, Rollback step 2. It said to point classifier.artifact at the previous
    # artifact and restart: with registry_dir set that is only the fallback, so nothing changed.
    from routecache.router.cli import main as cli_main

    registry = ModelRegistry(tmp_path / "registry")
    models = {}
    for entry, seed in (("good", 0), ("bad", 1)):
        artifact = _train(tmp_path, entry, seed, capsys)
        models[entry] = json.loads(artifact.with_suffix(".json").read_text())["version"]
        registry.add(artifact, entry)
        registry.promote(entry)
    settings = unit_settings()
    settings.classifier.registry_dir = registry.root
    settings.classifier.artifact = tmp_path / "good" / "difficulty.skops"
    restarted = build_classifier(settings, HashEmbedder())
    assert restarted.version == models["bad"]  # the artifact changed nothing
    assert cli_main(["rollback-classifier", "--registry", str(registry.root)]) == 0
    assert isinstance(restarted, ReloadingClassifier)
    assert await restarted.refresh()  # what the watcher does every reload_interval_seconds
    assert restarted.version == models["good"]

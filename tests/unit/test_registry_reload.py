"""The model registry (promote, rollback) and the hot-reloading classifier, on fake loaders."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routecache.classifier.model import (
    ARTIFACT_FORMAT,
    REQUIRED_METADATA,
    FixedScoreClassifier,
    artifact_pair,
)
from routecache.classifier.operating_point import CurvePoint, OperatingCurve
from routecache.classifier.ports import Assessment, DifficultyClassifier
from routecache.classifier.registry import ModelRegistry, RegistryError
from routecache.classifier.reloading import ReloadingClassifier
from routecache.domain import OperatingPoint
from tests.unit.conftest import record_fsyncs, record_synced

VECTOR = np.zeros(4, dtype=np.float32)


def _artifact(folder: Path, score: float, artifact_file: str = "model.skops") -> Path:
    """A stand-in artifact pair: the fake loader reads the score from the .skops bytes, and
    the .json holds its checksum, as a saved pair's does. With `artifact_file`, the model is
    written there instead, and the .json names it (a save that stopped before model.skops)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"score": score}).encode()
    (folder / artifact_file).write_bytes(data)
    (folder / "model.json").write_text(json.dumps(_metadata_of(data, artifact_file)))
    return folder / "model.skops"


def _metadata_of(data: bytes, artifact_file: str) -> dict[str, object]:
    return {
        **dict.fromkeys(REQUIRED_METADATA, "-"),
        "format": ARTIFACT_FORMAT,
        "artifact_sha256": hashlib.sha256(data).hexdigest(),
        "artifact_file": artifact_file,
    }


def fake_load(path: Path) -> DifficultyClassifier:
    if "broken" in path.parent.name:
        raise ValueError("damaged artifact")
    score = json.loads(path.read_text())["score"]
    return FixedScoreClassifier(score, version=path.parent.name)


def _registry_with(tmp_path: Path, *versions: str) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    for i, version in enumerate(versions):
        registry.add(_artifact(tmp_path / f"src-{version}", i / 10), version)
    return registry


def test_promote_and_roll_back_walk_the_promotion_history(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    assert registry.versions() == ["v1", "v2", "v3"]
    assert registry.current_version() is None
    for version in ("v1", "v2", "v3"):
        registry.promote(version)
    assert registry.current_version() == "v3"
    assert registry.rollback() == "v2"
    assert registry.rollback() == "v1"
    with pytest.raises(RegistryError, match="nothing was promoted before"):
        registry.rollback()
    assert registry.rollback(to="v3") == "v3"
    assert [c.action for c in registry.history()] == ["promote"] * 3 + ["rollback"] * 3
    assert registry.artifact_path("v1").is_file()  # rollback keeps every version


def test_rollback_without_a_version_in_service_says_so(tmp_path: Path) -> None:
    # It said "version in service None was never promoted here".
    with pytest.raises(RegistryError, match=r"no version in service \(no .*CURRENT\)"):
        ModelRegistry(tmp_path).rollback()


def test_registry_refuses_unknown_and_duplicate_versions(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    with pytest.raises(RegistryError, match="no version"):
        registry.promote("v9")
    with pytest.raises(RegistryError, match="already"):
        registry.add(_artifact(tmp_path / "again", 0.5), "v1")
    for name in ("../escape", "team/v2", ".hidden", ""):
        with pytest.raises(RegistryError, match="not a usable"):
            registry.add(_artifact(tmp_path / "bad", 0.5), name)
    assert registry.versions() == ["v1"]


def test_a_version_folder_without_its_artifact_is_neither_listed_nor_promoted(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1")
    registry.artifact_path("v2").parent.mkdir()
    (registry.artifact_path("v2").parent / "difficulty.json").write_text("{}")
    assert registry.versions() == ["v1"]
    with pytest.raises(RegistryError, match="no version 'v2'"):
        registry.promote("v2")
    assert registry.current_version() is None


def test_add_takes_the_pair_by_either_file_or_its_stem(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    source = _artifact(tmp_path / "src", 0.3)
    registry.add(source.with_suffix(".json"), "by-json")
    registry.add(source.with_suffix(""), "by-stem")
    for version in ("by-json", "by-stem"):
        folder = registry.artifact_path(version).parent
        assert (folder / "difficulty.skops").read_text() == source.read_text()
        metadata = json.loads((folder / "difficulty.json").read_text())
        assert metadata == _metadata_of(source.read_bytes(), "difficulty.skops")


def test_add_takes_the_model_the_json_names_where_a_save_stopped_before_replacing_it(
    tmp_path: Path,
) -> None:
    # The .json names the staged copy, NAME.skops is still the previous model: copied as it
    # was, the version could never load (its .json's checksum is the staged copy's).
    source = _artifact(tmp_path / "src", 0.7, artifact_file=f".model.{'a' * 64}.skops")
    source.write_text(json.dumps({"score": 0.1}))  # the previous save's
    registry = ModelRegistry(tmp_path / "registry")
    added = registry.add(source, "v1")
    assert fake_load(added).failure_probability(VECTOR, "") == 0.7
    metadata = json.loads((added.parent / "difficulty.json").read_text())
    assert metadata == _metadata_of(added.read_bytes(), "difficulty.skops")
    registry.promote("v1")
    assert registry.current_version() == "v1"


def test_a_version_whose_model_does_not_match_its_json_is_neither_added_nor_promoted(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1")
    registry.artifact_path("v1").write_text(json.dumps({"score": 0.9}))  # not its .json's
    with pytest.raises(RegistryError, match=r"promote v1: .*SHA-256 differs"):
        registry.promote("v1")
    assert registry.current_version() is None
    source = _artifact(tmp_path / "src-v2", 0.2)
    source.write_text(json.dumps({"score": 0.3}))
    with pytest.raises(RegistryError, match=r"cannot add v2: .*SHA-256 differs"):
        registry.add(source, "v2")
    assert registry.versions() == ["v1"]


def test_an_add_interrupted_earlier_does_not_block_adding_the_version(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    # What a crash during the copy leaves: a staging folder with part of the pair.
    staging = registry.root / ".adding-v2"
    staging.mkdir()
    (staging / "difficulty.skops").write_text("half")
    (staging / "stale.txt").write_text("from the crashed add")
    registry.add(_artifact(tmp_path / "src-v2", 0.2), "v2")
    assert json.loads(registry.artifact_path("v2").read_text()) == {"score": 0.2}
    assert sorted(p.name for p in registry.artifact_path("v2").parent.iterdir()) == [
        "difficulty.json", "difficulty.skops"
    ]  # fmt: skip
    assert registry.versions() == ["v1", "v2"]
    assert not staging.exists()


def test_adding_half_a_pair_reports_the_missing_file_and_adds_nothing(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    source = _artifact(tmp_path / "src-v2", 0.2)
    source.with_suffix(".json").unlink()
    # The missing file itself, not "the version folder exists": only a rename that finds the
    # folder taken means that.
    with pytest.raises(RegistryError, match=r"cannot add v2: .*model\.json is missing"):
        registry.add(source, "v2")
    assert registry.versions() == ["v1"]
    assert not (registry.root / ".adding-v2").exists()


def test_an_added_version_is_readable_as_the_umask_allows(tmp_path: Path) -> None:
    # A service running as another user than the training job must read new versions: a
    # private temporary folder (mode 0700) renamed into place did not allow it.
    previous = os.umask(0o022)
    try:
        registry = _registry_with(tmp_path, "v1")
    finally:
        os.umask(previous)
    assert registry.artifact_path("v1").parent.stat().st_mode & 0o777 == 0o755


def test_the_pointer_is_readable_as_the_umask_allows(tmp_path: Path) -> None:
    # The service reading CURRENT may run as another user than the job that promotes.
    registry = _registry_with(tmp_path, "v1")
    previous = os.umask(0o022)
    try:
        registry.promote("v1")
    finally:
        os.umask(previous)
    assert (registry.root / "CURRENT").stat().st_mode & 0o777 == 0o644


def test_a_promotion_syncs_the_folder_after_moving_the_pointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename lives in the folder: unsynced, a power loss may put the old version back in
    # service (or none) though the promotion returned.
    registry = _registry_with(tmp_path, "v1")
    synced = record_fsyncs(monkeypatch, registry.root / "CURRENT")
    registry.promote("v1")
    assert synced[-1] == (True, True)


def test_two_concurrent_adds_of_one_version_add_it_once_and_the_other_says_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    sources = [_artifact(tmp_path / f"src-{i}", i / 10) for i in range(2)]
    first_copying, go_on = threading.Event(), threading.Event()
    copy = artifact_pair
    copying: list[int] = []

    def copy_held(source: Path, name: str) -> tuple[bytes, bytes]:
        copying.append(threading.get_ident())
        first_copying.set()
        go_on.wait(10)
        return copy(source, name)

    monkeypatch.setattr("routecache.classifier.registry.artifact_pair", copy_held)
    outcomes: list[BaseException | None] = []

    def add(source: Path) -> None:
        try:
            registry.add(source, "v1")
            outcomes.append(None)
        except BaseException as error:  # reported by the assertions below
            outcomes.append(error)

    threads = [threading.Thread(target=add, args=(source,)) for source in sources]
    threads[0].start()
    assert first_copying.wait(10)
    threads[1].start()
    threads[1].join(0.2)  # the second add waits for the first, copying nothing meanwhile
    assert set(copying) == {threads[0].ident}
    go_on.set()
    for thread in threads:
        thread.join()
    errors = [e for e in outcomes if e is not None]
    assert len(errors) == 1 and isinstance(errors[0], RegistryError), outcomes
    assert "already" in str(errors[0])
    added = registry.artifact_path("v1")
    assert added.read_text() in {s.read_text() for s in sources}  # one whole pair, not a mix
    assert (added.parent / "difficulty.json").is_file()
    assert registry.versions() == ["v1"]
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", "versions"]  # no staging


async def test_reload_swaps_to_the_promoted_version(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    assert (classifier.version, classifier.failure_probability(VECTOR, "x")) == ("v1", 0.0)
    assert await classifier.refresh() is False  # nothing changed
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert (classifier.version, classifier.failure_probability(VECTOR, "x")) == ("v2", 0.1)
    registry.rollback()
    assert await classifier.refresh() is True
    assert classifier.version == "v1"


async def test_a_broken_version_is_skipped_and_the_old_model_keeps_serving(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1", "broken-v2", "v3")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    registry.promote("broken-v2")
    assert await classifier.refresh() is False
    assert classifier.version == "v1"
    registry.promote("v3")
    assert await classifier.refresh() is True
    assert classifier.version == "v3"


def test_without_a_promoted_version_the_fallback_serves(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "empty")
    fallback = _artifact(tmp_path / "packaged", 0.7)
    classifier = ReloadingClassifier.from_registry(registry, fake_load, fallback)
    assert classifier.version == "packaged"


async def test_watch_picks_up_a_promotion_while_scoring_never_fails(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    watcher = asyncio.create_task(classifier.watch(0.001))
    seen: set[str] = set()
    try:
        registry.promote("v2")
        for _ in range(2000):
            seen.add(classifier.version)
            classifier.failure_probability(VECTOR, "x")
            if classifier.version == "v2":
                break
            await asyncio.sleep(0.001)
    finally:
        watcher.cancel()
    assert seen == {"v1", "v2"} or seen == {"v2"}
    assert classifier.version == "v2" and classifier.swaps == 1


def test_rollback_never_returns_to_a_version_that_was_rolled_back(tmp_path: Path) -> None:
    # v2 went bad and was rolled back; v3 replaced v1. Rolling v3 back must restore v1, the
    # version in service before it, not the withdrawn v2 (promoted before v3, but pulled).
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    registry.promote("v1")
    registry.promote("v2")
    assert registry.rollback() == "v1"
    registry.promote("v3")
    assert registry.rollback() == "v1"
    assert registry.current_version() == "v1"


class _DimensionBound(FixedScoreClassifier):
    """Scores only embeddings of its own dimension, as a trained model does."""

    def __init__(self, dimension: int, version: str) -> None:
        super().__init__(0.5, version=version)
        self._dimension = dimension

    def assess(self, embedding: npt.NDArray[np.float32], text: str) -> Assessment:
        if np.asarray(embedding).reshape(-1).shape[0] != self._dimension:
            raise ValueError(f"expects {self._dimension}-d embeddings")
        return super().assess(embedding, text)


async def test_a_version_for_another_embedder_is_not_swapped_in(tmp_path: Path) -> None:
    # A candidate retrained on another embedder (64-d) is promoted over a 4-d one: swapping it
    # in would fail every routed request of the service; it is skipped like a broken one.
    registry = _registry_with(tmp_path, "v1", "v2-64d")

    def load(path: Path) -> DifficultyClassifier:
        version = path.parent.name
        return _DimensionBound(64 if "64d" in version else VECTOR.shape[0], version)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(
        registry, load, tmp_path / "none", embedding_dimension=VECTOR.shape[0]
    )
    registry.promote("v2-64d")
    assert await classifier.refresh() is False
    assert classifier.version == "v1"
    assert classifier.assess(VECTOR, "x").failure_probability == 0.5


class _TrainedOn(FixedScoreClassifier):
    """A model that names the embedder it was trained on, as a trained artifact does."""

    def __init__(self, embedder: str, version: str) -> None:
        super().__init__(0.5, version=version)
        self._trained_on = embedder

    @property
    def embedder(self) -> str | None:
        return self._trained_on


async def test_a_version_for_another_embedder_of_the_same_size_is_not_swapped_in(
    tmp_path: Path,
) -> None:
    # Both score 4-d vectors, but v2 learned from another embedder's: it would route on
    # vectors it never saw, without an error to show it.
    registry = _registry_with(tmp_path, "v1", "v2-other", "v3")

    def load(path: Path) -> DifficultyClassifier:
        version = path.parent.name
        return _TrainedOn("other-4d" if "other" in version else "service-4d", version)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(
        registry, load, tmp_path / "none", VECTOR.shape[0], "service-4d"
    )
    registry.promote("v2-other")
    assert await classifier.refresh() is False
    assert classifier.version == "v1"
    registry.promote("v3")
    assert await classifier.refresh() is True
    assert (classifier.version, classifier.embedder) == ("v3", "service-4d")


async def test_a_version_unreadable_for_a_moment_is_loaded_on_a_later_tick(
    tmp_path: Path,
) -> None:
    # A registry on a network mount can fail one read (EIO, stale handle). That says nothing
    # about the artifact: this replica must not stay on the old model while the others move on.
    registry = _registry_with(tmp_path, "v1", "v2")
    failures = [OSError(5, "Input/output error")]

    def flaky_load(path: Path) -> DifficultyClassifier:
        if path.parent.name == "v2" and failures:
            raise failures.pop()
        return fake_load(path)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, flaky_load, tmp_path / "none")
    registry.promote("v2")
    with pytest.raises(OSError, match="Input/output error"):  # for watch() to log once
        await classifier.refresh()
    assert classifier.version == "v1"
    assert await classifier.refresh() is True
    assert classifier.version == "v2"


def test_rollback_walks_back_through_a_version_promoted_twice(tmp_path: Path) -> None:
    # v1 went back into service after v2 (a promotion, not a rollback, so v2 was not withdrawn).
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    for version in ("v1", "v2", "v1", "v3"):
        registry.promote(version)
    assert registry.rollback() == "v1"
    assert registry.rollback() == "v2"  # in service before v1's second promotion
    assert registry.rollback() == "v1"
    with pytest.raises(RegistryError, match="nothing was promoted before"):
        registry.rollback()


def test_promoting_the_version_in_service_again_does_not_make_it_its_own_rollback(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    for version in ("v1", "v2", "v2"):
        registry.promote(version)
    assert registry.rollback() == "v1"


def test_a_pointer_set_outside_the_registry_cannot_be_rolled_back(tmp_path: Path) -> None:
    # CURRENT written by hand (or history.jsonl lost): there is no promotion to go back to.
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    (registry.root / "CURRENT").write_text("v2\n")
    assert registry.current_version() == "v2"
    with pytest.raises(RegistryError, match="'v2' was never promoted here"):
        registry.rollback()


def test_a_pointer_without_any_history_cannot_be_rolled_back(tmp_path: Path) -> None:
    # history.jsonl lost (or never written): a ValueError from zip(strict=True), a traceback.
    registry = _registry_with(tmp_path, "v1")
    (registry.root / "CURRENT").write_text("v1\n")
    with pytest.raises(RegistryError, match="'v1' was never promoted here"):
        registry.rollback()


def test_an_empty_pointer_means_no_version_in_service(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    registry.root.mkdir(exist_ok=True)
    (registry.root / "CURRENT").write_text("\n")
    assert registry.current_version() is None
    assert registry.current_artifact() is None
    fallback = _artifact(tmp_path / "packaged", 0.7)
    assert ReloadingClassifier.from_registry(registry, fake_load, fallback).version == "packaged"


async def test_a_broken_version_is_loaded_once_not_at_every_poll(tmp_path: Path) -> None:
    # Loading an artifact is the expensive part of a poll; one that failed stays failed.
    registry = _registry_with(tmp_path, "v1", "broken-v2")
    loads: list[str] = []

    def counting_load(path: Path) -> DifficultyClassifier:
        loads.append(path.parent.name)
        return fake_load(path)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, counting_load, tmp_path / "none")
    registry.promote("broken-v2")
    for _ in range(3):
        assert await classifier.refresh() is False
    assert loads == ["v1", "broken-v2"] and classifier.version == "v1"


async def test_an_emptied_pointer_keeps_the_model_in_service(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "broken-v2")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    registry.promote("broken-v2")
    assert await classifier.refresh() is False  # a failed version on record, then no pointer
    (registry.root / "CURRENT").write_text("\n")
    assert await classifier.refresh() is False
    assert classifier.version == "v1"


async def test_a_new_version_is_loaded_off_the_event_loop(tmp_path: Path) -> None:
    # Loading a real artifact takes long enough to stall every request on the loop.
    registry = _registry_with(tmp_path, "v1", "v2")
    loaded_on: dict[str, int] = {}

    def load(path: Path) -> DifficultyClassifier:
        loaded_on[path.parent.name] = threading.get_ident()
        return fake_load(path)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, load, tmp_path / "none")
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert loaded_on["v2"] != threading.get_ident()


@pytest.mark.parametrize(
    "failure",
    [OSError(116, "Stale file handle"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")],
    ids=["stale handle", "not UTF-8"],
)
async def test_watch_keeps_polling_after_the_pointer_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    # A stale handle on a network mount, or a CURRENT saved by hand in another encoding, fails
    # one read of the pointer; the watcher must go on (it died of the second).
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    registry.promote("v2")
    read_pointer = registry.current_version
    failures = [failure]

    def flaky_pointer() -> str | None:
        if failures:
            raise failures.pop()
        return read_pointer()

    monkeypatch.setattr(registry, "current_version", flaky_pointer)
    swapped = asyncio.Event()
    refresh = classifier.refresh

    async def refresh_and_tell() -> bool:
        if result := await refresh():
            swapped.set()
        return result

    monkeypatch.setattr(classifier, "refresh", refresh_and_tell)
    watcher = asyncio.create_task(classifier.watch(0))
    swap = asyncio.create_task(swapped.wait())
    try:
        # The swap, or the watcher's end: it died of the failed read.
        await asyncio.wait({watcher, swap}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        swap.cancel()
    assert not failures and classifier.version == "v2"


async def test_watch_waits_the_interval_before_each_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interval is classifier.reload_interval_seconds: polling faster reads the pointer on a
    # shared mount many times a second, slower leaves replicas on an old model for longer.
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    registry.promote("v2")
    waits: list[tuple[float, str]] = []

    async def record_sleep(seconds: float) -> None:
        waits.append((seconds, classifier.version))
        if len(waits) == 2:
            raise asyncio.CancelledError

    monkeypatch.setattr(asyncio, "sleep", record_sleep)
    with pytest.raises(asyncio.CancelledError):
        await classifier.watch(7.5)
    assert waits == [(7.5, "v1"), (7.5, "v2")]  # the first poll comes after one interval


async def test_a_version_that_names_no_embedder_is_checked_by_its_size_alone(
    tmp_path: Path,
) -> None:
    # Models saved before artifacts named their embedder cannot be refused for the name.
    registry = _registry_with(tmp_path, "v1", "v2")

    def load(path: Path) -> DifficultyClassifier:
        return _DimensionBound(VECTOR.shape[0], path.parent.name)  # names no embedder

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(
        registry, load, tmp_path / "none", VECTOR.shape[0], "service-4d"
    )
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert classifier.version == "v2"


def _serving_v1_with_v2_failing_once(tmp_path: Path) -> tuple[ModelRegistry, ReloadingClassifier]:
    """v1 in service; v2's first load fails (not a read error), a later one loads."""
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    failures = [ValueError("truncated artifact")]

    def load_failing_once(path: Path) -> DifficultyClassifier:
        if path.parent.name == "v2" and failures:
            raise failures.pop()
        return fake_load(path)

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, load_failing_once, tmp_path / "none")
    return registry, classifier


async def test_a_version_that_failed_is_tried_again_when_promoted_again_later(
    tmp_path: Path,
) -> None:
    # v2 failed once; after v3 served, promoting v2 again is a new change.
    registry, classifier = _serving_v1_with_v2_failing_once(tmp_path)
    for version, swapped in (("v2", False), ("v3", True), ("v2", True)):
        registry.promote(version)
        assert await classifier.refresh() is swapped
    assert classifier.version == "v2"


async def test_a_version_that_failed_is_tried_again_when_promoted_again_after_a_roll_back(
    tmp_path: Path,
) -> None:
    # Rolled back to the model in service, then v2 promoted again: that is a later pointer
    # change too, but the failure on record was never cleared and v2 was never loaded again.
    registry, classifier = _serving_v1_with_v2_failing_once(tmp_path)
    registry.promote("v2")
    assert await classifier.refresh() is False
    registry.rollback()
    assert await classifier.refresh() is False and classifier.version == "v1"
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert classifier.version == "v2"


async def test_a_failed_version_rolled_back_and_promoted_again_between_polls_is_tried_again(
    tmp_path: Path,
) -> None:
    # Before: the failure on record was cleared only by a poll that saw the roll back; both
    # within one reload interval, the poll saw v2 again and never loaded it.
    registry, classifier = _serving_v1_with_v2_failing_once(tmp_path)
    registry.promote("v2")
    assert await classifier.refresh() is False
    assert await classifier.refresh() is False  # the same pointer: not loaded again
    registry.rollback()
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert classifier.version == "v2"


async def test_the_routing_thresholds_follow_the_model_in_service(tmp_path: Path) -> None:
    # A threshold belongs to the scores of the model that set it: after a swap, the old
    # model's threshold would route the new model's scores.
    registry = _registry_with(tmp_path, "v1", "v2")

    def load(path: Path) -> DifficultyClassifier:
        version = path.parent.name
        default, at_target = {"v1": (0.3, 0.4), "v2": (0.7, 0.8)}[version]
        point = CurvePoint(at_target, strong_fraction=0.5, pgr=0.8, accuracy=0.9,
                           cost_vs_all_strong=0.5)  # fmt: skip
        return FixedScoreClassifier(0.5, version, default, curve=OperatingCurve([point]))

    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, load, tmp_path / "none")
    target = OperatingPoint(strong_fraction=0.5)
    assert (classifier.default_threshold, classifier.threshold_for(target)) == (0.3, 0.4)
    registry.promote("v2")
    assert await classifier.refresh() is True
    assert (classifier.default_threshold, classifier.threshold_for(target)) == (0.7, 0.8)


@pytest.mark.parametrize("version", [" v1", "v1 ", "v1\n"])
def test_a_version_name_with_surrounding_whitespace_is_refused(
    tmp_path: Path, version: str
) -> None:
    # CURRENT is read back stripped: " v1" would be promoted as "v1", a version not there.
    with pytest.raises(RegistryError, match="not a usable version name"):
        _registry_with(tmp_path, version)


def test_versions_are_listed_in_name_order(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v3", "v1", "z", "v2", "a", "m")
    assert registry.versions() == ["a", "m", "v1", "v2", "v3", "z"]


def test_a_file_where_the_registry_folder_should_be_means_no_version_in_service(
    tmp_path: Path,
) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    registry = ModelRegistry(tmp_path / "not-a-folder")
    assert registry.current_version() is None
    assert registry.versions() == []


def test_rolling_back_to_a_version_never_promoted_puts_it_in_service(tmp_path: Path) -> None:
    # An explicit --to target goes on the service stack, so the next rollback undoes it.
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    registry.promote("v1")
    registry.promote("v2")
    assert registry.rollback(to="v3") == "v3"
    assert registry.rollback() == "v2"
    assert registry.rollback() == "v1"


def test_history_records_each_change_with_the_version_it_replaced(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.promote("v2")
    registry.rollback()
    with (registry.root / "history.jsonl").open("a") as log:
        log.write("\n  \n")  # blank lines (a hand edit) are skipped
    changes = [(c.action, c.version, c.previous) for c in registry.history()]
    assert changes == [("promote", "v1", None), ("promote", "v2", "v1"), ("rollback", "v1", "v2")]


def test_a_damaged_history_line_is_a_registry_error_naming_the_line(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.promote("v2")
    history = registry.root / "history.jsonl"
    lines = history.read_text().splitlines()
    for damage in (
        "{not json",
        '["a list"]',
        '{"action": "promote"}',
        '{"action": "x", "version": "v1", "previous": null, "ts": 0}',
    ):
        history.write_text("\n".join([damage, *lines]) + "\n")
        with pytest.raises(RegistryError, match=r"history.jsonl:1: damaged history line"):
            registry.rollback()
    assert registry.current_version() == "v2"


@pytest.mark.parametrize(
    "damage", [b"\xff\xfe not UTF-8", b"[" * 100_000], ids=["not UTF-8", "too deep"]
)
def test_an_unreadable_history_line_is_a_registry_error_naming_the_line(
    tmp_path: Path, damage: bytes
) -> None:
    # A UnicodeDecodeError / RecursionError escaped: rollback-classifier ended in a traceback.
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.promote("v2")
    history = registry.root / "history.jsonl"
    history.write_bytes(history.read_bytes() + damage + b"\n")
    with pytest.raises(RegistryError, match=r"history.jsonl:3: damaged history line"):
        registry.rollback()
    assert registry.current_version() == "v2"


def test_a_pointer_that_is_not_utf8_is_a_registry_error_naming_it(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    (registry.root / "CURRENT").write_bytes(b"v\xff1\n")
    with pytest.raises(RegistryError, match=r"CURRENT: not UTF-8 text"):
        registry.current_version()


@pytest.mark.parametrize("where", ["missing", "under a file"])
def test_changing_a_registry_folder_that_is_not_there_says_so_and_makes_nothing(
    tmp_path: Path, where: str
) -> None:
    # A mistyped --registry was made on disk, .lock and all, before "nothing to roll back";
    # one under a file raised NotADirectoryError.
    if where == "under a file":
        (tmp_path / "a-file").write_text("")
        root = tmp_path / "a-file" / "registry"
    else:
        root = tmp_path / "registyr"
    registry = ModelRegistry(root)
    for change in (registry.rollback, lambda: registry.promote("v1")):
        with pytest.raises(RegistryError, match="no such folder: is this the registry folder"):
            change()
    assert not root.exists() and sorted(p.name for p in tmp_path.iterdir()) == (
        ["a-file"] if where == "under a file" else []
    )


def test_adding_to_a_registry_under_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    registry = ModelRegistry(tmp_path / "a-file" / "registry")
    with pytest.raises(RegistryError, match="cannot make the registry folder"):
        registry.add(_artifact(tmp_path / "src", 0.1), "v1")


def test_a_torn_last_history_line_is_dropped_and_the_next_change_logs_cleanly(
    tmp_path: Path,
) -> None:
    # A crash in the middle of an append leaves a last line without its newline; CURRENT moves
    # only after the record is written, so that change never happened.
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    registry.promote("v1")
    registry.promote("v2")
    with (registry.root / "history.jsonl").open("a") as log:
        log.write('{"action": "promote", "vers')
    assert [c.version for c in registry.history()] == ["v1", "v2"]
    registry.promote("v3")
    assert [c.version for c in registry.history()] == ["v1", "v2", "v3"]
    assert registry.rollback() == "v2"


def test_a_promotion_whose_history_cannot_be_written_leaves_the_pointer_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Logged first, moved second: a version can never be in service without a record, which
    # would make it impossible to roll back.
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    registry.promote("v1")
    registry.promote("v2")

    def disk_full(*_: object, **__: object) -> str:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(json, "dumps", disk_full)
        with pytest.raises(OSError, match="No space left"):
            registry.promote("v3")
    assert registry.current_version() == "v2"
    assert registry.rollback() == "v1"


def test_concurrent_promotions_all_land_in_the_history_in_pointer_order(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    errors: list[BaseException] = []

    def promote_many(version: str) -> None:
        try:
            for _ in range(150):
                ModelRegistry(registry.root).promote(version)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=promote_many, args=(v,)) for v in ("v1", "v2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    changes = registry.history()
    assert len(changes) == 300
    # Each record names the version it replaced: the log is one consistent sequence.
    assert all(a.version == b.previous for a, b in itertools.pairwise(changes))
    assert registry.current_version() == changes[-1].version


def _log_without_moving(registry: ModelRegistry, action: str, version: str) -> None:
    """A change logged whose CURRENT move never happened: a crash between the two steps."""
    record = {"action": action, "version": version, "previous": registry.current_version(),
              "ts": 0.0}  # fmt: skip
    with (registry.root / "history.jsonl").open("a") as log:
        log.write(json.dumps(record) + "\n")


def test_a_rollback_that_crashed_before_moving_the_pointer_leaves_rollback_working(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.promote("v2")
    _log_without_moving(registry, "rollback", "v1")
    assert registry.current_version() == "v2"
    assert registry.rollback() == "v1"  # was: "version in service 'v2' was never promoted"


def test_a_promotion_that_crashed_before_moving_the_pointer_is_never_rolled_back_to(
    tmp_path: Path,
) -> None:
    registry = _registry_with(tmp_path, "v1", "v2", "v3", "v4")
    registry.promote("v1")
    registry.promote("v2")
    _log_without_moving(registry, "promote", "v3")
    registry.promote("v4")
    assert registry.rollback() == "v2"  # was v3, a version that never served
    assert registry.rollback() == "v1"


@pytest.mark.parametrize("change", ["promote", "add"])
def test_changing_a_registry_that_is_a_file_says_so(tmp_path: Path, change: str) -> None:
    # add made its folders first: a raw NotADirectoryError before the lock's clear refusal.
    (tmp_path / "registry").write_text("")
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(RegistryError, match="is a file: is this the registry folder"):
        if change == "promote":
            registry.promote("v1")
        else:
            registry.add(_artifact(tmp_path / "src", 0.1), "v1")


def test_adding_over_a_version_folder_without_its_artifact_says_so(tmp_path: Path) -> None:
    registry = _registry_with(tmp_path, "v1")
    stray = registry.root / "versions" / "v2"
    stray.mkdir()
    (stray / "notes.txt").write_text("put here by hand")
    with pytest.raises(RegistryError, match=r"v2 exists: remove it to add v2"):
        registry.add(_artifact(tmp_path / "src-v2", 0.2), "v2")
    assert registry.versions() == ["v1"]


async def test_watch_logs_an_unreadable_registry_once_and_its_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A registry that stays unreadable (permissions, a lost mount) must show in the logs, or the
    # replica stays on its model unnoticed; once per outage, not once per poll.
    registry = _registry_with(tmp_path, "v1")
    registry.promote("v1")
    classifier = ReloadingClassifier.from_registry(registry, fake_load, tmp_path / "none")
    reads = [OSError(13, "Permission denied")] * 3 + [None, OSError(13, "Permission denied")]

    def pointer() -> str | None:
        failure = reads.pop(0) if reads else None
        if failure is not None:
            raise failure
        return "v1"

    async def stop_when_read_out(seconds: float) -> None:
        if not reads:
            raise asyncio.CancelledError

    monkeypatch.setattr(registry, "current_version", pointer)
    monkeypatch.setattr(asyncio, "sleep", stop_when_read_out)
    with caplog.at_level(logging.INFO), pytest.raises(asyncio.CancelledError):
        await classifier.watch(1)
    messages = [r.getMessage() for r in caplog.records if "registry" in r.getMessage()]
    assert messages == [
        "classifier registry could not be read ([Errno 13] Permission denied); "
        "trying again every poll",
        "classifier registry readable again",
        "classifier registry could not be read ([Errno 13] Permission denied); "
        "trying again every poll",
    ]


@pytest.mark.parametrize("pointer_fails_first", [False, True], ids=["artifact", "pointer"])
async def test_watch_logs_an_unreadable_artifact_once_and_recovers_only_when_it_reads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    pointer_fails_first: bool,
) -> None:
    # A new version's artifact that cannot be read was logged inside refresh() at every poll,
    # and after a failed pointer read watch() logged "readable again" though the artifact
    # still could not be read. One warning per outage, whichever read fails.
    registry = _registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    failures = [OSError(5, "Input/output error")] * 3

    def flaky_load(path: Path) -> DifficultyClassifier:
        if path.parent.name == "v2" and failures:
            raise failures.pop()
        return fake_load(path)

    classifier = ReloadingClassifier.from_registry(registry, flaky_load, tmp_path / "none")
    registry.promote("v2")
    read_pointer = registry.current_version
    pointer_failures = [OSError(13, "Permission denied")] if pointer_fails_first else []

    def pointer() -> str | None:
        if pointer_failures:
            raise pointer_failures.pop()
        return read_pointer()

    polls = 0

    async def stop_after_six_polls(seconds: float) -> None:
        nonlocal polls
        polls += 1
        if polls > 6:
            raise asyncio.CancelledError

    monkeypatch.setattr(registry, "current_version", pointer)
    monkeypatch.setattr(asyncio, "sleep", stop_after_six_polls)
    with caplog.at_level(logging.INFO), pytest.raises(asyncio.CancelledError):
        await classifier.watch(1)
    first = "[Errno 13] Permission denied" if pointer_fails_first else "[Errno 5] Input/output"
    logger = "routecache.classifier.reloading"
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(messages) == 3, messages
    assert messages[0].startswith(f"classifier registry could not be read ({first}")
    assert messages[1:] == ["classifier swapped: v1 -> v2", "classifier registry readable again"]
    assert not failures and classifier.version == "v2"


def test_an_added_version_is_on_disk_whole_before_it_can_be_promoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A synced CURRENT naming a version whose files or folder entry were still in the page
    # cache: after a power loss the service would find the version in service empty or gone.
    registry = _registry_with(tmp_path, "v1")
    source = _artifact(tmp_path / "src-v2", 0.2)
    folder = registry.artifact_path("v2").parent
    in_place = record_fsyncs(monkeypatch, folder)
    synced = record_synced(monkeypatch)
    registry.add(source, "v2")
    # Both files, then the staging folder (their names), then, once renamed into place, the
    # versions folder (its entry).
    assert [s.st_ino for s in synced] == [
        (folder / name).stat().st_ino
        for name in ("difficulty.skops", "difficulty.json", ".", "..")
    ]  # fmt: skip
    assert in_place == [(False, False), (False, False), (True, False), (True, True)]


def test_a_promotion_expecting_another_version_in_service_is_refused(tmp_path: Path) -> None:
    # A retrain compares with the version in service, then promotes: a promotion or rollback
    # in between was overridden by a candidate never compared with what then served.
    registry = _registry_with(tmp_path, "v1", "v2", "v3")
    with pytest.raises(RegistryError, match=r"CURRENT names no version, expected v0"):
        registry.promote("v1", expected_current="v0")
    registry.promote("v1", expected_current=None)
    registry.promote("v2", expected_current="v1")
    with pytest.raises(RegistryError, match=r"CURRENT names v2, expected v1"):
        registry.promote("v3", expected_current="v1")
    assert registry.current_version() == "v2"
    assert [c.version for c in registry.history()] == ["v1", "v2"]  # the refusal logs nothing
    registry.promote("v3")  # without an expectation, as the CLI promotes
    assert registry.current_version() == "v3"

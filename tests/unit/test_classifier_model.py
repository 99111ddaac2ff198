"""Features, the sklearn classifier, its artifact (save/load, refusals) and the test double."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.classifier.features import (
    TEXT_FEATURE_NAMES,
    feature_matrix,
    feature_names,
    text_features,
)
from routecache.classifier.model import (
    ClassifierArtifactError,
    FixedScoreClassifier,
    SklearnDifficultyClassifier,
    load_artifact,
    load_classifier,
    save_artifact,
)
from routecache.classifier.ports import DifficultyClassifier
from routecache.training.train_classifier import fit_pipeline

MMLU_PROMPT = "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
GSM_PROMPT = "Tom has 3 apples and buys 12 more at $2 each. How many apples does he have?"
EMBEDDER = HashEmbedder(32)


def _prompts(n: int = 60) -> tuple[list[str], np.ndarray]:
    hard = np.arange(n) % 2 == 0
    prompts = [
        f"{'prove the theorem about integrals' if h else 'count the apples'} case {i}"
        for i, h in enumerate(hard)
    ]
    return prompts, hard


def _metadata(threshold: float = 0.4) -> dict[str, Any]:
    return {
        "version": "difficulty-test",
        "created_utc": "2024-01-01T00:00:00+00:00",
        "training_data_sha256": "0" * 64,
        "n_train": 60,
        "embedder": EMBEDDER.name,
        "embedding_dimension": EMBEDDER.dimension,
        "feature_names": feature_names(EMBEDDER.dimension),
        "default_threshold": threshold,
        "holdout": {"apgr": 0.6},
    }


@pytest.fixture(scope="module")
def trained() -> Pipeline:
    prompts, hard = _prompts()
    return fit_pipeline(feature_matrix(EMBEDDER.encode(prompts), prompts), hard, c=1.0, seed=0)


def test_text_features_see_the_shape_of_the_prompt() -> None:
    mmlu, gsm = text_features(MMLU_PROMPT), text_features(GSM_PROMPT)
    names = list(TEXT_FEATURE_NAMES)
    assert mmlu.shape == gsm.shape == (len(names),)
    assert mmlu[names.index("multiple_choice")] == 1.0
    assert gsm[names.index("multiple_choice")] == 0.0
    assert gsm[names.index("log_numbers")] == pytest.approx(np.log1p(3))
    assert mmlu[names.index("log_lines")] == pytest.approx(np.log1p(6))
    assert np.isfinite(text_features("")).all()


def test_feature_matrix_appends_text_features_to_embeddings() -> None:
    texts = [MMLU_PROMPT, GSM_PROMPT]
    embeddings = EMBEDDER.encode(texts)
    matrix = feature_matrix(embeddings, texts)
    assert matrix.shape == (2, EMBEDDER.dimension + len(TEXT_FEATURE_NAMES))
    np.testing.assert_allclose(matrix[1, EMBEDDER.dimension :], text_features(GSM_PROMPT))
    with pytest.raises(ValueError, match="do not match"):
        feature_matrix(embeddings, texts[:1])


def test_fast_scoring_equals_the_pipeline(trained: Pipeline) -> None:
    classifier = SklearnDifficultyClassifier(trained, "v", 0.5)
    texts = [MMLU_PROMPT, GSM_PROMPT, *(_prompts(6)[0])]
    embeddings = EMBEDDER.encode(texts)
    expected = trained.predict_proba(feature_matrix(embeddings, texts))[:, 1]
    got = [classifier.failure_probability(e, t) for e, t in zip(embeddings, texts, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    hard, easy = _prompts(2)[0]
    assert classifier.failure_probability(EMBEDDER.encode([hard])[0], hard) > 0.5
    assert classifier.failure_probability(EMBEDDER.encode([easy])[0], easy) < 0.5


def test_strong_regularisation_is_recalibrated_to_probabilities() -> None:
    # At C = 1e-6 the raw logistic regression predicts about the base rate (0.5) for every
    # prompt; the Platt step must spread the probabilities out again, keeping the ranking.
    prompts, hard = _prompts()
    pipeline = fit_pipeline(feature_matrix(EMBEDDER.encode(prompts), prompts), hard, 1e-6, 0)
    classifier = SklearnDifficultyClassifier(pipeline, "v", 0.5)
    embeddings = EMBEDDER.encode(prompts)
    scores = np.array(
        [classifier.failure_probability(e, t) for e, t in zip(embeddings, prompts, strict=True)]
    )
    assert scores[hard].min() > 0.7 and scores[~hard].max() < 0.3


def test_scoring_refuses_an_embedding_of_the_wrong_size(trained: Pipeline) -> None:
    classifier = SklearnDifficultyClassifier(trained, "v", 0.5)
    with pytest.raises(ValueError, match="32-d"):
        classifier.failure_probability(np.zeros(384, dtype=np.float32), "hi")


def test_round_trip_gives_identical_scores(trained: Pipeline, tmp_path: Path) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(0.37), tmp_path, "rt")
    assert (model_path.name, metadata_path.name) == ("rt.skops", "rt.json")
    loaded = load_artifact(model_path)
    original = SklearnDifficultyClassifier(trained, "v", 0.5)
    assert loaded.version == "difficulty-test"
    assert loaded.default_threshold == pytest.approx(0.37)
    assert loaded.metadata["holdout"] == {"apgr": 0.6}
    for text in (MMLU_PROMPT, GSM_PROMPT):
        embedding = EMBEDDER.encode([text])[0]
        assert loaded.failure_probability(embedding, text) == original.failure_probability(
            embedding, text
        )


class _Passthrough(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    def fit(self, x: Any, y: Any = None) -> _Passthrough:
        return self

    def transform(self, x: Any) -> Any:
        return x


def test_untrusted_types_are_refused(trained: Pipeline, tmp_path: Path) -> None:
    custom = Pipeline([("odd", _Passthrough()), ("model", trained.named_steps["model"])])
    save_artifact(custom, _metadata(), tmp_path, "evil")
    with pytest.raises(ClassifierArtifactError, match=r"untrusted types.*_Passthrough"):
        load_artifact(tmp_path / "evil.skops")


def test_steps_outside_the_allowlist_are_refused(tmp_path: Path) -> None:
    prompts, hard = _prompts()
    x = feature_matrix(EMBEDDER.encode(prompts), prompts)
    pipeline = Pipeline([("f", FunctionTransformer(np.abs)), ("m", LogisticRegression())])
    save_artifact(pipeline.fit(x, hard.astype(int)), _metadata(), tmp_path, "odd")
    with pytest.raises(ClassifierArtifactError, match="allowed steps"):
        load_artifact(tmp_path / "odd.skops")


def test_missing_or_mismatched_files_are_reported(trained: Pipeline, tmp_path: Path) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "a")
    other = Pipeline([("s", StandardScaler()), ("m", trained.named_steps["model"])])
    other_path, _ = save_artifact(
        other.fit(np.eye(39), np.arange(39) % 2), _metadata(), tmp_path, "b"
    )
    metadata_path.rename(tmp_path / "kept.json")
    with pytest.raises(ClassifierArtifactError, match=r"a\.json is missing"):
        load_artifact(model_path)
    (tmp_path / "kept.json").rename(metadata_path)
    model_path.write_bytes(other_path.read_bytes())
    with pytest.raises(ClassifierArtifactError, match="SHA-256 differs"):
        load_artifact(model_path)
    with pytest.raises(ClassifierArtifactError, match="missing"):
        load_artifact(tmp_path / "nothing.skops")


def test_incomplete_or_stale_metadata_is_reported(trained: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="default_threshold"):
        save_artifact(trained, {"version": "x"}, tmp_path, "bad")
    _, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    record = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**record, "feature_names": ["x"] * 39}))
    with pytest.raises(ClassifierArtifactError, match="other features"):
        load_artifact(metadata_path)
    del record["default_threshold"]
    metadata_path.write_text(json.dumps(record))
    with pytest.raises(ClassifierArtifactError, match=r"lacks.*default_threshold"):
        load_artifact(metadata_path)


def test_fixed_score_classifier() -> None:
    double: DifficultyClassifier = FixedScoreClassifier(0.2, by_text={"hard": 0.9})
    vector = np.zeros(4, dtype=np.float32)
    assert double.failure_probability(vector, "easy") == 0.2
    assert double.failure_probability(vector, "hard") == 0.9
    assert (double.version, double.default_threshold) == ("fixed", 0.5)
    with pytest.raises(ValueError):
        FixedScoreClassifier(1.5)


def test_packaged_artifact_scores_a_real_request_quickly() -> None:
    classifier = load_classifier()
    assert classifier.version == classifier.metadata["version"]
    assert classifier.version.startswith("difficulty-")
    assert 0.0 < classifier.default_threshold < 1.0
    embedder = MiniLMEmbedder()
    assert classifier.metadata["embedder"] == embedder.name
    embedding = embedder.encode([GSM_PROMPT])[0]
    probability = classifier.failure_probability(embedding, GSM_PROMPT)
    assert 0.0 <= probability <= 1.0
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        classifier.failure_probability(embedding, GSM_PROMPT)
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 1e-3  # measured ~15 µs; the budget is well under 1 ms

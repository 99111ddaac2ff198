"""The difficulty classifier: a scikit-learn model and its artifact (NAME.skops + NAME.json).

The model predicts P(the cheap model's answer is wrong) from `features.feature_matrix`. The
artifact's metadata pins what the model was trained with (embedder, feature names) and the
SHA-256 of the .skops file, so a stale or mixed-up pair fails at start, not silently in service.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import skops.io
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from routecache.classifier.features import TEXT_FEATURE_NAMES, feature_names, text_features

ARTIFACT_FORMAT = 1
DEFAULT_ARTIFACT_NAME = "difficulty"

# Types outside skops' default-trusted set that an artifact may contain. Anything else that
# skops reports as untrusted is refused: loading it could run arbitrary code.
TRUSTED_EXTRA_TYPES: frozenset[str] = frozenset()
# Pipeline steps a loaded artifact may consist of (checked after loading, on top of skops).
_ALLOWED_STEPS: tuple[type, ...] = (StandardScaler, LogisticRegression)

REQUIRED_METADATA: tuple[str, ...] = (
    "version",
    "created_utc",
    "training_data_sha256",
    "n_train",
    "embedder",
    "embedding_dimension",
    "feature_names",
    "default_threshold",
    "holdout",
)


Weights = npt.NDArray[np.float64]


class ClassifierArtifactError(Exception):
    """A classifier artifact is missing, mismatched, untrusted or not what this code expects."""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _failure_column(classes: Any) -> int:
    labels = [int(c) for c in classes]
    if sorted(labels) != [0, 1]:
        raise ClassifierArtifactError(f"expected binary labels 0/1 (1 = cheap fails), got {labels}")
    return labels.index(1)


class SklearnDifficultyClassifier:
    """Scores one request from its (already computed) embedding and its text.

    A scaler + logistic regression is folded into one weight vector at construction: the
    pipeline's predict_proba costs ~0.2 ms of input validation per call, the dot product ~10 µs.
    Other pipelines fall back to predict_proba.
    """

    def __init__(
        self,
        pipeline: Any,
        version: str,
        default_threshold: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= default_threshold <= 1.0:
            raise ValueError(f"default_threshold must lie in [0, 1], got {default_threshold}")
        self._pipeline = pipeline
        self._version = version
        self._threshold = float(default_threshold)
        self._metadata = dict(metadata or {})
        self._dimension = int(pipeline.n_features_in_) - len(TEXT_FEATURE_NAMES)
        self._column = _failure_column(pipeline.classes_)
        self._linear = self._fold_linear(pipeline)

    def _fold_linear(self, pipeline: Any) -> tuple[Weights, Weights, float] | None:
        """(embedding weights, text-feature weights, bias) of the whole pipeline, if linear."""
        steps = [step for _, step in getattr(pipeline, "steps", [])]
        if len(steps) != 2 or not isinstance(steps[0], StandardScaler):
            return None
        if not isinstance(steps[1], LogisticRegression) or steps[1].coef_.shape[0] != 1:
            return None
        scaler, regression = steps
        weights = regression.coef_[0].astype(np.float64)
        bias = float(regression.intercept_[0])
        if scaler.scale_ is not None:
            weights = weights / scaler.scale_
        if scaler.mean_ is not None:
            bias -= float(weights @ scaler.mean_)
        # sklearn sorts classes_, so the logit is that of label 1 (cheap fails).
        return weights[: self._dimension], weights[self._dimension :], bias

    @property
    def version(self) -> str:
        return self._version

    @property
    def default_threshold(self) -> float:
        return self._threshold

    @property
    def embedding_dimension(self) -> int:
        return self._dimension

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def pipeline(self) -> Any:
        return self._pipeline

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float:
        vector = np.asarray(embedding).reshape(-1)
        if vector.shape[0] != self._dimension:
            raise ValueError(
                f"classifier {self._version} expects {self._dimension}-d embeddings, "
                f"got {vector.shape[0]}"
            )
        extra = text_features(text)
        if self._linear is not None:
            embedding_weights, text_weights, bias = self._linear
            return _sigmoid(float(vector @ embedding_weights) + float(extra @ text_weights) + bias)
        row = np.concatenate([vector.astype(np.float64), extra])[np.newaxis, :]
        return float(self._pipeline.predict_proba(row)[0, self._column])


class FixedScoreClassifier:
    """Test double: the same score for every request, or a per-text score where one is given."""

    def __init__(
        self,
        score: float,
        version: str = "fixed",
        default_threshold: float = 0.5,
        by_text: Mapping[str, float] | None = None,
    ) -> None:
        scores = [score, default_threshold, *(by_text or {}).values()]
        if any(not 0.0 <= s <= 1.0 for s in scores):
            raise ValueError("scores and threshold must lie in [0, 1]")
        self._score = score
        self._version = version
        self._threshold = default_threshold
        self._by_text = dict(by_text or {})

    @property
    def version(self) -> str:
        return self._version

    @property
    def default_threshold(self) -> float:
        return self._threshold

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float:
        return self._by_text.get(text, self._score)


def packaged_artifact_path(name: str = DEFAULT_ARTIFACT_NAME) -> Path:
    """The .skops file shipped in routecache/classifier/artifacts/."""
    return Path(str(files("routecache.classifier").joinpath("artifacts", f"{name}.skops")))


def _artifact_paths(path: Path) -> tuple[Path, Path]:
    base = path.with_suffix("") if path.suffix in (".skops", ".json") else path
    return base.with_name(base.name + ".skops"), base.with_name(base.name + ".json")


def save_artifact(
    model: Any, metadata: Mapping[str, Any], directory: Path, name: str
) -> tuple[Path, Path]:
    """Write NAME.skops and NAME.json (with the .skops SHA-256); returns both paths."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}")
    directory.mkdir(parents=True, exist_ok=True)
    model_path, metadata_path = _artifact_paths(directory / name)
    data = skops.io.dumps(model)
    record = {
        **metadata,
        "format": ARTIFACT_FORMAT,
        "artifact_file": model_path.name,
        "artifact_sha256": hashlib.sha256(data).hexdigest(),
    }
    # Write then rename, so a service starting meanwhile never reads half a file.
    for path, content in ((model_path, data), (metadata_path, _json_bytes(record))):
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(content)
        os.replace(partial, path)
    return model_path, metadata_path


def _json_bytes(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _read_metadata(model_path: Path, metadata_path: Path) -> tuple[bytes, dict[str, Any]]:
    for path in (model_path, metadata_path):
        if not path.is_file():
            raise ClassifierArtifactError(f"classifier artifact file {path} is missing")
    data = model_path.read_bytes()
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as exc:
        raise ClassifierArtifactError(f"{metadata_path} is not valid JSON: {exc}") from exc
    missing = [key for key in (*REQUIRED_METADATA, "artifact_sha256") if key not in metadata]
    if missing:
        raise ClassifierArtifactError(f"{metadata_path} lacks {missing}")
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise ClassifierArtifactError(
            f"{metadata_path} has format {metadata.get('format')}, expected {ARTIFACT_FORMAT}"
        )
    if hashlib.sha256(data).hexdigest() != metadata["artifact_sha256"]:
        raise ClassifierArtifactError(
            f"{model_path} does not match {metadata_path} (SHA-256 differs): "
            "the two files come from different training runs"
        )
    return data, metadata


def _check_model(model: Any, metadata: Mapping[str, Any], model_path: Path) -> None:
    steps = [step for _, step in getattr(model, "steps", [])]
    if not isinstance(model, Pipeline) or not all(isinstance(s, _ALLOWED_STEPS) for s in steps):
        raise ClassifierArtifactError(
            f"{model_path} holds {type(model).__name__} with steps "
            f"{[type(s).__name__ for s in steps]}; allowed steps: "
            f"{[t.__name__ for t in _ALLOWED_STEPS]}"
        )
    expected = feature_names(int(metadata["embedding_dimension"]))
    if list(metadata["feature_names"]) != expected or model.n_features_in_ != len(expected):
        raise ClassifierArtifactError(
            f"{model_path} was trained on other features than this code computes; retrain it"
        )


def load_artifact(path: Path) -> SklearnDifficultyClassifier:
    """Load NAME.skops with its NAME.json, refusing types outside skops' defaults + allowlist."""
    model_path, metadata_path = _artifact_paths(Path(path))
    data, metadata = _read_metadata(model_path, metadata_path)
    untrusted = skops.io.get_untrusted_types(data=data)
    refused = sorted(set(untrusted) - TRUSTED_EXTRA_TYPES)
    if refused:
        raise ClassifierArtifactError(f"{model_path} contains untrusted types {refused}")
    model = skops.io.loads(data, trusted=list(untrusted))
    _check_model(model, metadata, model_path)
    return SklearnDifficultyClassifier(
        model,
        version=str(metadata["version"]),
        default_threshold=float(metadata["default_threshold"]),
        metadata=metadata,
    )


def load_classifier(path: Path | None = None) -> SklearnDifficultyClassifier:
    """The classifier at `path`, or the packaged one (ClassifierSettings.artifact semantics)."""
    return load_artifact(path if path is not None else packaged_artifact_path())

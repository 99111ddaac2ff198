"""The difficulty classifier: neighbour features + two calibrated heads, as NAME.skops + NAME.json.

Features of a request: outcome rates of its nearest labelled prompts (neighbours.py) plus cheap
text features (features.py). Two logistic heads give P(cheap model fails) and P(strong model
fails); the request's routing score is their difference, the accuracy expected to be gained by
sending it strong. Routing on that gain rather than on P(cheap fails) alone keeps prompts that
both models get wrong on the cheap model: in 5-fold CV on routing_train it lifted APGR from
0.61 to 0.69 (docs/classifier.md).

The .skops file holds a plain dict of numpy arrays and two sklearn pipelines (no custom types,
so skops' default trust list suffices); NAME.json pins the embedder, the feature names, the
held-out operating curve and the SHA-256 of the .skops file, so a stale or mixed-up pair fails
at start, not silently in service.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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

from routecache.atomic_file import replacing_bytes
from routecache.classifier.features import TEXT_FEATURE_NAMES, text_features
from routecache.classifier.neighbours import NeighbourBank, neighbour_feature_names
from routecache.classifier.operating_point import OperatingCurve
from routecache.classifier.ports import Assessment
from routecache.domain import OperatingPoint

ARTIFACT_FORMAT = 2
DEFAULT_ARTIFACT_NAME = "difficulty"
HEADS: tuple[str, ...] = ("cheap_fails", "strong_fails")

# Types outside skops' default-trusted set that an artifact may contain. Anything else that
# skops reports as untrusted is refused: loading it could run arbitrary code.
TRUSTED_EXTRA_TYPES: frozenset[str] = frozenset()
# Pipeline steps a loaded head may consist of (checked after loading, on top of skops).
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


def feature_names() -> list[str]:
    """Column names of `DifficultyModel.features`, recorded with a model to detect drift."""
    return neighbour_feature_names() + list(TEXT_FEATURE_NAMES)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _fold_linear(head: Any) -> tuple[Weights, float]:
    """(weights, bias) of a StandardScaler + binary LogisticRegression pipeline.

    The pipeline's predict_proba costs ~0.2 ms of input validation per call, the folded dot
    product a few µs. sklearn sorts classes_, so the logit is that of label 1 (the model fails).
    """
    steps = [step for _, step in getattr(head, "steps", [])]
    if len(steps) != 2 or not isinstance(steps[0], StandardScaler):
        raise ClassifierArtifactError(f"a head must be StandardScaler + LogisticRegression: {head}")
    scaler, regression = steps
    classes = getattr(regression, "classes_", None)  # None: a head saved before fitting
    if (
        not isinstance(regression, LogisticRegression)
        or classes is None
        or [int(c) for c in classes] != [0, 1]
    ):
        raise ClassifierArtifactError(
            "a head must be a fitted binary LogisticRegression on labels 0/1"
        )
    weights = regression.coef_[0].astype(np.float64)
    bias = float(regression.intercept_[0])
    if scaler.scale_ is not None:
        weights = weights / scaler.scale_
    if scaler.mean_ is not None:
        bias -= float(weights @ scaler.mean_)
    return weights, bias


class DifficultyModel:
    """The fitted parts: the neighbour bank and one head per label in HEADS."""

    def __init__(self, bank: NeighbourBank, heads: Mapping[str, Any]) -> None:
        if sorted(heads) != sorted(HEADS):
            raise ClassifierArtifactError(f"expected heads {list(HEADS)}, got {sorted(heads)}")
        self.bank = bank
        self.heads = dict(heads)
        self._linear = {name: _fold_linear(head) for name, head in self.heads.items()}
        width = len(feature_names())
        for name, (weights, _) in self._linear.items():
            if weights.shape[0] != width:
                raise ClassifierArtifactError(
                    f"head {name} takes {weights.shape[0]} features, this code computes {width}"
                )

    def features(self, embedding: npt.NDArray[np.floating], text: str) -> Weights:
        return np.concatenate([self.bank.features(embedding), text_features(text)])

    def probabilities(self, features: Weights) -> tuple[float, float]:
        """(P(cheap fails), P(strong fails)) from one feature row."""
        cheap_w, cheap_b = self._linear["cheap_fails"]
        strong_w, strong_b = self._linear["strong_fails"]
        return (
            _sigmoid(float(features @ cheap_w) + cheap_b),
            _sigmoid(float(features @ strong_w) + strong_b),
        )

    def to_payload(self) -> dict[str, Any]:
        return {"bank": self.bank.to_payload(), "heads": self.heads}

    @classmethod
    def from_payload(cls, payload: Any) -> DifficultyModel:
        if (
            not isinstance(payload, dict)
            or set(payload) != {"bank", "heads"}
            or not isinstance(payload["heads"], dict)
        ):
            raise ClassifierArtifactError("the artifact does not hold a bank and heads")
        for name, head in payload["heads"].items():
            steps = [step for _, step in getattr(head, "steps", [])]
            if not isinstance(head, Pipeline) or not all(
                isinstance(s, _ALLOWED_STEPS) for s in steps
            ):
                raise ClassifierArtifactError(
                    f"head {name} holds {type(head).__name__} with steps "
                    f"{[type(s).__name__ for s in steps]}; allowed steps: "
                    f"{[t.__name__ for t in _ALLOWED_STEPS]}"
                )
        try:
            bank = NeighbourBank.from_payload(payload["bank"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ClassifierArtifactError(
                f"the artifact's neighbour bank is unusable: {exc}"
            ) from exc
        return cls(bank, payload["heads"])


class SklearnDifficultyClassifier:
    """Scores one request from its (already computed) embedding and its text."""

    def __init__(
        self,
        model: DifficultyModel,
        version: str,
        default_threshold: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not -1.0 <= default_threshold <= 1.0:
            raise ValueError(f"default_threshold must lie in [-1, 1], got {default_threshold}")
        self._model = model
        self._version = version
        self._threshold = float(default_threshold)
        self._metadata = dict(metadata or {})
        curve = self._metadata.get("operating_curve")
        self._curve = OperatingCurve.from_json(curve) if curve else None

    @property
    def version(self) -> str:
        return self._version

    @property
    def default_threshold(self) -> float:
        return self._threshold

    @property
    def embedding_dimension(self) -> int:
        return self._model.bank.input_dimension

    @property
    def embedder(self) -> str | None:
        name = self._metadata.get("embedder")
        return None if name is None else str(name)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def model(self) -> DifficultyModel:
        return self._model

    def threshold_for(self, point: OperatingPoint) -> float:
        # Without a curve (a hand-built model) the stored threshold is the best answer we have;
        # refusing would fail every request of the tenant.
        return self._threshold if self._curve is None else self._curve.threshold_for(point)

    def assess(self, embedding: npt.NDArray[np.float32], text: str) -> Assessment:
        vector = np.asarray(embedding).reshape(-1)
        if vector.shape[0] != self.embedding_dimension:
            raise ValueError(
                f"classifier {self._version} expects {self.embedding_dimension}-d embeddings, "
                f"got {vector.shape[0]}"
            )
        cheap, strong = self._model.probabilities(self._model.features(vector, text))
        return Assessment(failure_probability=cheap, routing_score=cheap - strong)

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float:
        return self.assess(embedding, text).failure_probability


class FixedScoreClassifier:
    """Test double: the same score for every request, or a per-text score where one is given."""

    def __init__(
        self,
        score: float,
        version: str = "fixed",
        default_threshold: float = 0.5,
        by_text: Mapping[str, float] | None = None,
        curve: OperatingCurve | None = None,
    ) -> None:
        scores = [score, default_threshold, *(by_text or {}).values()]
        if any(not 0.0 <= s <= 1.0 for s in scores):
            raise ValueError("scores and threshold must lie in [0, 1]")
        self._score = score
        self._version = version
        self._threshold = default_threshold
        self._by_text = dict(by_text or {})
        self._curve = curve

    def threshold_for(self, point: OperatingPoint) -> float:
        return self._threshold if self._curve is None else self._curve.threshold_for(point)

    @property
    def version(self) -> str:
        return self._version

    @property
    def default_threshold(self) -> float:
        return self._threshold

    @property
    def embedder(self) -> str | None:
        return None

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float:
        return self._by_text.get(text, self._score)

    def assess(self, embedding: npt.NDArray[np.float32], text: str) -> Assessment:
        # The fake routes on its failure probability, so tests set one number per request.
        score = self.failure_probability(embedding, text)
        return Assessment(failure_probability=score, routing_score=score)


def packaged_artifact_path(name: str = DEFAULT_ARTIFACT_NAME) -> Path:
    """The .skops file shipped in routecache/classifier/artifacts/."""
    return Path(str(files("routecache.classifier").joinpath("artifacts", f"{name}.skops")))


def _artifact_paths(path: Path) -> tuple[Path, Path]:
    base = path.with_suffix("") if path.suffix in (".skops", ".json") else path
    return base.with_name(base.name + ".skops"), base.with_name(base.name + ".json")


def save_artifact(
    model: DifficultyModel, metadata: Mapping[str, Any], directory: Path, name: str
) -> tuple[Path, Path]:
    """Write NAME.skops and NAME.json (with the .skops SHA-256); returns both paths.

    Two files cannot be replaced together, and a reader seeing the new .skops beside the old
    .json (a crash between the two, a service starting meanwhile) could load neither. So the
    .json is the commit point: the new model first goes to a file of its own, .NAME.SHA.skops,
    which a new .json names; only then is NAME.skops replaced, and a last .json names it again.
    Each file is replaced whole and synced, so at every step the .json names a whole file with
    its checksum: the old pair or the new one loads, even after a power loss.
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}")
    directory.mkdir(parents=True, exist_ok=True)
    model_path, metadata_path = _artifact_paths(directory / name)
    data = skops.io.dumps(model.to_payload())
    digest = hashlib.sha256(data).hexdigest()
    staged = model_path.with_name(f".{model_path.stem}.{digest}.skops")
    record = {**metadata, "format": ARTIFACT_FORMAT, "artifact_sha256": digest}
    for path, content in (
        (staged, data),
        (metadata_path, _json_bytes({**record, "artifact_file": staged.name})),
        (model_path, data),
        (metadata_path, _json_bytes({**record, "artifact_file": model_path.name})),
    ):
        with replacing_bytes(path) as out:
            out.write(content)
    # This save's staged copy, and any a crashed save left: every one the .json does not name
    # now. A concurrent save of this NAME may have staged its own and named it since (its
    # commit point): removed, that pair would load no model until that save went on.
    named = _named_file(metadata_path)
    for stray in _staged_copies(model_path):
        if stray.name != named:
            stray.unlink(missing_ok=True)
    return model_path, metadata_path


def _named_file(metadata_path: Path) -> object:
    """The `artifact_file` the .json at `metadata_path` names now, or None if it names none
    that can be read."""
    try:
        record = json.loads(metadata_path.read_bytes())
    except (OSError, ValueError):  # gone, or damaged (a JSONDecodeError is a ValueError)
        return None
    return record.get("artifact_file") if isinstance(record, dict) else None


def artifact_pair(path: Path, name: str) -> tuple[bytes, bytes]:
    """The pair at `path` as it loads, to publish elsewhere as NAME.skops and NAME.json: the
    model bytes its .json names (NAME.skops, or the staged copy of a save that stopped before
    replacing it), checked against the .json's SHA-256, and that .json naming NAME.skops.
    ClassifierArtifactError for a pair that would not load so (missing, mismatched)."""
    data, metadata = _read_metadata(*_artifact_paths(Path(path)))
    return data, _json_bytes({**metadata, "artifact_file": f"{name}.skops"})


def _is_staged_copy(model_path: Path, name: object) -> bool:
    """Whether `name` is that of a staged copy of NAME.skops: .NAME.SHA-256.skops."""
    prefix, suffix = f".{model_path.stem}.", ".skops"
    if not isinstance(name, str) or not name.startswith(prefix) or not name.endswith(suffix):
        return False
    digest = name[len(prefix) : -len(suffix)]
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _staged_copies(model_path: Path) -> list[Path]:
    return [p for p in model_path.parent.iterdir() if _is_staged_copy(model_path, p.name)]


def _json_bytes(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _read_metadata(model_path: Path, metadata_path: Path) -> tuple[bytes, dict[str, Any]]:
    # Read a second time when the checksum differs: a save may have moved on between reading
    # the .json and the .skops (save_artifact keeps each of its steps a matching pair).
    for _ in range(2):  # each read hashed once: the model file is megabytes
        data, metadata = _read_pair(model_path, metadata_path)
        if hashlib.sha256(data).hexdigest() == metadata["artifact_sha256"]:
            return data, metadata
    raise ClassifierArtifactError(
        f"{model_path} does not match {metadata_path} (SHA-256 differs): "
        "the two files come from different training runs"
    )


def _read_pair(model_path: Path, metadata_path: Path) -> tuple[bytes, dict[str, Any]]:
    """The .json, then the model file it names: NAME.skops, or the staged copy of a save that
    stopped before replacing NAME.skops (a copy or a registry version may name a file that is
    not beside it, from where it was saved: then NAME.skops)."""
    for path in (model_path, metadata_path):
        if not path.is_file():
            raise ClassifierArtifactError(f"classifier artifact file {path} is missing")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    # ValueError: JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits;
    # RecursionError: arrays or objects nested too deep. All a damaged file, not a crash.
    except (ValueError, RecursionError) as exc:
        raise ClassifierArtifactError(f"{metadata_path} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ClassifierArtifactError(f"{metadata_path} is not a JSON object")
    missing = [key for key in (*REQUIRED_METADATA, "artifact_sha256") if key not in metadata]
    if missing:
        raise ClassifierArtifactError(f"{metadata_path} lacks {missing}")
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise ClassifierArtifactError(
            f"{metadata_path} has format {metadata.get('format')}, expected {ARTIFACT_FORMAT}"
        )
    named = metadata.get("artifact_file")
    if _is_staged_copy(model_path, named):  # a name of that form only: never a path
        with contextlib.suppress(FileNotFoundError):  # the save finished: NAME.skops is new
            return model_path.with_name(str(named)).read_bytes(), metadata
    return model_path.read_bytes(), metadata


def _check_metadata(metadata: Mapping[str, Any], model: DifficultyModel, path: Path) -> None:
    expected = feature_names()
    dimension = int(metadata["embedding_dimension"])
    if list(metadata["feature_names"]) != expected or model.bank.input_dimension != dimension:
        raise ClassifierArtifactError(
            f"{path} was trained on other features than this code computes; retrain it"
        )


def load_artifact(path: Path) -> SklearnDifficultyClassifier:
    """Load NAME.skops with its NAME.json, refusing types outside skops' defaults + allowlist."""
    model_path, metadata_path = _artifact_paths(Path(path))
    data, metadata = _read_metadata(model_path, metadata_path)
    untrusted = skops.io.get_untrusted_types(data=data)
    refused = sorted(set(untrusted) - TRUSTED_EXTRA_TYPES)
    if refused:
        raise ClassifierArtifactError(f"{model_path} contains untrusted types {refused}")
    model = DifficultyModel.from_payload(skops.io.loads(data, trusted=list(untrusted)))
    # The checksum covers the .skops file only: a hand-edited NAME.json may hold values of the
    # wrong type or range, which callers must see as a broken artifact, not as a traceback.
    try:
        _check_metadata(metadata, model, model_path)
        return SklearnDifficultyClassifier(
            model,
            version=str(metadata["version"]),
            default_threshold=float(metadata["default_threshold"]),
            metadata=metadata,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # int(Infinity), float(10**400)
        raise ClassifierArtifactError(f"{metadata_path} holds an unusable value: {exc}") from exc


def load_classifier(path: Path | None = None) -> SklearnDifficultyClassifier:
    """The classifier at `path`, or the packaged one (ClassifierSettings.artifact semantics)."""
    return load_artifact(path if path is not None else packaged_artifact_path())

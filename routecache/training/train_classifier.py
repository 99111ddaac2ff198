"""Train the difficulty classifier on routing data and save it as an artifact.

    routecache train-classifier --data routing_train.jsonl [--out DIR] [--name difficulty]

The label is "the cheap model failed" (not weak_correct). A deterministic slice of the data,
chosen by a hash of the prompt, is held out to measure the router and to pick the default
threshold (the score above which ~40% of requests go to the strong model). The shipped model
is the one fitted without the holdout, so the metrics stored with it describe it exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.ports import Embedder
from routecache.classifier import metrics
from routecache.classifier.features import feature_matrix, feature_names
from routecache.classifier.model import (
    DEFAULT_ARTIFACT_NAME,
    SklearnDifficultyClassifier,
    packaged_artifact_path,
    save_artifact,
)

TARGET_STRONG_FRACTION = 0.4
# 5-fold CV on routing_train: APGR rises as C falls from 1 (0.58) and flattens below 1e-4
# (0.60); 1e-4 sits on that plateau with the best-calibrated holdout probabilities.
DEFAULT_C = 1e-4
EMBED_BATCH = 64


@dataclass(frozen=True)
class RoutingRow:
    prompt: str
    source: str
    weak_correct: bool
    strong_correct: bool
    weak_response: str | None = None
    strong_response: str | None = None


def read_routing_rows(paths: Sequence[Path]) -> list[RoutingRow]:
    """Rows of the routing JSONL format (shared/data/README.md); `subject` is not kept."""
    rows: list[RoutingRow] = []
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    rows.append(
                        RoutingRow(
                            prompt=str(record["prompt"]),
                            source=str(record.get("source", "")),
                            weak_correct=bool(record["weak_correct"]),
                            strong_correct=bool(record["strong_correct"]),
                            weak_response=record.get("weak_response"),
                            strong_response=record.get("strong_response"),
                        )
                    )
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{number}: not a routing row ({exc})") from exc
    if not rows:
        raise ValueError(f"no routing rows in {[str(p) for p in paths]}")
    return rows


def files_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def holdout_mask(prompts: Sequence[str], fraction: float, seed: int) -> npt.NDArray[np.bool_]:
    """True for held-out prompts: a hash of seed and prompt, so duplicates stay together."""
    limit = fraction * 2**64
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") < limit
            for p in prompts
        ],
        dtype=bool,
    )


def make_embedder(kind: str, hash_dimension: int = 64) -> Embedder:
    return MiniLMEmbedder() if kind == "minilm" else HashEmbedder(hash_dimension)


def embed_texts(embedder: Embedder, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """Embed in batches of similar length: padding to the batch's longest text is the cost."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
    for start in range(0, len(order), EMBED_BATCH):
        batch = order[start : start + EMBED_BATCH]
        out[batch] = embedder.encode([texts[i] for i in batch])
    return out


def fit_pipeline(
    features: npt.NDArray[np.float64], failed: npt.NDArray[np.bool_], c: float, seed: int
) -> Pipeline:
    """Scaler + logistic regression, its output recalibrated to P(cheap fails)."""
    labels = failed.astype(np.int64)
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            ("model", LogisticRegression(C=c, max_iter=2000, random_state=seed)),
        ]
    )
    pipeline.fit(features, labels)
    _recalibrate(pipeline, features, labels, seed)
    return pipeline


def _recalibrate(
    pipeline: Pipeline, features: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], seed: int
) -> None:
    """Platt-scale the logits in place: p = sigmoid(a * logit + b), a > 0.

    Strong regularisation ranks prompts best but squeezes every probability toward the base
    rate, which would make a threshold meaningless as a probability. A 1-d logistic fit on
    cross-validated logits restores calibration; folded into coef_ and intercept_, the model
    stays one linear layer and its ranking is unchanged.
    """
    folds = min(5, int(np.bincount(labels, minlength=2).min()))
    if folds < 2:
        return  # too few rows of one class to cross-validate; keep the raw model
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    logits = cross_val_predict(
        clone(pipeline), features, labels, cv=splitter, method="decision_function"
    )
    platt = LogisticRegression(C=1e6).fit(logits[:, np.newaxis], labels)
    slope, offset = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    if slope <= 0:
        return  # no held-out signal to scale by; flipping the ranking would be wrong
    model = pipeline.named_steps["model"]
    model.coef_ = model.coef_ * slope
    model.intercept_ = model.intercept_ * slope + offset


def choose_threshold(scores: npt.NDArray[np.float64], strong_fraction: float) -> float:
    """Midway between the scores ranked k and k+1, so ~k of n go strong (score >= threshold)."""
    ranked = np.sort(scores)[::-1]
    k = min(max(round(strong_fraction * len(ranked)), 1), len(ranked) - 1)
    return float((ranked[k - 1] + ranked[k]) / 2)


def routing_report(
    scores: npt.NDArray[np.float64], rows: Sequence[RoutingRow], threshold: float
) -> dict[str, float | None]:
    weak = np.array([r.weak_correct for r in rows])
    strong = np.array([r.strong_correct for r in rows])
    return metrics.threshold_report(scores, weak, strong, threshold)


def score_rows(
    classifier: SklearnDifficultyClassifier,
    embeddings: npt.NDArray[np.float32],
    rows: Sequence[RoutingRow],
) -> npt.NDArray[np.float64]:
    """Scores through the service's own per-request code path."""
    return np.array(
        [classifier.failure_probability(e, r.prompt) for e, r in zip(embeddings, rows, strict=True)]
    )


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.holdout_fraction < 1.0:
        print("--holdout-fraction must lie strictly between 0 and 1", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.data]
    rows = read_routing_rows(paths)
    held = holdout_mask([r.prompt for r in rows], args.holdout_fraction, args.seed)
    train_rows = [r for r, h in zip(rows, held, strict=True) if not h]
    test_rows = [r for r, h in zip(rows, held, strict=True) if h]
    if len(test_rows) < 2 or len(train_rows) < 2:
        print("need at least 2 training and 2 held-out rows", file=sys.stderr)
        return 2

    started = time.perf_counter()
    embedder = make_embedder(args.embedder, args.hash_dimension)
    embeddings = embed_texts(embedder, [r.prompt for r in rows])
    embed_seconds = time.perf_counter() - started

    started = time.perf_counter()
    failed = np.array([not r.weak_correct for r in train_rows])
    if failed.all() or not failed.any():
        print("the training rows need both cheap-model successes and failures", file=sys.stderr)
        return 2
    x_train = feature_matrix(embeddings[~held], [r.prompt for r in train_rows])
    pipeline = fit_pipeline(x_train, failed, args.c, args.seed)
    fit_seconds = time.perf_counter() - started

    created = datetime.now(UTC).replace(microsecond=0)
    version = f"{args.name}-{created:%Y%m%dT%H%M%SZ}"
    provisional = SklearnDifficultyClassifier(pipeline, version=version, default_threshold=0.5)
    scores = score_rows(provisional, embeddings[held], test_rows)
    threshold = choose_threshold(scores, TARGET_STRONG_FRACTION)
    holdout = routing_report(scores, test_rows, threshold)
    metadata = {
        "version": version,
        "created_utc": created.isoformat(),
        "training_files": [p.name for p in paths],
        "training_data_sha256": files_sha256(paths),
        "n_train": len(train_rows),
        "n_holdout": len(test_rows),
        "holdout_fraction": args.holdout_fraction,
        "seed": args.seed,
        "label": "not weak_correct",
        "model": f"StandardScaler + LogisticRegression(C={args.c}), Platt-recalibrated",
        "embedder": embedder.name,
        "embedding_dimension": embedder.dimension,
        "feature_names": feature_names(embedder.dimension),
        "default_threshold": threshold,
        "target_strong_fraction": TARGET_STRONG_FRACTION,
        "holdout": holdout,
    }
    model_path, _ = save_artifact(pipeline, metadata, Path(args.out), args.name)
    summary = {
        "artifact": str(model_path),
        "version": version,
        "n_train": len(train_rows),
        "default_threshold": threshold,
        "embed_seconds": round(embed_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "holdout": holdout,
    }
    print(json.dumps(summary))
    return 0


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="routing data (repeatable)",
    )
    parser.add_argument(
        "--out",
        default=str(packaged_artifact_path().parent),
        help="artifact folder (default: the packaged artifacts folder)",
    )
    parser.add_argument("--name", default=DEFAULT_ARTIFACT_NAME, help="artifact base name")
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="share of prompts held out for metrics and the threshold",
    )
    parser.add_argument("--seed", type=int, default=0, help="salts the holdout hash")
    parser.add_argument(
        "--c",
        type=float,
        default=DEFAULT_C,
        help="inverse L2 regularisation strength of the logistic regression",
    )
    parser.add_argument(
        "--embedder",
        choices=["minilm", "hash"],
        default="minilm",
        help="minilm: the packaged all-MiniLM-L6-v2 (as in service); hash: tests",
    )
    parser.add_argument(
        "--hash-dimension", type=int, default=64, help="dimension of the hash embedder"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routecache train-classifier", description=__doc__)
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

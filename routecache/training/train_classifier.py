"""Train the difficulty classifier on routing data and save it as an artifact.

    routecache train-classifier --data routing_train.jsonl [--out DIR] [--name difficulty]

Labels per prompt: did the cheap model fail, did the strong model fail. A deterministic slice
of the data, chosen by a hash of the prompt, is held out: the model is fitted on the rest, then
scored on it through the service's own code to measure the router and to fit the operating
curve (operating_point.py) that maps an operator's target to a threshold. The default threshold
is the curve's answer to DEFAULT_OPERATING_POINT. The shipped model is the one fitted without
the holdout, so the metrics stored with it describe it exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.ports import Embedder
from routecache.classifier import metrics
from routecache.classifier.features import text_feature_matrix
from routecache.classifier.model import (
    DEFAULT_ARTIFACT_NAME,
    DifficultyModel,
    SklearnDifficultyClassifier,
    feature_names,
    packaged_artifact_path,
    save_artifact,
)
from routecache.classifier.neighbours import NeighbourBank, label_matrix
from routecache.classifier.operating_point import OperatingCurve, fit_curve
from routecache.cli_args import fraction, positive_int, positive_number, random_seed
from routecache.domain import OperatingPoint
from routecache.training.data_files import (
    distinct_files,
    exits_2_on_data_error,
    writable_folder,
)
from routecache.training.embedding_cache import EmbeddingCache
from routecache.training.routing_data import (
    RoutingRow,
    files_sha256,
    holdout_mask,
    outcomes,
    read_routing_rows,
    request_cost,
    require_both_sides,
)

# The cheapest point that recovers 80% of the strong model's accuracy gap on held-out data.
DEFAULT_OPERATING_POINT = OperatingPoint(quality=0.8)
# 5-fold CV on routing_train (docs/classifier.md): C = 0.01 ranked best of 0.001..0.1.
DEFAULT_C = 0.01
EMBED_BATCH = 64


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


def embed_prompts(
    embedder: Embedder, texts: Sequence[str], cache_path: Path | None
) -> npt.NDArray[np.float32]:
    """Embeddings of `texts`, through an EmbeddingCache file where one is given."""
    if cache_path is None:
        return embed_texts(embedder, texts)
    cache = EmbeddingCache(cache_path)
    return cache.embed(texts, lambda batch: embed_texts(embedder, batch), embedder.dimension)


@dataclass(frozen=True)
class LabelledSet:
    """Prompts with their labels; strong_fails is NaN where the strong outcome is unknown."""

    texts: list[str]
    embeddings: npt.NDArray[np.float32]
    cheap_fails: npt.NDArray[np.float64]
    strong_fails: npt.NDArray[np.float64]

    @classmethod
    def from_rows(
        cls, rows: Sequence[RoutingRow], embeddings: npt.NDArray[np.float32]
    ) -> LabelledSet:
        return cls(
            [r.prompt for r in rows],
            embeddings,
            np.array([not r.weak_correct for r in rows], dtype=np.float64),
            np.array([not r.strong_correct for r in rows], dtype=np.float64),
        )

    def __add__(self, other: LabelledSet) -> LabelledSet:
        return LabelledSet(
            self.texts + other.texts,
            np.vstack([self.embeddings, other.embeddings]),
            np.concatenate([self.cheap_fails, other.cheap_fails]),
            np.concatenate([self.strong_fails, other.strong_fails]),
        )


def _head(features: npt.NDArray[np.float64], labels: npt.NDArray[np.float64], c: float) -> Pipeline:
    classes = np.unique(labels)
    if len(classes) != 2:
        raise ValueError("each label needs both outcomes (0 and 1) among the training rows")
    head = Pipeline(
        [("scale", StandardScaler()), ("model", LogisticRegression(C=c, max_iter=3000))]
    )
    return head.fit(features, labels.astype(np.int64))


def fit_model(data: LabelledSet, c: float = DEFAULT_C, seed: int = 0) -> DifficultyModel:
    """The neighbour bank of every row, and two heads fitted on leave-one-out features.

    Leave-one-out makes a training row's neighbour features look like a new request's (whose
    own label is not in the bank); a row's twins (a prompt repeated in the data, or graded
    again in events, whatever its case, spacing or accents: the uncased MiniLM embeds them
    identically) are the same request and are left out with it. Rows without a
    strong outcome train only the cheap head.
    """
    bank = NeighbourBank.fit(
        data.embeddings, label_matrix(data.cheap_fails, data.strong_fails), seed
    )
    features = np.hstack(
        [
            bank.batch_features(data.embeddings, leave_one_out=True, texts=data.texts),
            text_feature_matrix(data.texts),
        ]
    )
    known = ~np.isnan(data.strong_fails)
    heads = {
        "cheap_fails": _head(features, data.cheap_fails, c),
        "strong_fails": _head(features[known], data.strong_fails[known], c),
    }
    return DifficultyModel(bank, heads)


def score_rows(
    classifier: SklearnDifficultyClassifier,
    embeddings: npt.NDArray[np.float32],
    rows: Sequence[RoutingRow],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(routing scores, P(cheap fails)) through the service's own per-request code path."""
    pairs = [classifier.assess(e, r.prompt) for e, r in zip(embeddings, rows, strict=True)]
    return (
        np.array([a.routing_score for a in pairs]),
        np.array([a.failure_probability for a in pairs]),
    )


def routing_report(
    scores: npt.NDArray[np.float64], rows: Sequence[RoutingRow], threshold: float
) -> dict[str, float | None]:
    weak, strong = outcomes(rows)
    return metrics.threshold_report(scores, weak, strong, threshold)


def operating_curve(scores: npt.NDArray[np.float64], rows: Sequence[RoutingRow]) -> OperatingCurve:
    def cost(to_strong: npt.NDArray[np.bool_]) -> float:
        return sum(request_cost(r, bool(s)) for r, s in zip(rows, to_strong, strict=True))

    weak, strong = outcomes(rows)
    return fit_curve(scores, weak, strong, cost)


def calibration_table(
    probabilities: npt.NDArray[np.float64], failed: npt.NDArray[np.bool_], bins: int = 10
) -> list[dict[str, float]]:
    """Mean predicted P(cheap fails) against the observed failure rate, per probability decile."""
    order = np.argsort(probabilities, kind="stable")
    table = []
    for chunk in np.array_split(order, bins):
        if len(chunk):
            table.append(
                {
                    "n": float(len(chunk)),
                    "predicted": float(probabilities[chunk].mean()),
                    "observed": float(failed[chunk].mean()),
                }
            )
    return table


@dataclass(frozen=True)
class Candidate:
    """A model fitted without the holdout, with what the holdout says about it."""

    model: DifficultyModel
    metadata: dict[str, object]
    holdout_scores: npt.NDArray[np.float64]


def train_candidate(
    train: LabelledSet,
    held_rows: Sequence[RoutingRow],
    held_embeddings: npt.NDArray[np.float32],
    c: float,
    seed: int,
) -> Candidate:
    model = fit_model(train, c, seed)
    provisional = SklearnDifficultyClassifier(model, version="provisional", default_threshold=0.0)
    scores, failure = score_rows(provisional, held_embeddings, held_rows)
    curve = operating_curve(scores, held_rows)
    threshold = curve.threshold_for(DEFAULT_OPERATING_POINT)
    failed = np.array([not r.weak_correct for r in held_rows])
    metadata: dict[str, object] = {
        "n_train": len(train.texts),
        "n_holdout": len(held_rows),
        "label": "cheap_fails = not weak_correct; strong_fails = not strong_correct",
        "model": f"kNN features (PCA-128, k in 10/25/50/100) + text features -> two "
        f"StandardScaler + LogisticRegression(C={c}) heads; score = P(cheap fails) - "
        "P(strong fails)",
        "feature_names": feature_names(),
        "default_threshold": threshold,
        "default_operating_point": {"quality": DEFAULT_OPERATING_POINT.quality},
        "holdout": routing_report(scores, held_rows, threshold),
        "holdout_by_source": {
            source: routing_report(
                scores[[r.source == source for r in held_rows]],
                [r for r in held_rows if r.source == source],
                threshold,
            )
            for source in sorted({r.source for r in held_rows})
        },
        "operating_curve": curve.to_json(),
        "calibration": calibration_table(failure, failed),
        "brier_cheap_fails": float(np.mean((failure - failed) ** 2)),
    }
    return Candidate(model, metadata, scores)


@exits_2_on_data_error
def run(args: argparse.Namespace) -> int:
    paths = distinct_files([Path(p) for p in args.data])
    rows = read_routing_rows(paths)
    # Checked before the minutes of embedding and fitting, not when the artifact is saved.
    writable_folder(Path(args.out), "--out")
    held = holdout_mask([r.prompt for r in rows], args.holdout_fraction, args.seed)
    train_rows = [r for r, h in zip(rows, held, strict=True) if not h]
    test_rows = [r for r, h in zip(rows, held, strict=True) if h]
    require_both_sides(len(train_rows), len(test_rows))

    started = time.perf_counter()
    embedder = make_embedder(args.embedder, args.hash_dimension)
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    embeddings = embed_prompts(embedder, [r.prompt for r in rows], cache)
    embed_seconds = time.perf_counter() - started

    started = time.perf_counter()
    try:
        candidate = train_candidate(
            LabelledSet.from_rows(train_rows, embeddings[~held]),
            test_rows,
            embeddings[held],
            args.c,
            args.seed,
        )
    except ValueError as error:
        print(f"cannot train: {error}", file=sys.stderr)
        return 2
    fit_seconds = time.perf_counter() - started
    metadata = describe(candidate, args.name, paths, embedder, args)
    model_path, _ = save_artifact(candidate.model, metadata, Path(args.out), args.name)
    summary = {
        "artifact": str(model_path),
        "version": metadata["version"],
        "n_train": len(train_rows),
        "default_threshold": metadata["default_threshold"],
        "embed_seconds": round(embed_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "holdout": metadata["holdout"],
    }
    print(json.dumps(summary))
    return 0


def artifact_name(text: str) -> str:
    """An argparse type: a file name, not a path (it went outside --out)."""
    if not text or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r}: a file name without '/' or a leading '.'")
    return text


def describe(
    candidate: Candidate,
    name: str,
    paths: Sequence[Path],
    embedder: Embedder,
    args: argparse.Namespace,
) -> dict[str, object]:
    """The artifact's metadata: the candidate's holdout figures plus provenance."""
    created = datetime.now(UTC).replace(microsecond=0)
    return {
        # The suffix keeps two runs within one second apart in a registry.
        "version": f"{name}-{created:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "created_utc": created.isoformat(),
        "training_files": [p.name for p in paths],
        "training_data_sha256": files_sha256(paths),
        "holdout_fraction": args.holdout_fraction,
        "seed": args.seed,
        "embedder": embedder.name,
        "embedding_dimension": embedder.dimension,
        **candidate.metadata,
    }


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
    parser.add_argument(
        "--name", type=artifact_name, default=DEFAULT_ARTIFACT_NAME, help="artifact base name"
    )
    parser.add_argument(
        "--holdout-fraction",
        type=fraction,
        default=0.2,
        help="share of prompts held out for metrics and the threshold",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="salts the holdout hash")
    parser.add_argument(
        "--c",
        # Refused here, not by sklearn after the minutes of embedding.
        type=positive_number,
        default=DEFAULT_C,
        help="inverse L2 regularisation strength of the two logistic heads",
    )
    parser.add_argument(
        "--embedding-cache",
        default=None,
        metavar="FILE.npz",
        help="keep prompt embeddings here between runs (embedding is the slow part)",
    )
    parser.add_argument(
        "--embedder",
        choices=["minilm", "hash"],
        default="minilm",
        help="minilm: the packaged all-MiniLM-L6-v2 (as in service); hash: tests",
    )
    parser.add_argument(
        "--hash-dimension", type=positive_int, default=64, help="dimension of the hash embedder"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routecache train-classifier", description=__doc__)
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

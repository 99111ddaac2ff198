"""Evaluate a difficulty-classifier artifact as a router on routing data.

    routecache eval-router --data routing_dev.jsonl --json [--quality 0.8 | --strong-fraction F
                           | --max-cost-ratio C | --threshold T] [--embedding-cache FILE.npz]

Scores every prompt through `load_artifact(...).assess` (the service's own code), then reports
APGR / CPT over all cut points, and accuracy, strong fraction and cost at the configured
operating point, overall and per `source` slice. The operating point is, in this order: the
command line, the service's settings (ROUTECACHE_CLASSIFIER__TARGET_QUALITY etc. or
--config FILE), the model's default. List prices and token estimates: routing_data.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.classifier.model import (
    ClassifierArtifactError,
    SklearnDifficultyClassifier,
    load_classifier,
)
from routecache.cli_args import number_between
from routecache.domain import OperatingPoint
from routecache.router.settings import ConfigError, load_settings
from routecache.training.data_files import DataFileError, exits_2_on_data_error
from routecache.training.routing_data import (
    RoutingRow,
    read_routing_rows,
    request_cost,
)
from routecache.training.train_classifier import embed_prompts, make_embedder, routing_report


def router_report(
    scores: npt.NDArray[np.float64], rows: Sequence[RoutingRow], threshold: float
) -> dict[str, Any]:
    """Routing measures and cost of one slice at one threshold."""
    report: dict[str, Any] = routing_report(scores, rows, threshold)
    routed = sum(request_cost(r, bool(s >= threshold)) for r, s in zip(rows, scores, strict=True))
    all_strong = sum(request_cost(r, True) for r in rows)
    report["cost_usd"] = routed
    report["cost_all_strong_usd"] = all_strong
    report["cost_vs_all_strong"] = routed / all_strong if all_strong else None
    return report


def timed_scores(
    classifier: SklearnDifficultyClassifier,
    embeddings: npt.NDArray[np.float32],
    rows: Sequence[RoutingRow],
) -> tuple[npt.NDArray[np.float64], float]:
    """Routing scores of every row and the median latency of one call, in microseconds."""
    scores = np.zeros(len(rows))
    latencies = np.zeros(len(rows))
    for i, (embedding, row) in enumerate(zip(embeddings, rows, strict=True)):
        started = time.perf_counter_ns()
        scores[i] = classifier.assess(embedding, row.prompt).routing_score
        latencies[i] = time.perf_counter_ns() - started
    return scores, float(np.median(latencies)) / 1e3


def _embedder_for(classifier: SklearnDifficultyClassifier) -> tuple[str, int]:
    name = str(classifier.metadata.get("embedder", ""))
    return ("hash", classifier.embedding_dimension) if name.startswith("hash-") else ("minilm", 0)


def operating_point(args: argparse.Namespace) -> tuple[OperatingPoint | None, float | None, str]:
    """The operating point to report at, or the threshold itself where one is set, and where
    it came from."""
    if args.threshold is not None:  # the threshold itself is given: no target chose it
        return None, args.threshold, "command line threshold"
    if args.quality is not None:
        return OperatingPoint(quality=args.quality), None, "command line"
    if args.strong_fraction is not None:
        return OperatingPoint(strong_fraction=args.strong_fraction), None, "command line"
    if args.max_cost_ratio is not None:
        return OperatingPoint(cost_ratio=args.max_cost_ratio), None, "command line"
    try:
        classifier = load_settings(args.config).classifier
    except ConfigError as error:
        raise DataFileError(f"--config: {error}") from error
    if classifier.routing_threshold is not None:  # the service routes at it, target or not
        return None, classifier.routing_threshold, "settings threshold"
    configured = classifier.operating_point()
    return configured, None, "settings" if configured is not None else "model default"


def _stored_operating_point(metadata: dict[str, Any]) -> OperatingPoint | None:
    """The operating point the artifact's default threshold was set for, as reported."""
    stored = metadata.get("default_operating_point")
    if stored is None:
        return None
    try:
        return OperatingPoint(**stored)
    except (TypeError, ValueError) as error:  # a hand-edited metadata file
        raise DataFileError(
            f"--artifact: default_operating_point {stored!r} is not an operating point ({error})"
        ) from error


@exits_2_on_data_error
def run(args: argparse.Namespace) -> int:
    rows = read_routing_rows([Path(p) for p in args.data])
    # A bad --config is reported before minutes of scoring.
    point, given_threshold, source = operating_point(args)
    try:
        classifier = load_classifier(Path(args.artifact) if args.artifact else None)
    except ClassifierArtifactError as error:
        raise DataFileError(f"--artifact: {error}") from error
    stored_point = _stored_operating_point(classifier.metadata)  # checked before the scoring
    kind, dimension = _embedder_for(classifier)
    embedder = make_embedder(kind, dimension)
    if embedder.name != classifier.metadata.get("embedder"):
        raise DataFileError(
            f"the artifact was trained with embedder {classifier.metadata.get('embedder')!r}, "
            f"this environment provides {embedder.name!r}"
        )
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    embeddings = embed_prompts(embedder, [r.prompt for r in rows], cache)
    scores, p50_us = timed_scores(classifier, embeddings, rows)
    if given_threshold is not None:
        threshold = given_threshold
    elif point is not None:
        threshold = classifier.threshold_for(point)
    else:
        threshold = classifier.default_threshold
        point = stored_point
    report: dict[str, Any] = {
        "version": classifier.version,
        "operating_point": None if point is None else vars(point),
        "operating_point_from": source,
        "threshold": threshold,
    }
    report.update(router_report(scores, rows, threshold))
    report["scoring_p50_us"] = round(p50_us, 1)
    sources = sorted({r.source for r in rows})
    report["by_source"] = {
        source: router_report(
            scores[[r.source == source for r in rows]],
            [r for r in rows if r.source == source],
            threshold,
        )
        for source in sources
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="routing data to evaluate on (repeatable)",
    )
    parser.add_argument(
        "--artifact", default=None, help="a .skops artifact (default: the packaged classifier)"
    )
    parser.add_argument(
        "--threshold",
        type=number_between(-math.inf, math.inf),
        default=None,
        help="routing-score threshold (overrides any operating point)",
    )
    targets = parser.add_mutually_exclusive_group()
    # The ranges of the settings' classifier.target_quality / target_strong_fraction /
    # max_cost_ratio: outside them every threshold is a silent "all strong" or "all cheap".
    targets.add_argument(
        "--quality",
        type=number_between(0, 1.5),
        help="target fraction of the gap recovered (0-1.5)",
    )
    targets.add_argument(
        "--strong-fraction", type=number_between(0, 1), help="target share of strong calls (0-1)"
    )
    targets.add_argument(
        "--max-cost-ratio",
        type=number_between(0, 1),
        help="cost ceiling relative to all-strong (0-1)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="service settings TOML (operating point)"
    )
    parser.add_argument(
        "--embedding-cache", default=None, metavar="FILE.npz", help="reuse prompt embeddings"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routecache eval-router", description=__doc__)
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

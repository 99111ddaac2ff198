"""Evaluate a difficulty-classifier artifact as a router on routing data.

    routecache eval-router --data routing_dev.jsonl --json

Scores every prompt through `load_artifact(...).failure_probability` (the service's own code),
then reports APGR / CPT over all cut points and accuracy, strong fraction and cost at the
model's default threshold (score >= threshold goes strong), overall and per `source` slice.

Cost uses list prices (USD per million tokens, input/output): Mixtral-8x7B-Instruct 0.60/0.60,
GPT-4-1106-preview 10/30, with tokens = len(text) / 4. Output tokens: the recorded response of
the model the row is routed to where the row has one (GSM8K); otherwise (MMLU) 1 token, the
answer letter, assuming the prompt's "Answer:" suffix makes both models reply with a letter.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.classifier.model import SklearnDifficultyClassifier, load_classifier
from routecache.training.train_classifier import (
    RoutingRow,
    embed_texts,
    make_embedder,
    read_routing_rows,
    routing_report,
)

# (input, output) USD per million tokens.
CHEAP_PRICE = (0.60, 0.60)
STRONG_PRICE = (10.0, 30.0)
CHARS_PER_TOKEN = 4.0
ANSWER_ONLY_OUTPUT_TOKENS = 1.0


def request_cost(row: RoutingRow, strong: bool) -> float:
    """Estimated USD of answering one row with the strong or the cheap model."""
    response = row.strong_response if strong else row.weak_response
    input_tokens = len(row.prompt) / CHARS_PER_TOKEN
    output_tokens = (
        len(response) / CHARS_PER_TOKEN if response is not None else ANSWER_ONLY_OUTPUT_TOKENS
    )
    price_in, price_out = STRONG_PRICE if strong else CHEAP_PRICE
    return (input_tokens * price_in + output_tokens * price_out) / 1e6


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
    """Scores of every row and the median latency of one call, in microseconds."""
    scores = np.zeros(len(rows))
    latencies = np.zeros(len(rows))
    for i, (embedding, row) in enumerate(zip(embeddings, rows, strict=True)):
        started = time.perf_counter_ns()
        scores[i] = classifier.failure_probability(embedding, row.prompt)
        latencies[i] = time.perf_counter_ns() - started
    return scores, float(np.median(latencies)) / 1e3


def _embedder_for(classifier: SklearnDifficultyClassifier) -> tuple[str, int]:
    name = str(classifier.metadata.get("embedder", ""))
    return ("hash", classifier.embedding_dimension) if name.startswith("hash-") else ("minilm", 0)


def run(args: argparse.Namespace) -> int:
    classifier = load_classifier(Path(args.artifact) if args.artifact else None)
    rows = read_routing_rows([Path(p) for p in args.data])
    kind, dimension = _embedder_for(classifier)
    embedder = make_embedder(kind, dimension)
    if embedder.name != classifier.metadata.get("embedder"):
        raise SystemExit(
            f"the artifact was trained with embedder {classifier.metadata.get('embedder')!r}, "
            f"this environment provides {embedder.name!r}"
        )
    embeddings = embed_texts(embedder, [r.prompt for r in rows])
    scores, p50_us = timed_scores(classifier, embeddings, rows)
    threshold = classifier.default_threshold if args.threshold is None else args.threshold
    report: dict[str, Any] = {"version": classifier.version, "threshold": threshold}
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
        type=float,
        default=None,
        help="routing threshold (default: the one stored with the model)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routecache eval-router", description=__doc__)
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

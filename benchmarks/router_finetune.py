"""Experiment (issue 6): does fine-tuning the embedder on routing labels beat the shipped router?

    python -m benchmarks.router_finetune --train routing_train.jsonl --dev routing_dev.jsonl \
        --out DIR [--epochs 2] [--embedding-cache FILE.npz]
    python -m benchmarks.router_finetune --train … --dev … --scores DIR/scores_epoch2.npz

Fine-tunes the packaged all-MiniLM-L6-v2 with two logistic outputs (cheap model fails, strong
model fails) on routing_train less the service's holdout slice (the same hash split as
`train-classifier`), and saves its holdout and dev logits after each epoch (about 20 minutes an
epoch on the 2-core machine). Then prints APGR / CPT(80%) / GSM8K APGR for the shipped kind of
model (kNN + text heads), the fine-tuned model, and rank blends of the two. The blend weight is
chosen on the holdout; dev is reported once for that weight.

Not part of the service: the fine-tuned model would be a second encoder pass over every routed
prompt, and a retrain that takes this long.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.cache.embedder import packaged_minilm_path
from routecache.classifier import metrics
from routecache.classifier.model import SklearnDifficultyClassifier
from routecache.training.cross_encoder import build_module, length_batches
from routecache.training.routing_data import (
    RoutingRow,
    holdout_mask,
    outcomes,
    read_routing_rows,
)
from routecache.training.train_classifier import (
    LabelledSet,
    embed_prompts,
    fit_model,
    make_embedder,
    score_rows,
)

log = logging.getLogger(__name__)
MAX_PROMPT_TOKENS = 256
BATCH_SIZE = 16
LEARNING_RATE = 4e-5
Floats = npt.NDArray[np.float64]


def logits_of(module: Any, tokenizer: Any, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    import torch

    module.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 2), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), 64):
            chosen = order[start : start + 64]
            encoded = tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                max_length=MAX_PROMPT_TOKENS, return_tensors="pt")  # fmt: skip
            out[chosen] = module(**encoded).numpy()
    module.train()
    return out


def fine_tune(
    train: Sequence[RoutingRow], scored: dict[str, Sequence[RoutingRow]], epochs: int, out: Path
) -> None:
    """Train on `train`; after each epoch save the logits of every `scored` set to out/."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(13)
    torch.set_num_threads(2)
    rng = random.Random(13)
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    module = build_module(packaged_minilm_path(), outputs=2)
    module.train()
    texts = [r.prompt for r in train]
    labels = torch.tensor([[float(not r.weak_correct), float(not r.strong_correct)] for r in train])
    optimiser = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    total = math.ceil(len(texts) / BATCH_SIZE) * epochs
    warmup = max(1, int(total * 0.1))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in length_batches([len(t) for t in texts], BATCH_SIZE, rng):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                max_length=MAX_PROMPT_TOKENS, return_tensors="pt")  # fmt: skip
            loss = loss_fn(module(**encoded), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimiser.step()
            schedule.step()
        saved = {name: logits_of(module, tokenizer, [r.prompt for r in rows])
                 for name, rows in scored.items()}  # fmt: skip
        np.savez(out / f"scores_epoch{epoch}.npz", **saved)  # type: ignore[arg-type]
        log.info("epoch %d done, %.0f s", epoch, time.perf_counter() - started)


def routing_score(logits: npt.NDArray[np.float32]) -> Floats:
    """P(cheap fails) - P(strong fails), as the shipped heads route."""
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return p[:, 0] - p[:, 1]


def ranks(score: Floats) -> Floats:
    return np.argsort(np.argsort(score)) / (len(score) - 1)


def summary(score: Floats, rows: Sequence[RoutingRow]) -> dict[str, float]:
    weak, strong = outcomes(rows)
    gsm = np.array([r.source == "gsm8k" for r in rows])
    return {
        "apgr": metrics.apgr(score, weak, strong),
        "cpt80": metrics.cpt(score, weak, strong, 0.8),
        "gsm8k_apgr": metrics.apgr(score[gsm], weak[gsm], strong[gsm]),
    }


def bootstrap_sd(score: Floats, rows: Sequence[RoutingRow], resamples: int = 300) -> float:
    """How much APGR moves between resamples of the same rows: what dev can tell apart."""
    weak, strong = outcomes(rows)
    draws = np.random.default_rng(0).integers(0, len(rows), size=(resamples, len(rows)))
    return float(np.std([metrics.apgr(score[i], weak[i], strong[i]) for i in draws]))


def print_line(name: str, score: Floats, rows: Sequence[RoutingRow]) -> float:
    result = summary(score, rows)
    print(f"{name:44s} APGR {result['apgr']:.3f}  CPT(80%) {result['cpt80']:.3f}  "
          f"GSM8K APGR {result['gsm8k_apgr']:.3f}")  # fmt: skip
    return result["apgr"]


def knn_scores(
    fit_rows: Sequence[RoutingRow], test_rows: Sequence[RoutingRow], cache: Path | None
) -> Floats:
    """Routing scores of the shipped kind of model fitted on fit_rows, through its own code."""
    embedder = make_embedder("minilm")
    fit_vectors = embed_prompts(embedder, [r.prompt for r in fit_rows], cache)
    model = fit_model(LabelledSet.from_rows(fit_rows, fit_vectors))
    classifier = SklearnDifficultyClassifier(model, version="experiment", default_threshold=0.0)
    test_vectors = embed_prompts(embedder, [r.prompt for r in test_rows], cache)
    return score_rows(classifier, test_vectors, test_rows)[0]


def compare(
    scores: Path, train: Sequence[RoutingRow], hold: Sequence[RoutingRow],
    dev: Sequence[RoutingRow], cache: Path | None, name: str = "fine-tuned",
) -> None:  # fmt: skip
    with np.load(scores) as saved:
        tuned_hold, tuned_dev = routing_score(saved["hold"]), routing_score(saved["dev"])
    knn_hold = knn_scores(train, hold, cache)
    print_line("holdout: kNN + text heads (80% of train)", knn_hold, hold)
    weights = np.linspace(0.0, 1.0, 11)
    blends = [(1 - w) * ranks(knn_hold) + w * ranks(tuned_hold) for w in weights]
    apgrs = [
        print_line(f"holdout: rank blend, {name} weight {w:.1f}", blend, hold)
        for w, blend in zip(weights, blends, strict=True)
    ]
    chosen = float(weights[int(np.argmax(apgrs))])
    print(f"weight chosen on the holdout: {chosen:.1f}")
    knn_dev = knn_scores([*train, *hold], dev, cache)
    print_line("dev: kNN + text heads (all of train)", knn_dev, dev)
    spread = bootstrap_sd(knn_dev, dev)
    print(f"  bootstrap of dev (300 resamples): APGR standard deviation {spread:.3f}")
    print_line(f"dev: {name} (80% of train)", tuned_dev, dev)
    blend = (1 - chosen) * ranks(knn_dev) + chosen * ranks(tuned_dev)
    print_line(f"dev: rank blend, weight {chosen:.1f}", blend, dev)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--dev", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="folder for the logits of each epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scores", type=Path, help="compare saved logits; no training")
    parser.add_argument("--embedding-cache", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = read_routing_rows([args.train])
    dev = read_routing_rows([args.dev])
    held = holdout_mask([r.prompt for r in rows], 0.2, 0)
    train = [r for r, h in zip(rows, held, strict=True) if not h]
    hold = [r for r, h in zip(rows, held, strict=True) if h]
    if args.scores is None:
        if args.out is None:
            parser.error("--out is needed to train (or give --scores)")
        fine_tune(train, {"hold": hold, "dev": dev}, args.epochs, args.out)
        args.scores = args.out / f"scores_epoch{args.epochs}.npz"
    compare(args.scores, train, hold, dev, args.embedding_cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

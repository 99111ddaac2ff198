"""`routecache train-verifier`: labelled pairs → the shipped hit verifier, reproducibly.

    routecache train-verifier --data ../shared/data/cache/qqp_train.jsonl \\
        --out routecache/cache/verifier_artifacts

trains the cross-encoder on 85% of the pairs (split by cached question), exports it to ONNX
(int8), and calibrates the hit policy on the other 15% with the int8 graph, so the thresholds
describe exactly what ships. About an hour on two cores; `--weights` reuses trained weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from routecache.cache.cross_encoder import GRAPH_FILE, POLICY_FILE, OnnxCrossEncoder
from routecache.cache.embedder import packaged_minilm_path
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
from routecache.training.calibrate_verifier import (
    BUDGETS,
    calibrate,
    file_sha256,
    pair_logits,
    score_pairs,
)
from routecache.training.cross_encoder import TrainingPlan, train_cross_encoder
from routecache.training.eval_cache import embed_texts
from routecache.training.export_cross_encoder import export_cross_encoder
from routecache.training.pair_data import LabelledPair, load_pairs, split_pairs

log = logging.getLogger(__name__)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="labelled pairs (qqp format)")
    parser.add_argument("--out", type=Path, required=True, help="folder for graph + policy")
    parser.add_argument("--work-dir", type=Path, help="weights and scores go here (default: --out)")
    parser.add_argument("--weights", type=Path, help="reuse trained weights, skip training")
    parser.add_argument("--scores", type=Path,
                        help="an earlier calibration_scores.npz (and --out's graph)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--holdout", type=float, default=0.15, help="share kept for calibration")
    parser.add_argument("--confidence", type=float, default=0.99,
                        help="one-sided confidence that a budget holds")  # fmt: skip
    parser.add_argument("--one-order", action="store_true",
                        help="score (query, cached) only: half the verifier's cost")  # fmt: skip
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))


def _holdout_scores(
    args: argparse.Namespace, fit: list[LabelledPair], holdout: list[LabelledPair]
) -> dict[str, np.ndarray]:
    """Cosine and both orders' logits of the calibration pairs, from the graph that ships."""
    if args.scores is not None:
        with np.load(args.scores) as saved:
            return {name: saved[name] for name in ("cosines", "forward", "backward")}
    model_dir = packaged_minilm_path()
    work = args.work_dir or args.out
    weights = args.weights or train_cross_encoder(
        fit, model_dir, work, TrainingPlan(epochs=args.epochs)
    )
    graph = export_cross_encoder(weights, model_dir, args.out / GRAPH_FILE)
    vectors = embed_texts(OnnxMiniLMEmbedder(), [t for p in holdout for t in (p.query, p.cached)])
    scorer = OnnxCrossEncoder(graph, symmetric=False, threads=None)
    scores = {
        "cosines": np.array([float(np.dot(vectors[p.query], vectors[p.cached])) for p in holdout]),
        "forward": pair_logits(scorer, [(p.query, p.cached) for p in holdout]),
        "backward": pair_logits(scorer, [(p.cached, p.query) for p in holdout]),
    }
    work.mkdir(parents=True, exist_ok=True)
    np.savez(
        work / "calibration_scores.npz",
        cosines=scores["cosines"], forward=scores["forward"], backward=scores["backward"],
    )  # fmt: skip
    return scores


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    pairs = load_pairs(args.data)
    fit, holdout = split_pairs(pairs, args.holdout)
    log.info("%d pairs: %d to train the cross-encoder, %d to calibrate", len(pairs), len(fit),
             len(holdout))  # fmt: skip
    scores = _holdout_scores(args, fit, holdout)
    symmetric = not args.one_order
    logits = scores["forward"] if not symmetric else (scores["forward"] + scores["backward"]) / 2
    calibration = calibrate(
        score_pairs(holdout, scores["cosines"].tolist(), logits.tolist()),
        budgets=[float(b) for b in args.budgets.split(",")],
        confidence=args.confidence,
        symmetric=symmetric,
        metadata={
            "training_data": str(args.data),
            "training_data_sha256": file_sha256(args.data),
            "holdout_fraction": args.holdout,
            "epochs": args.epochs,
            "graph_sha256": file_sha256(args.out / GRAPH_FILE),
        },
    )
    (args.out / POLICY_FILE).write_text(calibration.to_json() + "\n", encoding="utf-8")
    summary = {
        "cosine_floor": calibration.cosine_floor,
        "symmetric": symmetric,
        "confidence": args.confidence,
        "holdout_recall": {t.max_false_hit_rate: t.holdout_recall for t in calibration.thresholds},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0

"""Experiment (issue 12): how much of the cross-encoder's fp32 quality survives int8 quantisation?

    python -m benchmarks.verifier_quantisation --data qqp_train.jsonl --weights cross_encoder.pt \
        [--limit N]

Exports the weights a `train-verifier` run saved (its --work-dir holds cross_encoder.pt) to an
fp32 ONNX graph, quantises it to dynamic int8 with one weight scale per tensor (what ships) and
one per output channel, scores the calibration 15% of the pairs with each graph the way the
service does (one pair at a time, (query, cached) order), and prints one JSON line per graph:
AUC, the best recall a threshold chosen with hindsight reaches at each false-hit rate, how far
its logits stray from fp32's, the mean time per pair and the file size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.verifier_recipes import hindsight_recall
from routecache.cache.cross_encoder import OnnxCrossEncoder
from routecache.cache.embedder import packaged_minilm_path
from routecache.cli_args import fraction, positive_int
from routecache.training.export_cross_encoder import export_cross_encoder
from routecache.training.pair_data import LabelledPair, load_pairs, split_pairs


def quantise(fp32: Path, out: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
    return out


def gap_to_reference(
    scores: npt.NDArray[np.floating[Any]], reference: npt.NDArray[np.floating[Any]]
) -> dict[str, float]:
    """How far a graph's logits stray from the fp32 graph's on the same pairs."""
    return {
        "correlation": round(float(np.corrcoef(scores, reference)[0, 1]), 4),
        "largest_gap": round(float(np.abs(scores - reference).max()), 3),
    }


def score(graph: Path, pairs: Sequence[LabelledPair]) -> tuple[npt.NDArray[np.float32], float]:
    """Logits of each pair scored alone, and the mean milliseconds per pair."""
    scorer = OnnxCrossEncoder(graph, symmetric=False)
    started = time.perf_counter()
    logits = scorer.logits([(p.query, p.cached) for p in pairs])
    return logits, (time.perf_counter() - started) / len(pairs) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(prog="python -m benchmarks.verifier_quantisation")
    parser.add_argument("--data", type=Path, required=True, help="labelled pairs (qqp format)")
    parser.add_argument("--weights", type=Path, required=True, help="train-verifier's weights")
    parser.add_argument("--holdout", type=fraction, default=0.15, help="as train-verifier's")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N held-out pairs")
    args = parser.parse_args(argv)
    _, held_out = split_pairs(load_pairs(args.data), args.holdout)
    held_out = held_out[: args.limit]
    labels = np.array([p.duplicate for p in held_out])
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_cross_encoder(
            args.weights, packaged_minilm_path(), Path(scratch) / "fp32.onnx", int8=False
        )
        graphs = {
            "fp32": fp32,
            "int8 per tensor": quantise(fp32, Path(scratch) / "tensor.onnx", per_channel=False),
            "int8 per channel": quantise(fp32, Path(scratch) / "channel.onnx", per_channel=True),
        }
        reference: npt.NDArray[np.float32] | None = None
        for name, graph in graphs.items():
            logits, ms = score(graph, held_out)
            reference = logits if reference is None else reference
            row = {
                "graph": name,
                "pairs": len(held_out),
                "auc": round(float(roc_auc_score(labels, logits)), 4),
                "hindsight_recall": hindsight_recall(logits, labels),
                **gap_to_reference(logits, reference),
                "ms_per_pair": round(ms, 2),
                "megabytes": round(graph.stat().st_size / 1e6, 1),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

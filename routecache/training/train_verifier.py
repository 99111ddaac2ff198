"""`routecache train-verifier`: labelled pairs → the shipped hit verifier, reproducibly.

    routecache train-verifier --data ../shared/data/cache/qqp_train.jsonl \\
        --out routecache/cache/verifier_artifacts

trains the cross-encoder on 85% of the pairs (split by cached question), exports it to ONNX
(int8) in the work folder, and calibrates the hit policy on the other 15% with the int8 graph,
so the thresholds describe exactly what ships (with `--cache-mode`, also on cache-mode lookups
of the same queries among all the data's cached questions). About an hour on two cores;
`--weights` reuses trained weights, `--scores` a run's saved scores, `--init-weights` continues
training earlier weights. --out gets the graph and its policy only once calibration succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from routecache.atomic_file import replacing, replacing_bytes
from routecache.cache.cross_encoder import GRAPH_FILE, POLICY_FILE, OnnxCrossEncoder
from routecache.cache.embedder import MINILM_DIMENSION, packaged_minilm_path
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
from routecache.cli_args import fraction, fractions, positive_int, positive_number
from routecache.training.calibrate_verifier import (
    BUDGETS,
    ScoredPairs,
    calibrate,
    check_holdout,
    file_sha256,
    score_pairs,
)
from routecache.training.cross_encoder import TrainingPlan, train_cross_encoder, training_device
from routecache.training.data_files import (
    DataFileError,
    exits_2_on_data_error,
    writable_folder,
)
from routecache.training.eval_cache import cache_candidates, embed_texts
from routecache.training.export_cross_encoder import export_cross_encoder
from routecache.training.pair_data import LabelledPair, load_pairs, split_pairs

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path("runs") / "train-verifier"
SCORES_FILE = "calibration_scores.npz"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="labelled pairs (qqp format)")
    parser.add_argument("--out", type=Path, required=True, help="folder for graph + policy")
    # Not --out: that folder ships in the package, and gets the graph only once it is calibrated.
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"weights, graph, scores (default: {DEFAULT_WORK_DIR})")  # fmt: skip
    parser.add_argument("--weights", type=Path, help="reuse trained weights, skip training")
    parser.add_argument("--scores", type=Path,
                        help=f"an earlier {SCORES_FILE} (with the graph beside it, "
                        "else --out's)")  # fmt: skip
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (auto: a GPU when torch sees one)")  # fmt: skip
    # Finite and above 0: -1 or nan was a traceback at the first step, 0 or inf trained for nothing.
    parser.add_argument("--learning-rate", type=positive_number, default=TrainingPlan.learning_rate)
    parser.add_argument("--init-weights", type=Path,
                        help="continue training from these weights")  # fmt: skip
    # Checked up front: --holdout 0 failed only at calibration, after the hour of training.
    parser.add_argument("--holdout", type=fraction, default=0.15,
                        help="share kept for calibration")  # fmt: skip
    # A confidence of 1 or more (99 meant as a percentage) made every bound NaN, and a NaN
    # bound breaks no budget: each threshold fell to the lowest score, serving every candidate.
    parser.add_argument("--confidence", type=fraction, default=0.99,
                        help="one-sided confidence that a budget holds (0 to 1)")  # fmt: skip
    parser.add_argument("--one-order", action="store_true",
                        help="score (query, cached) only: half the verifier's cost")  # fmt: skip
    parser.add_argument("--budgets", type=fractions, default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--cache-mode", action="store_true",
                        help="also hold each budget on cache-mode lookups (far stricter "
                        "thresholds: see docs/cache-verifier.md)")  # fmt: skip


_PAIR_SCORES = ("cosines", "forward", "backward")
_CACHE_SCORES = ("cache_cosines", "cache_forward", "cache_backward", "cache_found", "cache_right")


def _holdout_scores(
    args: argparse.Namespace, fit: list[LabelledPair], holdout: list[LabelledPair], graph: Path
) -> dict[str, np.ndarray]:
    """Cosine and both orders' logits of the calibration pairs, from the graph that ships, and
    with `--cache-mode` the cache-mode lookups of the held-out queries (the holdout's and the
    training pairs' cached questions all in one cache). Scores already saved are reused."""
    wanted = (*_PAIR_SCORES, *(_CACHE_SCORES if args.cache_mode else ()))
    scores: dict[str, np.ndarray] = {}
    if args.scores is not None:
        scores = _saved_scores(args.scores, len(holdout))
    missing = [name for name in wanted if name not in scores]
    if not missing:
        return scores
    # The graph first: one that cannot load fails here, not after embedding every question.
    scorer = OnnxCrossEncoder(graph, symmetric=False, threads=None)
    embedded = holdout + (fit if args.cache_mode else [])
    vectors = embed_texts(OnnxMiniLMEmbedder(), [t for p in embedded for t in (p.query, p.cached)])
    if any(name in _PAIR_SCORES for name in missing):
        scores.update(_pair_scores(scorer, vectors, holdout))
    if any(name in _CACHE_SCORES for name in missing):
        scores.update(_cache_scores(scorer, vectors, holdout, fit))
    with replacing_bytes(args.work_dir / SCORES_FILE) as saved:
        np.savez(saved, **scores)  # type: ignore[arg-type]
    return scores


def _saved_scores(path: Path, holdout: int) -> dict[str, np.ndarray]:
    """An earlier run's scores, refused unless there is one per held-out pair (scores of
    another split failed deep in calibration, a zip() traceback)."""
    try:
        with np.load(path) as saved:
            scores = {
                name: saved[name] for name in (*_PAIR_SCORES, *_CACHE_SCORES) if name in saved
            }
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"--scores {path}: cannot read it ({exc})") from exc
    lengths = sorted({len(values) for values in scores.values()} - {holdout})
    if lengths:
        raise DataFileError(
            f"--scores {path}: scores of {lengths[0]} pairs, the holdout has {holdout} "
            "(another --data or --holdout?)"
        )
    return scores


def _scored_graph(args: argparse.Namespace) -> Path:
    """The graph that saved --scores describe: the one beside them (the work folder of the run
    that scored it, published or not), else --out's (scores saved before graphs were kept)."""
    beside = args.scores.parent / GRAPH_FILE
    graph: Path = beside if beside.is_file() else args.out / GRAPH_FILE
    if not graph.is_file():
        # Without it the run was a FileNotFoundError traceback once every score had been read.
        raise DataFileError(
            f"--scores needs the graph it scored: neither {beside} nor {graph} is there"
        )
    return graph


def _trained_graph(args: argparse.Namespace, fit: list[LabelledPair]) -> Path:
    """The trained (or --weights) cross-encoder, exported into the work folder: --out gets it
    only with its calibrated policy."""
    work: Path = args.work_dir
    model_dir = packaged_minilm_path()
    plan = TrainingPlan(
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        init_weights=args.init_weights,
        device=args.device,
    )
    weights = args.weights or train_cross_encoder(fit, model_dir, work, plan)
    return export_cross_encoder(weights, model_dir, work / GRAPH_FILE)


def _publish(out: Path, graph: Path, policy: str) -> None:
    """Put the graph, then the policy naming it, into --out, each replaced whole (synced,
    renamed) and only once calibration succeeded: a run that fails leaves --out as it was.
    A crash between the two renames leaves a graph its policy does not name, which the
    service refuses to start with (build_hit_policy) rather than serve one model's scores
    against another's thresholds. Copied, not renamed: the work folder may be on another
    file system."""
    target = out / GRAPH_FILE
    if graph.resolve() != target.resolve():
        with graph.open("rb") as source, replacing_bytes(target) as copy:
            shutil.copyfileobj(source, copy)
    with replacing(out / POLICY_FILE) as written:
        written.write(policy)


def _pair_scores(
    scorer: OnnxCrossEncoder, vectors: dict[str, np.ndarray], holdout: list[LabelledPair]
) -> dict[str, np.ndarray]:
    return {
        "cosines": np.array([float(np.dot(vectors[p.query], vectors[p.cached])) for p in holdout]),
        "forward": scorer.logits([(p.query, p.cached) for p in holdout]),
        "backward": scorer.logits([(p.cached, p.query) for p in holdout]),
    }


def _cache_scores(
    scorer: OnnxCrossEncoder,
    vectors: dict[str, np.ndarray],
    holdout: list[LabelledPair],
    fit: list[LabelledPair],
) -> dict[str, np.ndarray]:
    lookups = cache_candidates(holdout, vectors, ScopedFaissIndex(MINILM_DIMENSION), fit)
    assert lookups.same_question is not None  # cache mode always sets it
    return {
        "cache_cosines": np.array(lookups.similarities),
        "cache_forward": scorer.logits(lookups.texts),
        "cache_backward": scorer.logits([(c, q) for q, c in lookups.texts]),
        "cache_found": np.array([found for _, found in lookups.texts]),
        "cache_right": lookups.same_question,
    }


def _logits(scores: dict[str, np.ndarray], prefix: str, symmetric: bool) -> np.ndarray:
    forward, backward = scores[f"{prefix}forward"], scores[f"{prefix}backward"]
    return (forward + backward) / 2 if symmetric else forward


def _cache_lookups(
    holdout: list[LabelledPair], scores: dict[str, np.ndarray], symmetric: bool
) -> ScoredPairs:
    """The held-out queries' cache-mode candidates as labelled pairs: right = same question."""
    found = [str(text) for text in scores["cache_found"]]
    pairs = [
        LabelledPair(p.query, text, bool(right))
        for p, text, right in zip(holdout, found, scores["cache_right"], strict=True)
    ]
    logits = _logits(scores, "cache_", symmetric)
    return score_pairs(pairs, scores["cache_cosines"].tolist(), logits.tolist())


@exits_2_on_data_error
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Up front: a folder that cannot be made was a traceback after an epoch of training.
    writable_folder(args.out, "--out")
    writable_folder(args.work_dir, "--work-dir")
    if args.weights is None and args.scores is None:
        try:
            training_device(args.device)
        except ValueError as exc:
            raise DataFileError(f"--{exc}") from exc
    # Saved scores describe the graph they were scored with, which the policy names by hash.
    scored = _scored_graph(args) if args.scores is not None else None
    pairs = load_pairs(args.data)
    fit, holdout = split_pairs(pairs, args.holdout)
    check_holdout(holdout)
    log.info("%d pairs: %d to train the cross-encoder, %d to calibrate", len(pairs), len(fit),
             len(holdout))  # fmt: skip
    graph = scored or _trained_graph(args, fit)
    scores = _holdout_scores(args, fit, holdout, graph)
    symmetric = not args.one_order
    logits = _logits(scores, "", symmetric)
    calibration = calibrate(
        score_pairs(holdout, scores["cosines"].tolist(), logits.tolist()),
        budgets=args.budgets,
        confidence=args.confidence,
        symmetric=symmetric,
        cache_lookups=_cache_lookups(holdout, scores, symmetric) if args.cache_mode else None,
        metadata={
            "training_data": str(args.data),
            "training_data_sha256": file_sha256(args.data),
            "holdout_fraction": args.holdout,
            "epochs": args.epochs,
            "init_weights": str(args.init_weights) if args.init_weights else None,
            "learning_rate": args.learning_rate,
            "weights": str(args.weights) if args.weights else None,
            "graph_sha256": file_sha256(graph),
        },
    )
    _publish(args.out, graph, calibration.to_json() + "\n")
    summary = {
        "cosine_floor": calibration.cosine_floor,
        "symmetric": symmetric,
        "confidence": args.confidence,
        "holdout_recall": {t.max_false_hit_rate: t.holdout_recall for t in calibration.thresholds},
        "cache_mode_recall": calibration.metadata.get("cache_mode_recall"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0

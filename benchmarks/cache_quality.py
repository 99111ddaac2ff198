"""Correct and false cache hits: routecache's verified policy vs cosine thresholds vs GPTCache.

    python -m benchmarks.cache_quality --pairs ../shared/data/cache/qqp_dev.jsonl

On the same labelled pairs and the same all-MiniLM-L6-v2 vectors, in pairwise and cache mode
(routecache.training.eval_cache explains both), prints one table row per policy:

- verified: the shipped cross-encoder + calibrated rule at each false-hit budget;
- cosine: a plain threshold on the cosine similarity (GPTCache/RedisVL style);
- gptcache: the PyPI package's own default decision (SearchDistanceEvaluation over FAISS L2
  distance, Config().similarity_threshold, the adapter's rank formula). Pairwise: its evaluation
  object judges each pair's distance. Cache mode: a real GPTCache (SQLite + FAISS data manager)
  holds every cached question and answers each query with get(); its embedding function returns
  the same precomputed vectors, so both sides see identical embeddings.

Added latency: the verifier's p50/p99 per lookup that reaches it (one pair, one thread).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routecache.cache.hit_policy import CosinePolicy, HitPolicy, HitRequirement
from routecache.router.bootstrap import build_embedder, build_hit_policy, build_vector_index
from routecache.router.settings import load_settings
from routecache.training.eval_cache import (
    CacheEvaluation,
    Candidates,
    Mode,
    candidates_for,
    decide_as_served,
    embed_texts,
    score_candidates,
    seen_whole_of,
    summarise,
    verifier_latency_ms,
    without_unseen,
)
from routecache.training.pair_data import LabelledPair, load_pairs


def gptcache_pairwise(candidates: Candidates) -> list[bool]:
    """GPTCache's default decision for each (query, cached) pair, from the package's own code."""
    from gptcache import Config
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    evaluation = SearchDistanceEvaluation()
    low, high = evaluation.range()
    rank_threshold = min(high, max(low, (high - low) * Config().similarity_threshold))
    # FAISS IndexFlatL2 (GPTCache's faiss store) reports squared L2: 2 - 2 cos for unit vectors.
    return [
        evaluation.evaluation({}, {"search_result": (2 - 2 * s, None)}) >= rank_threshold
        for s in candidates.similarities
    ]


def gptcache_cache_mode(
    pairs: Sequence[LabelledPair], vectors: dict[str, np.ndarray]
) -> list[tuple[bool, bool]]:
    """(hit, correct) per query from a real GPTCache holding every cached question."""
    from gptcache import Cache, Config
    from gptcache.adapter import api
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    outcomes: list[tuple[bool, bool]] = []
    with tempfile.TemporaryDirectory() as scratch:
        manager = get_data_manager(
            CacheBase("sqlite", sql_url=f"sqlite:///{Path(scratch) / 'gptcache.db'}"),
            VectorBase("faiss", dimension=384, index_path=str(Path(scratch) / "faiss")),
            max_size=len(vectors) + 1,
        )
        cache = Cache()
        cache.init(
            pre_embedding_func=get_prompt,
            embedding_func=lambda text, **_: vectors[text],
            data_manager=manager,
            similarity_evaluation=SearchDistanceEvaluation(),
            config=Config(),
        )
        for text in sorted({p.cached for p in pairs}):
            api.put(text, text, cache_obj=cache)  # the "answer" names the question it answers
        for pair in pairs:
            answer = api.get(pair.query, cache_obj=cache)
            outcomes.append((answer is not None, pair.duplicate and answer == pair.cached))
    return outcomes


def gptcache_row(
    mode: str, hits: Sequence[bool], correct: Sequence[bool], dups: int
) -> dict[str, Any]:
    served, right = sum(hits), sum(h and c for h, c in zip(hits, correct, strict=True))
    n = len(hits)
    return {
        "mode": mode, "policy": "gptcache default", "setting": "cos>=0.6 (rank 3.2/4)",
        "precision": right / served if served else 1.0, "recall": right / dups,
        "hit_rate": served / n, "false_hit_rate": (served - right) / n,
    }  # fmt: skip


def row(result: CacheEvaluation, setting: str) -> dict[str, Any]:
    return {
        "mode": result.mode, "policy": result.policy, "setting": setting,
        "precision": result.precision, "recall": result.recall,
        "hit_rate": result.hit_rate, "false_hit_rate": result.false_hit_rate,
    }  # fmt: skip


def policy_rows(
    mode: Mode,
    candidates: Candidates,
    ours: Candidates,  # `candidates` as routecache's cache finds them (without_unseen)
    duplicates: int,
    verified: HitPolicy,
    budgets: Sequence[float],
    thresholds: Sequence[float],
) -> list[dict[str, Any]]:
    rows = []
    scores = score_candidates(verified, ours)
    for budget in budgets:
        requirement = HitRequirement(0.9, budget)
        verdicts = decide_as_served(verified, scores, ours.similarities, requirement)
        result = summarise(mode, "verified", ours, duplicates, verdicts, requirement, True)
        rows.append(row(result, f"budget {budget}") | {"verified_share": result.verified_share})
    cosine = CosinePolicy()
    nan = np.full(len(candidates.texts), np.nan)
    for threshold in thresholds:
        requirement = HitRequirement(threshold)
        verdicts = cosine.decide(nan, candidates.similarities, requirement)
        result = summarise(mode, "cosine", candidates, duplicates, verdicts, requirement, False)
        rows.append(row(result, f"cos>={threshold}"))
    return rows


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    print("| mode | policy | setting | precision | recall | hit rate | false-hit rate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['policy']} | {r['setting']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['hit_rate']:.3f} | {r['false_hit_rate']:.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--modes", default="pairwise,cache")
    parser.add_argument("--budgets", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--thresholds", default="0.80,0.85,0.90,0.95")
    parser.add_argument("--no-gptcache", action="store_true")
    args = parser.parse_args()

    settings = load_settings(None)
    embedder = build_embedder(settings)
    seen_whole = seen_whole_of(embedder)  # ours only: a plain cosine cache has no such rule
    verified = build_hit_policy(settings, embedder.name)
    pairs = load_pairs(args.pairs, limit=args.limit)
    duplicates = sum(p.duplicate for p in pairs)
    started = time.perf_counter()
    vectors = embed_texts(embedder, [t for p in pairs for t in (p.query, p.cached)])
    print(f"{len(pairs)} pairs, {duplicates} duplicates; embedded {len(vectors)} texts in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    rows: list[dict[str, Any]] = []
    modes: list[Mode] = ["pairwise" if m == "pairwise" else "cache" for m in args.modes.split(",")]
    for mode in modes:
        index = build_vector_index(settings, embedder.dimension)
        candidates = candidates_for(pairs, vectors, mode, index)
        started = time.perf_counter()
        rows += policy_rows(
            mode,
            candidates,
            without_unseen(candidates, seen_whole) if seen_whole else candidates,
            duplicates,
            verified,
            [float(b) for b in args.budgets.split(",")],
            [float(t) for t in args.thresholds.split(",")],
        )
        print(f"{mode}: scored in {time.perf_counter() - started:.0f} s")
        if not args.no_gptcache:
            if mode == "pairwise":
                hits = gptcache_pairwise(candidates)
                rows.append(gptcache_row(mode, hits, list(candidates.correct), duplicates))
            else:
                outcomes = gptcache_cache_mode(pairs, vectors)
                hits, correct = [h for h, _ in outcomes], [c for _, c in outcomes]
                rows.append(gptcache_row(mode, hits, correct, duplicates))
        if mode == "pairwise":
            latency = verifier_latency_ms(verified, candidates, HitRequirement(0.9, 0.01))
            print(f"verifier latency per verified lookup: {latency}")
    print_rows(rows)


if __name__ == "__main__":
    main()

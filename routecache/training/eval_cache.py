"""How often the semantic tier serves a right answer, and how often a wrong one, on labelled pairs.

Two modes, both through the service's own parts (its embedder, FAISS index and hit policy):

- pairwise: each pair's cached question is the only entry; its query looks it up.
- cache: every cached question of the file is stored in one scope; each query looks up its
  nearest neighbour among all of them. A hit is correct only when it returns the query's own
  partner of a duplicate pair: any other entry answers another question. That strict count also
  calls false a hit on the query's very text stored for another pair, or on a question the
  file's own labels join to it; those are counted apart (`false_hits_same_question`) so the
  rate of hits that answer another question shows too.

False-hit rate = wrong answers served / all lookups (as in the vCache paper); recall = duplicate
pairs answered by their partner / all duplicate pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from routecache.cache.embedder import differ_only_in_marks
from routecache.cache.hit_policy import CosinePolicy, HitPolicy, HitRequirement, HitVerdict, clears
from routecache.cache.ports import Embedder, SeesWhole, VectorIndex
from routecache.cli_args import fractions, listed, number_between, positive_int
from routecache.training.data_files import DataFileError, exits_2_on_data_error
from routecache.training.pair_data import (
    LabelledPair,
    duplicate_clusters,
    load_pairs,
    normalised,
)

Mode = Literal["pairwise", "cache"]
_SCOPE = "eval:cache"


@dataclass(frozen=True)
class CacheEvaluation:
    mode: str
    policy: str
    pairs: int
    duplicates: int
    hits: int
    correct_hits: int
    false_hits: int
    precision: float
    recall: float
    hit_rate: float
    false_hit_rate: float
    max_false_hit_rate: float | None
    cosine_threshold: float | None
    verified_share: float  # lookups whose candidate reached the verifier
    # Strict false hits whose entry is the query's text or a labelled duplicate of it (cache mode)
    false_hits_same_question: int = 0
    false_hit_rate_other_questions: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Candidates:
    """Each query's candidate: the cached text it would be compared with, and their cosine."""

    texts: list[tuple[str, str]]
    similarities: list[float]
    correct: npt.NDArray[np.bool_]  # serving this candidate would answer the query rightly
    # the candidate is the query's text or joined to it by labelled duplicates (cache mode)
    same_question: npt.NDArray[np.bool_] | None = None


def embed_texts(embedder: Embedder, texts: Sequence[str], batch: int = 64) -> dict[str, np.ndarray]:
    """Vectors of unique texts, encoded in batches of similar length (little padding)."""
    unique = sorted(set(texts), key=len)
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch):
        chunk = unique[start : start + batch]
        vectors.update(zip(chunk, embedder.encode(chunk), strict=True))
    return vectors


def pairwise_candidates(
    pairs: Sequence[LabelledPair], vectors: dict[str, np.ndarray]
) -> Candidates:
    sims = [float(np.dot(vectors[p.query], vectors[p.cached])) for p in pairs]
    return Candidates(
        [(p.query, p.cached) for p in pairs], sims, np.array([p.duplicate for p in pairs])
    )


def cache_candidates(
    pairs: Sequence[LabelledPair],
    vectors: dict[str, np.ndarray],
    index: VectorIndex,
    distractors: Sequence[LabelledPair] = (),
) -> Candidates:
    """Each query's nearest entry among all cached questions (also the distractors')."""
    cached = sorted({p.cached for p in pairs} | {p.cached for p in distractors})
    ids = [str(i) for i in range(len(cached))]
    index.add_many(_SCOPE, ids, np.stack([vectors[t] for t in cached]))
    clusters = duplicate_clusters([*pairs, *distractors])
    texts: list[tuple[str, str]] = []
    sims: list[float] = []
    correct: list[bool] = []
    same: list[bool] = []
    for pair in pairs:
        neighbours = index.search(_SCOPE, vectors[pair.query], 1)
        found = cached[int(neighbours[0].entry_id)] if neighbours else ""
        texts.append((pair.query, found))
        sims.append(neighbours[0].similarity if neighbours else -1.0)
        correct.append(pair.duplicate and found == pair.cached)
        same.append(bool(found) and clusters[normalised(found)] == clusters[normalised(pair.query)])
    right = np.array(correct)
    return Candidates(texts, sims, right, right | np.array(same))


def candidates_for(
    pairs: Sequence[LabelledPair],
    vectors: dict[str, np.ndarray],
    mode: Mode,
    index: VectorIndex | None = None,
    seen_whole: Callable[[str], bool] | None = None,
) -> Candidates:
    """Each pair's candidate; with `seen_whole` (the embedder's), as the service's cache
    finds them: a pair whose query or candidate the model does not see whole is no semantic
    candidate (its cosine says nothing of the text it could not see)."""
    if mode == "pairwise":
        candidates = pairwise_candidates(pairs, vectors)
    elif index is None:
        raise ValueError("cache mode needs a vector index")
    else:
        candidates = cache_candidates(pairs, vectors, index)
    return candidates if seen_whole is None else without_unseen(candidates, seen_whole)


def without_unseen(candidates: Candidates, seen_whole: Callable[[str], bool]) -> Candidates:
    """`candidates`, a miss at once (cosine -1) where the model did not see both texts whole,
    or they differ only in marks it drops (accents). In cache mode the service would go on to
    the next nearest entry; this counts a miss."""
    sims = [
        s
        if seen_whole(query) and seen_whole(cached) and not differ_only_in_marks(query, cached)
        else -1.0
        for (query, cached), s in zip(candidates.texts, candidates.similarities, strict=True)
    ]
    return dataclasses.replace(candidates, similarities=sims)


def seen_whole_of(embedder: Embedder) -> Callable[[str], bool] | None:
    return embedder.sees_whole if isinstance(embedder, SeesWhole) else None


def score_candidates(
    policy: HitPolicy, candidates: Candidates, batch: int = 64
) -> npt.NDArray[np.float64]:
    chunks = [
        policy.scores(candidates.texts[i : i + batch], candidates.similarities[i : i + batch])
        for i in range(0, len(candidates.texts), batch)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0)


def summarise(
    mode: str,
    policy_name: str,
    candidates: Candidates,
    duplicates: int,
    verdicts: Sequence[HitVerdict],
    requirement: HitRequirement,
    verified: bool,
) -> CacheEvaluation:
    hits = np.array([v.accept for v in verdicts])
    correct = int((hits & candidates.correct).sum())
    n, served = len(verdicts), int(hits.sum())
    same = candidates.same_question
    same_question = 0 if same is None else int((hits & same & ~candidates.correct).sum())
    return CacheEvaluation(
        mode=mode,
        policy=policy_name,
        pairs=n,
        duplicates=duplicates,
        hits=served,
        correct_hits=correct,
        false_hits=served - correct,
        precision=correct / served if served else 1.0,
        recall=correct / duplicates if duplicates else 0.0,
        hit_rate=served / n if n else 0.0,
        false_hit_rate=(served - correct) / n if n else 0.0,
        max_false_hit_rate=requirement.max_false_hit_rate if verified else None,
        cosine_threshold=None if verified else requirement.cosine_threshold,
        verified_share=sum(v.verifier_score is not None for v in verdicts) / n if n else 0.0,
        false_hits_same_question=same_question,
        false_hit_rate_other_questions=(served - correct - same_question) / n if n else 0.0,
    )


def decide_as_served(
    policy: HitPolicy,
    scores: npt.NDArray[np.float64],
    similarities: Sequence[float],
    requirement: HitRequirement,
) -> list[HitVerdict]:
    """The verdicts the service gives: `scores` were taken once for every requirement, but a
    candidate under this requirement's floor is a miss before the verifier (an infinite floor
    for a budget below every calibrated one), so it is neither served nor counted verified."""
    floor = policy.floor(requirement)
    verdicts = policy.decide(scores, similarities, requirement)
    return [
        verdict if clears(similarity, floor) else HitVerdict(False, similarity)
        for verdict, similarity in zip(verdicts, similarities, strict=True)
    ]


def evaluate(
    pairs: Sequence[LabelledPair],
    embedder: Embedder,
    policy: HitPolicy,
    policy_name: str,
    requirements: Sequence[HitRequirement],
    mode: Mode,
    index: VectorIndex | None = None,
    vectors: dict[str, np.ndarray] | None = None,
) -> list[CacheEvaluation]:
    """One evaluation per requirement; embeddings and verifier scores are computed once."""
    if vectors is None:
        vectors = embed_texts(embedder, [t for p in pairs for t in (p.query, p.cached)])
    candidates = candidates_for(pairs, vectors, mode, index, seen_whole_of(embedder))
    return evaluate_candidates(pairs, candidates, policy, policy_name, requirements, mode)


def evaluate_candidates(
    pairs: Sequence[LabelledPair],
    candidates: Candidates,
    policy: HitPolicy,
    policy_name: str,
    requirements: Sequence[HitRequirement],
    mode: Mode,
) -> list[CacheEvaluation]:
    """`evaluate` on the pairs' candidates, already found."""
    scores = score_candidates(policy, candidates)
    duplicates = sum(p.duplicate for p in pairs)
    verified = policy_name != "cosine"
    return [
        summarise(
            mode,
            policy_name,
            candidates,
            duplicates,
            decide_as_served(policy, scores, candidates.similarities, requirement),
            requirement,
            verified,
        )
        for requirement in requirements
    ]


def verifier_latency_ms(
    policy: HitPolicy, candidates: Candidates, requirement: HitRequirement, samples: int = 300
) -> dict[str, float]:
    """p50/p99 of one verifier pass per lookup that reaches it (what a lookup adds)."""
    floor = policy.floor(requirement)
    floor_pairs = [
        (t, s)
        for t, s in zip(candidates.texts, candidates.similarities, strict=True)
        if clears(s, floor)
    ][:samples]
    timings = []
    for texts, sim in floor_pairs:
        started = time.perf_counter()
        policy.scores([texts], [sim])
        timings.append((time.perf_counter() - started) * 1000)
    if not timings:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "samples": 0}
    return {
        "p50_ms": float(np.percentile(timings, 50)),
        "p99_ms": float(np.percentile(timings, 99)),
        "samples": len(timings),
    }


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=Path, required=True, help="labelled pairs (qqp format)")
    parser.add_argument("--max-false-hit-rate", type=fractions, default=None,
                        help="the budget, or several separated by commas (one JSON line each; "
                        "default: cache.max_false_hit_rate)")  # fmt: skip
    parser.add_argument("--mode", choices=["pairwise", "cache"], default="pairwise")
    parser.add_argument("--policy", choices=["verified", "cosine"], default=None,
                        help="default: as configured (cache.verifier)")  # fmt: skip
    # As cache.similarity_threshold takes them: 1 (identical embeddings only) is one, 0 not.
    thresholds = listed(number_between(0, 1, above_low=True))
    parser.add_argument("--cosine-threshold", type=thresholds, default=None,
                        help="cosine threshold(s): default cache.similarity_threshold")  # fmt: skip
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N pairs")
    parser.add_argument("--latency", action="store_true",
                        help="also time one verifier pass per lookup that reaches it (the "
                        "--mode's lookups, up to 300)")  # fmt: skip
    parser.add_argument("--config", type=Path, help="TOML settings (embedder, verifier)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per budget")


@exits_2_on_data_error
def run(args: argparse.Namespace) -> int:
    from routecache.router.bootstrap import build_embedder, build_hit_policy, build_vector_index
    from routecache.router.settings import load_settings

    settings = load_settings(args.config)
    if args.policy is not None:
        verifier = "cross-encoder" if args.policy == "verified" else "off"
        settings = settings.model_copy(
            update={"cache": settings.cache.model_copy(update={"verifier": verifier})}
        )
    try:
        policy = build_hit_policy(settings)
    except OSError as error:  # a verifier_dir without its files: as `serve` reports it
        raise DataFileError(f"--config: cache.verifier_dir: {error}") from error
    name = "cosine" if isinstance(policy, CosinePolicy) else "verified"
    requirements = [
        HitRequirement(threshold, budget)
        for threshold in args.cosine_threshold or [settings.cache.similarity_threshold]
        for budget in args.max_false_hit_rate or [settings.cache.max_false_hit_rate]
    ]
    pairs = load_pairs(args.pairs, limit=args.limit)
    embedder = build_embedder(settings)
    index = build_vector_index(settings, embedder.dimension) if args.mode == "cache" else None
    started = time.perf_counter()
    vectors = embed_texts(embedder, [t for p in pairs for t in (p.query, p.cached)])
    candidates = candidates_for(pairs, vectors, args.mode, index, seen_whole_of(embedder))
    results = evaluate_candidates(pairs, candidates, policy, name, requirements, args.mode)
    seconds = round(time.perf_counter() - started, 1)
    latency = None
    if args.latency:
        # The mode's own candidates: in cache mode, other lookups reach the verifier than
        # the pairs' own cached questions (a query's nearest entry may be another pair's).
        latency = verifier_latency_ms(policy, candidates, requirements[0])
    for result in results:
        report: dict[str, object] = {**result.as_dict(), "seconds": seconds}
        if latency is not None:
            report["verifier_latency"] = latency
        if args.json:
            print(json.dumps(report))
        else:
            print("\n".join(f"{key:>20}: {value}" for key, value in report.items()) + "\n")
    return 0

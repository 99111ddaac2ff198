"""A semantic-hit stream the hit verifier accepts: Quora duplicate pairs, chosen by the service.

A seeded prompt behind a preamble ("Quick question: <GSM8K problem>") tests the vector search,
but the verifier rightly doubts many such pairs at the default false-hit budget, so most of them
would be timed as misses. Here the cache is seeded with the cached question of labelled
duplicate pairs, and the semantic queries are their partners, kept only where the service's
own embedder and hit policy (built by bootstrap, default settings) serve the hit. What is timed
is then the path a verified semantic hit really takes: embed, search, cross-encoder, decide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routecache.cache.hit_policy import HitRequirement
from routecache.training.eval_cache import embed_texts, pairwise_candidates
from routecache.training.pair_data import LabelledPair, load_pairs


def accepted_duplicates(pairs_path: Path, count: int) -> list[LabelledPair]:
    """Up to `count` duplicate pairs (file order) whose query the default policy serves a hit,
    and whose query's nearest seed, among all the chosen seeds, is its own partner."""
    from routecache.router.bootstrap import build_embedder, build_hit_policy
    from routecache.router.settings import load_settings

    settings = load_settings(None)
    embedder = build_embedder(settings)
    policy = build_hit_policy(settings, embedder.name)
    requirement = HitRequirement(
        settings.cache.similarity_threshold, settings.cache.max_false_hit_rate
    )
    pairs = load_pairs(pairs_path)
    # A query that is itself some pair's cached question would be an exact hit, not a semantic one.
    cached_texts = {p.cached for p in pairs}
    duplicates = [p for p in pairs if p.duplicate and p.query not in cached_texts]
    wanted = 2 * count  # some are dropped below, for a nearer seed of another pair
    chosen: dict[str, LabelledPair] = {}
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(duplicates), 4 * count):
        batch = [p for p in duplicates[start : start + 4 * count] if p.cached not in chosen]
        vectors.update(embed_texts(embedder, [t for p in batch for t in (p.query, p.cached)]))
        candidates = pairwise_candidates(batch, vectors)
        sims = candidates.similarities
        verdicts = policy.decide(policy.scores(candidates.texts, sims), sims, requirement)
        for pair, verdict in zip(batch, verdicts, strict=True):
            if verdict.accept and pair.cached not in chosen and len(chosen) < wanted:
                chosen[pair.cached] = pair
        if len(chosen) >= wanted:
            break
    kept = _nearest_is_partner(list(chosen.values()), vectors)[:count]
    if len(kept) < count:
        raise ValueError(f"{pairs_path}: {len(kept)} usable duplicate pairs, {count} asked")
    return kept


def _nearest_is_partner(
    pairs: list[LabelledPair], vectors: dict[str, np.ndarray]
) -> list[LabelledPair]:
    """Pairs whose query is nearer its own cached question than any other pair's. Dropping a
    pair removes a seed, so the pairs kept stay valid among fewer seeds."""
    if not pairs:
        return []
    seeds = np.stack([vectors[p.cached] for p in pairs])
    queries = np.stack([vectors[p.query] for p in pairs])
    nearest = (queries @ seeds.T).argmax(axis=1)
    return [p for i, p in enumerate(pairs) if nearest[i] == i]

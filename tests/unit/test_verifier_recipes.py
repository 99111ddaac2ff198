"""The verifier-recipe experiment's pair augmentation: only what the labels imply, nothing twice."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from benchmarks.verifier_recipes import hindsight_recall, implied_pairs
from routecache.training.pair_data import LabelledPair


def test_implied_pairs_follow_duplicates_and_carry_non_duplicates_to_cluster_members() -> None:
    pairs = [
        LabelledPair("A?", "B?", True),
        LabelledPair("b?", "C?", True),  # same question as "B?" once case is folded
        LabelledPair("C?", "D?", False),
    ]

    implied = {(p.query, p.cached, p.duplicate) for p in implied_pairs(pairs)}

    assert ("A?", "C?", True) in implied or ("C?", "A?", True) in implied
    assert {(x, "D?", False) for x in ("A?", "B?")} <= implied
    assert not any(frozenset((q, c)) == frozenset(("C?", "D?")) for q, c, _ in implied)
    assert all(q.casefold() != c.casefold() for q, c, _ in implied)


def test_contradictory_labels_imply_nothing() -> None:
    # A = B and A != B (Quora has such rows): carrying the "different" label would be a guess.
    pairs = [LabelledPair("A?", "B?", True), LabelledPair("B?", "A?", False)]

    assert implied_pairs(pairs) == []


def test_hindsight_recall_counts_false_hits_over_all_lookups() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = np.array([True, False, True, True, False, False, False, False, False, True])

    recall = hindsight_recall(scores, labels)

    # 1 false hit in 10 lookups is a rate of 0.1, over every budget here: only the top pair.
    assert recall[0.05] == 0.25


def test_the_cap_per_cluster_counts_only_pairs_not_already_labelled() -> None:
    # A chain A = B = C = D states 3 of its 6 pairs; a cap of 3 must bring the other 3.
    chain = ["A?", "B?", "C?", "D?"]
    pairs = [LabelledPair(a, b, True) for a, b in pairwise(chain)]

    implied = implied_pairs(pairs, per_cluster=3)

    assert {frozenset((p.query, p.cached)) for p in implied} == {
        frozenset(("A?", "C?")),
        frozenset(("A?", "D?")),
        frozenset(("B?", "D?")),
    }

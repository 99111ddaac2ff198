"""eval-cache on a few hand-checked pairs: the counts behind precision, recall and false hits."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import CosinePolicy, HitRequirement
from routecache.router.cli import main
from routecache.training.eval_cache import evaluate
from routecache.training.pair_data import LabelledPair

PAIRS = [
    LabelledPair("how do i learn python fast", "how do i learn python quickly", True),
    LabelledPair(
        "what is the capital city of france", "what is the capital city of germany", False
    ),
    LabelledPair("best way to cook rice", "how to fix a car engine", False),
]


def test_preconditions_of_the_hand_counts() -> None:
    vectors = HashEmbedder().encode([t for p in PAIRS for t in (p.query, p.cached)])
    sims = [float(np.dot(vectors[i], vectors[i + 1])) for i in range(0, 6, 2)]
    assert sims[0] >= 0.5 and sims[1] >= 0.5 and sims[2] < 0.5


@pytest.mark.parametrize("mode", ["pairwise", "cache"])
def test_counts_at_a_cosine_threshold(mode: str) -> None:
    embedder = HashEmbedder()
    (result,) = evaluate(
        PAIRS, embedder, CosinePolicy(), "cosine", [HitRequirement(0.5)], mode,  # type: ignore[arg-type]
        ScopedFaissIndex(embedder.dimension),
    )  # fmt: skip
    assert (result.pairs, result.duplicates, result.hits) == (3, 1, 2)
    assert (result.correct_hits, result.false_hits) == (1, 1)
    assert result.precision == 0.5 and result.recall == 1.0
    assert result.hit_rate == pytest.approx(2 / 3)
    assert result.false_hit_rate == pytest.approx(1 / 3)
    assert result.cosine_threshold == 0.5 and result.max_false_hit_rate is None


def test_cache_mode_counts_a_hit_on_another_questions_entry_as_false() -> None:
    # Both queries are near the first cached question; only pair 0 is its partner.
    pairs = [
        LabelledPair("how do i learn python fast", "how do i learn python quickly", True),
        LabelledPair("how do i learn python quickly please", "something else entirely", True),
    ]
    embedder = HashEmbedder()
    (result,) = evaluate(
        pairs, embedder, CosinePolicy(), "cosine", [HitRequirement(0.5)], "cache",
        ScopedFaissIndex(embedder.dimension),
    )  # fmt: skip
    assert (result.hits, result.correct_hits, result.false_hits) == (2, 1, 1)
    assert result.recall == 0.5


def test_cli_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(asdict(p)) + "\n" for p in PAIRS))
    config = tmp_path / "hash.toml"
    config.write_text('[cache]\nembedder = "hash"\nsimilarity_threshold = 0.5\n')
    code = main(["eval-cache", "--pairs", str(pairs), "--config", str(config), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("pairs", "precision", "recall", "hit_rate", "false_hit_rate", "max_false_hit_rate"):
        assert key in report
    assert report["policy"] == "cosine" and report["pairs"] == 3

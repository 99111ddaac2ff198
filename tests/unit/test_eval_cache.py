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
from routecache.training.eval_cache import cache_candidates, embed_texts, evaluate
from routecache.training.pair_data import LabelledPair, duplicate_clusters

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


def test_cache_mode_counts_apart_false_hits_on_the_same_question() -> None:
    # Query 0's own text (another case and spacing) is stored for pair 2; query 1's nearest
    # entry is pair 3's cached question, which pair 3's label makes a duplicate of query 1's
    # text; pair 4's query finds only another question.
    pairs = [
        LabelledPair("how do i  learn python fast", "tips for growing tomatoes", False),
        LabelledPair("what is the capital city of france", "best way to cook rice", False),
        LabelledPair("a question nobody else asks", "How do I learn Python fast", False),
        LabelledPair(
            "what is the capital city of france", "what is the capital city of france now", True
        ),
        LabelledPair("best way to cook rice fast", "some other text", False),
    ]
    embedder = HashEmbedder()
    index = ScopedFaissIndex(embedder.dimension)
    vectors = embed_texts(embedder, [t for p in pairs for t in (p.query, p.cached)])
    candidates = cache_candidates(pairs, vectors, index)
    assert [found for _, found in candidates.texts[:2]] == [
        "How do I learn Python fast",
        "what is the capital city of france now",
    ]
    assert candidates.texts[4][1] == "best way to cook rice"
    assert candidates.same_question is not None
    assert candidates.same_question.tolist() == [True, True, False, True, False]
    assert candidates.correct.tolist() == [False, False, False, True, False]
    (result,) = evaluate(
        pairs, embedder, CosinePolicy(), "cosine", [HitRequirement(-1.0)], "cache",
        ScopedFaissIndex(embedder.dimension), vectors,
    )  # fmt: skip
    assert (result.hits, result.correct_hits, result.false_hits) == (5, 1, 4)
    assert result.false_hits_same_question == 2
    assert result.false_hit_rate == pytest.approx(4 / 5)
    assert result.false_hit_rate_other_questions == pytest.approx(2 / 5)


def test_duplicate_clusters_join_labelled_duplicates_transitively() -> None:
    clusters = duplicate_clusters(
        [
            LabelledPair("A question", "b question", True),
            LabelledPair("b  question", "c question", True),
            LabelledPair("c question", "d question", False),
        ]
    )
    assert clusters["a question"] == clusters["b question"] == clusters["c question"]
    assert clusters["d question"] != clusters["a question"]


def test_pairwise_mode_has_no_same_question_count() -> None:
    embedder = HashEmbedder()
    (result,) = evaluate(
        PAIRS, embedder, CosinePolicy(), "cosine", [HitRequirement(0.5)], "pairwise"
    )
    assert result.false_hits_same_question == 0
    assert result.false_hit_rate_other_questions == result.false_hit_rate


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


@pytest.mark.parametrize("content", [None, "not json\n"], ids=["missing file", "not JSON"])
def test_cli_reports_a_bad_pairs_file_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    if content is not None:
        pairs.write_text(content)
    config = tmp_path / "hash.toml"
    config.write_text('[cache]\nembedder = "hash"\nsimilarity_threshold = 0.5\n')
    assert main(["eval-cache", "--pairs", str(pairs), "--config", str(config)]) == 2
    assert "pairs.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_cli_refuses_a_limit_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    # It evaluated one pair and reported on it as if asked to.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(asdict(p)) + "\n" for p in PAIRS))
    config = tmp_path / "hash.toml"
    config.write_text('[cache]\nembedder = "hash"\n')
    with pytest.raises(SystemExit) as exit_:
        main(["eval-cache", "--pairs", str(pairs), "--config", str(config), "--limit", limit])
    assert exit_.value.code == 2
    assert "argument --limit" in capsys.readouterr().err

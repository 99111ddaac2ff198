"""eval-cache on a few hand-checked pairs: the counts behind precision, recall and false hits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import (
    BudgetThreshold,
    CosinePolicy,
    HitPolicy,
    HitRequirement,
    HitVerdict,
    PolicyCalibration,
    VerifiedPolicy,
)
from routecache.cache.pair_features import FEATURE_NAMES
from routecache.router.cli import main
from routecache.router.settings import Settings
from routecache.training.eval_cache import (
    Candidates,
    cache_candidates,
    candidates_for,
    embed_texts,
    evaluate,
    evaluate_candidates,
    pairwise_candidates,
    score_candidates,
    summarise,
    verifier_latency_ms,
)
from routecache.training.pair_data import LabelledPair, duplicate_clusters
from tests.fakes import PartlySeenEmbedder

PAIRS = [
    LabelledPair("how do i learn python fast", "how do i learn python quickly", True),
    LabelledPair(
        "what is the capital city of france", "what is the capital city of germany", False
    ),
    LabelledPair("best way to cook rice", "how to fix a car engine", False),
]


class _NoScorer:
    """A cross-encoder stand-in whose logit is always 0: the probability follows the cosine."""

    def logits(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float32]:
        return np.zeros(len(pairs), dtype=np.float32)


def _cosine_verified(floor: float, threshold: float = 0.5) -> VerifiedPolicy:
    """A verified policy whose probability is sigmoid(cosine), above a cosine floor."""
    weights = tuple(1.0 if name == "cosine" else 0.0 for name in FEATURE_NAMES)
    calibration = PolicyCalibration(floor, weights, 0.0, (BudgetThreshold(0.01, threshold, 0.5),))
    return VerifiedPolicy(calibration, _NoScorer())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1 / (1 + np.exp(-x))
    return result


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


def test_cache_mode_offers_the_distractors_questions_and_joins_their_labels() -> None:
    # The query's nearest entry is a distractor's cached question, which the distractor's label
    # makes a duplicate of the query's text: the same question, but not the query's own partner.
    pairs = [LabelledPair("how do i learn python fast", "tips for growing tomatoes", False)]
    distractors = [
        LabelledPair("how do i learn python fast", "how do i learn python quickly", True)
    ]
    embedder = HashEmbedder()
    texts = [t for p in [*pairs, *distractors] for t in (p.query, p.cached)]
    vectors = embed_texts(embedder, texts)
    candidates = cache_candidates(pairs, vectors, ScopedFaissIndex(embedder.dimension), distractors)
    assert candidates.texts == [("how do i learn python fast", "how do i learn python quickly")]
    assert candidates.correct.tolist() == [False]
    assert candidates.same_question is not None and candidates.same_question.tolist() == [True]


def test_cache_mode_without_an_index_is_refused() -> None:
    vectors = embed_texts(HashEmbedder(), [t for p in PAIRS for t in (p.query, p.cached)])
    with pytest.raises(ValueError, match="vector index"):
        candidates_for(PAIRS, vectors, "cache")


def test_embedding_in_batches_gives_each_text_its_own_vector() -> None:
    embedder = HashEmbedder()
    texts = ["a", "bb cc", "ddd eee fff", "bb cc", "g h i j k l", "mm"]
    vectors = embed_texts(embedder, texts, batch=2)
    assert set(vectors) == set(texts)
    for text in texts:
        np.testing.assert_allclose(vectors[text], embedder.encode([text])[0])


def test_a_budget_below_every_calibrated_one_verifies_nothing_as_the_service() -> None:
    # Calibrated for 0.01 only: a 0.001 budget has an infinite threshold, so the service's
    # floor is infinite and no lookup reaches the cross-encoder, though both clear 0.5.
    policy = _cosine_verified(floor=0.5)
    requirement = HitRequirement(0.99, 0.001)
    assert policy.floor(requirement) == float("inf")
    candidates = Candidates([("a", "b"), ("c", "d")], [0.8, 0.7], np.array([True, False]))
    pairs = [LabelledPair("a", "b", True), LabelledPair("c", "d", False)]
    (result,) = evaluate_candidates(
        pairs, candidates, policy, "verified", [requirement], "pairwise"
    )
    assert (result.hits, result.verified_share) == (0, 0.0)


def test_scoring_in_batches_keeps_each_candidates_similarity() -> None:
    similarities = [0.95, 0.2, 0.7, 0.85, 0.6]
    candidates = Candidates(
        [(f"q{i}", f"c{i}") for i in range(5)], similarities, np.zeros(5, dtype=bool)
    )
    scores = score_candidates(_cosine_verified(floor=0.5), candidates, batch=2)
    expected = _sigmoid(np.array(similarities))
    expected[1] = np.nan  # under the floor: never verified
    np.testing.assert_allclose(scores, expected)


def test_a_verified_policy_reports_its_budget_and_the_share_it_verified() -> None:
    embedder = HashEmbedder()
    # Floor 0.5: the first two pairs reach the verifier, the third (cosine < 0.5) does not.
    # Each verified probability is sigmoid(cosine) < 0.75, so a 0.75 threshold serves none.
    for threshold, hits in ((0.0, (2, 1)), (0.75, (0, 0))):
        (result,) = evaluate(
            PAIRS, embedder, _cosine_verified(floor=0.5, threshold=threshold), "verified",
            [HitRequirement(0.99, 0.01)], "pairwise",
        )  # fmt: skip
        assert (result.policy, result.max_false_hit_rate, result.cosine_threshold) == (
            "verified",
            0.01,
            None,
        )
        assert result.verified_share == pytest.approx(2 / 3)  # served or not
        assert (result.hits, result.correct_hits) == hits


def test_latency_times_each_lookup_that_reaches_the_verifier_up_to_the_sample_count() -> None:
    candidates = Candidates(
        [(f"q{i}", f"c{i}") for i in range(4)], [0.4, 0.6, 0.75, 0.9], np.zeros(4, dtype=bool)
    )
    policy = _cosine_verified(floor=0.6)  # a similarity equal to the floor is verified
    assert verifier_latency_ms(policy, candidates, HitRequirement(0.9))["samples"] == 3
    assert verifier_latency_ms(policy, candidates, HitRequirement(0.9), samples=2)["samples"] == 2


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


def _hash_config(tmp_path: Path) -> Path:
    config = tmp_path / "hash.toml"
    config.write_text('[cache]\nembedder = "hash"\nsimilarity_threshold = 0.5\n')
    return config


def _pairs_file(tmp_path: Path) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(asdict(p)) + "\n" for p in PAIRS))
    return pairs


def test_cli_reports_each_threshold_and_budget_on_the_first_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path))]
    argv += ["--config", str(_hash_config(tmp_path)), "--json", "--mode", "cache"]
    argv += ["--cosine-threshold", "0.5,0.99", "--max-false-hit-rate", "0.01,0.05"]
    assert main([*argv, "--limit", "2"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["cosine_threshold"] for r in reports] == [0.5, 0.5, 0.99, 0.99]
    assert {(r["pairs"], r["mode"]) for r in reports} == {(2, "cache")}
    assert [r["hits"] for r in reports] == [2, 2, 0, 0]


def test_cli_latency_flag_adds_the_same_verifier_timing_to_each_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path))]
    argv += ["--config", str(_hash_config(tmp_path)), "--json", "--latency"]
    assert main([*argv, "--cosine-threshold", "0.5,0.99"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(reports) == 2
    latency = reports[0]["verifier_latency"]  # timed once, at the first requirement
    assert reports[1]["verifier_latency"] == latency
    assert set(latency) == {"p50_ms", "p99_ms", "samples"} and latency["samples"] <= len(PAIRS)


@pytest.mark.parametrize(
    ("flag", "verifier", "policy"),
    [("verified", "cross-encoder", "verified"), ("cosine", "off", "cosine")],
)
def test_cli_policy_flag_sets_the_verifier_it_builds(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    verifier: str,
    policy: str,
) -> None:
    from routecache.router import bootstrap

    asked: list[str] = []

    def build(settings: Settings) -> HitPolicy:
        asked.append(settings.cache.verifier)
        return CosinePolicy() if settings.cache.verifier == "off" else _cosine_verified(0.5)

    monkeypatch.setattr(bootstrap, "build_hit_policy", build)
    config = tmp_path / "verified.toml"
    config.write_text('[cache]\nembedder = "hash"\nverifier = "auto"\n')
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path)), "--config", str(config)]
    assert main([*argv, "--json", "--policy", flag]) == 0
    assert asked == [verifier]
    assert json.loads(capsys.readouterr().out)["policy"] == policy


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-false-hit-rate", v) for v in ["0", "1", "0.01,1.5", "few", "", ","]]
    # 0: the service's settings refuse it (similarity_threshold must be above 0).
    + [("--cosine-threshold", v) for v in ["-0.1", "0", "1.01", "0.5,nan", "high", ""]],
)
def test_cli_refuses_a_budget_or_cosine_threshold_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path))]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--config", str(_hash_config(tmp_path)), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_cli_takes_a_cosine_threshold_of_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1 serves only identical embeddings: a threshold cache.similarity_threshold takes too.
    # It was refused as if it were a budget, which must lie strictly between 0 and 1.
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path))]
    argv += ["--config", str(_hash_config(tmp_path)), "--json", "--cosine-threshold", "0.5,1"]
    assert main(argv) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["cosine_threshold"] for r in reports] == [0.5, 1.0]


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


def test_pairwise_candidates_put_the_query_first_as_the_verifier_scores_them() -> None:
    # A one-order verifier scores (query, cached): the order the service looks up in.
    vectors = embed_texts(HashEmbedder(), [t for p in PAIRS for t in (p.query, p.cached)])
    candidates = pairwise_candidates(PAIRS, vectors)
    assert candidates.texts == [(p.query, p.cached) for p in PAIRS]
    assert candidates.correct.tolist() == [True, False, False]


def test_same_question_false_hits_count_only_the_candidates_served() -> None:
    # Four lookups: a right hit, a served same-question entry, an unserved one, a served
    # entry of another question.
    candidates = Candidates(
        [(f"q{i}", f"c{i}") for i in range(4)],
        [0.9, 0.9, 0.9, 0.9],
        np.array([True, False, False, False]),
        np.array([True, True, True, False]),
    )
    verdicts = [HitVerdict(accept, 0.9) for accept in (True, True, False, True)]
    result = summarise("cache", "cosine", candidates, 1, verdicts, HitRequirement(0.5), False)
    assert (result.hits, result.correct_hits, result.false_hits) == (3, 1, 2)
    assert result.false_hits_same_question == 1
    assert result.false_hit_rate_other_questions == pytest.approx(1 / 4)
    assert result.verified_share == 0.0 and result.precision == pytest.approx(1 / 3)
    # nothing served: nothing served wrongly, so the precision is 1, not 0
    none = [HitVerdict(False, 0.9)] * 4
    result = summarise("cache", "cosine", candidates, 1, none, HitRequirement(0.5), False)
    assert (result.precision, result.recall, result.false_hits_same_question) == (1.0, 0.0, 0)


def test_cli_latency_in_cache_mode_times_the_cache_mode_lookups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It timed each pair's own cached question: in cache mode the lookups that reach the
    # verifier are those whose nearest entry clears the floor, here a query stored verbatim
    # for another pair (its own cached question is unrelated).
    verbatim = LabelledPair(PAIRS[0].cached, "why do cats purr at night", False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(asdict(p)) + "\n" for p in [*PAIRS, verbatim]))
    argv = ["eval-cache", "--pairs", str(pairs), "--config", str(_hash_config(tmp_path))]
    argv += ["--json", "--latency", "--mode", "cache", "--policy", "cosine"]
    assert main([*argv, "--cosine-threshold", "0.99"]) == 0
    (report,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Under the cosine policy the floor is the threshold: each lookup reaching it is a hit.
    assert report["hits"] >= 1 and report["verifier_latency"]["samples"] == report["hits"]


def test_cli_without_json_prints_one_aligned_line_per_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval-cache", "--pairs", str(_pairs_file(tmp_path))]
    assert main([*argv, "--config", str(_hash_config(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{'pairs':>20}: 3" in lines and f"{'policy':>20}: cosine" in lines


def test_cli_reports_a_verifier_dir_without_its_files_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The service stops with "routecache: cannot start: ..." (exit 2); eval-cache raised a
    # FileNotFoundError traceback (exit 1).
    empty = tmp_path / "verifier"
    empty.mkdir()
    config = tmp_path / "verified.toml"
    config.write_text(f'[cache]\nverifier = "cross-encoder"\nverifier_dir = "{empty}"\n')
    assert main(["eval-cache", "--pairs", str(_pairs_file(tmp_path)), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routecache: ") and str(empty) in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["pairwise", "cache"])
def test_a_pair_the_model_cannot_see_whole_is_no_hit_as_in_the_service(mode: str) -> None:
    # eval-cache runs the service's matching: the cache matches a text the model does not see
    # whole (an emoji read as [UNK]) by the exact tier only, so such a pair is no semantic hit.
    pairs = [LabelledPair("what does the 😀 emoji mean", "what does the 😡 emoji mean", False)]
    embedder = PartlySeenEmbedder()
    (plain,) = evaluate(
        pairs, HashEmbedder(), CosinePolicy(), "cosine", [HitRequirement(0.5)], mode,  # type: ignore[arg-type]
        ScopedFaissIndex(embedder.dimension),
    )  # fmt: skip
    (seen,) = evaluate(
        pairs, embedder, CosinePolicy(), "cosine", [HitRequirement(0.5)], mode,  # type: ignore[arg-type]
        ScopedFaissIndex(embedder.dimension),
    )  # fmt: skip
    assert (plain.hits, plain.false_hits) == (1, 1)  # the same vector, cosine 1
    assert (seen.hits, seen.false_hits) == (0, 0)

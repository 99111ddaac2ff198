"""The semantic tier's decision rule: cosine floor, verifier, calibrated thresholds per budget."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache.cross_encoder import GRAPH_FILE, POLICY_FILE, packaged_verifier_dir
from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import (
    BudgetThreshold,
    CosinePolicy,
    HitRequirement,
    PolicyCalibration,
    VerifiedPolicy,
)
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.pair_features import FEATURE_NAMES, lexical_features
from routecache.cache.semantic_cache import NewEntry, SemanticCache
from routecache.domain import CacheOutcome, Tier
from routecache.router.bootstrap import build_hit_policy
from routecache.router.settings import ConfigError, load_settings
from tests.fakes import ManualClock


class KeywordScorer:
    """A fake cross-encoder: a high logit unless the pair differs in the word 'paris'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def logits(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float32]:
        self.calls.extend(pairs)
        return np.array(
            [-6.0 if ("paris" in q) != ("paris" in c) else 6.0 for q, c in pairs], dtype=np.float32
        )


def calibration(floor: float = 0.5) -> PolicyCalibration:
    # The probability is the sigmoid of the cross-encoder logit alone.
    weights = tuple(1.0 if name == "cross_encoder" else 0.0 for name in FEATURE_NAMES)
    return PolicyCalibration(
        cosine_floor=floor,
        weights=weights,
        bias=0.0,
        thresholds=(BudgetThreshold(0.01, 0.9, 0.4), BudgetThreshold(0.05, 0.6, 0.7)),
    )


def test_threshold_is_that_of_the_largest_calibrated_budget_not_above_the_one_asked() -> None:
    rule = calibration()
    assert rule.threshold_for(0.01) == 0.9
    assert rule.threshold_for(0.03) == 0.9
    assert rule.threshold_for(0.05) == 0.6
    assert rule.threshold_for(0.5) == 0.6
    assert math.isinf(rule.threshold_for(0.005))  # nothing measured keeps it: no hits


def test_calibration_round_trips_through_json_and_rejects_other_features() -> None:
    rule = calibration()
    again = PolicyCalibration.from_json(rule.to_json())
    assert again == rule
    broken = rule.to_json().replace('"cosine"', '"cosine_v2"')
    with pytest.raises(ValueError, match="features"):
        PolicyCalibration.from_json(broken)


def test_a_budget_equal_to_a_calibrated_one_up_to_rounding_gets_its_threshold() -> None:
    # 0.7 * 0.1 is 0.06999999999999999: the same budget as a calibrated 0.07, not a smaller one
    # that nothing measured keeps (which would turn the tenant's semantic hits off).
    rule = replace(calibration(), thresholds=(BudgetThreshold(0.07, 0.8, 0.5),))
    assert 0.7 * 0.1 < 0.07
    assert rule.threshold_for(0.7 * 0.1) == 0.8


def test_a_one_order_calibration_round_trips_with_its_metadata() -> None:
    # The service scores pairs in one order or both as the calibration says: a calibration
    # fitted on one order and read back as symmetric would score pairs it was not fitted on.
    rule = replace(calibration(), symmetric=False, metadata={"pairs": "quora", "seed": 7})
    again = PolicyCalibration.from_json(rule.to_json())
    assert again.symmetric is False and again.metadata == {"pairs": "quora", "seed": 7}
    assert again == rule


def test_a_calibration_needs_a_weight_per_feature_and_a_budget() -> None:
    rule = calibration()
    with pytest.raises(ValueError, match="weights"):
        replace(rule, weights=rule.weights[:-1])
    with pytest.raises(ValueError, match="budget threshold"):
        replace(rule, thresholds=())


def test_pairs_under_the_floor_are_not_scored_and_never_hit() -> None:
    scorer = KeywordScorer()
    policy = VerifiedPolicy(calibration(floor=0.5), scorer)
    pairs = [("weather in paris", "weather in paris today"), ("a", "b")]
    scores = policy.scores(pairs, [0.9, 0.3])
    assert scorer.calls == [pairs[0]]
    assert scores[0] > 0.99 and math.isnan(scores[1])
    verdicts = policy.decide(scores, [0.9, 0.3], HitRequirement(0.9, 0.01))
    assert [v.accept for v in verdicts] == [True, False]
    assert verdicts[1].verifier_score is None


def test_a_batch_entirely_under_the_floor_never_reaches_the_cross_encoder() -> None:
    # An empty batch of feature rows cannot go through the logistic model: nothing is scored.
    scorer = KeywordScorer()
    scores = VerifiedPolicy(calibration(floor=0.5), scorer).scores(
        [("a", "b"), ("c", "d")], [0.1, 0.2]
    )
    assert scorer.calls == [] and np.isnan(scores).all()


def test_the_calibrated_bias_shifts_the_probability() -> None:
    policy = VerifiedPolicy(replace(calibration(), bias=-6.0), KeywordScorer())
    (score,) = policy.scores([("a", "a")], [0.9])  # logit 6, bias -6: even odds
    assert score == pytest.approx(0.5)


def test_the_cosine_similarity_is_one_of_the_verifiers_features() -> None:
    weights = tuple(1.0 if name == "cosine" else 0.0 for name in FEATURE_NAMES)
    policy = VerifiedPolicy(replace(calibration(), weights=weights), KeywordScorer())
    (score,) = policy.scores([("a", "a")], [0.9])
    assert score == pytest.approx(1.0 / (1.0 + math.exp(-0.9)))


def test_the_verifier_refuses_a_close_neighbour_that_asks_something_else() -> None:
    policy = VerifiedPolicy(calibration(), KeywordScorer())
    scores = policy.scores([("weather in paris", "weather in london")], [0.95])
    (verdict,) = policy.decide(scores, [0.95], HitRequirement(0.9, 0.05))
    assert not verdict.accept and verdict.verifier_score is not None
    assert verdict.verifier_score < 0.01


async def test_cosine_policy_is_the_plain_threshold() -> None:
    policy = CosinePolicy()
    assert policy.floor(HitRequirement(0.85)) == 0.85
    assert (await policy.judge("a", "b", 0.86, HitRequirement(0.85))).accept
    assert not (await policy.judge("a", "b", 0.84, HitRequirement(0.85))).accept


async def test_each_rule_serves_at_its_threshold_exactly() -> None:
    at = HitRequirement(0.85, 0.01)
    assert (await CosinePolicy().judge("a", "b", 0.85, at)).accept
    scorer = KeywordScorer()
    policy = VerifiedPolicy(calibration(floor=0.5), scorer)
    assert not math.isnan(policy.scores([("a", "a")], [0.5])[0])  # at the floor: verified
    assert scorer.calls == [("a", "a")]
    (verdict,) = policy.decide(np.array([0.9]), [0.95], at)  # 0.9: the 1 % budget's threshold
    assert verdict.accept and verdict.verifier_score == 0.9


async def test_a_similarity_short_of_the_threshold_by_float32_rounding_only_clears_it() -> None:
    # A float32 unit vector dotted with itself is often 0.99999994: at threshold (or floor) 1,
    # "identical embeddings only", it must count as 1. A real shortfall still does not clear.
    rounded = float(np.float32(1.0) - np.finfo(np.float32).eps / 2)  # 0.99999994
    assert (await CosinePolicy().judge("a", "a", rounded, HitRequirement(1.0))).accept
    assert not (await CosinePolicy().judge("a", "b", 0.9999, HitRequirement(1.0))).accept
    policy = VerifiedPolicy(calibration(floor=1.0), KeywordScorer())
    assert not math.isnan(policy.scores([("a", "a")], [rounded])[0])
    assert math.isnan(policy.scores([("a", "b")], [0.9999])[0])


def test_lexical_features_see_numbers_negation_and_question_words() -> None:
    jaccard, numbers, negation, question, _ = lexical_features(
        "Why is 2016 a leap year?", "How is 2017 not a leap year?"
    )
    assert (numbers, negation, question) == (1.0, 1.0, 1.0)
    assert 0 < jaccard < 1
    same = lexical_features("How do I learn Python?", "how do i learn python")
    assert same[:4] == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("negated", ["never", "no", "without", "nobody", "nothing", "none"])
def test_a_negation_word_on_one_side_only_differs(negated: str) -> None:
    assert lexical_features(f"do cats {negated} purr", "do cats purr")[2] == 1.0
    assert lexical_features(f"do cats {negated} purr", f"do dogs {negated} purr")[2] == 0.0


def test_a_decimal_number_is_one_number_not_two() -> None:
    # 2.5 % over 5 years is not 5.2 % over 2 years, though the digits are the same.
    loan = "a loan at 2.5 % over 5 years", "a loan at 5.2 % over 2 years"
    assert lexical_features(*loan)[1] == 1.0


def test_the_question_word_is_the_first_one_asked() -> None:
    # "How do I find what my IP is" asks how, not what: it must differ from "What is my IP".
    assert lexical_features("How do I find what my IP is", "What is my IP")[3] == 1.0
    assert lexical_features("How do I find what my IP is", "How to see which IP I have")[3] == 0.0


@pytest.mark.parametrize(
    "query", ["whom did the letter name, and who sent it", "whose letter was it, and who sent it"]
)
def test_whom_and_whose_are_question_words_apart_from_who(query: str) -> None:
    # Asked first, they are the question: not the "who" that follows.
    assert lexical_features(query, "who sent the letter")[3] == 1.0


def test_the_lexical_signals_read_either_side_as_the_query() -> None:
    # Symmetric calibrations score both orders: the same pair must give the same signals.
    a, b = "How long does it take to boil one egg?", "boil an egg"
    assert lexical_features(a, b) == pytest.approx(lexical_features(b, a))
    # The length signal is |log((words + 1) / (words + 1))|, as the shipped weights were fitted.
    assert lexical_features("one two three", "one")[4] == pytest.approx(math.log(2))


def test_lexical_signals_read_full_width_text_as_its_plain_form() -> None:
    assert lexical_features("\uff37\uff48\uff59 is the sky blue", "why is the sky blue") == (
        1.0, 0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip


def test_a_pair_with_no_words_to_compare_is_no_evidence_either_way() -> None:
    # Text outside the Latin alphabet has no words here: the overlap reads as full, as in the
    # pairs the weights were fitted on, so only the cross-encoder and the cosine decide.
    assert lexical_features("\u5929\u6c14\u600e\u4e48\u6837", "\u4eca\u5929\u5929\u6c14") == (
        1.0, 0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip


def test_a_negation_typed_with_a_typographic_apostrophe_still_differs() -> None:
    # Phones type "don(U+2019)t": the negation must count as in "don't", or the verifier loses
    # its signal against serving the answer to "why do cats purr" for "why don't cats purr".
    for mark in ("\u2019", "\u2018", "\u02bc"):
        typed = f"Why don{mark}t cats purr?"
        assert lexical_features(typed, "Why do cats purr?")[2] == 1.0
        assert lexical_features(typed, "Why don't cats purr?") == (1.0, 0.0, 0.0, 0.0, 0.0)


# The shipped verifier was calibrated on these exact values: the tests below pin what each
# signal computes, so a change to any of them shows up here before it skews the calibration.


def test_a_decimal_comma_number_is_one_number_too() -> None:
    loan = "a loan at 2,5 % over 5 years", "a loan at 5,2 % over 2 years"
    assert lexical_features(*loan)[1] == 1.0


def test_a_number_repeated_on_one_side_only_does_not_differ() -> None:
    assert lexical_features("does 2 times 2 make 4", "does 2 squared make 4")[1] == 0.0


def test_words_compare_under_full_case_folding() -> None:
    assert lexical_features("Why is the Straße closed", "why is the STRASSE closed") == (
        1.0, 0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip


def test_a_contraction_is_one_word() -> None:
    assert lexical_features("we're here", "we here")[4] == 0.0


@pytest.mark.parametrize(
    "word", ["what", "how", "why", "when", "where", "which", "who", "whom", "whose"]
)
def test_each_question_word_asked_on_one_side_only_differs(word: str) -> None:
    assert lexical_features(f"{word} is it", "is it")[3] == 1.0


def test_the_length_signal_counts_repeated_words() -> None:
    # Distinct words are the same two, but four words against two is log(5 / 3).
    assert lexical_features("very very very big", "very big")[4] == pytest.approx(math.log(5 / 3))


def _entry(text: str, vector: npt.NDArray[np.float32]) -> NewEntry:
    return NewEntry(
        tenant="acme", scope="acme:s", prompt=text, answer=f"answer to {text}", model="m",
        tier=Tier.CHEAP, embedding=vector, cost_usd=0.01, prompt_tokens=3,
        completion_tokens=3, ttl_seconds=60,
    )  # fmt: skip


def _verified_cache(floor: float) -> tuple[SemanticCache, HashEmbedder, KeywordScorer]:
    """A cache whose hits the keyword scorer verifies above a cosine floor."""
    embedder, scorer, clock = HashEmbedder(), KeywordScorer(), ManualClock()
    cache = SemanticCache(
        InMemoryEntryStore(100, clock),
        ScopedFaissIndex(embedder.dimension),
        clock,
        policy=VerifiedPolicy(calibration(floor=floor), scorer),
    )
    return cache, embedder, scorer


async def test_semantic_cache_serves_only_what_the_verifier_accepts() -> None:
    cache, embedder, scorer = _verified_cache(floor=0.3)
    stored = "what is the weather in london this week"
    await cache.store(_entry(stored, embedder.encode([stored])[0]))
    requirement = HitRequirement(0.9, 0.01)

    other_city = "what is the weather in paris this week"
    assert (
        await cache.lookup_semantic(
            "acme:s", other_city, embedder.encode([other_city])[0], requirement
        )
        is None
    )
    same = "what is the weather in london this week please"
    hit = await cache.lookup_semantic("acme:s", same, embedder.encode([same])[0], requirement)
    assert hit is not None and hit.outcome is CacheOutcome.SEMANTIC
    assert hit.verifier_score is not None and hit.verifier_score > 0.9
    assert scorer.calls == [(other_city, stored), (same, stored)]  # one pass per lookup


async def test_a_lookup_verifies_only_its_nearest_candidate() -> None:
    # Two stored neighbours above the floor, both asking about another city: the verifier
    # refuses the nearest and the lookup is a miss, without paying for a second pass.
    cache, embedder, scorer = _verified_cache(floor=0.1)
    for stored in ("what is the weather in london this week", "the weather in london"):
        await cache.store(_entry(stored, embedder.encode([stored])[0]))
    query = "what is the weather in paris this week"
    vector = embedder.encode([query])[0]
    neighbours = cache.index.search("acme:s", vector, 4)
    assert len(neighbours) == 2 and all(n.similarity >= 0.1 for n in neighbours)
    assert await cache.lookup_semantic("acme:s", query, vector, HitRequirement(0.9)) is None
    assert len(scorer.calls) == 1


async def test_a_budget_below_every_calibrated_one_never_pays_for_a_verifier_pass() -> None:
    # Its threshold is infinite: no score could clear it, so the cross-encoder ran for nothing
    # on every lookup with a neighbour above the floor.
    cache, embedder, scorer = _verified_cache(floor=0.1)
    stored = "what is the weather in london this week"
    await cache.store(_entry(stored, embedder.encode([stored])[0]))
    vector = embedder.encode([stored + " please"])[0]
    assert await cache.lookup_semantic("acme:s", stored, vector, HitRequirement(0.9, 0.005)) is None
    assert scorer.calls == []
    assert await cache.lookup_semantic("acme:s", stored, vector, HitRequirement(0.9, 0.01))


@pytest.mark.parametrize(
    ("verifier", "embedder", "verified"),
    [("off", "all-MiniLM-L6-v2", False), ("auto", "hash", False),
     ("auto", "all-MiniLM-L6-v2", True), ("cross-encoder", "hash", True)],
)  # fmt: skip
def test_the_configured_verifier_applies_to_minilm_unless_turned_off(
    verifier: str, embedder: str, verified: bool
) -> None:
    policy = build_hit_policy(load_settings(cache={"verifier": verifier}), embedder)
    assert isinstance(policy, VerifiedPolicy) is verified


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"features": []}', '{"cosine_floor": 0.5}'],
    ids=["not JSON", "not an object", "other features", "keys missing"],
)  # fmt: skip
def test_a_damaged_verifier_calibration_is_one_config_error_naming_it(
    tmp_path: Path, content: str
) -> None:
    # Before: a JSONDecodeError, TypeError or KeyError traceback at the start.
    (tmp_path / POLICY_FILE).write_text(content)
    settings = load_settings(cache={"verifier": "cross-encoder", "verifier_dir": tmp_path})
    with pytest.raises(ConfigError, match=f"{POLICY_FILE} is not a verifier calibration"):
        build_hit_policy(settings, "all-MiniLM-L6-v2")


@pytest.mark.parametrize("graph", [b"", b"not a graph"], ids=["empty", "garbage"])
def test_a_torn_verifier_graph_is_one_config_error_naming_it(tmp_path: Path, graph: bytes) -> None:
    # Before: ONNX Runtime's INVALID_PROTOBUF traceback at the start (a missing graph already
    # stopped it in one line, as an OSError).
    shutil.copyfile(packaged_verifier_dir() / POLICY_FILE, tmp_path / POLICY_FILE)
    (tmp_path / GRAPH_FILE).write_bytes(graph)
    settings = load_settings(cache={"verifier": "cross-encoder", "verifier_dir": tmp_path})
    with pytest.raises(ConfigError, match=f"cache.verifier_dir: .*{GRAPH_FILE}"):
        build_hit_policy(settings, "all-MiniLM-L6-v2")


@pytest.mark.parametrize("named", ["0" * 64, None], ids=["another graph", "no graph named"])
def test_a_verifier_graph_other_than_its_policy_names_is_one_config_error(
    tmp_path: Path, named: str | None
) -> None:
    # Before: a train-verifier run that failed after its export left a new graph beside the
    # old graph's policy, and the service served hits with thresholds of another model.
    shutil.copyfile(packaged_verifier_dir() / GRAPH_FILE, tmp_path / GRAPH_FILE)
    policy = json.loads((packaged_verifier_dir() / POLICY_FILE).read_text("utf-8"))
    policy["metadata"].pop("graph_sha256")
    if named is not None:
        policy["metadata"]["graph_sha256"] = named
    (tmp_path / POLICY_FILE).write_text(json.dumps(policy), encoding="utf-8")
    settings = load_settings(cache={"verifier": "cross-encoder", "verifier_dir": tmp_path})
    with pytest.raises(ConfigError, match=f"cache.verifier_dir: .*{GRAPH_FILE} is not the graph"):
        build_hit_policy(settings, "all-MiniLM-L6-v2")


def test_the_packaged_verifier_graph_is_the_one_its_policy_names() -> None:
    policy = json.loads((packaged_verifier_dir() / POLICY_FILE).read_text("utf-8"))
    graph = (packaged_verifier_dir() / GRAPH_FILE).read_bytes()
    assert policy["metadata"]["graph_sha256"] == hashlib.sha256(graph).hexdigest()

"""Features, the neighbour + heads classifier, its artifact (save/load, refusals) and the double."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.classifier.features import (
    TEXT_FEATURE_NAMES,
    text_feature_matrix,
    text_features,
)
from routecache.classifier.model import (
    ClassifierArtifactError,
    DifficultyModel,
    FixedScoreClassifier,
    SklearnDifficultyClassifier,
    feature_names,
    load_artifact,
    load_classifier,
    save_artifact,
)
from routecache.classifier.neighbours import (
    KS,
    NeighbourBank,
    label_matrix,
    neighbour_feature_names,
)
from routecache.classifier.ports import DifficultyClassifier
from routecache.domain import OperatingPoint
from routecache.training.train_classifier import LabelledSet, fit_model
from tests.unit.conftest import record_fsyncs

MMLU_PROMPT = "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
GSM_PROMPT = "Tom has 3 apples and buys 12 more at $2 each. How many apples does he have?"
EMBEDDER = HashEmbedder(32)


def _labelled(n: int = 80) -> LabelledSet:
    """Hard prompts: the cheap model fails; easy ones it gets right."""
    hard = np.arange(n) % 2 == 0
    texts = [
        f"{'prove the theorem about integrals' if h else 'count the apples'} case {i}"
        for i, h in enumerate(hard)
    ]
    strong_fails = (np.arange(n) % 5 == 1).astype(float)  # the strong model slips now and then
    return LabelledSet(texts, EMBEDDER.encode(texts), hard.astype(float), strong_fails)


def _metadata(threshold: float = 0.4) -> dict[str, Any]:
    return {
        "version": "difficulty-test",
        "created_utc": "2024-01-01T00:00:00+00:00",
        "training_data_sha256": "0" * 64,
        "n_train": 80,
        "embedder": EMBEDDER.name,
        "embedding_dimension": EMBEDDER.dimension,
        "feature_names": feature_names(),
        "default_threshold": threshold,
        "holdout": {"apgr": 0.6},
    }


@pytest.fixture(scope="module")
def trained() -> DifficultyModel:
    return fit_model(_labelled(), c=1.0, seed=0)


def test_text_features_see_the_shape_of_the_prompt() -> None:
    mmlu, gsm = text_features(MMLU_PROMPT), text_features(GSM_PROMPT)
    names = list(TEXT_FEATURE_NAMES)
    assert mmlu.shape == gsm.shape == (len(names),)
    assert mmlu[names.index("multiple_choice")] == 1.0
    assert gsm[names.index("multiple_choice")] == 0.0
    assert gsm[names.index("log_numbers")] == pytest.approx(np.log1p(3))
    assert mmlu[names.index("log_lines")] == pytest.approx(np.log1p(6))
    assert np.isfinite(text_features("")).all()


def test_text_features_count_each_named_quantity() -> None:
    # 58 characters, 18 words, 5 lines; digits 1200 3 5 2 1 2 3 4 2 (12); the numbers
    # 1,200 3.5 2 1 2 3 42 (7); the math symbols $ % = (3); options A) to D).
    text = "Pay $1,200 at 3.5% for 2 years: x = ?\nA) 1\nB) 2\nC) 3\nD) 42"
    expected = {
        "log_chars": np.log1p(58),
        "log_words": np.log1p(18),
        "log_lines": np.log1p(5),
        "digit_ratio": 12 / 58,
        "log_numbers": np.log1p(7),
        "math_symbol_ratio": 3 / 58,
        "multiple_choice": 1.0,
    }
    assert list(expected) == list(TEXT_FEATURE_NAMES)
    np.testing.assert_allclose(text_features(text), list(expected.values()))


def _counted_one_by_one(text: str) -> tuple[float, float]:
    """digit_ratio and math_symbol_ratio as the trained artifacts were fitted: per character."""
    denominator = max(len(text), 1)
    digits = sum(c.isdigit() for c in text)
    symbols = sum(c in frozenset("=+-*/^<>%$") for c in text)
    return digits / denominator, symbols / denominator


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Pay $1,200 at 3.5% for 2 years: x = ?",
        "x² + y³ = z⁴, H₂O, ½ and ① ② ⑳, ١٢٣ and ۴۵۶, १२३, ๑๒๓, full-width \uff15\uff16\uff17",
        "\U0001d7d9\U0001d7da \U0001d7d8, 🄁 🄂 (astral digits), emoji 🙂 and 𐒠𐒡 (Osmanya)",
        "".join(chr(c) for c in range(0x110000) if chr(c).isdigit()),  # every digit there is
        "".join(map(chr, range(0x2500))) + "".join(map(chr, range(0x1D7C0, 0x1D800))),
    ],
    ids=["empty", "ascii", "bmp forms", "astral", "every digit", "ranges"],
)
def test_text_features_count_digits_and_symbols_as_str_isdigit_does(text: str) -> None:
    names = list(TEXT_FEATURE_NAMES)
    features = text_features(text * 3)
    counted = (features[names.index("digit_ratio")], features[names.index("math_symbol_ratio")])
    assert counted == _counted_one_by_one(text * 3)  # equal, not close: same counts


def test_text_features_of_an_empty_prompt_are_zero_and_two_options_are_no_quiz() -> None:
    np.testing.assert_array_equal(text_features(""), np.zeros(len(TEXT_FEATURE_NAMES)))
    two_options = text_features("Is it true?\nA. yes\nB. no")
    assert two_options[TEXT_FEATURE_NAMES.index("multiple_choice")] == 0.0


def test_ratios_of_a_one_character_prompt_are_over_that_one_character() -> None:
    names = list(TEXT_FEATURE_NAMES)
    assert text_features("7")[names.index("digit_ratio")] == 1.0
    assert text_features("=")[names.index("math_symbol_ratio")] == 1.0


def test_a_quiz_needs_all_four_options_each_opening_a_line_before_a_space() -> None:
    def quiz(text: str) -> float:
        return float(text_features(text)[TEXT_FEATURE_NAMES.index("multiple_choice")])

    assert quiz("Pick one:\nA. x\nB. y\nC. z") == 0.0  # three options
    assert quiz("Pick one:\nA.x\nB.y\nC.z\nD.w") == 0.0  # no space: abbreviations, not options
    assert quiz("Pick one:\nA. x\nB) y\nC. z\nD) w") == 1.0
    assert quiz("Plan A. go, plan B. wait, plan C. run or plan D. hide") == 0.0  # mid-line


def test_a_word_is_any_run_of_non_space_characters() -> None:
    log_words = text_features("x=y+2, (so) 3.5%!")[TEXT_FEATURE_NAMES.index("log_words")]
    assert log_words == pytest.approx(np.log1p(3))


def test_text_feature_matrix_holds_each_prompts_features_as_given() -> None:
    texts = ["", "  padded prompt \n\n", MMLU_PROMPT]
    matrix = text_feature_matrix(texts)
    assert matrix.shape == (3, len(TEXT_FEATURE_NAMES))
    for row, text in zip(matrix, texts, strict=True):
        np.testing.assert_array_equal(row, text_features(text))


def _expected_neighbour_features(
    bank: NeighbourBank, embedding: np.ndarray, skip: int | None = None
) -> np.ndarray:
    """The documented features by brute force: label rates and similarities of the nearest."""
    payload = bank.to_payload()
    z = (embedding - payload["pca_mean"]) @ payload["pca_components"].T
    similarities = payload["vectors"] @ (z / np.linalg.norm(z))
    ranked = [i for i in np.argsort(-similarities, kind="stable") if i != skip]
    labels = payload["labels"]
    rates = [labels[ranked[:k]].mean(axis=0) for k in KS]
    top = similarities[ranked]
    return np.concatenate([*rates, [top[0], top[:10].mean()]])


def _random_bank(n: int, dimension: int, seed: int) -> tuple[NeighbourBank, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, dimension)).astype(np.float32) + 0.5  # off-centre
    labels = label_matrix(rng.random(n) < 0.4, rng.random(n) < 0.2)
    return NeighbourBank.fit(embeddings, labels), embeddings


def test_neighbour_features_rank_a_large_bank_by_cosine_similarity() -> None:
    # A bank larger than every k, so each k and both similarity columns differ.
    bank, _ = _random_bank(300, 16, seed=0)
    queries = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32) * 3.0
    batch = bank.batch_features(queries)
    assert batch.shape == (4, len(neighbour_feature_names()))
    for query, row in zip(queries, batch, strict=True):
        expected = _expected_neighbour_features(bank, query)
        np.testing.assert_allclose(bank.features(query), expected, atol=1e-5)
        np.testing.assert_allclose(row, expected, atol=1e-5)
    assert np.all(batch[:, -2] <= 1.0 + 1e-6)  # cosine similarities
    assert np.all(batch[:, -2] >= batch[:, -1])  # the nearest is at least the top-10 mean


def test_leave_one_out_leaves_out_each_prompt_itself_beyond_the_first_chunk() -> None:
    bank, embeddings = _random_bank(600, 16, seed=2)  # more rows than one 512-row chunk
    loo = bank.batch_features(embeddings, leave_one_out=True)
    for row in (0, 511, 512, 599):
        expected = _expected_neighbour_features(bank, embeddings[row], skip=row)
        np.testing.assert_allclose(loo[row], expected, atol=1e-5)


def test_bank_fits_fewer_prompts_than_dimensions_and_refuses_mismatched_labels() -> None:
    bank, embeddings = _random_bank(10, 32, seed=3)
    assert (bank.size, bank.input_dimension) == (10, 32)
    assert bank.features(embeddings[0])[-2] == pytest.approx(1.0, abs=1e-5)  # itself
    vectors = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="does not match"):
        NeighbourBank(np.zeros(4, np.float32), vectors, vectors, label_matrix([1, 0, 1], [0] * 3))


def test_a_bank_refuses_labels_without_the_three_named_columns() -> None:
    vectors = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="does not match"):
        NeighbourBank(np.zeros(4, np.float32), vectors, vectors, np.zeros((4, 2)))


def test_batch_features_of_no_prompts_is_an_empty_table_of_the_named_columns() -> None:
    bank, _ = _random_bank(20, 8, seed=4)
    empty = bank.batch_features(np.zeros((0, 8), dtype=np.float32))
    assert empty.shape == (0, len(neighbour_feature_names()))


def test_label_matrix_gain_is_cheap_failures_the_strong_model_fixes() -> None:
    labels = label_matrix([1, 1, 0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(labels[:, 2], [1, 0, 0, -1])
    # No strong outcome known at all: an even chance, not a success.
    unknown = label_matrix([1, 0], [np.nan, np.nan])
    np.testing.assert_array_equal(unknown[:, 1], [0.5, 0.5])
    strong = np.array([np.nan, 1.0])
    label_matrix([1, 0], strong)
    assert np.isnan(strong[0])  # the caller's outcomes are left as they were


def test_neighbour_rates_are_the_labels_of_the_nearest_prompts() -> None:
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 1, 2]]  # three near a, two near b
    labels = label_matrix([1, 1, 0, 0, 0, 1], [0, 0, 0, 1, np.nan, 0])
    assert labels[4, 1] == pytest.approx(0.2)  # an unknown strong outcome: the known mean
    bank = NeighbourBank(np.zeros(4, np.float32), np.eye(4, dtype=np.float32), vectors, labels)
    single = bank.features(np.array([1, 0, 0, 0], dtype=np.float32))
    batch = bank.batch_features(np.array([[1, 0, 0, 0]], dtype=np.float32))[0]
    np.testing.assert_allclose(single, batch, atol=1e-6)
    # Every k exceeds the bank here, so each rate covers all 6 prompts ranked by similarity.
    assert single[0] == pytest.approx(3 / 6)  # knn10_cheap_fails
    loo = bank.batch_features(vectors, leave_one_out=True)
    assert loo.shape == (6, single.shape[0])
    assert loo[0, 0] == pytest.approx(2 / 5)  # the row itself is left out


def test_leave_one_out_leaves_out_a_prompts_twins_the_uncased_model_cannot_tell_apart() -> None:
    # Before: a row's twin (the same prompt, listed twice) stayed its neighbour at similarity
    # 1, so its own label was a feature; every training row then looked like that, and the
    # heads learned a top-1 similarity no new request has. Then only exact-text twins were
    # left out, while "X" (case), "z  " (spacing) and "zä" / "za" (accent) embed identically
    # under the uncased MiniLM and still gave a row its own label at similarity 1.
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 1, 2]]
    labels = label_matrix([1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0])
    bank = NeighbourBank(np.zeros(4, np.float32), np.eye(4, dtype=np.float32), vectors, labels)
    texts = ["x", "x", "X", "zä", " ZA\u0308 ", "w"]
    loo = bank.batch_features(vectors, leave_one_out=True, texts=texts)
    # Rows 3 ("zä") and 4 leave out each other: rows 0, 1, 2 and 5 remain, none along their axis.
    assert list(loo[[3, 4], -2]) == pytest.approx([0.0, 0.0])  # knn_top1_similarity
    # "X" is row 0's twin too: rows 3, 4 and 5 remain, none along its axis.
    assert loo[0, -2] == pytest.approx(0.0)
    assert loo[0, 0] == pytest.approx(1 / 3)  # knn10_cheap_fails of rows 3, 4, 5
    projection = np.eye(4, dtype=np.float32)
    twins = NeighbourBank(np.zeros(4, np.float32), projection, vectors[:2], labels[:2])
    with pytest.raises(ValueError, match="another text"):
        twins.batch_features(vectors[:2], leave_one_out=True, texts=["x", "x"])


def test_the_classifier_learns_hard_from_easy(trained: DifficultyModel) -> None:
    classifier = SklearnDifficultyClassifier(trained, "v", 0.0)
    hard, easy = "prove the theorem about integrals case 999", "count the apples case 998"
    p_hard = classifier.assess(EMBEDDER.encode([hard])[0], hard)
    p_easy = classifier.assess(EMBEDDER.encode([easy])[0], easy)
    assert p_hard.failure_probability > 0.5 > p_easy.failure_probability
    assert p_hard.routing_score > p_easy.routing_score
    # The routing score is the accuracy gained by going strong: P(cheap fails) - P(strong fails).
    cheap, strong = trained.probabilities(trained.features(EMBEDDER.encode([hard])[0], hard))
    assert (p_hard.failure_probability, p_hard.routing_score) == (cheap, cheap - strong)
    assert classifier.failure_probability(EMBEDDER.encode([hard])[0], hard) == (
        p_hard.failure_probability
    )


def test_folded_heads_equal_the_pipelines(trained: DifficultyModel) -> None:
    texts = [MMLU_PROMPT, GSM_PROMPT]
    for embedding, text in zip(EMBEDDER.encode(texts), texts, strict=True):
        row = trained.features(embedding, text)
        cheap, strong = trained.probabilities(row)
        assert cheap == pytest.approx(trained.heads["cheap_fails"].predict_proba([row])[0, 1])
        assert strong == pytest.approx(trained.heads["strong_fails"].predict_proba([row])[0, 1])


def test_scoring_refuses_an_embedding_of_the_wrong_size(trained: DifficultyModel) -> None:
    classifier = SklearnDifficultyClassifier(trained, "v", 0.5)
    with pytest.raises(ValueError, match="32-d"):
        classifier.assess(np.zeros(384, dtype=np.float32), "hi")
    assert classifier.threshold_for(OperatingPoint(quality=0.5)) == 0.5  # no curve: stored


def test_round_trip_gives_identical_scores(trained: DifficultyModel, tmp_path: Path) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(0.37), tmp_path, "rt")
    assert (model_path.name, metadata_path.name) == ("rt.skops", "rt.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.json", "rt.skops"]  # no temp file
    loaded = load_artifact(model_path)
    original = SklearnDifficultyClassifier(trained, "v", 0.5)
    assert loaded.version == "difficulty-test"
    assert loaded.default_threshold == pytest.approx(0.37)
    assert loaded.metadata["holdout"] == {"apgr": 0.6}
    for text in (MMLU_PROMPT, GSM_PROMPT):
        embedding = EMBEDDER.encode([text])[0]
        assert loaded.assess(embedding, text) == original.assess(embedding, text)


class _Passthrough(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    def fit(self, x: Any, y: Any = None) -> _Passthrough:
        return self

    def transform(self, x: Any) -> Any:
        return x


def _save_payload(payload: Any, tmp_path: Path, name: str) -> Path:
    """An artifact whose .skops holds `payload` as is (save_artifact only writes good ones)."""
    model_path = tmp_path / f"{name}.skops"
    data = skops.io.dumps(payload)
    model_path.write_bytes(data)
    import hashlib

    record = {**_metadata(), "format": 2, "artifact_sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / f"{name}.json").write_text(json.dumps(record))
    return model_path


def test_untrusted_types_are_refused(trained: DifficultyModel, tmp_path: Path) -> None:
    payload = trained.to_payload()
    payload["heads"] = {**payload["heads"], "cheap_fails": Pipeline([("odd", _Passthrough())])}
    path = _save_payload(payload, tmp_path, "evil")
    with pytest.raises(ClassifierArtifactError, match=r"untrusted types.*_Passthrough"):
        load_artifact(path)


def test_steps_outside_the_allowlist_are_refused(trained: DifficultyModel, tmp_path: Path) -> None:
    odd = Pipeline([("f", FunctionTransformer(np.abs)), ("m", LogisticRegression())])
    payload = trained.to_payload()
    payload["heads"] = {**payload["heads"], "cheap_fails": odd}
    with pytest.raises(ClassifierArtifactError, match="allowed steps"):
        load_artifact(_save_payload(payload, tmp_path, "odd"))
    with pytest.raises(ClassifierArtifactError, match="bank and heads"):
        load_artifact(_save_payload({"bank": payload["bank"]}, tmp_path, "half"))
    with pytest.raises(ClassifierArtifactError, match="bank and heads"):  # was a TypeError
        load_artifact(_save_payload({**payload, "heads": 3}, tmp_path, "numeric_heads"))


def test_missing_or_mismatched_files_are_reported(trained: DifficultyModel, tmp_path: Path) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "a")
    other = fit_model(_labelled(40), c=0.5, seed=1)
    other_path, _ = save_artifact(other, _metadata(), tmp_path, "b")
    metadata_path.rename(tmp_path / "kept.json")
    with pytest.raises(ClassifierArtifactError, match=r"a\.json is missing"):
        load_artifact(model_path)
    (tmp_path / "kept.json").rename(metadata_path)
    model_path.write_bytes(other_path.read_bytes())
    with pytest.raises(ClassifierArtifactError, match="SHA-256 differs"):
        load_artifact(model_path)
    with pytest.raises(ClassifierArtifactError, match="missing"):
        load_artifact(tmp_path / "nothing.skops")


def test_incomplete_or_stale_metadata_is_reported(trained: DifficultyModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="default_threshold"):
        save_artifact(trained, {"version": "x"}, tmp_path, "bad")
    _, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    record = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**record, "feature_names": ["x"] * 3}))
    with pytest.raises(ClassifierArtifactError, match="other features"):
        load_artifact(metadata_path)
    del record["default_threshold"]
    metadata_path.write_text(json.dumps(record))
    with pytest.raises(ClassifierArtifactError, match=r"lacks.*default_threshold"):
        load_artifact(metadata_path)


def _head_on(width: int, classes: int = 2) -> Pipeline:
    rng = np.random.default_rng(0)
    head = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression())])
    return head.fit(rng.normal(size=(30, width)), np.arange(30) % classes)


def test_a_model_needs_both_binary_heads_on_the_features_this_code_computes(
    trained: DifficultyModel,
) -> None:
    # Refused when built (at load, so at start), not on the first request it scores.
    heads, width = trained.heads, len(feature_names())
    with pytest.raises(ClassifierArtifactError, match="expected heads"):
        DifficultyModel(trained.bank, {"cheap_fails": heads["cheap_fails"]})
    with pytest.raises(ClassifierArtifactError, match=f"takes {width + 1} features"):
        DifficultyModel(trained.bank, {**heads, "strong_fails": _head_on(width + 1)})
    with pytest.raises(ClassifierArtifactError, match="binary"):
        DifficultyModel(trained.bank, {**heads, "strong_fails": _head_on(width, classes=3)})
    unfitted = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression())])
    with pytest.raises(ClassifierArtifactError, match="fitted binary"):  # was an AttributeError
        DifficultyModel(trained.bank, {**heads, "strong_fails": unfitted})
    scaler_only = Pipeline([("scale", StandardScaler().fit(np.zeros((2, width))))])
    with pytest.raises(ClassifierArtifactError, match="StandardScaler"):
        DifficultyModel(trained.bank, {**heads, "cheap_fails": scaler_only})


def test_a_routing_threshold_may_be_negative_but_not_outside_the_score_range(
    trained: DifficultyModel,
) -> None:
    # Routing scores are P(cheap fails) - P(strong fails), so they lie in [-1, 1].
    for inside in (-1.0, -0.2, 1.0):
        assert SklearnDifficultyClassifier(trained, "v", inside).default_threshold == inside
    for outside in (-1.01, 1.01):
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            SklearnDifficultyClassifier(trained, "v", outside)


def test_an_artifact_of_another_format_dimension_or_without_its_checksum_is_refused(
    trained: DifficultyModel, tmp_path: Path
) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    record = json.loads(metadata_path.read_text())
    for changed, message in (
        ({"format": 1}, "format 1, expected 2"),
        ({"embedding_dimension": 64}, "other features"),
    ):
        metadata_path.write_text(json.dumps({**record, **changed}))
        with pytest.raises(ClassifierArtifactError, match=message):
            load_artifact(model_path)
    del record["artifact_sha256"]
    metadata_path.write_text(json.dumps(record))
    with pytest.raises(ClassifierArtifactError, match=r"lacks.*artifact_sha256"):
        load_artifact(model_path)
    for damaged, message in ((b"42\n", "not a JSON object"), (b"\xff\xfe", "not valid JSON")):
        metadata_path.write_bytes(damaged)  # were a TypeError / UnicodeDecodeError traceback
        with pytest.raises(ClassifierArtifactError, match=message):
            load_artifact(model_path)


# Values a hand edit (or a bad merge) may leave in NAME.json, which its checksum does not cover.
_DAMAGED_METADATA: dict[str, dict[str, Any]] = {
    "a threshold that is not a number": {"default_threshold": "high"},
    "a null threshold": {"default_threshold": None},
    "a threshold outside the score range": {"default_threshold": 2.0},
    "a dimension that is not a number": {"embedding_dimension": "wide"},
    "feature names that are not a list": {"feature_names": 3},
    "a curve point without its measures": {"operating_curve": [{"threshold": 0.1}]},
    "a curve that is not a list of points": {"operating_curve": "steep"},
    # OverflowError, neither a TypeError nor a ValueError:
    "an infinite dimension": {"embedding_dimension": float("inf")},
    "a threshold too large for a float": {"default_threshold": 10**400},
    "a curve point too large for a float": {"operating_curve": [{"threshold": 10**400}]},
}


@pytest.mark.parametrize("damage", list(_DAMAGED_METADATA))
def test_damaged_metadata_values_are_an_artifact_error_naming_the_file(
    trained: DifficultyModel, tmp_path: Path, damage: str
) -> None:
    # Were a bare TypeError/ValueError/AttributeError: eval-router and retrain printed a
    # traceback, where a ClassifierArtifactError is reported as a broken version.
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    record = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**record, **_DAMAGED_METADATA[damage]}))
    with pytest.raises(ClassifierArtifactError, match=r"m\.json"):
        load_artifact(model_path)


_BROKEN_BANKS: dict[str, Callable[[dict[str, np.ndarray]], object]] = {
    "no labels": lambda bank: bank.pop("labels"),
    # These loaded, then failed every request (or, 1-D labels, raised IndexError on load).
    "one label column": lambda bank: bank.update(labels=bank["labels"][:, 0]),
    "vectors of another width": lambda bank: bank.update(vectors=bank["vectors"][:, :-1]),
    "mean of another length": lambda bank: bank.update(pca_mean=bank["pca_mean"][:-1]),
    "no prompts": lambda bank: bank.update(vectors=bank["vectors"][:0], labels=bank["labels"][:0]),
}


@pytest.mark.parametrize("breakage", list(_BROKEN_BANKS))
def test_an_unusable_neighbour_bank_is_an_artifact_error(
    trained: DifficultyModel, tmp_path: Path, breakage: str
) -> None:
    # Callers (retrain, hot reload) treat ClassifierArtifactError as "this version is broken".
    payload = trained.to_payload()
    payload["bank"] = dict(payload["bank"])
    _BROKEN_BANKS[breakage](payload["bank"])
    with pytest.raises(ClassifierArtifactError, match="neighbour bank is unusable"):
        load_artifact(_save_payload(payload, tmp_path, "broken"))


def test_an_artifact_name_with_a_dot_keeps_its_whole_name(
    trained: DifficultyModel, tmp_path: Path
) -> None:
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "difficulty.v2")
    assert (model_path.name, metadata_path.name) == ("difficulty.v2.skops", "difficulty.v2.json")
    assert load_artifact(tmp_path / "difficulty.v2").version == "difficulty-test"


def test_fixed_score_classifier() -> None:
    double: DifficultyClassifier = FixedScoreClassifier(0.2, by_text={"hard": 0.9})
    vector = np.zeros(4, dtype=np.float32)
    assert double.failure_probability(vector, "easy") == 0.2
    assert double.assess(vector, "hard").routing_score == 0.9
    assert (double.version, double.default_threshold) == ("fixed", 0.5)
    assert double.threshold_for(OperatingPoint(quality=0.9)) == 0.5  # no curve: the default
    with pytest.raises(ValueError):
        FixedScoreClassifier(1.5)


def test_packaged_artifact_scores_a_real_request_quickly() -> None:
    classifier = load_classifier()
    assert classifier.version == classifier.metadata["version"]
    assert classifier.version.startswith("difficulty-")
    assert -1.0 < classifier.default_threshold < 1.0
    assert classifier.threshold_for(OperatingPoint(strong_fraction=0.0)) > (
        classifier.threshold_for(OperatingPoint(strong_fraction=1.0))
    )
    embedder = MiniLMEmbedder()
    assert classifier.metadata["embedder"] == embedder.name
    embedding = embedder.encode([GSM_PROMPT])[0]
    assessment = classifier.assess(embedding, GSM_PROMPT)
    assert 0.0 <= assessment.failure_probability <= 1.0
    assert -1.0 <= assessment.routing_score <= 1.0
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        classifier.assess(embedding, GSM_PROMPT)
        timings.append(time.perf_counter() - started)
    # Measured ~0.5 ms p50 on a busy 2-core host; a generous bound keeps the test from flaking.
    assert statistics.median(timings) < 20e-3


def test_an_artifact_is_synced_file_by_file_before_each_rename_and_its_folder_after(
    trained: DifficultyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unsynced, a power loss after save returned could leave an empty .skops or .json (or the
    # old one) where the registry or --out expects the new artifact.
    synced = record_fsyncs(monkeypatch, tmp_path / "a.json")
    save_artifact(trained, _metadata(), tmp_path, "a")
    # The staged .skops, its folder, the .json naming it (in place only then), its folder,
    # then NAME.skops and the .json naming it, each with its folder.
    in_place = [(False, True), (True, True)]
    assert synced == [(False, False), (True, False), (False, False), (True, True), *in_place * 2]


_CURVE_POINT = {
    "threshold": 0.2,
    "strong_fraction": 0.5,
    "pgr": 0.8,
    "accuracy": 0.7,
    "cost_vs_all_strong": 0.5,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", math.nan),
        ("threshold", 1.5),
        ("threshold", -1.01),
        ("pgr", math.inf),
        ("strong_fraction", math.nan),
        ("cost_vs_all_strong", -math.inf),
    ],
)
def test_a_curve_point_not_finite_or_with_a_threshold_outside_the_score_range_is_refused(
    trained: DifficultyModel, tmp_path: Path, field: str, value: float
) -> None:
    # A hand-edited NaN threshold loaded: threshold_for(quality=0.8) gave nan, and a tenant
    # with that target silently went all cheap (every comparison with nan is false).
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    record = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**record, "operating_curve": [_CURVE_POINT]}))
    assert load_artifact(model_path).threshold_for(OperatingPoint(quality=0.8)) == 0.2
    damaged = [_CURVE_POINT, {**_CURVE_POINT, field: value}]
    metadata_path.write_text(json.dumps({**record, "operating_curve": damaged}))
    with pytest.raises(ClassifierArtifactError, match=rf"m\.json.*operating_curve\[1\].*{field}"):
        load_artifact(model_path)


@pytest.mark.parametrize("failing_write", [1, 2, 3, 4])
def test_a_save_that_dies_midway_leaves_a_pair_that_loads(
    trained: DifficultyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_write: int
) -> None:
    # The .skops was replaced, then the .json: a crash (or a service starting) between the two
    # saw the new model beside the old metadata, "SHA-256 differs", and no model would load.
    from routecache import atomic_file

    save_artifact(trained, _metadata(), tmp_path, "a")
    other = fit_model(_labelled(40), c=0.5, seed=1)
    real = atomic_file.replacing_bytes
    calls = iter(range(1, 100))

    @contextlib.contextmanager
    def dying(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
        if next(calls) == failing_write:
            raise OSError("disk full")
        with real(path, mode) as out:
            yield out

    monkeypatch.setattr("routecache.classifier.model.replacing_bytes", dying)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(other, {**_metadata(), "version": "new"}, tmp_path, "a")
    assert load_artifact(tmp_path / "a.skops").version in ("difficulty-test", "new")
    monkeypatch.undo()
    save_artifact(other, {**_metadata(), "version": "newer"}, tmp_path, "a")
    assert load_artifact(tmp_path / "a.skops").version == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.skops"]  # strays removed


def test_a_save_keeps_the_staged_copy_that_a_concurrent_save_of_the_name_committed(
    trained: DifficultyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Save B of the same name runs between save A's last write and A's clean-up, and stops
    # after its .json names its staged copy: A removed every staged copy, B's included, and
    # the pair (B's .json, A's .skops) loaded no model.
    from routecache import atomic_file

    other = fit_model(_labelled(40), c=0.5, seed=1)
    real = atomic_file.replacing_bytes
    calls = iter(range(1, 100))

    @contextlib.contextmanager
    def interleaved(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
        call = next(calls)
        if call == 7:  # B's third write: B stops with its .json naming its staged copy
            raise OSError("killed")
        with real(path, mode) as out:
            yield out
        if call == 4:  # A's last write done, its clean-up still to come
            with contextlib.suppress(OSError):
                save_artifact(other, {**_metadata(), "version": "b"}, tmp_path, "a")

    monkeypatch.setattr("routecache.classifier.model.replacing_bytes", interleaved)
    save_artifact(trained, {**_metadata(), "version": "a"}, tmp_path, "a")
    assert load_artifact(tmp_path / "a.skops").version == "b"
    assert len(list(tmp_path.glob(".a.*.skops"))) == 1  # B's; A's own staged copy is gone


def test_a_load_that_a_save_overtakes_between_its_two_reads_loads_the_new_pair(
    trained: DifficultyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service starting while train-classifier writes to its folder: the old .json read,
    # then the new .skops. Read once, that pair was "SHA-256 differs" and the start failed.
    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "a")
    other = fit_model(_labelled(40), c=0.5, seed=1)
    real_read_text = Path.read_text
    saves: list[tuple[Path, Path]] = []

    def read_then_save(path: Path, *args: Any, **kwargs: Any) -> str:
        text = real_read_text(path, *args, **kwargs)
        if path == metadata_path and not saves:
            saves.append(save_artifact(other, {**_metadata(), "version": "new"}, tmp_path, "a"))
        return text

    monkeypatch.setattr(Path, "read_text", read_then_save)
    assert load_artifact(model_path).version == "new"
    assert saves


@pytest.mark.parametrize(
    "tail",
    ["9" * 5000, "[" * 100_000 + "]" * 100_000],
    ids=["a number of too many digits", "nested too deep"],
)
def test_metadata_that_json_refuses_to_parse_is_an_artifact_error(
    trained: DifficultyModel, tmp_path: Path, tail: str
) -> None:
    # json.loads raises a plain ValueError / RecursionError for these: it escaped as a
    # traceback at start, from the registry's add and promote, and from a retrain.
    from routecache.classifier.registry import ModelRegistry, RegistryError

    model_path, metadata_path = save_artifact(trained, _metadata(), tmp_path, "m")
    text = metadata_path.read_text().rstrip()
    metadata_path.write_text(text[:-1] + ', "note": ' + tail + "}")
    with pytest.raises(ClassifierArtifactError, match=r"m\.json is not valid JSON"):
        load_artifact(model_path)
    with pytest.raises(RegistryError, match=r"cannot add v1: .*not valid JSON"):
        ModelRegistry(tmp_path / "registry").add(model_path, "v1")

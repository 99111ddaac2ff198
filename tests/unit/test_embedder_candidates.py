"""The embedder-candidate experiment: its ONNX pooling, its router fit and its bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.embedder_candidates import OnnxMeanPooled, cache_report, candidate, router_report
from routecache.cache.embedder import HashEmbedder
from routecache.training.routing_data import RoutingRow

VOCABULARY = 30522  # the packaged MiniLM tokenizer's uncased BERT vocabulary


def token_state_graph(path: Path, width: int = 4) -> None:
    """A graph whose token states are a fixed random table looked up by token id."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).normal(size=(VOCABULARY, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["states"])],
        "token_states",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
        ],
        [helper.make_tensor_value_info("states", TensorProto.FLOAT, ["b", "t", width])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_pooling_ignores_the_padding_of_a_batch(tmp_path: Path) -> None:
    token_state_graph(tmp_path / "states.onnx")
    encoder = OnnxMeanPooled(tmp_path / "states.onnx")
    texts = ["short", "a much longer question with many more words in it"]

    batched = encoder.encode(texts)
    alone = np.vstack([encoder.encode([t]) for t in texts])

    assert encoder.dimension == 4
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "spec", ["no-kind", "name=torch:/tmp", "=hf:/tmp", "name=hf:", "name=onnx:/no/such/file.onnx"]
)
def test_a_bad_candidate_is_refused_with_its_spec(spec: str) -> None:
    with pytest.raises(SystemExit, match="--candidate"):
        candidate(spec)


def test_cache_report_ranks_duplicates_by_cosine() -> None:
    queries = ["how do I learn python fast", "what is the capital of france", "best pizza in rome"]
    cached = ["how do I learn python quickly", "why is the sky blue", "cheap flights to oslo"]
    labels = np.array([True, False, False])

    report = cache_report(HashEmbedder(256), queries, cached, labels)

    assert report["auc"] == 1.0
    assert report["hindsight_recall_at_false_hit_rate"][0.01] == 1.0


def rows(count: int, seed: int) -> list[RoutingRow]:
    """Prompts whose words say whether the cheap model fails: a signal the router must find."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        hard = bool(rng.random() < 0.4)
        topic = "prove the theorem about manifolds" if hard else "what colour is the sky"
        source = "gsm8k" if i % 3 == 0 else "mmlu"
        strong_right = bool(rng.random() < 0.9)
        out.append(RoutingRow(f"{topic} case {i % 7}", source, not hard, strong_right))
    return out


def test_router_report_finds_a_learnable_difficulty_signal() -> None:
    report = router_report(HashEmbedder(64), rows(300, seed=1), rows(120, seed=2))

    # Random routing scores about 0.5 APGR and needs 80% strong calls for 80% of the gap.
    assert report["apgr"] > 0.8
    assert report["gsm8k_apgr"] > 0.8
    assert report["cpt80"] < 0.6

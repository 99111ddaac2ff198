"""The shipped cross-encoder graph: loads offline, and scores a pair the same in any company."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routecache.cache.cross_encoder import (
    GRAPH_FILE,
    OUTPUT,
    OnnxCrossEncoder,
    packaged_verifier_dir,
)
from routecache.cache.onnx_embedder import ensure_onnx_export
from tests.onnx_graphs import identity_model

PARAPHRASE = ("How are hydrogen bombs made?", "How do they make a hydrogen bomb?")
OTHER = ("What is the capital of France?", "What is the capital of Germany?")
LONG = (
    "Why do so many people ask things on Quora that they could just as easily look up on Google "
    "or any other search engine in a few seconds, and what does it say about them?",
    "Why do people ask questions on Quora that can easily be answered by Google?",
)


@pytest.fixture(scope="module")
def one_order() -> OnnxCrossEncoder:
    return OnnxCrossEncoder(packaged_verifier_dir() / GRAPH_FILE, symmetric=False)


def test_a_pair_scores_the_same_alone_and_among_others(one_order: OnnxCrossEncoder) -> None:
    # Scored in one batch, dynamic int8 quantisation shared an activation scale across the
    # batch and moved each pair's logit (by up to 2 on qqp pairs): the service, scoring one
    # pair per lookup, refused hits that the batch-scored calibration had accepted.
    alone = one_order.logits([PARAPHRASE])[0]
    among = one_order.logits([LONG, PARAPHRASE, OTHER])
    assert among[1] == alone
    assert among[0] == one_order.logits([LONG])[0]


def test_duplicates_score_above_near_misses(one_order: OnnxCrossEncoder) -> None:
    paraphrase, other = one_order.logits([PARAPHRASE, OTHER])
    assert paraphrase > 0 > other


def test_symmetric_scoring_averages_both_orders(one_order: OnnxCrossEncoder) -> None:
    both = OnnxCrossEncoder(packaged_verifier_dir() / GRAPH_FILE, symmetric=True)
    forward = one_order.logits([PARAPHRASE])[0]
    backward = one_order.logits([(PARAPHRASE[1], PARAPHRASE[0])])[0]
    assert forward != pytest.approx(backward, abs=1e-3)  # one order alone is not the average
    assert both.logits([PARAPHRASE])[0] == pytest.approx((forward + backward) / 2, abs=1e-6)


def test_a_missing_graph_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="cross-encoder graph not found"):
        OnnxCrossEncoder(packaged_verifier_dir() / "missing.onnx")


def test_a_torn_graph_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    # Before: ONNX Runtime's INVALID_PROTOBUF, which says nothing of a cross-encoder.
    graph = tmp_path / "torn.onnx"
    graph.write_bytes((packaged_verifier_dir() / GRAPH_FILE).read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cross-encoder graph {graph} is not a graph"):
        OnnxCrossEncoder(graph)


def _one_input_graph(path: Path, ir_version: int | None = None) -> Path:
    """A graph with the verifier's output but only one of its three inputs."""
    path.write_bytes(identity_model("input_ids", OUTPUT, ir_version=ir_version))
    return path


@pytest.mark.parametrize(
    ("model", "named"),
    [("embedder", "outputs are sentence_vector"), ("one input", "inputs input_ids,")],
)
def test_a_graph_of_another_model_is_refused_at_load(
    tmp_path: Path, model: str, named: str
) -> None:
    # Before: the embedder's graph loaded as a verifier, and every lookup it had to verify
    # then failed with INVALID_ARGUMENT "Invalid output name: duplicate_logit".
    graph = ensure_onnx_export() if model == "embedder" else _one_input_graph(tmp_path / "g.onnx")
    with pytest.raises(ValueError, match=f"{graph} is not a cross-encoder: .*{named}"):
        OnnxCrossEncoder(graph)


def test_a_pair_longer_than_the_model_takes_is_scored_truncated(
    one_order: OnnxCrossEncoder,
) -> None:
    pasted = "a question pasted with its whole log " * 120  # past the model's 512 positions
    [logit] = one_order.logits([(pasted, PARAPHRASE[0])])
    assert np.isfinite(logit)


def test_a_whole_graph_onnx_runtime_refuses_is_not_called_torn(tmp_path: Path) -> None:
    # Before: a graph of an IR version this ONNX Runtime cannot read was "empty, torn or
    # another format", sending the operator after a file that is whole.
    graph = _one_input_graph(tmp_path / "new.onnx", ir_version=99)
    with pytest.raises(ValueError, match=f"{graph} is a whole ONNX model .*IR version: 99"):
        OnnxCrossEncoder(graph)

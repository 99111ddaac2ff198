"""benchmarks/verifier_quantisation.py: the quantisers it compares and how it measures the gap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.verifier_quantisation import gap_to_reference, quantise


def _matmul_graph(path: Path, weights: np.ndarray) -> Path:
    inputs = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weights.shape[0]])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weights.shape[1]])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    initial = [numpy_helper.from_array(weights, "w")]
    graph = helper.make_graph([node], "g", [inputs], [output], initial)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": x})
    return np.asarray(y)


def test_one_scale_per_channel_keeps_small_channels_that_one_per_tensor_rounds_away(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    # Output channels of very different size: one scale for the whole tensor spends its 256
    # steps on the large channel and rounds the small one to a few levels.
    weights = (rng.normal(size=(64, 8)) * np.array([100, 1, 1, 1, 0.01, 0.01, 1, 1])).astype(
        np.float32
    )
    fp32 = _matmul_graph(tmp_path / "fp32.onnx", weights)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    exact = _run(fp32, x)
    small = [4, 5]
    errors = {}
    for per_channel in (False, True):
        graph = quantise(fp32, tmp_path / f"q{per_channel}.onnx", per_channel=per_channel)
        errors[per_channel] = np.abs(_run(graph, x) - exact)[:, small].max()
    assert errors[True] < errors[False] / 10


def test_the_gap_to_the_reference_is_its_correlation_and_largest_difference() -> None:
    reference = np.array([0.0, 1.0, 2.0, 3.0])
    assert gap_to_reference(reference, reference) == {"correlation": 1.0, "largest_gap": 0.0}
    shifted = gap_to_reference(reference + np.array([0.0, 0.5, 0.0, -1.5]), reference)
    assert shifted["largest_gap"] == 1.5 and shifted["correlation"] < 1.0

"""The ONNX export of the packaged MiniLM gives the torch model's vectors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from routecache.cache.embedder import MiniLMEmbedder, checked_minilm_dir, packaged_minilm_path
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder

pytestmark = pytest.mark.integration

TEXTS = [
    "What is the capital of France?",
    "a",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
]


def test_exported_graph_matches_torch_and_is_reused(tmp_path: Path) -> None:
    onnx = OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    assert onnx.path.is_file() and onnx.path.parent == tmp_path
    torch_vectors = MiniLMEmbedder().encode(TEXTS)
    batched = onnx.encode(TEXTS)
    one_by_one = np.vstack([onnx.encode([t]) for t in TEXTS])
    assert batched.shape == (3, 384) and batched.dtype == np.float32
    assert np.abs(batched - torch_vectors).max() < 1e-4
    assert np.abs(one_by_one - torch_vectors).max() < 1e-4
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)

    stamp = onnx.path.stat().st_mtime_ns
    again = OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    assert again.path == onnx.path and again.path.stat().st_mtime_ns == stamp


def test_a_model_folder_without_its_config_is_refused_naming_it(tmp_path: Path) -> None:
    assert (packaged_minilm_path() / "config.json").is_file()
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights, but no config.json
    with pytest.raises(FileNotFoundError, match=f"no model files in {re.escape(str(tmp_path))}"):
        checked_minilm_dir(tmp_path)

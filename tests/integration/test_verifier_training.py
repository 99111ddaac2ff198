"""Training the hit verifier from the packaged MiniLM weights, then exporting what the service runs.

A few steps on a handful of pairs: not a model worth shipping, but the same code path as
`routecache train-verifier` (weights file, export, int8 quantisation, the service's scorer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from routecache.cache.cross_encoder import OnnxCrossEncoder
from routecache.cache.embedder import packaged_minilm_path
from routecache.training.cross_encoder import TrainingPlan, build_module, train_cross_encoder
from routecache.training.export_cross_encoder import export_cross_encoder
from routecache.training.pair_data import LabelledPair

pytestmark = pytest.mark.integration

PAIRS = [
    LabelledPair("How do I learn Python?", "What is the best way to learn Python?", True),
    LabelledPair("What is the capital of France?", "What is the capital of Germany?", False),
    LabelledPair("How can I lose weight fast?", "What is the fastest way to lose weight?", True),
    LabelledPair("Why is the sky blue?", "Why is the sea salty?", False),
]


def test_the_module_gives_one_logit_per_input_or_a_row_per_input() -> None:
    import torch

    with torch.no_grad():
        single, double = (build_module(packaged_minilm_path(), outputs=n) for n in (1, 2))
        ids = torch.tensor([[101, 2129, 2079, 102], [101, 2339, 2003, 102]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "token_type_ids": torch.zeros_like(ids)}  # fmt: skip
        assert tuple(single(**inputs).shape) == (2,)
        assert tuple(double(**inputs).shape) == (2, 2)


def test_trained_weights_export_to_the_graph_the_service_scores_with(tmp_path: Path) -> None:
    import torch

    plan = TrainingPlan(epochs=1, batch_size=2, learning_rate=1e-4)
    weights = train_cross_encoder(PAIRS, packaged_minilm_path(), tmp_path / "work", plan)
    assert (tmp_path / "work" / "cross_encoder_epoch1.pt").is_file()
    trained = build_module(packaged_minilm_path())
    trained.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    trained.eval()
    untouched = build_module(packaged_minilm_path()).encoder.state_dict()
    moved = [name for name, value in trained.encoder.state_dict().items()
             if not torch.equal(value, untouched[name])]  # fmt: skip
    assert moved, "training left the encoder's weights as loaded"

    graph = export_cross_encoder(weights, packaged_minilm_path(), tmp_path / "ce.onnx", int8=False)
    scorer = OnnxCrossEncoder(graph, symmetric=False)
    exported = scorer.logits([(p.query, p.cached) for p in PAIRS])
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    with torch.no_grad():
        expected = [
            float(trained(**tokenizer(p.query, p.cached, return_tensors="pt"))) for p in PAIRS
        ]
    np.testing.assert_allclose(exported, expected, atol=1e-3)

    quantised = export_cross_encoder(weights, packaged_minilm_path(), tmp_path / "ce8.onnx")
    int8 = OnnxCrossEncoder(quantised, symmetric=False).logits([(p.query, p.cached) for p in PAIRS])
    assert np.all(np.isfinite(int8))
    assert quantised.stat().st_size < graph.stat().st_size / 2  # int8 weights: a quarter or so

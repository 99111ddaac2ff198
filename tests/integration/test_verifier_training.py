"""Training the hit verifier from the packaged MiniLM weights, then exporting what the service runs.

A few steps on a handful of pairs: not a model worth shipping, but the same code path as
`routecache train-verifier` (weights file, export, int8 quantisation, the service's scorer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
    plan = TrainingPlan(epochs=1, batch_size=2, learning_rate=1e-5)
    weights = train_cross_encoder(PAIRS, packaged_minilm_path(), tmp_path / "work", plan)
    assert weights.is_file()
    assert (tmp_path / "work" / "cross_encoder_epoch1.pt").is_file()

    graph = export_cross_encoder(weights, packaged_minilm_path(), tmp_path / "out" / "ce.onnx")
    scorer = OnnxCrossEncoder(graph, symmetric=False)
    logits = scorer.logits([(p.query, p.cached) for p in PAIRS])
    assert logits.shape == (len(PAIRS),)
    assert np.all(np.isfinite(logits))
    assert len(set(np.round(logits, 4).tolist())) == len(PAIRS)  # the pairs are told apart

"""The duplicate-question cross-encoder, run by ONNX Runtime from the graph shipped in the package.

It was fine-tuned from the packaged all-MiniLM-L6-v2 weights (routecache.training.cross_encoder)
and reuses that model's tokenizer, so nothing but the graph itself has to ship.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.cache.embedder import packaged_minilm_path
from routecache.cache.onnx_embedder import cpu_session

GRAPH_FILE = "cross_encoder.int8.onnx"
POLICY_FILE = "hit_policy.json"
MAX_PAIR_TOKENS = 128  # as in training: 99.9% of question pairs fit
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "duplicate_logit"


def packaged_verifier_dir() -> Path:
    """The verifier shipped in the package: the int8 graph and its calibrated hit policy."""
    return Path(__file__).resolve().parent / "verifier_artifacts"


class OnnxCrossEncoder:
    """Scores (query, cached) pairs: the logit that they ask the same thing.

    `symmetric` scores both orders and averages them: the model saw both during training, and
    the average is steadier than either order alone.
    """

    def __init__(self, graph: Path, symmetric: bool = True, threads: int | None = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        if not graph.is_file():
            raise FileNotFoundError(f"cross-encoder graph not found: {graph}")
        self._session = cpu_session(graph, threads)
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(packaged_minilm_path()), local_files_only=True
        )
        self._symmetric = symmetric

    def logits(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float32]:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        first = [q for q, _ in pairs]
        second = [c for _, c in pairs]
        if not self._symmetric:
            return self._run(first, second)
        both = self._run(first + second, second + first)
        averaged = ((both[: len(pairs)] + both[len(pairs) :]) / 2).astype(np.float32)
        return averaged

    def _run(self, first: list[str], second: list[str]) -> npt.NDArray[np.float32]:
        batch = self._tokenizer(
            first,
            second,
            padding=True,
            truncation=True,
            max_length=MAX_PAIR_TOKENS,
            return_tensors="np",
        )
        feeds = {name: batch[name].astype(np.int64, copy=False) for name in INPUTS}
        (logits,) = self._session.run([OUTPUT], feeds)
        return np.asarray(logits, dtype=np.float32).reshape(-1)

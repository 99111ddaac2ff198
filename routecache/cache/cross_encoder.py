"""The duplicate-question cross-encoder, run by ONNX Runtime from the graph shipped in the package.

It was fine-tuned from the packaged all-MiniLM-L6-v2 weights (routecache.training.cross_encoder)
and reuses that model's tokenizer, so nothing but the graph itself has to ship.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routecache.cache.embedder import packaged_minilm_path
from routecache.cache.onnx_embedder import (
    cpu_session,
    unloadable_graph_errors,
    whole_onnx_model,
)

GRAPH_FILE = "cross_encoder.int8.onnx"
POLICY_FILE = "hit_policy.json"
MAX_PAIR_TOKENS = 128  # as in training: 99.9% of question pairs fit
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "duplicate_logit"


def packaged_verifier_dir() -> Path:
    """The verifier shipped in the package: the int8 graph and its calibrated hit policy."""
    return Path(__file__).resolve().parent / "verifier_artifacts"


def graph_sha256(graph: Path) -> str:
    """The graph file's sha256 (hex), as a calibrated policy names it (metadata.graph_sha256)."""
    with graph.open("rb") as data:
        return hashlib.file_digest(data, "sha256").hexdigest()


class OnnxCrossEncoder:
    """Scores (query, cached) pairs: the logit that they ask the same thing.

    `symmetric` scores both orders and averages them: the model saw both during training, and
    the average is steadier than either order alone.

    Every pair (and order) runs through the graph alone. Dynamic int8 quantisation picks one
    activation scale per batch, so a pair scored in a batch gets a logit that depends on its
    batch-mates (by up to 2 logits on qqp pairs). The service scores one pair per lookup;
    scoring alone everywhere gives calibration, evaluation and the service the same number.
    """

    def __init__(self, graph: Path, symmetric: bool = True, threads: int | None = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        if not graph.is_file():
            raise FileNotFoundError(f"cross-encoder graph not found: {graph}")
        try:
            self._session = cpu_session(graph, threads)
        except unloadable_graph_errors() as error:
            whole = whole_onnx_model(graph)
            if whole is not None:  # FAIL for a newer IR or opset than this runtime reads
                raise ValueError(
                    f"cross-encoder graph {graph} is {whole}, but ONNX Runtime cannot load it: "
                    f"{str(error).strip()}. Install an onnxruntime that reads it, or export "
                    "the verifier again with an onnx no newer than the installed onnxruntime reads"
                ) from error
            # Unlike the embedder's graph it cannot be exported again here: no weights ship.
            raise ValueError(
                f"cross-encoder graph {graph} is not a graph ONNX Runtime can load "
                f"(empty, torn or another format): {error}"
            ) from error
        # A graph of another model (the embedder's, say) loads as well, and would then fail
        # every lookup it had to verify: refused here, where a start can name it.
        inputs = [node.name for node in self._session.get_inputs()]
        outputs = [node.name for node in self._session.get_outputs()]
        if sorted(inputs) != sorted(INPUTS) or OUTPUT not in outputs:
            raise ValueError(
                f"cross-encoder graph {graph} is not a cross-encoder: its outputs are "
                f"{', '.join(outputs)} and inputs {', '.join(inputs)}, not {OUTPUT} "
                f"of {', '.join(INPUTS)}"
            )
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(packaged_minilm_path()), local_files_only=True
        )
        self._symmetric = symmetric

    def logits(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float32]:
        scores = [self._logit(query, cached) for query, cached in pairs]
        return np.array(scores, dtype=np.float32)

    def _logit(self, query: str, cached: str) -> float:
        forward = self._run(query, cached)
        if not self._symmetric:
            return forward
        return (forward + self._run(cached, query)) / 2

    def _run(self, first: str, second: str) -> float:
        encoded = self._tokenizer(
            first, second, truncation=True, max_length=MAX_PAIR_TOKENS, return_tensors="np"
        )
        feeds = {name: encoded[name].astype(np.int64, copy=False) for name in INPUTS}
        (logits,) = self._session.run([OUTPUT], feeds)
        return float(np.asarray(logits).reshape(-1)[0])

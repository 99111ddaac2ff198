"""The scoped index: flat while small, IVF past the threshold, removals and scopes respected."""

from __future__ import annotations

import threading

import numpy as np

from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex


def unit_rows(count: int, dimension: int = 32, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


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
    assert index.search("a", rows[1], 1)[0].entry_id == "e"  # the later vector is kept
    index.add("a", "f", rows[0])
    index.remove("a", "e")
    assert [n.entry_id for n in index.search("a", rows[0], 5)] == ["f"]

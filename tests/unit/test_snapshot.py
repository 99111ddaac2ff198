"""The embedded store survives a restart through its snapshot."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from routecache.backends.storage import EmbeddedStorage
from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.hit_policy import HitRequirement
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import CacheEntry, StoreUnavailable
from routecache.cache.semantic_cache import NewEntry
from routecache.cache.snapshot import (
    RESTORE_SLICE,
    SnapshotError,
    _encode,
    read_live_entries,
    read_snapshot,
    restore_snapshot,
    save_snapshot,
)
from routecache.domain import CacheControl, CacheOutcome, ChatRequest, Message, Role, Tier
from routecache.errors import Unavailable
from tests.unit.conftest import KEYS, Harness, make_harness, record_fsyncs

ACME = KEYS["acme"]


def ask(prompt: str, ttl: int | None = None, tags: tuple[str, ...] = ()) -> ChatRequest:
    return ChatRequest(
        messages=(Message(Role.USER, prompt),), cache=CacheControl(ttl_seconds=ttl, tags=tags)
    )


async def test_a_restarted_process_keeps_its_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "snapshot.jsonl"
    first = make_harness(store={"snapshot_path": path})
    await first.service.start_storage()
    stored = await first.service.pipeline.complete(ask("how do I reset my password today"), ACME)
    short = await first.service.pipeline.complete(ask("a short lived answer", ttl=5), ACME)
    await first.service.aclose()  # saves the snapshot
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()

    second = make_harness(store={"snapshot_path": path})
    grace = second.service.settings.upstream.stale_grace_seconds
    # The short-lived entry has expired meanwhile, and its stale grace has passed too.
    second.clock.now = first.clock.now + 10 + grace
    await second.service.start_storage()
    try:
        near = await second.service.pipeline.complete(ask("how do I reset my password"), ACME)
        assert near.cache.outcome is CacheOutcome.SEMANTIC
        assert near.cache.entry_id == stored.cache.entry_id
        assert await second.service.pipeline.cache.get("acme", short.cache.entry_id) is None
        assert second.cheap.calls == []
    finally:
        await second.service.aclose()


async def test_no_snapshot_file_means_an_empty_start(tmp_path: Path) -> None:
    harness = make_harness(store={"snapshot_path": tmp_path / "absent.jsonl"})
    await harness.service.start_storage()
    assert await harness.service.pipeline.cache.entry_count("acme") == 0
    await harness.service.aclose()
    assert (tmp_path / "absent.jsonl").is_file()


async def test_an_expired_entry_within_the_stale_grace_is_restored_for_stale_answers_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    first = make_harness(store={"snapshot_path": path})
    await first.service.start_storage()
    short = await first.service.pipeline.complete(ask("a short lived answer", ttl=5), ACME)
    await first.service.aclose()

    second = make_harness(store={"snapshot_path": path})
    second.clock.now = first.clock.now + 10  # expired, but well within the stale grace
    await second.service.start_storage()
    try:
        cache = second.service.pipeline.cache
        restored = await cache.get("acme", short.cache.entry_id)
        assert restored is not None
        assert await cache.lookup_exact(restored.scope, restored.prompt) is None
        stale = await cache.lookup_stale(restored.scope, restored.prompt, None, HitRequirement(0.9))
        assert stale is not None and stale.entry.entry_id == short.cache.entry_id
    finally:
        await second.service.aclose()


class _GatedList(list[CacheEntry]):
    """Entries whose writer stalls until released: a snapshot still being written."""

    def __init__(self, entries: list[CacheEntry], entered: Event, release: Event) -> None:
        super().__init__(entries)
        self._entered, self._release = entered, release

    def __iter__(self) -> Iterator[CacheEntry]:
        self._entered.set()
        self._release.wait(5)
        return super().__iter__()


class _SlowFirstSnapshotStore(InMemoryEntryStore):
    """The first snapshot taken of it is slow to write; later ones are not."""

    def __init__(self) -> None:
        super().__init__(max_entries=10, clock=lambda: 0.0)
        self.entered, self.release = Event(), Event()
        self._gated = True

    def entries(self) -> list[CacheEntry]:
        entries = super().entries()
        if not self._gated:
            return entries
        self._gated = False
        return _GatedList(entries, self.entered, self.release)


def _entry(
    name: str, embedding: npt.NDArray[np.float32] | None = None, expires_at: float = 1e12
) -> CacheEntry:
    return CacheEntry(
        entry_id=f"acme:{name}", tenant="acme", scope="acme:s", exact_key=f"acme:s:{name}",
        prompt=name, answer=name, model="m", tier=Tier.CHEAP,
        embedding=np.full(4, 0.5, dtype=np.float32) if embedding is None else embedding,
        created_at=0.0, expires_at=expires_at, cost_usd=0.0,
    )  # fmt: skip


async def test_a_save_under_way_at_shutdown_cannot_overwrite_the_final_snapshot(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    store = _SlowFirstSnapshotStore()
    keep, drop = _entry("keep"), _entry("drop")
    await store.put(keep)
    await store.put(drop)
    storage = EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 0.01)
    await storage.start()
    await asyncio.to_thread(store.entered.wait, 5)  # a periodic save is writing [keep, drop]
    await store.delete([drop.entry_id])  # invalidated meanwhile
    closing = asyncio.create_task(storage.aclose())  # cancels the periodic save, saves again
    await asyncio.sleep(0.2)
    store.release.set()
    await closing
    await asyncio.sleep(0.3)  # what is left of the cancelled save's thread runs out
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == [keep.entry_id]


def _fields_but_the_vector(entry: CacheEntry) -> dict[str, object]:
    return {k: v for k, v in dataclasses.asdict(entry).items() if k != "embedding"}


def test_a_saved_entry_reads_back_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    entry = dataclasses.replace(
        _entry("émoji ✓", embedding=np.array([0.1, -0.2, 0.3, 1e-7], dtype=np.float32)),
        tier=Tier.STRONG, tags=("billing", "faq"), hit_count=3, last_hit_at=42.5,
        prompt_tokens=7, completion_tokens=11, cost_usd=0.0125, created_at=1.5,
    )  # fmt: skip
    assert save_snapshot([entry], path) == 1
    [restored] = list(read_snapshot(path))
    assert _fields_but_the_vector(restored) == _fields_but_the_vector(entry)
    assert restored.tags == ("billing", "faq")
    assert restored.embedding.dtype == np.float32
    assert np.array_equal(restored.embedding, entry.embedding)


@pytest.mark.parametrize(
    "content",
    [b"", b'{"routecache_snapshot": 2}\n', b'{"entries": []}\n', b"hello world\n", b"[1]\n",
     b"caf\xe9\n"],
    ids=["empty", "v2", "other", "text", "a list", "latin-1"],
)  # fmt: skip
def test_a_file_that_is_not_a_version_1_snapshot_is_refused(tmp_path: Path, content: bytes) -> None:
    # Text, a list or another encoding raised JSONDecodeError, AttributeError or
    # UnicodeDecodeError, naming neither the file nor what was wrong with it.
    path = tmp_path / "snapshot.jsonl"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=f"{path} is not a routecache snapshot"):
        read_live_entries(path, now=0.0)


def _with_field(name: str, value: object) -> str:
    """A saved entry's line with one field set to `value`."""
    record = json.loads(_encode(_entry("x")))
    record[name] = value
    return json.dumps(record)


@pytest.mark.parametrize(
    "line",
    ["not json", '{"entry_id": "acme:x"}', "[]", _with_field("expires_at", "soon"),
     _with_field("created_at", None), _with_field("hit_count", "3"),
     _with_field("cost_usd", True), _with_field("tags", "abc"),
     _with_field("tags", {"a": 1}), _with_field("tags", ["a", 2]), _with_field("answer", 5),
     _with_field("model", None), _with_field("prompt", ["hi"]), _with_field("entry_id", 7)],
    ids=["not json", "fields missing", "not an object", "text expiry", "no creation time",
         "text hit count", "boolean cost", "tags as text", "tags as object", "tag not text",
         "number answer", "no model", "prompt as list", "number id"],
)  # fmt: skip
def test_a_damaged_entry_is_refused_with_its_file_and_line(tmp_path: Path, line: str) -> None:
    # A field of the wrong type was read in as it was: a text expiry failed the expiry check
    # with a TypeError traceback, a missing creation time or a number answer every hit on the
    # entry (INTERNAL), tags "abc" became the tags a, b and c.
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a", "b"), path)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(SnapshotError, match=f"{path} line 4: not a snapshot entry"):
        read_live_entries(path, now=0.0)


def test_an_entry_is_restored_only_while_its_expiry_plus_grace_is_ahead(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    save_snapshot([_entry("e", expires_at=100.0)], path)
    assert len(read_live_entries(path, now=99.5)) == 1
    assert read_live_entries(path, now=100.0) == []  # the store drops it at expiry too
    assert len(read_live_entries(path, now=109.5, grace=10.0)) == 1
    assert read_live_entries(path, now=110.0, grace=10.0) == []


def _distinct_entries(*names: str) -> list[CacheEntry]:
    return [_entry(n, embedding=np.eye(4, dtype=np.float32)[i]) for i, n in enumerate(names)]


async def _saved_after_a_hit_on_a(path: Path) -> list[CacheEntry]:
    """a, b and c stored in that order, then a served: least recently used first is b, c, a."""
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    entries = _distinct_entries("a", "b", "c")
    for entry in entries:
        await store.put(entry)
    await store.record_hit(entries[0].entry_id, now=1.0)
    save_snapshot(store.entries(), path)
    return entries


async def test_a_snapshot_of_another_embedding_dimension_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    # A snapshot made before the embedding model changed: FAISS failed a bare assertion, and
    # the start ended in a traceback instead of one line naming the snapshot.
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a"), path)
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    with pytest.raises(SnapshotError, match=f"{path}: entry acme:a: .*dimension 4.* 8"):
        await restore_snapshot(store, ScopedFaissIndex(8), path, lambda: 0.0)


def test_a_folder_at_the_snapshot_path_is_refused_not_taken_for_no_snapshot(
    tmp_path: Path,
) -> None:
    with pytest.raises(IsADirectoryError):
        read_live_entries(tmp_path, now=0.0)


async def test_a_restore_keeps_the_least_recently_used_order(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    await _saved_after_a_hit_on_a(path)
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    assert await restore_snapshot(store, ScopedFaissIndex(4), path, lambda: 0.0) == 3
    assert [e.entry_id for e in store.entries()] == ["acme:b", "acme:c", "acme:a"]


async def test_a_restore_into_a_smaller_store_drops_the_least_recently_used_from_the_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    a, b, _ = await _saved_after_a_hit_on_a(path)
    store = InMemoryEntryStore(max_entries=2, clock=lambda: 0.0)
    index = ScopedFaissIndex(4)
    await restore_snapshot(store, index, path, lambda: 0.0)
    assert [e.entry_id for e in store.entries()] == ["acme:c", "acme:a"]
    assert len(index) == 2
    assert "acme:b" not in [n.entry_id for n in index.search("acme:s", b.embedding, 3)]
    assert index.search("acme:s", a.embedding, 1)[0].entry_id == "acme:a"


class _CountingIndex(ScopedFaissIndex):
    """Counts the FAISS adds: one per entry, or one per scope and slice."""

    def __init__(self, dimension: int) -> None:
        super().__init__(dimension)
        self.single_adds = 0
        self.bulk_adds = 0

    def add(self, scope: str, entry_id: str, vector: Any) -> None:
        self.single_adds += 1
        super().add(scope, entry_id, vector)

    def add_many(self, scope: str, entry_ids: list[str], vectors: Any) -> None:
        self.bulk_adds += 1
        super().add_many(scope, entry_ids, vectors)


async def test_a_restore_gives_the_loop_turns_and_indexes_in_bulk(tmp_path: Path) -> None:
    # Before: every entry was put and indexed without a loop turn: 100 000 held the loop for
    # seconds, and the health checks (NOT_SERVING while it loads) timed out meanwhile.
    path = tmp_path / "snapshot.jsonl"
    count = 3 * RESTORE_SLICE + 5
    vectors = np.random.default_rng(1).standard_normal((count, 4)).astype(np.float32)
    save_snapshot([_entry(f"e{i}", embedding=vectors[i]) for i in range(count)], path)
    turns = 0
    seen: list[int] = []  # the loop turns counted at each put

    class Store(InMemoryEntryStore):
        async def put(self, entry: CacheEntry) -> list[CacheEntry]:
            seen.append(turns)
            return await super().put(entry)

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    ticker = asyncio.create_task(count_turns())
    index = _CountingIndex(4)
    try:
        assert await restore_snapshot(Store(count, lambda: 0.0), index, path, lambda: 0.0) == count
    finally:
        ticker.cancel()
    longest = max(seen.count(turn) for turn in set(seen))  # puts made without a loop turn
    assert longest <= RESTORE_SLICE
    assert index.single_adds == 0 and index.bulk_adds == 4 and len(index) == count


@pytest.mark.parametrize("slice_size", [1, 2, 3, 2048])
async def test_a_restore_by_slices_keeps_order_evictions_and_penalties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_size: int
) -> None:
    monkeypatch.setattr("routecache.cache.snapshot.RESTORE_SLICE", slice_size)
    path = tmp_path / "snapshot.jsonl"
    entries = _distinct_entries("a", "b", "c", "d")
    # "d2" answers d's exact key: it replaces d, as a put of a new answer does.
    d2 = dataclasses.replace(entries[3], entry_id="acme:d2", prompt="d2")
    save_snapshot([*entries, d2], path, {"acme:a": 0.1, "acme:c": 0.2, "acme:d": 0.3})
    store = InMemoryEntryStore(max_entries=2, clock=lambda: 0.0)
    index = ScopedFaissIndex(4)
    penalties: dict[str, float] = {}
    assert await restore_snapshot(store, index, path, lambda: 0.0, 0.0, penalties) == 5
    assert [e.entry_id for e in store.entries()] == ["acme:c", "acme:d2"]
    assert sorted(index.rows_of_tenant("acme")) == [("acme:s", "acme:c"), ("acme:s", "acme:d2")]
    assert penalties == {"acme:c": 0.2}


class _DiskFullAfterOne(list[CacheEntry]):
    """Entries whose writing fails after the first, as a full disk would make it."""

    def __iter__(self) -> Iterator[CacheEntry]:
        yield self[0]
        raise OSError(28, "No space left on device")


def test_a_save_that_fails_midway_leaves_the_previous_snapshot_whole(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a", "b"), path)
    with pytest.raises(OSError):
        save_snapshot(_DiskFullAfterOne(_distinct_entries("c", "d")), path)
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == ["acme:a", "acme:b"]


def test_a_save_syncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename lives in the folder: unsynced, a power loss may bring back the old snapshot
    # (or none) though the save returned.
    path = tmp_path / "snapshot.jsonl"
    synced = record_fsyncs(monkeypatch, path)
    opened: list[int] = []
    real_open = os.open

    def open_(*args: Any, **kwargs: Any) -> int:
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(os, "open", open_)
    save_snapshot(_distinct_entries("a"), path)
    assert synced == [(False, False), (True, True)]
    for descriptor in opened:  # the file's and the folder's: none left open
        with pytest.raises(OSError):
            os.fstat(descriptor)


def test_a_longer_temp_file_left_by_a_crash_adds_nothing_to_the_next_snapshot(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a", "b", "c"), path)
    path.rename(path.with_name(path.name + ".tmp"))
    save_snapshot(_distinct_entries("d"), path)
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == ["acme:d"]


async def test_a_storage_closed_before_its_restore_leaves_the_snapshot_alone(
    tmp_path: Path,
) -> None:
    # A start that failed before the restore (a taken metrics port, say) closed the storage,
    # and the close saved the still empty store over the snapshot: the cache was gone.
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a", "b"), path)
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    await EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 300.0).aclose()
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == ["acme:a", "acme:b"]


async def test_a_snapshot_that_cannot_be_restored_is_not_overwritten(tmp_path: Path) -> None:
    # The failed restore stopped the start; the close that followed saved the empty store over
    # the file it could not read (a snapshot with one bad line, or a file named by mistake).
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a"), path)
    content = path.read_text() + "not json\n"
    path.write_text(content)
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    storage = EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 300.0)
    with pytest.raises(ValueError):
        await storage.start()
    await storage.aclose()
    assert path.read_text() == content


async def test_a_snapshot_is_saved_periodically_and_the_store_reports_itself_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    storage = EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 0.02)
    health: list[bool] = []

    async def cache_health(up: bool) -> None:
        health.append(up)

    await storage.start(cache_health)
    assert health == [True]
    await store.put(_entry("kept"))
    try:
        for _ in range(200):  # not only at the stop: a crash keeps what the last save had
            if path.is_file() and read_live_entries(path, now=0.0):
                break
            await asyncio.sleep(0.01)
        assert [e.entry_id for e in read_live_entries(path, now=0.0)] == ["acme:kept"]
    finally:
        await storage.aclose()


async def test_a_snapshot_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "snapshot.jsonl"  # its folder cannot be made
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    await store.put(_entry("kept"))
    storage = EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 3600)
    await storage.save(path)  # a full disk must not take the service down
    assert "cache snapshot to" in caplog.text and "failed" in caplog.text


async def test_a_service_stopped_before_its_store_was_restored_keeps_the_snapshot(
    tmp_path: Path,
) -> None:
    # A start that fails before the restore (a metrics port still held by the process being
    # replaced, say) stops the service: its store is empty, not the cache. Saving it would
    # overwrite the snapshot and lose every entry.
    path = tmp_path / "snapshot.jsonl"
    save_snapshot([_entry("kept")], path)
    harness = make_harness(store={"snapshot_path": path})
    await harness.service.aclose()  # start_service's clean-up when the start fails
    assert [e.entry_id for e in read_live_entries(path, now=0.0)] == ["acme:kept"]


async def _saved_then_stored(path: Path) -> tuple[Harness, str, str]:
    """A running service with a snapshot (saved every 300 s), two near entries of acme in
    it, and that snapshot on disk: what a crash would restore."""
    harness = make_harness(store={"snapshot_path": path})
    await harness.service.start_storage()
    cache = harness.service.pipeline.cache
    stored = []
    for prompt in ("how do I reset my password", "how do I reset my password today"):
        vector = HashEmbedder().encode([prompt])[0]
        new = NewEntry("acme", "acme:s", prompt, "answer", "m", Tier.CHEAP, vector, 0.0, 1, 1,
                       3600, tags=("help",))  # fmt: skip
        entry = await cache.store(new)
        assert entry is not None
        stored.append(entry.entry_id)
    first, near = stored
    await _storage(harness).save(path)  # a periodic save
    return harness, first, near


def _storage(harness: Harness) -> EmbeddedStorage:
    storage = harness.service.storage
    assert isinstance(storage, EmbeddedStorage)
    return storage


_STORAGE_SAVE = "routecache.backends.storage.save_snapshot"  # what EmbeddedStorage writes with


def _saved_ids(path: Path) -> list[str]:
    return [e.entry_id for e in read_live_entries(path, now=0.0)]


@pytest.mark.parametrize("how", ["ids", "tag", "tenant"])
async def test_an_acknowledged_invalidation_is_in_the_snapshot_when_it_returns(
    tmp_path: Path, how: str
) -> None:
    # A crash right after the acknowledgement restores the snapshot: the entry must not be in it.
    path = tmp_path / "snapshot.jsonl"
    harness, first, near = await _saved_then_stored(path)
    cache = harness.service.pipeline.cache
    try:
        assert sorted(_saved_ids(path)) == sorted([first, near])
        if how == "ids":
            assert await cache.invalidate_ids("acme", [first, near]) == 2
        elif how == "tag":
            assert await cache.invalidate_tag("acme", "help") == 2
        else:
            assert await cache.invalidate_tenant("acme") == 2
        assert _saved_ids(path) == []
    finally:
        await harness.service.aclose()


async def test_an_acknowledged_thumbs_down_is_in_the_snapshot_when_it_returns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    harness, first, near = await _saved_then_stored(path)
    try:
        assert await harness.service.pipeline.cache.distrust("acme", first) == 1
        assert _saved_ids(path) == [near]
    finally:
        await harness.service.aclose()


async def test_removals_at_once_share_one_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "snapshot.jsonl"
    harness, first, near = await _saved_then_stored(path)
    saves: list[int] = []
    real_save = save_snapshot

    def counted(entries: list[CacheEntry], *args: Any, **kwargs: Any) -> int:
        saves.append(len(entries))
        return real_save(entries, *args, **kwargs)

    monkeypatch.setattr(_STORAGE_SAVE, counted)
    cache = harness.service.pipeline.cache
    try:
        # The first removal starts a save at once; the others, made while it runs, share
        # the next one.
        counts = await asyncio.gather(
            cache.invalidate_ids("acme", [first]),
            cache.invalidate_ids("acme", [near]),
            cache.invalidate_ids("acme", [first]),  # already gone: still waits for the save
        )
        assert sorted(counts) == [0, 1, 1]
        assert _saved_ids(path) == [] and len(saves) <= 2
    finally:
        await harness.service.aclose()


async def test_an_invalidation_whose_save_fails_is_unavailable_and_a_retry_waits_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "snapshot.jsonl"
    harness, first, near = await _saved_then_stored(path)
    real_save = save_snapshot

    def disk_full(entries: list[CacheEntry], *args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_STORAGE_SAVE, disk_full)
    cache = harness.service.pipeline.cache
    try:
        with pytest.raises(Unavailable):
            await cache.invalidate_ids("acme", [first])
        monkeypatch.setattr(_STORAGE_SAVE, real_save)
        # The retry finds nothing left to remove, and still returns only once it is saved.
        assert await cache.invalidate_ids("acme", [first]) == 0
        assert _saved_ids(path) == [near]
    finally:
        await harness.service.aclose()


async def test_a_save_failing_on_an_entry_answers_the_removals_and_the_saver_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: only OSError was caught. An entry that could not be encoded (a lone surrogate in
    # a provider's model name: UnicodeEncodeError, a ValueError) ended the periodic saver, a
    # removal waiting for its save hung to the caller's deadline, and the stop's save raised.
    path = tmp_path / "snapshot.jsonl"
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    storage = EmbeddedStorage(store, ScopedFaissIndex(4), lambda: 0.0, path, 0.02, 0.0, 0.0)
    await storage.start()
    await store.put(dataclasses.replace(_entry("bad"), model="m\ud800"))
    try:
        async with asyncio.timeout(5):
            with pytest.raises(StoreUnavailable):
                await storage.removals_saved(True)
        await asyncio.sleep(0.1)  # a few periodic saves, all failing
        assert storage._task is not None and not storage._task.done()
        assert "cache snapshot to" in caplog.text and "UnicodeEncodeError" in caplog.text
        assert [gone.entry_id for gone in await store.delete(["acme:bad"])] == ["acme:bad"]
        async with asyncio.timeout(5):
            await storage.removals_saved(True)  # the saver still runs: this one is written
        assert _saved_ids(path) == []
    finally:
        await storage.aclose()


async def test_thumbs_down_penalties_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    harness, first, near = await _saved_then_stored(path)
    cache = harness.service.pipeline.cache
    await cache.distrust("acme", first)
    penalty = cache.penalty_of(near)
    assert penalty > 0
    await harness.service.aclose()

    second = make_harness(store={"snapshot_path": path})
    second.clock.now = harness.clock.now
    await second.service.start_storage()
    try:
        assert second.service.pipeline.cache.penalty_of(near) == pytest.approx(penalty)
    finally:
        await second.service.aclose()


def test_a_penalty_is_an_optional_field_of_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.jsonl"
    a, b = _distinct_entries("a", "b")
    save_snapshot([a, b], path, {b.entry_id: 0.1})
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    # Only where there is one: a snapshot without penalties is as before, and loads as before.
    assert "penalty" not in lines[0] and lines[1]["penalty"] == pytest.approx(0.1)
    assert [e.entry_id for e in read_snapshot(path)] == [a.entry_id, b.entry_id]


async def test_a_snapshot_without_penalties_restores_none_and_a_damaged_one_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    save_snapshot(_distinct_entries("a"), path)
    seeded: dict[str, float] = {}
    store = InMemoryEntryStore(max_entries=10, clock=lambda: 0.0)
    await restore_snapshot(store, ScopedFaissIndex(4), path, lambda: 0.0, penalties=seeded)
    assert seeded == {}
    header, line = path.read_text().splitlines()
    path.write_text(header + "\n" + json.dumps({**json.loads(line), "penalty": "high"}) + "\n")
    with pytest.raises(SnapshotError, match="line 2"):
        read_live_entries(path, now=0.0)

"""Snapshots of the embedded store: a single-process deployment keeps its cache over restarts.

One JSON object per entry (embedding in base64 float32, and `penalty`, the similarity a
thumbs-down on a neighbour added to what it needs, only where there is one: a snapshot without
it loads with none), least recently used first, written
to a temporary file and renamed over the old snapshot (routecache.atomic_file), so a crash
mid-write never leaves a torn file. No pickle: loading a snapshot cannot run code.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routecache.atomic_file import replacing
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import CacheEntry, VectorIndex
from routecache.domain import Tier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _encode(entry: CacheEntry, penalty: float = 0.0) -> str:
    record: dict[str, Any] = dataclasses.asdict(entry)
    if penalty:
        record["penalty"] = penalty
    record["tier"] = entry.tier.value
    record["tags"] = list(entry.tags)
    record["embedding"] = base64.b64encode(
        np.ascontiguousarray(entry.embedding, dtype=np.float32).tobytes()
    ).decode()
    return json.dumps(record, ensure_ascii=False)


class SnapshotError(ValueError):
    """The file is no snapshot, or one of its entries is damaged: refused, never overwritten.
    Or no save could write it (check_snapshot_writable)."""


# Read back as they are, a text or missing number failed later, outside the line's check: the
# expiry check at restore, or every hit on the entry.
_NUMBERS = ("created_at", "expires_at", "cost_usd", "prompt_tokens", "completion_tokens",
            "hit_count", "last_hit_at")  # fmt: skip
# Likewise a number or null answer, model or prompt was served as it was: every hit on it
# raised a TypeError building the reply (INTERNAL).
_TEXTS = ("entry_id", "tenant", "scope", "exact_key", "prompt", "answer", "model")


def _decode(line: bytes) -> tuple[CacheEntry, float]:
    """The entry and its penalty (0 when the line has none)."""
    record = json.loads(line)
    penalty = record.pop("penalty", 0.0)
    if isinstance(penalty, bool) or not isinstance(penalty, int | float):
        raise TypeError(f"penalty is {penalty!r}, not a number")
    record["tier"] = Tier(record["tier"])
    tags = record["tags"]
    # tuple() would take the text "abc" for the tags a, b and c.
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise TypeError(f"tags is {tags!r}, not a list of texts")
    record["tags"] = tuple(tags)
    record["embedding"] = np.frombuffer(base64.b64decode(record["embedding"]), dtype=np.float32)
    for name in _NUMBERS:
        value = record.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} is {value!r}, not a number")
    for name in _TEXTS:
        if not isinstance(record[name], str):
            raise TypeError(f"{name} is {record[name]!r}, not a text")
    return CacheEntry(**record), float(penalty)


def save_snapshot(
    entries: Sequence[CacheEntry], path: Path, penalties: Mapping[str, float] | None = None
) -> int:
    """Writes the entries (take them with store.entries() on the loop) and their penalties
    (entry id → penalty, a copy taken on the loop too); returns how many entries."""
    penalties = penalties or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Prompts and answers at rest: readable by the service's user only.
    with replacing(path, mode=0o600) as out:
        out.write(json.dumps({"routecache_snapshot": FORMAT_VERSION}) + "\n")
        for entry in entries:
            out.write(_encode(entry, penalties.get(entry.entry_id, 0.0)) + "\n")
    return len(entries)


def check_snapshot_writable(path: Path) -> None:
    """SnapshotError unless a save can write `path`: its folder is made (as a save makes it) and
    a file is created and removed beside it (a save writes PATH.tmp there and renames it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own, not PATH.tmp: another process's save may be writing that.
        descriptor, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check",
                                             dir=path.parent)  # fmt: skip
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        problem = f"store.snapshot_path {path}: cannot be written ({exc})"
        raise SnapshotError(problem) from exc


def read_snapshot(path: Path) -> Iterator[CacheEntry]:
    return (entry for entry, _ in _read_rows(path))


def _read_rows(path: Path) -> Iterator[tuple[CacheEntry, float]]:
    """Each entry with its penalty (0 where the line has none)."""
    # Bytes, decoded a line at a time: a byte that is not UTF-8 is reported with its line.
    with path.open("rb") as lines:
        try:
            header = json.loads(next(lines, b"{}"))
        except ValueError:  # not JSON, or not UTF-8
            header = None
        if not isinstance(header, dict) or header.get("routecache_snapshot") != FORMAT_VERSION:
            raise SnapshotError(f"{path} is not a routecache snapshot (version {FORMAT_VERSION})")
        for number, line in enumerate(lines, start=2):
            try:
                row = _decode(line)
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"{path} line {number}: not a snapshot entry ({exc!r})"
                raise SnapshotError(problem) from exc
            yield row


def read_live_entries(path: Path, now: float, grace: float = 0.0) -> list[CacheEntry]:
    """The snapshot's entries that have not expired, or expired less than `grace` seconds ago
    (still servable stale); none when there is no snapshot."""
    return [entry for entry, _ in _read_live_rows(path, now, grace)]


def _read_live_rows(path: Path, now: float, grace: float) -> list[tuple[CacheEntry, float]]:
    if not path.exists():  # a folder is refused when read, not taken for no snapshot
        log.info("no cache snapshot at %s: starting empty", path)
        return []
    return [(entry, penalty) for entry, penalty in _read_rows(path)
            if entry.expires_at + grace > now]  # fmt: skip


# Entries a restore puts between loop turns: some ten milliseconds' work, so health checks
# (NOT_SERVING meanwhile) are answered; 100 000 in one go held the loop for seconds.
RESTORE_SLICE = 2048


async def restore_snapshot(
    store: InMemoryEntryStore,
    index: VectorIndex,
    path: Path,
    clock: Callable[[], float],
    stale_grace_seconds: float = 0.0,
    penalties: MutableMapping[str, float] | None = None,
) -> int:
    """Loads the live entries of a snapshot, if there is one; returns how many. `penalties`
    gets the penalty of each loaded entry that has one (for the cache to seed its own)."""
    rows = await asyncio.to_thread(_read_live_rows, path, clock(), stale_grace_seconds)
    kept: dict[str, float] = {}
    for start in range(0, len(rows), RESTORE_SLICE):
        if start:
            await asyncio.sleep(0)
        await _restore_slice(store, index, path, rows[start : start + RESTORE_SLICE], kept)
    if penalties is not None:
        penalties.update(kept)
    log.info("restored %d cache entries from %s", len(rows), path)
    return len(rows)


async def _restore_slice(
    store: InMemoryEntryStore,
    index: VectorIndex,
    path: Path,
    rows: Sequence[tuple[CacheEntry, float]],
    kept: dict[str, float],
) -> None:
    """Puts the rows in file order (least recently used first, as saved), then indexes those
    the store kept, a bulk add per scope: one FAISS call instead of one per entry."""
    # Per (scope, dimension), in file order: the entries put and not yet indexed.
    pending: dict[tuple[str, int], dict[str, CacheEntry]] = {}
    for entry, penalty in rows:
        for gone in await store.put(entry):
            # Put in this slice: not indexed yet, so it is dropped from what will be.
            if pending.get((gone.scope, len(gone.embedding)), {}).pop(gone.entry_id, None) is None:
                index.remove(gone.scope, gone.entry_id)
            kept.pop(gone.entry_id, None)  # else its penalty outlived it
        if penalty:
            kept[entry.entry_id] = penalty
        pending.setdefault((entry.scope, len(entry.embedding)), {})[entry.entry_id] = entry
    for (scope, _), entries in pending.items():
        if not entries:
            continue
        ids = list(entries)
        try:
            index.add_many(scope, ids, np.stack([e.embedding for e in entries.values()]))
        except ValueError as exc:  # a snapshot made with another embedding model
            raise SnapshotError(f"{path}: entry {ids[0]}: {exc}") from exc

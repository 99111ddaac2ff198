"""Snapshots of the embedded store: a single-process deployment keeps its cache over restarts.

One JSON object per entry (embedding in base64 float32), least recently used first, written
to a temporary file and renamed over the old snapshot (routecache.atomic_file), so a crash
mid-write never leaves a torn file. No pickle: loading a snapshot cannot run code.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routecache.atomic_file import replacing
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import CacheEntry, VectorIndex
from routecache.domain import Tier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _encode(entry: CacheEntry) -> str:
    record: dict[str, Any] = dataclasses.asdict(entry)
    record["tier"] = entry.tier.value
    record["tags"] = list(entry.tags)
    record["embedding"] = base64.b64encode(
        np.ascontiguousarray(entry.embedding, dtype=np.float32).tobytes()
    ).decode()
    return json.dumps(record, ensure_ascii=False)


class SnapshotError(ValueError):
    """The file is no snapshot, or one of its entries is damaged: refused, never overwritten."""


# Read back as they are, a text or missing number failed later, outside the line's check: the
# expiry check at restore, or every hit on the entry.
_NUMBERS = ("created_at", "expires_at", "cost_usd", "prompt_tokens", "completion_tokens",
            "hit_count", "last_hit_at")  # fmt: skip
# Likewise a number or null answer, model or prompt was served as it was: every hit on it
# raised a TypeError building the reply (INTERNAL).
_TEXTS = ("entry_id", "tenant", "scope", "exact_key", "prompt", "answer", "model")


def _decode(line: bytes) -> CacheEntry:
    record = json.loads(line)
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
    return CacheEntry(**record)


def save_snapshot(entries: Sequence[CacheEntry], path: Path) -> int:
    """Writes the entries (take them with store.entries() on the loop); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Prompts and answers at rest: readable by the service's user only.
    with replacing(path, mode=0o600) as out:
        out.write(json.dumps({"routecache_snapshot": FORMAT_VERSION}) + "\n")
        for entry in entries:
            out.write(_encode(entry) + "\n")
    return len(entries)


def read_snapshot(path: Path) -> Iterator[CacheEntry]:
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
                entry = _decode(line)
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"{path} line {number}: not a snapshot entry ({exc!r})"
                raise SnapshotError(problem) from exc
            yield entry


def read_live_entries(path: Path, now: float, grace: float = 0.0) -> list[CacheEntry]:
    """The snapshot's entries that have not expired, or expired less than `grace` seconds ago
    (still servable stale); none when there is no snapshot."""
    if not path.exists():  # a folder is refused when read, not taken for no snapshot
        log.info("no cache snapshot at %s: starting empty", path)
        return []
    return [entry for entry in read_snapshot(path) if entry.expires_at + grace > now]


async def restore_snapshot(
    store: InMemoryEntryStore,
    index: VectorIndex,
    path: Path,
    clock: Callable[[], float],
    stale_grace_seconds: float = 0.0,
) -> int:
    """Loads the live entries of a snapshot, if there is one; returns how many."""
    entries = await asyncio.to_thread(read_live_entries, path, clock(), stale_grace_seconds)
    loaded = 0
    for entry in entries:
        for gone in await store.put(entry):
            index.remove(gone.scope, gone.entry_id)
        try:
            index.add(entry.scope, entry.entry_id, entry.embedding)
        except ValueError as exc:  # a snapshot made with another embedding model
            raise SnapshotError(f"{path}: entry {entry.entry_id}: {exc}") from exc
        loaded += 1
    log.info("restored %d cache entries from %s", loaded, path)
    return loaded

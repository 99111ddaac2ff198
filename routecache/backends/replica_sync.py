"""Keeps this replica's FAISS index equal to what Redis holds.

At start: a full rebuild from the tenants' entry hashes (ZSCAN + pipelined HMGET, bulk FAISS
adds), with progress logged. Then: tail the tenants' sync streams (XREAD BLOCK) from the ids
noted before the rebuild began, so nothing written meanwhile is missed, and apply the other
replicas' adds and deletes. After an outage the tail resumes where it stopped; if the stream
was trimmed past that point or Redis lost its data, the tenant is rebuilt instead. So it is
when the stream was trimmed past where its rebuild began (more changes during the scan than
the stream keeps) or past a tail that fell behind: XREAD would go on at the oldest message
kept, and the adds trimmed before it would never be indexed.

Entries the index still holds but Redis no longer has cost only memory: SemanticCache checks
every candidate against the store and drops the missing ones. A delete read from the stream
goes to the removal listener (SemanticCache.forget_removed, wired in router/bootstrap.py), so
the entry's feedback penalty leaves this replica's memory with its index row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from routecache.backends import scripts
from routecache.backends.keys import KeySpace, tenant_of_id
from routecache.backends.link import RedisLink, RedisRefused, guarded
from routecache.backends.redis_store import RedisEntryStore
from routecache.backends.rounds import EachTenant, Rounds, TryAgain
from routecache.cache.ports import VectorIndex

log = logging.getLogger(__name__)

StreamId = tuple[int, int]
Message = tuple[bytes, dict[bytes, bytes]]
# (scope, entry id) of an entry another replica or the sweep removed.
RemovalListener = Callable[[str, str], None]
_PROGRESS_EVERY_SECONDS = 2.0
_OPS = ("add", "del")
_READ_COUNT = 1000  # sync messages one XREAD returns at most, per stream


class _Malformed(ValueError):
    """A sync message or entry row this replica cannot read: skipped, else it stopped the tail."""


class _Trimmed(TryAgain):
    """The sync stream no longer reaches back to where a rebuild began: the entries put behind
    the scan's cursor meanwhile are in neither the scan nor the stream, so it is done again."""

    def __init__(self) -> None:
        super().__init__("its sync stream was trimmed past where the rebuild began (more "
                         "changes while it ran than store.sync_stream_max_len)")  # fmt: skip


def parse_id(raw: str) -> StreamId:
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


class ReplicaSync:
    def __init__(
        self,
        link: RedisLink,
        keyspace: KeySpace,
        tenants: Sequence[str],
        index: VectorIndex,
        store: RedisEntryStore,
        origin: str,
        clock: Callable[[], float],
        purge_interval_seconds: float = 5.0,
        batch: int = 2000,
        stale_grace_seconds: float = 0.0,
    ) -> None:
        self._link = link
        self._keys = keyspace
        self._tenants = list(tenants)
        self._index = index
        self._store = store
        self._origin = origin
        self._clock = clock
        self._purge_interval = purge_interval_seconds
        self._batch = batch
        # A batch this long may start past messages trimmed before the read (a stream keeps
        # at least sync_stream_max_len; one trimmed past the position asked for holds only
        # newer ones): checked against the stream. A shorter one cannot, and costs nothing.
        self._suspect_batch = min(_READ_COUNT, store.sync_stream_max_len)
        # Expired entries within the grace stay searchable for stale answers (SemanticCache
        # keeps them out of normal lookups).
        self._grace = stale_grace_seconds
        self._rows = link.client.register_script(scripts.INDEX_ROWS)
        self._last: dict[str, str] = {}  # sync stream key → last applied id
        # Until a rebuild finished (e.g. Redis was down at start) the run loop owes one.
        self._resync = True
        # Tenants whose last gap check or rebuild failed (they stay owed), and when the next
        # check is due: a probe interval after a round that left one owed.
        self._rebuilds = EachTenant(
            "index rebuild of tenant %s failed (%s): trying again every %.2f s, the other "
            "tenants are checked and tailed meanwhile",
            "index of tenant %s is in step with redis again",
            link.probe_interval_seconds,
        )
        self._resync_at = 0.0
        # Tenants whose sync stream Redis refused to read (a key of the wrong type, say): one
        # such key refused the XREAD of every stream, so they are left out of it and read
        # alone, without blocking, once a probe interval (when the next try is due).
        self._reads = EachTenant(
            "sync stream of tenant %s cannot be read (%s): read alone again every %.2f s (or at "
            "the next round after), the other tenants are tailed meanwhile",
            "sync stream of tenant %s is read again",
            link.probe_interval_seconds,
        )
        self._reads_retry_at = 0.0
        self.applied = 0  # other replicas' operations taken in, as poll() counts them
        self.skipped = 0  # sync messages and entry rows that could not be read
        self._tail_rounds = Rounds(link, "replica sync tail")
        self._purge_rounds = Rounds(link, "replica sync purge")
        self._purges = EachTenant(
            "purge of expired entries of tenant %s failed (%s): trying again every %.1f s, the "
            "other tenants are purged meanwhile",
            "purge of expired entries of tenant %s works again",
            purge_interval_seconds,
        )
        # Per stream, the newest message skipped: a batch read again (its round failed after)
        # logs and counts it once.
        self._skipped_upto: dict[str, StreamId] = {}
        self._on_removed: RemovalListener = index.remove
        link.subscribe(self._on_health)

    def on_removed(self, listener: RemovalListener) -> None:
        """What drops a removed entry from this replica (default: the index row alone). The
        listener must drop the index row too."""
        self._on_removed = listener

    async def _on_health(self, up: bool) -> None:
        if not up:
            self._resync = True

    async def rebuild(self) -> int:
        """Loads every servable entry (live, or expired within the stale grace) of the
        configured tenants into the index; returns the count."""
        started = time.perf_counter()
        total = 0
        for tenant in self._tenants:
            try:
                total += await self._rebuild_tenant(tenant, started)
            except _Trimmed as exc:  # the others go on; the tail loop rebuilds this one again
                log.warning("index rebuild of tenant %s is done again: %s", tenant, exc)
        log.info("index rebuilt from redis: %d entries in %.1f s", total,
                 time.perf_counter() - started)  # fmt: skip
        self._resync = len(self._last) < len(self._tenants)
        return total

    async def _rebuild_tenant(self, tenant: str, started: float) -> int:
        keys = self._keys.of(tenant)
        client = self._link.client
        newest = await guarded(self._link, lambda: client.xrevrange(keys.sync, count=1))
        # Noted before the scan, kept only once it finished: a torn rebuild is redone.
        self._last.pop(keys.sync, None)
        resume_from = newest[0][0].decode() if newest else "0-0"
        size = await guarded(self._link, lambda: client.zcard(keys.lru))
        # The rows held before the scan: one whose entry the scan does not find is of an entry
        # Redis lost (FLUSHALL, a restart with no persistence), which nothing else removes.
        # Rows added during the scan are left alone: the scan may miss an entry put meanwhile.
        held_before = self._index.rows_of_tenant(tenant)
        seen: set[str] = set()
        loaded, cursor, logged = 0, 0, 0.0
        while True:
            scan = partial(client.zscan, keys.lru, cursor, count=self._batch)
            cursor, members = await guarded(self._link, scan)
            ids = [m.decode() for m, _ in members]
            loaded += await self._load(ids)
            seen.update(ids)
            elapsed = time.perf_counter() - started
            if cursor == 0 or elapsed - logged >= _PROGRESS_EVERY_SECONDS:
                logged = elapsed
                log.info("rebuilding index: tenant %s %d/%d entries (%.1f s)", tenant, len(seen),
                         size, elapsed)  # fmt: skip
            if cursor == 0:
                self._drop_lost(tenant, held_before, seen)
                if await self._trimmed_since(keys.sync, resume_from):
                    raise _Trimmed()  # the tenant stays out of `_last`: owed a rebuild
                self._last[keys.sync] = resume_from
                return loaded

    def _drop_lost(self, tenant: str, held: list[tuple[str, str]], seen: set[str]) -> None:
        """Drops the rows (and, through the listener, the penalties) of entries a full scan
        did not find: an entry Redis held throughout the scan is always in it (ZSCAN)."""
        lost = [(scope, entry_id) for scope, entry_id in held if entry_id not in seen]
        for scope, entry_id in lost:
            self._on_removed(scope, entry_id)
        if lost:
            log.info("rebuilding index: tenant %s: %d rows of entries redis no longer holds "
                     "dropped", tenant, len(lost))  # fmt: skip

    async def _load(self, ids: Sequence[str]) -> int:
        """Adds the live ones of these entries; returns how many were added."""
        by_tenant: defaultdict[str, list[str]] = defaultdict(list)
        for entry_id in ids:
            by_tenant[tenant_of_id(entry_id)].append(entry_id)
        now = self._clock()
        # Grouped by vector size too: rows of two sizes joined into one matrix were cut into
        # rows of neither (or a size the index takes, and added garbled).
        by_scope: defaultdict[tuple[str, int], tuple[list[str], list[bytes]]] = defaultdict(
            lambda: ([], [])
        )
        for tenant, members in by_tenant.items():
            rows = partial(self._rows, args=[self._keys.of(tenant).base, *members])
            flat = await guarded(self._link, rows)
            for n, entry_id in enumerate(members):
                scope, emb, expires = flat[3 * n : 3 * n + 3]
                if scope is None:
                    continue  # removed since
                try:
                    scope_text, live_until = _row(scope, emb, expires)
                except _Malformed as exc:
                    # Retried, it failed the rebuild, or stopped the tail at it, every round.
                    self.skipped += 1
                    log.warning("entry %s of tenant %s not indexed: %s", entry_id, tenant, exc)
                    continue
                if live_until + self._grace <= now:
                    continue
                scope_ids, vectors = by_scope[scope_text, len(emb)]
                scope_ids.append(entry_id)
                vectors.append(emb)
        added = 0
        for (scope, _), (scope_ids, vectors) in by_scope.items():
            try:
                matrix = np.frombuffer(b"".join(vectors), dtype=np.float32)
                self._index.add_many(scope, scope_ids, matrix.reshape(len(scope_ids), -1))
            except ValueError as exc:
                # E.g. stored by a replica with another embedder: this index cannot hold them,
                # and retrying would stop the tail at them for good. Skipped, they cost misses.
                log.warning("%d entries not indexed (%s): first %s", len(scope_ids), exc,
                            scope_ids[0])  # fmt: skip
                continue
            added += len(scope_ids)
        return added

    async def run(self) -> None:
        """The tail loop; runs until cancelled, waits out Redis outages and pauses after a
        call Redis refused. The purge has its own schedule: a tail that fails does not hold
        it up, and a purge that fails waits for the next interval."""
        if not self._tenants:
            return
        next_purge = time.monotonic() + self._purge_interval
        while True:
            await self._link.wait_up()
            await self._tail_rounds.run(self._tail)
            if time.monotonic() >= next_purge:
                await self._purge_rounds.run(self._purge)
                next_purge = time.monotonic() + self._purge_interval

    async def _tail(self) -> None:
        if self._resync and time.monotonic() >= self._resync_at:
            await self._check_gaps()
        if not self._last:
            # No tenant rebuilt (each rebuild refused, or failed on a bug): nothing to read
            # until the next check, a probe interval on. Returned at once, the loop awaited
            # nothing (the link up) and held the event loop, every request stalled, till then.
            await asyncio.sleep(self._link.probe_interval_seconds)
            return
        await self.poll()

    async def _purge(self) -> None:
        """Each tenant's purge; one that fails (refused, say a key of the wrong type) leaves
        the others to go on. Redis down ends the round: every call after it would fail too."""
        await self._purges.run(self._tenants, self._store.purge_expired)

    async def poll(self) -> int:
        """Reads and applies one batch of sync operations; returns how many of them were other
        replicas' (each counted, though only an id's last one in the batch decides its state).
        Raises RedisRefused, so the round pauses, when no stream could be read, or each only
        alone (the one XREAD of them all refused again and again)."""
        if not self._last:
            return 0
        count = 0
        refused = self._reads.failing
        if refused and time.monotonic() >= self._reads_retry_at:
            count += await self._read_each(sorted(refused))
        streams = {
            s: at for s, at in self._last.items() if self._tenant_of_stream(s) not in refused
        }
        if not streams:
            raise RedisRefused("the sync stream of every tenant was refused")
        read = partial(self._link.blocking.xread, streams, count=_READ_COUNT,
                       block=self._link.block_ms)  # fmt: skip
        try:
            answer = await guarded(self._link, read)
        except RedisRefused:
            # One stream (a key of the wrong type, say) fails the read of them all: read alone,
            # it holds up its own tenant, and every other is read this round still.
            count += await self._read_each([self._tenant_of_stream(s) for s in streams])
            # The tenants set aside now, _read_each's own reads included.
            left = streams.keys() - {self._keys.of(t).sync for t in self._reads.failing}
            # None left (every stream refused alone too), or none set aside (only the read of
            # them all is refused): the next read would be refused again, so the round pauses.
            if len(left) in (0, len(streams)):
                raise
            return count
        return count + await self._apply_all(answer)

    async def _read_each(self, tenants: Sequence[str]) -> int:
        """Reads each tenant's stream alone (not blocking); a tenant whose read fails is left
        out of the XREAD of them all until it reads again. What was read is applied after
        the reads: an error applying it (a faiss RuntimeError, say) is no failed read, and
        fails the round, whose loop logs it once an episode and tries again."""
        answers: list[list[tuple[bytes, list[Message]]]] = []

        async def read_one(tenant: str) -> None:
            stream = self._keys.of(tenant).sync
            if stream in self._last:  # else its rebuild is owed: the gap check does it
                at = {stream: self._last[stream]}
                read = partial(self._link.client.xread, at, count=_READ_COUNT)
                answers.append(await guarded(self._link, read))

        await self._reads.run(tenants, read_one)
        self._reads_retry_at = time.monotonic() + self._link.probe_interval_seconds
        count = 0
        for answer in answers:
            count += await self._apply_all(answer)
        return count

    async def _apply_all(self, answer: list[tuple[bytes, list[Message]]]) -> int:
        """Applies what XREAD answered and moves each stream's position past it, or, where the
        stream was trimmed past the position read from, owes its tenant a rebuild."""
        count = 0
        for raw_stream, messages in answer:
            stream = raw_stream.decode()
            asked = self._last.get(stream, "0-0")
            count += await self._apply(stream, messages)
            # Checked before the position moves: a failed check reads the batch again.
            if len(messages) >= self._suspect_batch and await self._trimmed_since(stream, asked):
                self._owe_rebuild(stream)
            else:
                self._last[stream] = messages[-1][0].decode()
        self.applied += count
        return count

    def _owe_rebuild(self, stream: str) -> None:
        """The tail lagged past what the stream keeps: XREAD went on at its oldest message
        without a word, and the changes trimmed before it are lost to this replica. The next
        tail round's gap check rebuilds the tenant (one not in `_last`)."""
        log.warning("sync stream of %s was trimmed past this replica's position (it fell more "
                    "than store.sync_stream_max_len changes behind): rebuilding its entries",
                    self._tenant_of_stream(stream))  # fmt: skip
        self._last.pop(stream, None)
        self._resync, self._resync_at = True, 0.0

    async def _trimmed_since(self, stream: str, position: str) -> bool:
        """Whether the stream lost messages newer than `position` (see `_trimmed_past`). Asked
        after a read, it may also see a trim since the read: a rebuild more, never a gap kept."""
        return _trimmed_past(await self._stream_info(stream), parse_id(position))

    async def _apply(self, stream: str, messages: list[Message]) -> int:
        tenant = self._tenant_of_stream(stream)
        ops = []
        for message in messages:
            try:
                ops.append(_operation(message, tenant))
            except _Malformed as exc:
                # Retried, it stopped the tail here for good: no later add or delete applied.
                at = parse_id(message[0].decode())
                if at <= self._skipped_upto.get(stream, (-1, -1)):
                    continue
                self._skipped_upto[stream] = at
                self.skipped += 1
                log.warning("sync message %s of %s (tenant %s) skipped: %s",
                            message[0].decode(), stream, tenant, exc)  # fmt: skip
        # Each id ends as its last operation left it: a `del` then an `add` (a PUT of an id
        # Redis holds unlinks it first) leaves the entry in, an `add` then a `del` leaves it
        # out. An id whose last operation is this replica's own is as its cache left it, but
        # for a PUT or DELETE Redis ran whose reply was lost (a timeout), which the cache took
        # for failed: an own `add` the index lacks (never indexed; only those are read from
        # Redis) and an own `del` the index still holds (the row and its penalty kept). The
        # rest cost one index lookup each.
        last = {op["id"]: op for op in ops}
        theirs = {i: op for i, op in last.items() if op.get("o") != self._origin}
        for op in ops:
            # Before a re-add too: the index keeps one row per id and would keep the old one.
            if op["op"] == "del" and op["id"] in theirs:
                self._on_removed(op["scope"], op["id"])
        for i, op in last.items():
            # A batch ending between an own `del` and the re-`add` of its id drops the row the
            # cache re-added: the next batch's own `add`, which the index then lacks, restores it.
            if op["op"] == "del" and i not in theirs and self._index.contains(op["scope"], i):
                self._on_removed(op["scope"], i)
        await self._load([i for i, op in last.items() if op["op"] == "add" and (
            i in theirs or not self._index.contains(op["scope"], i))])  # fmt: skip
        return sum(op.get("o") != self._origin for op in ops)

    def _tenant_of_stream(self, stream: str) -> str:
        return next((t for t in self._tenants if self._keys.of(t).sync == stream), stream)

    async def _check_gaps(self) -> None:
        """After an outage, or a tail or rebuild that found its stream trimmed past it: rebuild
        a tenant whose stream no longer reaches back to our id (or that has none: owed one).
        A tenant whose check or rebuild fails (refused, or a bug: `_load` lets out what is not
        a ValueError, such as a faiss RuntimeError) stays owed and is checked again a probe
        interval later; raised, it failed every tail round, so no tenant was tailed and the
        others' checks never ran. Redis down ends the round: every call after it would fail."""
        started = time.perf_counter()
        await self._rebuilds.run(self._tenants, partial(self._check_gap, started=started))
        self._resync = bool(self._rebuilds.failing)
        self._resync_at = time.monotonic() + self._link.probe_interval_seconds

    async def _check_gap(self, tenant: str, started: float) -> None:
        stream = self._keys.of(tenant).sync
        if stream not in self._last:
            await self._rebuild_tenant(tenant, started)
            return
        last = parse_id(self._last[stream])
        info = await self._stream_info(stream)
        newest = parse_id(_text(info.get("last-generated-id", "0-0")))
        if _trimmed_past(info, last) or newest < last:
            log.warning("sync stream of %s has a gap: rebuilding its entries", tenant)
            await self._rebuild_tenant(tenant, started)

    async def _stream_info(self, stream: str) -> dict[str, Any]:
        info: dict[str, Any] = await guarded(self._link, partial(self._xinfo, stream))
        return info

    async def _xinfo(self, stream: str) -> dict[str, Any]:
        try:
            info: dict[str, Any] = await self._link.client.xinfo_stream(stream)
        except ResponseError as exc:
            if "no such key" not in str(exc):
                raise  # refused (no permission, not a stream): `guarded` tells it apart
            return {}  # Redis holds nothing of this tenant
        return info


def _operation(message: Message, tenant: str) -> dict[str, str]:
    """A sync message's fields (written by scripts.py: op, id, scope, o); raises _Malformed."""
    try:
        op = {k.decode(): v.decode() for k, v in message[1].items()}
    except UnicodeDecodeError as exc:
        raise _Malformed(f"not UTF-8 ({exc})") from exc
    missing = [f for f in ("op", "id", "scope") if f not in op]
    if missing:
        raise _Malformed(f"no {', '.join(missing)}")
    if op["op"] not in _OPS:
        raise _Malformed(f"unknown op {op['op']!r}")
    if tenant_of_id(op["id"]) != tenant:
        raise _Malformed(f"id {op['id']!r} is not of this tenant")
    return op


def _row(scope: bytes, emb: bytes | None, expires: bytes | None) -> tuple[str, float]:
    """An entry row's scope and expiry (scripts.INDEX_ROWS); raises _Malformed."""
    if emb is None or expires is None:
        raise _Malformed("no vector" if emb is None else "no expiry")
    try:
        return scope.decode(), float(expires)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Malformed(str(exc)) from exc


def _trimmed_past(info: dict[str, Any], position: StreamId) -> bool:
    """Whether the stream (its XINFO STREAM) lost messages newer than `position`: its oldest
    kept message is newer, and trimming dropped some. A first message newer than the position
    alone is no gap: a stream empty when the position was noted (0-0) and never trimmed starts
    after it too. Trimming leaves max-deleted-entry-id alone, so entries-added tells instead
    (Redis 7; an older one does not say, and any stream starting past the position counts)."""
    if not info:
        return False  # Redis holds no such stream: the caller tells that apart
    added = info.get("entries-added")
    if added is not None and int(added) <= int(info.get("length", 0)):
        return False  # never trimmed
    first = info.get("first-entry")
    # Trimmed empty: whatever came after the position is gone.
    oldest = info.get("last-generated-id", "0-0") if first is None else first[0]
    return parse_id(_text(oldest)) > position


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

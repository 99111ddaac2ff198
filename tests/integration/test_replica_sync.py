"""One replica's index kept equal to Redis by ReplicaSync, while another replica writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import redis

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, RedisRefused
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions
from routecache.backends.replica_sync import ReplicaSync, parse_id
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.ports import CacheEntry
from routecache.cache.semantic_cache import NewEntry, SemanticCache
from routecache.domain import Tier
from tests.fakes import ManualClock
from tests.integration.replicas import eventually, real_clock
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration

SCOPE = "acme:scope-1"
GRACE = 300.0
OUTAGE = OSError("connection reset by peer")


def vector(i: int) -> np.ndarray:
    angle = i * 0.01
    return np.array([math.cos(angle), math.sin(angle), 0.0, 0.0], dtype=np.float32)


@dataclass
class Rig:
    """Replica A (a ReplicaSync and its index, nothing else) and replica B (a cache), each on
    its own link to one Redis."""

    server: RedisServer
    link: RedisLink  # replica A's
    clock: ManualClock
    writer: SemanticCache
    written: int = 0

    def replica_a(
        self,
        batch: int = 2000,
        purge_interval_seconds: float = 5.0,
        tenants: tuple[str, ...] = ("acme",),
        sync_stream_max_len: int = 100_000,
    ) -> ReplicaA:
        options = RedisStoreOptions(10_000, sync_stream_max_len=sync_stream_max_len)
        store = RedisEntryStore(self.link, KeySpace(), options, self.clock, "a")
        index = ScopedFaissIndex(4)
        sync = ReplicaSync(self.link, KeySpace(), tenants, index, store, "a", self.clock,
                           purge_interval_seconds, batch, GRACE)  # fmt: skip
        return ReplicaA(sync, index, store)

    async def write(self, count: int = 1, ttl: int = 3600) -> list[CacheEntry]:
        """Replica B stores `count` new entries."""
        stored = []
        for _ in range(count):
            i, self.written = self.written, self.written + 1
            new = NewEntry("acme", SCOPE, f"question {i}", f"answer {i}", "m", Tier.CHEAP,
                           vector(i), 0.01, 10, 10, ttl)  # fmt: skip
            entry = await self.writer.store(new)
            assert entry is not None
            stored.append(entry)
        return stored

    def raw(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port)


@dataclass
class ReplicaA:
    sync: ReplicaSync
    index: ScopedFaissIndex
    store: RedisEntryStore

    def ids(self) -> set[str]:
        """What this replica can find by similarity."""
        return {n.entry_id for n in self.index.search(SCOPE, vector(0), 1000)}


def link_to(server: RedisServer) -> RedisLink:
    return RedisLink(server.url, timeout_seconds=2.0, max_connections=8,
                     probe_interval_seconds=0.05, block_ms=100)  # fmt: skip


@contextlib.asynccontextmanager
async def rig_on(server: RedisServer) -> AsyncIterator[Rig]:
    link, writer_link, clock = link_to(server), link_to(server), real_clock()
    store = RedisEntryStore(writer_link, KeySpace(), RedisStoreOptions(10_000), clock, "b")
    writer = SemanticCache(store, ScopedFaissIndex(4), clock)
    try:
        assert await link.connect() and await writer_link.connect()
        yield Rig(server, link, clock, writer)
    finally:
        await link.aclose()
        await writer_link.aclose()


@pytest.fixture
async def rig(redis_server: RedisServer) -> AsyncIterator[Rig]:
    async with rig_on(redis_server) as made:
        yield made


@pytest.fixture
async def own_rig(own_redis_server: RedisServer) -> AsyncIterator[Rig]:
    async with rig_on(own_redis_server) as made:
        yield made


@contextlib.contextmanager
def running(sync: ReplicaSync) -> Iterator[None]:
    task = asyncio.create_task(sync.run())
    try:
        yield
    finally:
        task.cancel()


@pytest.mark.parametrize(
    ("later", "loaded"),
    [(59.0, 1), (60.0 + GRACE - 1, 1), (60.0 + GRACE, 0)],
    ids=["live", "stale-within-grace", "grace-over"],
)
async def test_a_rebuild_loads_live_entries_and_stale_ones_within_the_grace(
    rig: Rig, later: float, loaded: int
) -> None:
    await rig.write(ttl=60)
    rig.clock.advance(later)
    a = rig.replica_a()
    assert await a.sync.rebuild() == loaded
    assert len(a.ids()) == loaded


async def test_a_rebuild_reads_every_batch_of_a_large_tenant(rig: Rig) -> None:
    await rig.write(300)
    a = rig.replica_a(batch=50)
    assert await a.sync.rebuild() == 300
    assert len(a.index) == 300


async def test_each_operation_of_another_replica_is_applied_once_and_its_own_never(
    rig: Rig,
) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    added = await rig.write(3)
    assert await a.sync.poll() == 3
    assert a.ids() == {e.entry_id for e in added}
    assert await rig.writer.invalidate_ids("acme", [added[0].entry_id]) == 1
    assert await a.sync.poll() == 1
    assert a.ids() == {e.entry_id for e in added[1:]}
    assert await a.sync.poll() == 0  # nothing new: nothing applied again
    await a.store.delete([added[1].entry_id])  # this replica's own removal: its cache did the rest
    assert await a.sync.poll() == 0
    assert a.sync.applied == 4


async def test_an_entry_removed_before_the_replica_read_it_is_skipped(rig: Rig) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    (gone,) = await rig.write()
    await rig.writer.invalidate_ids("acme", [gone.entry_id])
    (kept,) = await rig.write()
    assert await a.sync.poll() == 3
    assert a.ids() == {kept.entry_id}


async def test_after_an_outage_a_stream_trimmed_past_the_replica_rebuilds_the_tenant(
    rig: Rig,
) -> None:
    first = await rig.write()
    a = rig.replica_a()
    await a.sync.rebuild()
    await rig.link.mark_down(OUTAGE)  # replica A is cut off while B writes on
    written = first + await rig.write(3)
    with rig.raw() as raw:
        raw.xtrim(
            "rc:{acme}:sync", maxlen=1, approximate=False
        )  # the stream keeps only the newest operation
    with running(a.sync):
        await eventually(lambda: len(a.ids()) == 4, "every entry in A's index", within=3)
    assert a.ids() == {e.entry_id for e in written}


async def test_after_an_outage_redis_restored_from_an_older_backup_rebuilds_the_tenant(
    own_rig: Rig, tmp_path: Path
) -> None:
    rig = own_rig
    (restored,) = await rig.write()
    a = rig.replica_a()
    await a.sync.rebuild()
    backup = tmp_path / "backup"
    aof = rig.server.data_dir / "appendonlydir"
    shutil.copytree(aof, backup)  # every write is fsynced: a consistent copy
    with running(a.sync):
        await rig.writer.invalidate_ids("acme", [restored.entry_id])
        (newer,) = await rig.write()
        await eventually(lambda: a.ids() == {newer.entry_id}, "A applied B's changes")
        rig.server.kill()
        shutil.rmtree(aof)
        shutil.copytree(backup, aof)
        await asyncio.to_thread(rig.server.start)  # back with the older data: `restored` only
        await eventually(lambda: restored.entry_id in a.ids(), "A's index rebuilt", within=3)


def rebuilds_of(monkeypatch: pytest.MonkeyPatch, sync: ReplicaSync) -> list[str]:
    """The tenants the sync rebuilds from now on, in order."""
    rebuilt: list[str] = []
    rebuild_tenant = sync._rebuild_tenant

    async def counted(tenant: str, started: float) -> int:
        rebuilt.append(tenant)
        return await rebuild_tenant(tenant, started)

    monkeypatch.setattr(sync, "_rebuild_tenant", counted)
    return rebuilt


async def test_after_an_outage_a_stream_that_reaches_back_to_the_replica_is_tailed_not_rebuilt(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.write()
    a = rig.replica_a()
    await a.sync.rebuild()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    await rig.link.mark_down(OUTAGE)  # nothing written meanwhile: the stream ends at A's id
    with running(a.sync):
        await eventually(lambda: not a.sync._resync, "A checked the stream for gaps")
        (later,) = await rig.write()
        await eventually(lambda: later.entry_id in a.ids(), "B's later entry", within=3)
    assert rebuilt == []


async def test_after_an_outage_a_stream_empty_at_the_rebuild_and_never_trimmed_is_tailed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A's position is 0-0 (no stream at its rebuild) and it tailed nothing before the outage:
    # the stream's first message is newer than 0-0, but nothing was trimmed, so no gap.
    a = rig.replica_a()
    await a.sync.rebuild()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    await rig.link.mark_down(OUTAGE)
    written = await rig.write(3)
    with running(a.sync):
        await eventually(lambda: not a.sync._resync, "A checked the stream for gaps")
        await eventually(lambda: len(a.ids()) == 3, "B's entries tailed", within=3)
    assert a.ids() == {e.entry_id for e in written}
    assert rebuilt == []


def trim_sync_stream(rig: Rig, keep: int) -> None:
    """What B's writes past store.sync_stream_max_len do: the stream keeps the newest `keep`."""
    with rig.raw() as raw:
        raw.xtrim("rc:{acme}:sync", maxlen=keep, approximate=False)


async def test_a_stream_trimmed_past_where_a_rebuild_began_rebuilds_the_tenant_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More changes than the stream keeps while A's rebuild scanned (80 s at 1M entries): the
    # entries put behind the scan's cursor are in neither the scan nor the stream A tails from
    # the id noted before it, so the tail alone never indexed them.
    before = await rig.write(2)
    a = rig.replica_a()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    during: list[CacheEntry] = []
    real_load = a.sync._load

    async def load(ids: list[str]) -> int:
        if not during:  # B writes on while A's first scan batch loads
            during.extend(await rig.write(5))
            trim_sync_stream(rig, keep=1)
        return await real_load(ids)

    monkeypatch.setattr(a.sync, "_load", load)
    await a.sync.rebuild()
    with running(a.sync):
        await eventually(lambda: len(a.ids()) == 7, "every entry in A's index", within=3)
    assert a.ids() == {e.entry_id for e in before + during}
    assert rebuilt == ["acme", "acme"]


async def test_a_tail_that_fell_behind_a_trimmed_stream_rebuilds_the_tenant(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No outage: A's tail lagged (a long rebuild of another tenant, a busy event loop) while
    # the stream was trimmed past it. XREAD starts at the oldest message kept, silently.
    a = rig.replica_a(sync_stream_max_len=2)
    await a.sync.rebuild()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    written = await rig.write(5)
    trim_sync_stream(rig, keep=2)
    with running(a.sync):
        await eventually(lambda: len(a.ids()) == 5, "every entry in A's index", within=3)
    assert a.ids() == {e.entry_id for e in written}
    assert rebuilt == ["acme"]


async def test_a_tail_behind_a_stream_that_still_reaches_back_to_it_is_not_rebuilt(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rig.replica_a(sync_stream_max_len=2)
    await a.sync.rebuild()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    written = await rig.write(5)  # more than the stream keeps at once, but nothing trimmed
    assert await a.sync.poll() == 5
    assert a.ids() == {e.entry_id for e in written}
    assert rebuilt == [] and not a.sync._resync


async def test_after_an_outage_a_stream_redis_no_longer_holds_rebuilds_the_tenant(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.write()
    a = rig.replica_a()
    await a.sync.rebuild()
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    await rig.link.mark_down(OUTAGE)
    rig.server.flushall()  # Redis came back empty: XINFO STREAM answers "no such key"
    with running(a.sync):
        await eventually(lambda: not a.sync._resync, "A checked the stream for gaps")
    assert rebuilt == ["acme"]
    assert rig.link.refusals == 0  # a missing stream is no refusal


async def test_a_replica_that_started_with_redis_down_tails_a_tenant_with_no_stream_yet(
    rig: Rig,
) -> None:
    a = rig.replica_a()  # its start-up rebuild never ran
    await rig.link.mark_down(OUTAGE)
    with running(a.sync):
        await eventually(lambda: not a.sync._resync, "A caught up once Redis answered")
        (first,) = await rig.write()  # the tenant's first write creates its sync stream
        await eventually(lambda: first.entry_id in a.ids(), "B's first entry", within=3)


@pytest.mark.timeout(60)  # before the fix: a tail loop that never yields, a probe interval long
async def test_a_tail_with_every_rebuild_refused_leaves_the_event_loop_to_others(rig: Rig) -> None:
    # Nothing to tail until the rebuild is tried again: the loop went round without awaiting
    # anything, so for a probe interval at a time no request (no other task) got a turn.
    slow = RedisLink(rig.server.url, timeout_seconds=2.0, max_connections=8,
                     probe_interval_seconds=10.0, block_ms=100)  # fmt: skip
    store = RedisEntryStore(slow, KeySpace(), RedisStoreOptions(10_000), rig.clock, "a")
    sync = ReplicaSync(slow, KeySpace(), ["acme"], ScopedFaissIndex(4), store, "a", rig.clock)
    with rig.raw() as raw:
        raw.set("rc:{acme}:lru", "not a zset")  # the rebuild's ZCARD is refused: WRONGTYPE
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    assert await slow.connect()
    ticking = asyncio.create_task(ticker())
    try:
        with running(sync):
            await eventually(lambda: sync._rebuilds.failing == {"acme"}, "the rebuild refused")
            counted = ticks
            await eventually(lambda: ticks >= counted + 20, "other tasks had turns", within=5)
    finally:
        ticking.cancel()
        await slow.aclose()
    assert sync._resync and slow.up and slow.failures == 0


@pytest.mark.parametrize(
    "failure", [RedisDown("redis is down"), OUTAGE], ids=["redis down", "socket error"]
)
async def test_a_purge_that_finds_redis_down_does_not_end_the_tail(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    a = rig.replica_a(purge_interval_seconds=0.0)
    await a.sync.rebuild()
    purges = 0

    async def down_once(tenant: str) -> int:
        nonlocal purges
        purges += 1
        if purges == 1:
            raise failure
        return 0

    monkeypatch.setattr(a.store, "purge_expired", down_once)
    with running(a.sync):
        await eventually(lambda: purges >= 1, "the first purge")
        (later,) = await rig.write()
        await eventually(lambda: later.entry_id in a.ids(), "B's later entry", within=3)


def polls_of(monkeypatch: pytest.MonkeyPatch, sync: ReplicaSync) -> list[int]:
    """What each poll of the tail loop returned, as it returns."""
    polls: list[int] = []
    poll = sync.poll

    async def noted() -> int:
        polls.append(await poll())
        return polls[-1]

    monkeypatch.setattr(sync, "poll", noted)
    return polls


async def test_a_purge_redis_refuses_waits_for_the_next_purge_interval(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rig.replica_a(purge_interval_seconds=0.0)  # the first round purges
    await a.sync.rebuild()
    purges: list[str] = []
    purge = a.store.purge_expired

    async def first_of_the_hour(tenant: str) -> int:
        purges.append(tenant)
        a.sync._purge_interval = 3600.0  # the next purge is due an hour after this one
        return await purge(tenant)

    monkeypatch.setattr(a.store, "purge_expired", first_of_the_hour)
    polls = polls_of(monkeypatch, a.sync)
    with rig.server.denied("evalsha", "eval"), running(a.sync):  # the purge is a script
        await eventually(lambda: rig.link.refusals >= 1, "the first purge refused")
        after = len(polls)
        await eventually(lambda: len(polls) >= after + 5, "five more rounds of the tail")
    assert purges == ["acme"]  # not tried again on each round
    assert rig.link.up and rig.link.failures == 0


async def test_a_sync_stream_read_redis_refuses_fails_the_round_not_the_link(rig: Rig) -> None:
    a = rig.replica_a()
    await rig.write()
    await a.sync.rebuild()
    with running(a.sync):
        with rig.server.denied("xread"):
            await eventually(lambda: rig.link.refusals >= 2, "the tail read refused, then again")
            assert rig.link.up and rig.link.failures == 0
            before = rig.link.refusals
            await asyncio.sleep(0.5)
            # A pause of a probe interval (0.05 s) after each: not hundreds of tries a second.
            assert rig.link.refusals - before <= 20
        (later,) = await rig.write()
        await eventually(lambda: later.entry_id in a.ids(), "B's later entry", within=3)
    assert rig.link.failures == 0


async def test_a_rebuild_redis_refuses_leaves_the_link_up_and_is_done_again(rig: Rig) -> None:
    (entry,) = await rig.write()
    a = rig.replica_a()
    with rig.server.denied("xrevrange"):
        with pytest.raises(RedisRefused):
            await a.sync.rebuild()
        assert rig.link.up and rig.link.failures == 0 and rig.link.refusals == 1
        with running(a.sync):
            await eventually(lambda: rig.link.refusals >= 2, "the rebuild tried again")
    with running(a.sync):
        await eventually(lambda: a.ids() == {entry.entry_id}, "the rebuild done", within=3)
    assert rig.link.failures == 0


async def test_a_rebuild_that_failed_on_a_bug_is_done_again_by_the_tail_loop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What RedisStorage.start relies on: it logs such a failure and leaves the rest to the loop.
    (entry,) = await rig.write()
    a = rig.replica_a()
    add_many, calls = a.index.add_many, []

    def broken_once(scope: str, entry_ids: list[str], vectors: np.ndarray) -> None:
        calls.append(scope)
        if len(calls) == 1:
            raise RuntimeError("index broken")
        add_many(scope, entry_ids, vectors)

    monkeypatch.setattr(a.index, "add_many", broken_once)
    with pytest.raises(RuntimeError):
        await a.sync.rebuild()
    with running(a.sync):
        await eventually(lambda: a.ids() == {entry.entry_id}, "the rebuild done again", within=3)


async def test_an_entry_whose_vector_the_index_cannot_hold_is_skipped_and_the_rest_applied(
    rig: Rig,
) -> None:
    # E.g. written by a replica with another embedder: 8 numbers where this index takes 4.
    a = rig.replica_a()
    await a.sync.rebuild()
    kept, odd = await rig.write(2)
    with rig.raw() as raw:
        raw.hset(f"rc:{{acme}}:e:{odd.entry_id}", "emb", np.ones(8, np.float32).tobytes())
    assert await a.sync.poll() == 2
    assert a.ids() == {kept.entry_id}
    (later,) = await rig.write()
    assert await a.sync.poll() == 1
    assert a.ids() == {kept.entry_id, later.entry_id}


async def test_a_tail_round_that_fails_unexpectedly_is_logged_and_the_tail_goes_on(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    add_many = a.index.add_many
    failures: list[str] = []

    def broken(scope: str, entry_ids: list[str], vectors: np.ndarray) -> None:
        if failures[-1:] != ["mended"]:
            failures.append(scope)
            raise RuntimeError("index broken")
        add_many(scope, entry_ids, vectors)

    monkeypatch.setattr(a.index, "add_many", broken)
    with running(a.sync):
        (entry,) = await rig.write()
        await eventually(lambda: len(failures) >= 2, "the round failed, then again")
        before = len(failures)
        await asyncio.sleep(0.5)
        # A pause of a probe interval (0.05 s) after each: not hundreds of tries a second.
        assert len(failures) - before <= 20
        failures.append("mended")
        await eventually(lambda: entry.entry_id in a.ids(), "the entry, once the index takes it")
    # Its traceback once for the episode, not once per round.
    assert caplog.text.count("RuntimeError: index broken") == 1


ACME_SYNC = "rc:{acme}:sync"
GOOD_EMB = vector(0).tobytes()


@pytest.mark.parametrize(
    ("message", "entry"),
    [
        ({"op": "add", "scope": SCOPE, "o": "b"}, None),
        ({"op": "del", "id": "acme:gone", "o": "b"}, None),
        ({"op": "move", "id": "acme:odd", "scope": SCOPE, "o": "b"}, None),
        ({"op": b"\xff\xfe", "id": "acme:odd", "scope": SCOPE, "o": "b"}, None),
        ({"op": "add", "id": "globex:theirs", "scope": SCOPE, "o": "b"}, None),
        (
            {"op": "add", "id": "acme:odd", "scope": SCOPE, "o": "b"},
            {"scope": SCOPE, "emb": GOOD_EMB, "expires": "soon"},
        ),
        (
            {"op": "add", "id": "acme:odd", "scope": SCOPE, "o": "b"},
            {"scope": SCOPE, "expires": "9999999999"},
        ),
        (
            {"op": "add", "id": "acme:odd", "scope": SCOPE, "o": "b"},
            {"scope": b"\xff", "emb": GOOD_EMB, "expires": "9999999999"},
        ),
    ],
    ids=[
        "no id",
        "del without scope",
        "unknown op",
        "not utf-8",
        "another tenant's id",
        "expires not a number",
        "no vector",
        "scope not utf-8",
    ],
)
async def test_a_sync_message_or_entry_that_cannot_be_read_is_skipped_and_the_rest_applied(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
    message: dict[str, str | bytes],
    entry: dict[str, str | bytes] | None,
) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    with rig.raw() as raw:
        if entry is not None:
            raw.hset("rc:{acme}:e:acme:odd", mapping=entry)
        raw.xadd(ACME_SYNC, message)
    (later,) = await rig.write()
    await a.sync.poll()  # the malformed message and B's add, in one batch
    assert a.ids() == {later.entry_id}
    assert a.sync.skipped == 1
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "acme" in r.getMessage()]
    assert len(warned) == 1
    (after,) = await rig.write()
    assert await a.sync.poll() == 1  # the stream position went past it: not read again
    assert a.ids() == {later.entry_id, after.entry_id}


async def test_a_skipped_sync_message_read_again_after_a_failed_round_is_told_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    with rig.raw() as raw:
        raw.xadd(ACME_SYNC, {"op": "move", "id": "acme:odd", "scope": SCOPE, "o": "b"})
    (later,) = await rig.write()
    with rig.server.denied("evalsha", "eval"), pytest.raises(RedisRefused):
        await a.sync.poll()  # B's add cannot be loaded: the round fails, the batch is read again
    await a.sync.poll()
    assert a.ids() == {later.entry_id}
    assert a.sync.skipped == 1
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1


async def test_a_purge_one_tenant_refuses_does_not_hold_up_the_other_tenants(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a = rig.replica_a(purge_interval_seconds=0.0, tenants=("jammed", "acme"))
    await a.sync.rebuild()
    (expired,) = await rig.write(ttl=60)
    with rig.raw() as raw:
        raw.set("rc:{jammed}:exp", "not a sorted set")  # its purge script fails: WRONGTYPE
    rig.clock.advance(120)
    purges: list[str] = []
    purge = a.store.purge_expired

    async def noted(tenant: str) -> int:
        purges.append(tenant)
        return await purge(tenant)

    monkeypatch.setattr(a.store, "purge_expired", noted)
    with running(a.sync), rig.raw() as raw:
        entry_key = f"rc:{{acme}}:e:{expired.entry_id}"
        await eventually(lambda: not raw.exists(entry_key), "acme's expired entry purged")
        await eventually(lambda: purges.count("jammed") >= 3, "jammed's purge tried again")
    warned = [r for r in caplog.records if "jammed" in r.getMessage()]
    assert len(warned) == 1  # once for the episode, not once per purge
    assert rig.link.up and rig.link.failures == 0


async def test_a_tenant_whose_sync_stream_cannot_be_read_does_not_hold_up_the_other_tenants(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    a = rig.replica_a(tenants=("jammed", "acme"))
    await a.sync.rebuild()
    with rig.raw() as raw:
        raw.set("rc:{jammed}:sync", "not a stream")  # its XREAD fails: WRONGTYPE
    (first,) = await rig.write()
    assert await a.sync.poll() == 1  # one XREAD of both streams is refused: acme's read alone
    (later,) = await rig.write()
    assert await a.sync.poll() == 1
    assert a.ids() == {first.entry_id, later.entry_id}
    assert rig.link.up and rig.link.failures == 0
    with running(a.sync):
        await eventually(lambda: rig.link.refusals >= 4, "jammed's read tried again")
        with rig.raw() as raw:
            raw.delete("rc:{jammed}:sync")  # mended: jammed's read works again
        await eventually(lambda: not a.sync._reads.failing, "jammed tailed again")
        (after,) = await rig.write()
        await eventually(lambda: after.entry_id in a.ids(), "acme tailed with jammed", within=3)
    warned = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "jammed" in r.getMessage()
    ]
    assert len(warned) == 1  # once for the episode, not once per round
    assert rig.link.up and rig.link.failures == 0


async def test_a_read_refused_only_across_streams_applies_each_stream_and_pauses_the_round(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # E.g. a proxy in front of a cluster: CROSSSLOT for one XREAD of two tenants' streams.
    a = rig.replica_a(tenants=("globex", "acme"))
    await a.sync.rebuild()

    async def cross_slot(*args: object, **kwargs: object) -> None:
        raise redis.ResponseError("CROSSSLOT Keys in request don't hash to the same slot")

    monkeypatch.setattr(rig.link.blocking, "xread", cross_slot)
    (entry,) = await rig.write()
    # Raised, the round pauses: read each alone at once, it went on without a pause for ever.
    with pytest.raises(RedisRefused):
        await a.sync.poll()
    assert a.ids() == {entry.entry_id} and not a.sync._reads.failing


async def test_a_bug_applying_a_stream_read_alone_fails_the_round_not_the_tenants_read(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A faiss error applying what acme's read alone returned: its read worked, so acme is not
    # set aside as "cannot be read" (tailed once a probe interval); the round's bug handling
    # logs it once an episode, and the next round tries again.
    a = rig.replica_a(tenants=("globex", "acme"))
    await a.sync.rebuild()

    async def cross_slot(*args: object, **kwargs: object) -> None:
        raise redis.ResponseError("CROSSSLOT Keys in request don't hash to the same slot")

    def broken(scope: str, entry_ids: list[str], vectors: np.ndarray) -> None:
        raise RuntimeError("faiss: index broken")

    monkeypatch.setattr(rig.link.blocking, "xread", cross_slot)
    monkeypatch.setattr(a.index, "add_many", broken)
    await rig.write()
    with pytest.raises(RuntimeError, match="index broken"):
        await a.sync.poll()
    assert not a.sync._reads.failing
    assert rig.link.up and rig.link.failures == 0


async def test_a_tenant_whose_rebuild_fails_on_a_bug_does_not_hold_up_the_other_tenants(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (first,) = await rig.write()
    a = rig.replica_a(tenants=("jammed", "acme"))  # its start-up rebuild never ran
    rebuild_tenant, jammed = a.sync._rebuild_tenant, [True]

    async def broken_for_jammed(tenant: str, started: float) -> int:
        if tenant == "jammed" and jammed:
            raise RuntimeError("faiss: index broken")  # not a ValueError: _load lets it out
        return await rebuild_tenant(tenant, started)

    monkeypatch.setattr(a.sync, "_rebuild_tenant", broken_for_jammed)
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    with running(a.sync):
        await eventually(lambda: first.entry_id in a.ids(), "acme rebuilt past jammed")
        (later,) = await rig.write()
        await eventually(lambda: later.entry_id in a.ids(), "acme tailed", within=3)
        await eventually(lambda: rebuilt.count("jammed") >= 3, "jammed's rebuild tried again")
        assert a.sync._resync  # jammed still owes its rebuild
        jammed.clear()
        await eventually(lambda: not a.sync._resync, "jammed rebuilt once mended")
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "jammed" in warned[0].getMessage()  # once for the episode
    assert rebuilt.count("acme") == 1  # checked again, not rebuilt again
    assert rig.link.up and rig.link.failures == 0


@pytest.mark.parametrize(
    "failure", [RedisDown("redis is down"), OUTAGE], ids=["redis down", "socket error"]
)
async def test_a_gap_check_that_finds_redis_down_ends_the_round(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    a = rig.replica_a(tenants=("jammed", "acme"))  # its start-up rebuild never ran

    async def down(tenant: str, started: float) -> int:
        raise failure

    monkeypatch.setattr(a.sync, "_rebuild_tenant", down)
    rebuilt = rebuilds_of(monkeypatch, a.sync)
    with pytest.raises(type(failure)):
        await a.sync._check_gaps()
    assert rebuilt == ["jammed"]  # every call after it would fail too: acme waits for Redis
    assert a.sync._resync and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_stream_ids_compare_by_time_then_sequence() -> None:
    # Two operations in one millisecond differ in their sequence only.
    assert parse_id("1700000000000-7") == (1700000000000, 7)
    assert parse_id("1700000000000-7") > parse_id("1700000000000-3")
    assert parse_id("5") == (5, 0)


@pytest.mark.timeout(20)  # a tail loop with nothing to await never yields: only a signal ends it
async def test_a_replica_with_no_tenants_has_nothing_to_tail(rig: Rig) -> None:
    index = ScopedFaissIndex(4)
    store = RedisEntryStore(rig.link, KeySpace(), RedisStoreOptions(10_000), rig.clock, "a")
    sync = ReplicaSync(rig.link, KeySpace(), [], index, store, "a", rig.clock)
    await asyncio.wait_for(sync.run(), timeout=2)  # returns at once


async def test_a_poll_before_any_rebuild_applies_nothing(rig: Rig) -> None:
    await rig.write()
    a = rig.replica_a()
    assert await a.sync.poll() == 0
    assert a.ids() == set()


async def test_an_entry_stored_again_under_its_id_stays_in_the_replicas_index(rig: Rig) -> None:
    # Storing an id again unlinks the old entry first: its `del` and the new `add` reach the
    # replica in one batch, and must be applied in that order, not adds first.
    a = rig.replica_a()
    (entry,) = await rig.write()
    await a.sync.rebuild()
    b = RedisEntryStore(rig.link, KeySpace(), RedisStoreOptions(10_000), rig.clock, "b")
    await b.put(replace(entry, answer="a better answer", embedding=vector(5)))
    assert await a.sync.poll() == 2
    assert a.ids() == {entry.entry_id}
    # The row is the new one: the old vector went with the `del`.
    (nearest,) = a.index.search(SCOPE, vector(5), 1)
    assert nearest.similarity == pytest.approx(1.0)


async def test_an_entry_removed_then_stored_again_by_this_replica_is_kept(rig: Rig) -> None:
    # Another replica's `del`, then this replica's own `add` of the id, in one batch: the
    # last operation is this replica's, whose cache already added the row.
    a = rig.replica_a()
    (entry,) = await rig.write()
    await a.sync.rebuild()
    await rig.writer.invalidate_ids("acme", [entry.entry_id])
    await a.store.put(entry)
    a.index.add(SCOPE, entry.entry_id, entry.embedding)  # what A's cache did as it stored it
    assert await a.sync.poll() == 1
    assert a.ids() == {entry.entry_id}


async def test_an_own_entry_whose_put_reply_was_lost_is_indexed_from_the_stream(rig: Rig) -> None:
    # Redis ran this replica's PUT but its reply timed out: the cache took the put for failed
    # and never indexed the entry, which only a restart's rebuild would have found.
    a = rig.replica_a()
    await a.sync.rebuild()
    (entry,) = await rig.write()
    await a.sync.poll()
    await a.store.delete([entry.entry_id])
    a.index.remove(SCOPE, entry.entry_id)  # what A's cache did as it removed it
    await a.store.put(entry)  # this replica's own add, never in its index
    assert entry.entry_id not in a.ids()
    assert await a.sync.poll() == 0  # still no other replica's operation
    assert a.ids() == {entry.entry_id}


async def test_an_own_delete_whose_reply_was_lost_drops_the_row_from_the_stream(
    rig: Rig,
) -> None:
    # Redis ran this replica's DELETE (an invalidation, or a PUT's eviction) but its reply
    # timed out: the cache kept the row and its penalty, which nothing else removed.
    a = rig.replica_a()
    removed: list[str] = []

    def forget(scope: str, entry_id: str) -> None:  # as SemanticCache.forget_removed
        removed.append(entry_id)
        a.index.remove(scope, entry_id)

    a.sync.on_removed(forget)
    await a.sync.rebuild()
    kept, lost, done = await rig.write(3)
    await a.sync.poll()
    await a.store.delete([lost.entry_id])  # the cache never heard back: its row stays
    await a.store.delete([done.entry_id])
    a.index.remove(SCOPE, done.entry_id)  # what A's cache did as the delete returned
    assert await a.sync.poll() == 0  # still no other replica's operation
    assert a.ids() == {kept.entry_id}
    assert removed == [lost.entry_id]  # the delete the cache applied is not told again


async def test_an_own_entry_already_indexed_is_not_read_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rig.replica_a()
    await a.sync.rebuild()
    (entry,) = await rig.write()
    await a.sync.poll()
    reads: list[list[str]] = []
    real_load = a.sync._load

    async def load(ids: list[str]) -> int:
        reads.append(list(ids))
        return await real_load(ids)

    monkeypatch.setattr(a.sync, "_load", load)
    own = replace(entry, entry_id=f"acme:{'1' * 32}", exact_key=f"{entry.exact_key}-other")
    await a.store.put(own)
    a.index.add(SCOPE, own.entry_id, own.embedding)  # as A's cache did once the put returned
    assert await a.sync.poll() == 0
    assert reads == [[]]  # the normal path: nothing read from Redis, nothing added twice
    assert len(a.index) == 2


async def test_a_rebuild_drops_the_rows_of_entries_redis_no_longer_holds(rig: Rig) -> None:
    # Redis lost them (FLUSHALL, a restart with no persistence): serving stayed correct (the
    # store is read before a hit), but the rows stayed in the index for the process's life.
    a = rig.replica_a()
    await a.sync.rebuild()
    written = await rig.write(3)
    await a.sync.poll()
    assert a.ids() == {e.entry_id for e in written}
    rig.raw().flushall()
    (kept,) = await rig.write()
    await a.sync.rebuild()
    assert a.ids() == {kept.entry_id}


async def test_a_rebuild_keeps_a_row_added_while_it_scanned(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row this replica's cache adds during the scan (its own put landing after the cursor
    # passed) may not be in the scan: only rows held before the scan are dropped.
    a = rig.replica_a()
    late = f"acme:{'2' * 32}"
    real_load = a.sync._load

    async def load(ids: list[str]) -> int:
        a.index.add(SCOPE, late, vector(7))
        return await real_load(ids)

    monkeypatch.setattr(a.sync, "_load", load)
    await rig.write(2)
    await a.sync.rebuild()
    assert late in a.ids() and len(a.ids()) == 3

"""The storage a service runs on, with its start and stop: the embedded store (optionally
snapshotted to disk) or Redis (shared by replicas). Chosen in router/bootstrap.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

from redis.exceptions import RedisError

from routecache.backends.link import RedisLink
from routecache.backends.redis_events import RedisStreamEventSink
from routecache.backends.redis_spend import RedisSpendLedger
from routecache.backends.replica_sync import ReplicaSync
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import CacheEntry, StoreUnavailable, VectorIndex
from routecache.cache.snapshot import check_snapshot_writable, restore_snapshot, save_snapshot

log = logging.getLogger(__name__)

CacheHealth = Callable[[bool], Awaitable[None]]


async def _ignore_health(up: bool) -> None:
    return None


class Storage(Protocol):
    async def start(self, cache_health: CacheHealth = _ignore_health) -> None:
        """Loads what the store holds into the index; returns when this replica may serve."""
        ...

    async def aclose(self) -> None: ...


class PenaltyBook(Protocol):
    """The cache's thumbs-down penalties (SemanticCache), kept in the snapshot with the entries."""

    def penalties(self) -> dict[str, float]: ...

    def seed_penalties(self, penalties: Mapping[str, float]) -> None: ...


class _NoPenalties:
    def penalties(self) -> dict[str, float]:
        return {}

    def seed_penalties(self, penalties: Mapping[str, float]) -> None:
        return None


# The least time between two saves made for removals: removals made meanwhile share the next
# save, so a stream of them costs at most one save (a whole-store write) a second.
REMOVAL_SAVE_GAP_SECONDS = 1.0


class EmbeddedStorage:
    """The in-process store; with a snapshot path it is restored at start and saved
    periodically, at stop and soon after a removal (see `removals_saved`)."""

    def __init__(
        self,
        store: InMemoryEntryStore,
        index: VectorIndex,
        clock: Callable[[], float],
        snapshot_path: Path | None,
        snapshot_interval_seconds: float,
        stale_grace_seconds: float = 0.0,
        removal_save_gap_seconds: float = REMOVAL_SAVE_GAP_SECONDS,
    ) -> None:
        self.store = store
        self._index = index
        self._clock = clock
        self._path = snapshot_path
        self._interval = snapshot_interval_seconds
        self._grace = stale_grace_seconds
        self._task: asyncio.Task[None] | None = None
        # One writer at a time: a save cancelled on the loop (stop cancels the periodic one)
        # goes on in its thread, and two writers share the .tmp file, so the older snapshot
        # could land last and bring back entries removed since.
        self._writing = threading.Lock()
        # Saved only once restored: before that the store is empty, or the file unreadable, and
        # a save would put that over the snapshot.
        self._restored = False
        self._penalties: PenaltyBook = _NoPenalties()
        # Removals are numbered as they are reported; a save covers those reported before it
        # took the entries. Each caller waits for a save covering its number (True: written).
        self._gap = removal_save_gap_seconds
        self._reported = 0
        self._saved_through = 0
        self._waiting: list[tuple[int, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()

    def keep_penalties(self, book: PenaltyBook) -> None:
        """Saves the book's penalties with the entries, and seeds it with them at start."""
        self._penalties = book

    async def start(self, cache_health: CacheHealth = _ignore_health) -> None:
        if self._path is not None:
            # Before the restore (seconds on a large file): a path no save can write would
            # serve, and make every removal UNAVAILABLE until the settings are fixed.
            await asyncio.to_thread(check_snapshot_writable, self._path)
            penalties: dict[str, float] = {}
            await restore_snapshot(self.store, self._index, self._path, self._clock, self._grace,
                                   penalties)  # fmt: skip
            self._penalties.seed_penalties(penalties)
            self._restored = True
            self._task = asyncio.create_task(self._keep_saved(self._path))
        await cache_health(True)

    async def removals_saved(self, removed: bool) -> None:
        """Returns once the snapshot no longer holds what the caller removed (`removed`: it
        removed something; else it waits only while an earlier removal is not yet saved, which
        may be the one it meant, made by a call at once or one whose save failed). Else an
        acknowledged Invalidate or thumbs-down came back with the next start after a crash.
        Raises StoreUnavailable when that save fails (the caller is told to retry)."""
        if self._task is None:
            return  # no snapshot: nothing on disk to bring the entry back
        if removed:
            self._reported += 1
        elif self._saved_through >= self._reported:
            return
        saved: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((self._reported, saved))
        self._wake.set()
        if not await saved:
            raise StoreUnavailable("the cache snapshot could not be written")

    async def _keep_saved(self, path: Path) -> None:
        """Saves every interval, and at once when a removal wakes it, but at most one save for
        removals a gap: those reported meanwhile share the next."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            woken = self._wake.is_set()
            self._wake.clear()
            await self.save(path)
            if woken:
                await asyncio.sleep(self._gap)

    async def save(self, path: Path) -> bool:
        """Whether it was written. A full disk must not take the service down: logged."""
        # The lists are taken here, on the loop; encoding and writing run on a thread.
        covered = self._reported
        entries, penalties = self.store.entries(), self._penalties.penalties()
        try:
            count = await asyncio.to_thread(self._write, entries, penalties, path)
        except OSError as exc:
            log.error("cache snapshot to %s failed: %s", path, exc)
            self._answer(covered, False)
            return False
        except Exception:
            # Not only the disk: an entry that cannot be encoded (a lone surrogate, say) raised
            # past this, ending the periodic saver and leaving the removals waiting for a save
            # to their deadline. Logged with its traceback (a bug); the saver goes on.
            log.exception("cache snapshot to %s failed", path)
            self._answer(covered, False)
            return False
        log.info("saved %d cache entries to %s", count, path)
        self._saved_through = max(self._saved_through, covered)
        self._answer(covered, True)
        return True

    def _answer(self, covered: int, written: bool) -> None:
        """Tells the callers waiting for removals up to `covered` whether they are saved."""
        still = []
        for number, saved in self._waiting:
            if number > covered:
                still.append((number, saved))
            elif not saved.done():  # else its caller is gone
                saved.set_result(written)
        self._waiting = still

    def _write(self, entries: list[CacheEntry], penalties: dict[str, float], path: Path) -> int:
        with self._writing:
            return save_snapshot(entries, path, penalties)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._path is not None and self._restored:
            await self.save(self._path)  # answers the removals still waiting, too


class RedisStorage:
    """Redis: connect, rebuild the index, then tail the sync stream and flush events in the
    background. A Redis that is down at start leaves the service serving without a cache."""

    def __init__(
        self,
        link: RedisLink,
        sync: ReplicaSync,
        events: RedisStreamEventSink | None,
        spend: RedisSpendLedger,
        close_timeout_seconds: float = 2.0,
    ) -> None:
        self.link = link
        self.sync = sync
        self.events = events
        self._spend = spend
        self._close_timeout = close_timeout_seconds
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, cache_health: CacheHealth = _ignore_health) -> None:
        self.link.subscribe(cache_health)
        if await self.link.connect():
            try:
                await self.sync.rebuild()
            except StoreUnavailable as exc:  # down, or refused a call: the sync loop redoes it
                log.warning("index rebuild from redis failed (%s): finishing it later", exc)
            except (RedisError, OSError) as exc:  # a call beside the link: Redis is down
                await self.link.mark_down(exc)
            except Exception:
                # A bug (or data this replica cannot take) is no outage: marked down, it sent
                # every part (rate limits, spend, events) to its fallback. The cache serves what
                # was loaded, and the sync loop does the rest of the rebuild again, as after a
                # refusal, logging a failure again with its traceback.
                log.exception("index rebuild from redis failed: the replica sync tries it again")
        self._tasks.append(asyncio.create_task(self.sync.run(), name="replica-sync"))
        if self.events is not None:
            self._tasks.append(asyncio.create_task(self.events.run(), name="event-flush"))

    async def aclose(self) -> None:
        for task in self._tasks:
            await _cancel(task)
        if (flushing := self._spend.stop_flushing()) is not None:
            await _cancel(flushing)  # else it may add spend the report below calls lost
        # Last chance for pending spend and buffered events; a dead Redis must not hang stop.
        # Spend first: the caps are held to it, and a slow event flush must not use up the time.
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await self._spend.flush()
                if self.events is not None and self.link.up:
                    await _last_event_flush(self.events)
        self._spend.report_unflushed()
        if self.events is not None:
            # Redis down (the last flush skipped, or failing): what it still holds is lost.
            self.events.report_unflushed()
        await self.link.aclose()


async def _last_event_flush(events: RedisStreamEventSink) -> None:
    """The stop's event flush: a batch failing on a bug (the flush drops and counts it) is
    logged, and the stop goes on to report the spend and close the connections."""
    try:
        await events.flush()
    except (StoreUnavailable, TimeoutError):
        raise
    except Exception:
        log.exception("the last event flush failed: its events were dropped")


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancels until it is done: on Python 3.11 a cancel that lands as a socket timeout
    expires can come out as a TimeoutError, which the loops treat as Redis being down."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    if not task.cancelled() and (error := task.exception()) is not None:
        # Logged, not raised: raised, it ended the stop before the last spend and event
        # flush and before the connections were closed.
        log.error("background task %s had stopped on an error", task.get_name(), exc_info=error)

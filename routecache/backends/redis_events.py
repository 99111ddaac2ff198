"""The event log on Redis Streams (one stream per tenant, `XADD ... MAXLEN ~`).

`emit` never waits on Redis: events go into a bounded local queue per tenant that a background
task flushes in batches. While Redis is down the queues hold them, up to `max_buffered` in all;
past it the oldest event of the tenant with the most buffered is dropped, and counted (one
tenant's volume never drops a quieter tenant's events), and they are flushed once Redis answers
again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from redis.exceptions import DataError

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.backends.rounds import Rounds
from routecache.router.events import (
    NOT_ENCODABLE,
    event_json,
    first_sight,
    new_event,
    unique_events,
)

log = logging.getLogger(__name__)

# Events before a tenant is known (a refused API key's request): a name no tenant can have
# (settings.TENANT_NAME_PATTERN), so no tenant's stream receives them.
_NO_TENANT = "!none"

# What redis-py's encoder raises for a value it cannot write: DataError for a type it takes
# no form of, UnicodeEncodeError for text that is no UTF-8 (a lone surrogate).
_REDIS_PY_CANNOT_ENCODE = (DataError, UnicodeEncodeError)

# An encoded event: its stream and the entry's fields.
_Row = tuple[str, dict[str, str]]


class RedisStreamEventSink:
    def __init__(
        self,
        link: RedisLink,
        keyspace: KeySpace,
        max_buffered: int = 10_000,
        stream_max_len: int = 1_000_000,
        batch: int = 500,
    ) -> None:
        self._link = link
        self._keys = keyspace
        # tenant → its events, oldest first; only tenants with events buffered.
        self._queues: dict[str, deque[dict[str, Any]]] = {}
        self._held = 0  # events in all the queues
        # In all, not per tenant: events carry whole prompts, and a bound per tenant held it
        # times the tenants through a long outage.
        self._max_buffered = max_buffered
        self._stream_max_len = stream_max_len
        self._batch = batch
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._rounds = Rounds(link, "event flush")
        self.dropped = 0
        self.written = 0

    @property
    def buffered(self) -> int:
        return self._held

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None:
        event = new_event(kind, payload)  # its event_id kept if the event is written again
        self._queues.setdefault(_tenant_of(event), deque()).append(event)
        self._held += 1
        self._bound()
        self._wake.set()

    def report_unflushed(self) -> int:
        """At stop, after the last flush: the events still buffered (Redis was down) end with
        this process. Counted in `dropped` and logged in one WARNING with each tenant's count,
        so the loss is seen; returns how many."""
        left = {tenant: len(queue) for tenant, queue in self._queues.items()}
        lost = sum(left.values())
        if lost:
            self.dropped += lost
            log.warning("%d events never reached redis and end with this process: %s", lost,
                        ", ".join(f"{_shown(t)} {n}" for t, n in sorted(left.items())))  # fmt: skip
        self._queues.clear()
        self._held = 0
        return lost

    def _bound(self) -> None:
        """Past the bound, drops the oldest events of the tenant with the most buffered."""
        while self._held > self._max_buffered:
            tenant, queue = max(self._queues.items(), key=lambda item: len(item[1]))
            queue.popleft()
            if not queue:
                del self._queues[tenant]
            self._held -= 1
            self.dropped += 1

    async def run(self) -> None:
        """The flush loop; runs until cancelled. A refused write (out of memory) is tried again
        after a pause, an outage once Redis is up, and anything else is logged and the loop goes
        on after a pause: ended, it left the events to pile up and be dropped unseen."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._link.wait_up()
            await self._rounds.run(self.flush)
            if self._queues:
                self._wake.set()

    async def flush(self) -> None:
        """Writes everything buffered; raises RedisDown (keeping the rest) if Redis fails."""
        async with self._flushing:  # the background loop and a final flush never interleave
            while self._queues:
                batch, rows = self._encode(self._take(self._batch))
                if not rows:
                    continue
                try:
                    await guarded(self._link, lambda r=rows: self._write(r))  # type: ignore[misc]
                # A cancel (the service's stop ending the loop mid-write) keeps the batch too,
                # for the stop's final flush. Either way Redis may have taken it already: an
                # event written twice is better than a batch lost.
                except (RedisDown, asyncio.CancelledError):
                    self._requeue(batch)
                    raise
                except _Unencodable as exc:
                    # A value redis-py takes no form of (a bug of ours, every value should be
                    # text): those events are dropped alone, the rest go back in front.
                    encodes = [self._encodes(row) for row in rows]
                    if all(encodes):  # not an event's value: the batch is the bug
                        self.dropped += len(rows)
                        raise
                    self.dropped += encodes.count(False)
                    log.error("%d events redis-py could not encode were dropped (%s)",
                              encodes.count(False), exc)  # fmt: skip
                    self._requeue([event for event, ok in zip(batch, encodes, strict=True) if ok])
                    continue
                except Exception:
                    # Not Redis (a bug): the batch would fail again, and held in front it stopped
                    # every later event. Dropped and counted; the flush loop logs the error.
                    self.dropped += len(rows)
                    raise
                self.written += len(rows)

    def _encode(self, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[_Row]]:
        """The events that encode, and their stream entries. One JSON has no form for even with
        `default=str` (a dict with a tuple key, a circular reference) is dropped and counted
        alone: raised while writing, it failed the whole batch, up to `batch` good events."""
        kept: list[dict[str, Any]] = []
        rows: list[_Row] = []
        failed: list[str] = []
        for event in batch:
            try:
                data = event_json(event)
            except NOT_ENCODABLE as exc:
                failed.append(f"{event.get('kind')}: {exc}")
                continue
            stream = self._keys.of(_tenant_of(event)).events
            kept.append(event)
            rows.append((stream, {"kind": _text(event["kind"]), "data": data}))
        if failed:
            self.dropped += len(failed)
            log.error("%d events could not be encoded as JSON and were dropped (first %s)",
                      len(failed), failed[0])  # fmt: skip
        return kept, rows

    def _take(self, count: int) -> list[dict[str, Any]]:
        """Up to `count` of the oldest events, a tenant at a time, the tenants in turn."""
        batch: list[dict[str, Any]] = []
        while self._queues and len(batch) < count:
            tenant = next(iter(self._queues))
            queue = self._queues.pop(tenant)
            batch += [queue.popleft() for _ in range(min(count - len(batch), len(queue)))]
            if queue:
                self._queues[tenant] = queue  # to the end: the next batch starts elsewhere
        self._held -= len(batch)
        return batch

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        """Puts an unwritten batch back in front of each tenant's queue; past the bound the
        oldest of the tenant with the most buffered go."""
        for event in reversed(batch):
            self._queues.setdefault(_tenant_of(event), deque()).appendleft(event)
        self._held += len(batch)
        self._bound()

    async def _write(self, rows: Sequence[_Row]) -> None:
        pipe = self._link.client.pipeline(transaction=False)
        try:
            for stream, fields in rows:
                pipe.xadd(stream, fields, maxlen=self._stream_max_len, approximate=True)
            await pipe.execute()
        except _REDIS_PY_CANNOT_ENCODE as exc:
            # redis-py refused to build or encode the batch (before sending any of it): not
            # Redis down, which `guarded` made of this RedisError, flapping every part onto its
            # fallback; nor a bug failing the whole batch, every tenant's events with it.
            raise _Unencodable(str(exc)) from exc

    def _encodes(self, row: _Row) -> bool:
        """Whether redis-py can encode each of this row's values."""
        encoder = self._link.client.get_encoder()
        stream, fields = row
        try:
            for value in (stream, *fields.keys(), *fields.values()):
                encoder.encode(value)
        except _REDIS_PY_CANNOT_ENCODE:
            return False
        return True


class _Unencodable(Exception):
    """redis-py could not encode a batch: a bug of ours, not Redis failing."""


def _tenant_of(event: Mapping[str, Any]) -> str:
    return str(event.get("tenant") or _NO_TENANT)


def _shown(tenant: str) -> str:
    """A tenant as a log line names it: events before a tenant was known have none."""
    return "(no tenant)" if tenant == _NO_TENANT else tenant


def _text(value: object) -> str:
    """A field value as text, so redis-py never meets one it cannot encode (None, a bool):
    text as it is, anything else as the JSON `data` holds it."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


async def read_events(
    link: RedisLink, keyspace: KeySpace, tenant: str, count: int = 1000
) -> list[dict[str, Any]]:
    """The tenant's oldest `count` events (see `_read_page` for what is skipped), an event
    written twice once. Raises RedisDown (RedisRefused when Redis answered with an error), as
    every call does."""
    events, _ = await _read_page(link, keyspace.of(tenant).events, "-", count)
    return list(unique_events(events))


async def iter_events(
    link: RedisLink, keyspace: KeySpace, tenant: str, page: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every event of the tenant's stream, oldest first, `page` entries a read: what
    `routecache export-events` turns into the JSONL log retrain reads, or the notebook's table.
    Read whole, the caller picking by `ts`: an entry id is Redis' clock at the flush, the `ts`
    the replica's at the event, so starting at an id could miss events of a replica ahead.
    An event the sink wrote twice (a write that timed out after Redis applied it is written
    again) is yielded once: its copies share its `event_id`."""
    key = keyspace.of(tenant).events
    start = "-"
    seen: set[str] = set()
    while True:
        events, last = await _read_page(link, key, start, page)
        for event in events:
            if first_sight(event, seen):
                yield event
        if last is None:
            return
        start = f"({last}"  # exclusive: the page after the last entry read


async def _read_page(
    link: RedisLink, key: str, start: str, count: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `count` events from `start`, and the id of the last entry read (None: the stream
    has no more). An entry that is not an event (no `data` field, or not a JSON object there,
    or one nested too deeply to parse: written by something else) is skipped, and logged once
    per read with the count, rather than failing the read of every event around it."""
    rows = await guarded(link, lambda: link.client.xrange(key, min=start, count=count))
    events: list[dict[str, Any]] = []
    skipped: list[str] = []
    for entry_id, fields in rows:
        try:
            event = json.loads(fields[b"data"])
        # UnicodeDecodeError is a ValueError too; RecursionError: JSON nested past the parser.
        except (KeyError, ValueError, RecursionError) as exc:
            skipped.append(f"{entry_id.decode()}: {exc!r}")
            continue
        if not isinstance(event, dict):
            skipped.append(f"{entry_id.decode()}: not a JSON object")
            continue
        events.append(event)
    if skipped:
        log.warning("%d entries of %s could not be read as events and were skipped (first %s)",
                    len(skipped), key, skipped[0])  # fmt: skip
    return events, rows[-1][0].decode() if len(rows) == count else None

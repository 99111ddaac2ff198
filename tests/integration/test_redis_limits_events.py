"""Rate limits, spend and the event stream shared by replicas through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, RedisRefused
from routecache.backends.redis_events import RedisStreamEventSink, read_events
from routecache.backends.redis_spend import RedisSpendLedger
from routecache.domain import Tier
from routecache.errors import ResourceExhausted
from routecache.router.budget import Cap, Period, Reservation
from tests.fakes import ManualClock
from tests.integration.replicas import (
    ACME,
    ask,
    eventually,
    real_clock,
    replica_settings,
    start_replica,
)
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration


def link_to(server: RedisServer) -> RedisLink:
    return RedisLink(server.url, timeout_seconds=0.5, max_connections=4,
                     probe_interval_seconds=0.05)  # fmt: skip


Connected = tuple[RedisLink, RedisStreamEventSink]


@pytest.fixture
async def connected(redis_server: RedisServer) -> AsyncIterator[Connected]:
    """A link to the test's Redis, connected, and an event sink on it; closed at the end."""
    link = link_to(redis_server)
    assert await link.connect()
    try:
        yield link, RedisStreamEventSink(link, KeySpace())
    finally:
        await link.aclose()


@contextlib.asynccontextmanager
async def flushing(sink: RedisStreamEventSink) -> AsyncIterator[asyncio.Task[None]]:
    """The sink's flush loop, running in the background; ended (cancelled) at the end."""
    loop = asyncio.create_task(sink.run())
    try:
        yield loop
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_spend_falls_back_to_the_replica_when_redis_is_down(
    own_redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    link = link_to(own_redis_server)
    spend = RedisSpendLedger(link, KeySpace(), clock)
    assert await link.connect()
    try:
        await spend.record("acme", 0.25)
        own_redis_server.kill()
        await spend.record("acme", 0.5)  # kept pending, counted against the cap meanwhile
        assert await spend.spent_today("acme") == pytest.approx(0.75)
        own_redis_server.start()
        await link.wait_up()
        other = RedisSpendLedger(link, KeySpace(), clock)  # as another replica sees it

        async def flushed() -> bool:  # the pending spend is moved by the link's health listener
            return await other.spent_today("acme") == pytest.approx(0.75)

        await eventually(flushed, "the spend recorded while Redis was down reaches Redis")
    finally:
        await link.aclose()


async def record_an_eighth(spend: RedisSpendLedger) -> float:
    await spend.record("acme", 0.125)
    return 0.125


async def reserve_an_eighth(spend: RedisSpendLedger) -> float:
    held = await spend.reserve("acme", "", 0.125, [Cap(Period.DAY, 10.0)])
    assert isinstance(held, Reservation) and not held.local
    return 0.0  # held, not spent


@pytest.mark.parametrize("write", [record_an_eighth, reserve_an_eighth])
async def test_spend_redis_refused_reaches_it_once_it_takes_writes_again(
    redis_server: RedisServer, write: Callable[[RedisSpendLedger], Awaitable[float]]
) -> None:
    # Refused (out of memory) the link stays up, so no "up" notice starts the flush: the spend
    # stayed on this replica, out of the caps every other replica checks in Redis.
    clock = ManualClock()
    link = link_to(redis_server)
    spend = RedisSpendLedger(link, KeySpace(), clock)
    assert await link.connect()
    try:
        await spend.record("acme", 0.25)
        with redis_server.out_of_memory():
            await spend.record("acme", 0.5)  # refused: kept here, counted against the cap
            assert link.up and await spend.spent_today("acme") == pytest.approx(0.75)
        spent = 0.75 + await write(spend)  # taken: what Redis refused follows it
        other = RedisSpendLedger(link, KeySpace(), clock)  # as another replica sees it

        async def flushed() -> bool:
            return await other.spent_today("acme") == pytest.approx(spent)

        await eventually(flushed, "the spend Redis refused reaches Redis")
    finally:
        await link.aclose()


async def test_the_daily_cap_counts_spend_of_every_replica(redis_server: RedisServer) -> None:
    clock = real_clock()
    settings = replica_settings(redis_server.url)
    # A call reserves its worst case before it is made: a cap of exactly one call's worst case
    # lets the first call through and, once that spent anything, no other on any replica.
    probe = await start_replica(settings, clock)
    tenant = probe.service.pipeline._p.authenticator.authenticate(ACME)
    worst = probe.service.pipeline.costs.worst_case_usd(
        tenant, ask("spend some money"), Tier.CHEAP, cheap_only=False
    )
    await probe.service.aclose()
    settings.tenants[0].daily_budget_usd = worst
    a = await start_replica(settings, clock)
    b = await start_replica(settings, clock)
    try:
        await a.service.pipeline.complete(ask("spend some money"), ACME)
        with pytest.raises(ResourceExhausted):
            await b.service.pipeline.complete(ask("anything else"), ACME)
    finally:
        await a.service.aclose()
        await b.service.aclose()


async def test_events_land_on_the_tenant_stream(redis_server: RedisServer) -> None:
    clock = real_clock()
    replica = await start_replica(replica_settings(redis_server.url), clock)
    try:
        done = await replica.service.pipeline.complete(ask("log me"), ACME)
        sink = replica.service.events
        assert isinstance(sink, RedisStreamEventSink)
        await sink.flush()
        link = replica.service.storage.link  # type: ignore[attr-defined]
        events = await read_events(link, KeySpace(), "acme")
        assert [e["response_id"] for e in events] == [done.response_id]
        assert events[0]["kind"] == "completion" and events[0]["prompt"] == "log me"
        assert await read_events(link, KeySpace(), "globex") == []
    finally:
        await replica.service.aclose()


async def test_events_of_no_tenant_stay_out_of_every_tenants_stream(
    connected: Connected,
) -> None:
    link, sink = connected
    # A refused key's request: its prompt must not reach a tenant that happens to be "_".
    sink.emit("error", {"tenant": "", "prompt": "not yours", "reason": "unauthenticated"})
    sink.emit("error", {"prompt": "nor yours", "reason": "unauthenticated"})  # no tenant key
    await sink.flush()
    assert await read_events(link, KeySpace(), "_") == []
    assert await read_events(link, KeySpace(), "None") == []


async def test_the_event_buffer_is_bounded_while_redis_is_down(
    own_redis_server: RedisServer,
) -> None:
    link = link_to(own_redis_server)
    sink = RedisStreamEventSink(link, KeySpace(), max_buffered=3)
    own_redis_server.kill()
    assert not await link.connect()
    try:
        for n in range(5):
            sink.emit("completion", {"tenant": "acme", "n": n})
        assert sink.buffered == 3 and sink.dropped == 2
        own_redis_server.start()
        await link.wait_up()
        await sink.flush()
        assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [2, 3, 4]
        assert [e["n"] for e in await read_events(link, KeySpace(), "acme", count=2)] == [2, 3]
    finally:
        await link.aclose()


async def test_the_buffer_is_bounded_in_total_and_only_the_largest_queue_loses_events(
    own_redis_server: RedisServer,
) -> None:
    # Before: the buffer was shared, so acme's volume dropped globex's one event; then each
    # tenant had the whole bound, so a long outage held the bound times the tenants.
    link = link_to(own_redis_server)
    sink = RedisStreamEventSink(link, KeySpace(), max_buffered=4)
    own_redis_server.kill()
    assert not await link.connect()
    try:
        sink.emit("completion", {"tenant": "globex", "n": 0})
        sink.emit("completion", {"tenant": "initech", "n": 0})
        for n in range(5):
            sink.emit("completion", {"tenant": "acme", "n": n})
        assert sink.buffered == 4 and sink.dropped == 3
        own_redis_server.start()
        await link.wait_up()
        await sink.flush()
        assert [e["n"] for e in await read_events(link, KeySpace(), "globex")] == [0]
        assert [e["n"] for e in await read_events(link, KeySpace(), "initech")] == [0]
        assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [3, 4]
    finally:
        await link.aclose()


async def test_the_flush_loop_writes_events_and_keeps_them_in_order_through_an_outage(
    own_redis_server: RedisServer,
) -> None:
    link = link_to(own_redis_server)
    assert await link.connect()
    # Batches of 2: the failed write is a part of what is buffered, and must go back in front.
    sink = RedisStreamEventSink(link, KeySpace(), max_buffered=3, batch=2)
    try:
        async with flushing(sink):

            async def written(count: int) -> bool:
                return len(await read_events(link, KeySpace(), "acme")) == count

            before = time.time()
            sink.emit("completion", {"tenant": "acme", "n": 0})
            await eventually(lambda: written(1), "an emitted event is written without a flush call")
            # Redis dies unnoticed: the loop's next write fails, and the link is marked down.
            own_redis_server.kill()
            for n in (1, 2, 3):
                sink.emit("completion", {"tenant": "acme", "n": n})
            await eventually(lambda: not link.up, "the failed write marks the link down")
            own_redis_server.start()
            await eventually(lambda: link.up, "redis answers again")  # reads fail until then
            await eventually(lambda: written(4), "the events kept while Redis was down are written")
            events = await read_events(link, KeySpace(), "acme")
            assert [e["n"] for e in events] == [0, 1, 2, 3] and sink.dropped == 0
            assert all(
                e["kind"] == "completion" and before <= e["ts"] <= time.time() for e in events
            )
    finally:
        await link.aclose()


async def test_the_flush_loop_pauses_after_a_write_redis_refuses(
    redis_server: RedisServer,
) -> None:
    # Refused (out of memory) the link stays up: the loop retried at once, over and over.
    link = RedisLink(redis_server.url, timeout_seconds=0.5, max_connections=4,
                     probe_interval_seconds=2.0)  # fmt: skip
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace())
    try:
        async with flushing(sink):
            with redis_server.out_of_memory():
                sink.emit("completion", {"tenant": "acme", "n": 0})
                await eventually(lambda: link.refusals > 0, "the write is refused")
                await asyncio.sleep(0.2)  # a loop retrying at once wrote hundreds of times here
                assert link.refusals == 1 and sink.buffered == 1 and link.up

            async def written() -> bool:
                return [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [0]

            await eventually(written, "the refused event is written once Redis takes writes")
    finally:
        await link.aclose()


async def test_a_tenant_stream_is_trimmed_to_about_its_max_length(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server)
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace(), stream_max_len=10)
    try:
        for n in range(500):
            sink.emit("completion", {"tenant": "trimmed", "n": n})
        await sink.flush()
        # `MAXLEN ~` trims whole stream nodes (100 entries each by default), never below 10.
        length = await link.client.xlen(KeySpace().of("trimmed").events)
        assert 10 <= length <= 110
        newest = await read_events(link, KeySpace(), "trimmed", count=1000)
        assert newest[-1]["n"] == 499
    finally:
        await link.aclose()


async def test_events_emitted_during_a_failed_write_keep_the_buffer_bounded(
    own_redis_server: RedisServer,
) -> None:
    link = link_to(own_redis_server)  # calls time out after 0.5 s
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace(), max_buffered=3)
    try:
        for n in range(3):
            sink.emit("completion", {"tenant": "acme", "n": n})
        stalling = asyncio.create_task(asyncio.to_thread(own_redis_server.debug_sleep, 1.0))
        await asyncio.to_thread(own_redis_server.wait_stalled)  # the stall has begun
        flushing = asyncio.create_task(sink.flush())
        await eventually(lambda: sink.buffered == 0, "the write of the batch has started")
        for n in range(3, 6):  # the service goes on while the write waits
            sink.emit("completion", {"tenant": "acme", "n": n})
        with pytest.raises(RedisDown):
            await flushing
        # The unwritten batch went back in front of the newer events; the oldest were dropped.
        assert sink.buffered == 3 and sink.dropped == 3
        await stalling
        await eventually(lambda: link.up, "redis answers again")
        await sink.flush()
        # (The stalled write itself lands once Redis wakes: a timeout does not undo a command.)
        assert [e["n"] for e in await read_events(link, KeySpace(), "acme")][-3:] == [3, 4, 5]
    finally:
        await link.aclose()


async def test_a_flush_cancelled_mid_write_leaves_its_batch_to_the_final_flush(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = link_to(redis_server)
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace(), batch=2)
    write, started = sink._write, asyncio.Event()

    async def never_answers(batch: object) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(sink, "_write", never_answers)
    loop = asyncio.create_task(sink.run())
    try:
        for n in range(3):
            sink.emit("completion", {"tenant": "cancelled", "n": n})
        await started.wait()
        loop.cancel()  # the service's stop ends the flush loop while it writes a batch
        with pytest.raises(asyncio.CancelledError):
            await loop
        monkeypatch.setattr(sink, "_write", write)
        await sink.flush()  # the stop's final flush
        assert [e["n"] for e in await read_events(link, KeySpace(), "cancelled")] == [0, 1, 2]
        assert sink.written == 3  # the cancelled batch counted once, as it was written
    finally:
        await link.aclose()


async def test_a_flush_that_fails_unexpectedly_is_logged_and_the_loop_goes_on(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    link = link_to(redis_server)
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace(), batch=1)
    write, failed = sink._write, asyncio.Event()

    async def broken_once(batch: list[tuple[str, dict[str, str]]]) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug in the write")
        await write(batch)

    monkeypatch.setattr(sink, "_write", broken_once)
    try:
        async with flushing(sink) as loop:
            sink.emit("completion", {"tenant": "acme", "n": 0})
            await asyncio.wait_for(failed.wait(), 10)
            sink.emit("completion", {"tenant": "acme", "n": 1})

            async def written() -> bool:
                return [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [1]

            await eventually(written, "the later event written: the loop went on")
            assert not loop.done()
        assert sink.dropped == 1  # the batch the bug failed: counted, not tried again for ever
        assert "a bug in the write" in caplog.text and link.up
    finally:
        await link.aclose()


async def test_an_event_with_a_value_json_cannot_encode_is_written_as_text(
    connected: Connected,
) -> None:
    link, sink = connected
    when = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    sink.emit("completion", {"tenant": "acme", "when": when})
    await sink.flush()
    assert [e["when"] for e in await read_events(link, KeySpace(), "acme")] == [str(when)]


async def test_an_event_json_cannot_encode_at_all_is_dropped_alone_and_the_batch_written(
    connected: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    link, sink = connected
    circular: dict[str, object] = {}
    circular["self"] = circular
    sink.emit("completion", {"tenant": "acme", "n": 0})
    sink.emit("completion", {"tenant": "acme", "scores": {("a", "b"): 1}})  # a tuple key
    sink.emit("completion", {"tenant": "acme", "loop": circular})
    sink.emit("completion", {"tenant": "acme", "n": 3})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [0, 3]
    assert (sink.written, sink.dropped) == (2, 2)
    dropped = [r for r in caplog.records if "could not be encoded" in r.getMessage()]
    assert len(dropped) == 1 and "2 events" in dropped[0].getMessage()  # once per batch


@pytest.mark.parametrize(("kind", "field"), [(None, b"null"), (True, b"true"), (3, b"3")])
async def test_an_event_whose_kind_is_not_text_is_written_as_json_and_the_link_stays_up(
    connected: Connected, kind: object, field: bytes
) -> None:
    link, sink = connected
    # The payload's `kind` takes the event's place: redis-py takes no None or bool.
    sink.emit("completion", {"tenant": "acme", "kind": kind})
    await sink.flush()
    ((_, fields),) = await link.client.xrange(KeySpace().of("acme").events)
    assert fields[b"kind"] == field
    assert [e["kind"] for e in await read_events(link, KeySpace(), "acme")] == [kind]
    assert link.up and link.failures == 0


async def test_an_event_redis_py_cannot_encode_is_dropped_alone_and_the_link_stays_up(
    connected: Connected, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    link, sink = connected
    encode = sink._encode

    def one_unencodable(
        batch: list[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
        kept, rows = encode(batch)
        for event, (_, fields) in zip(kept, rows, strict=True):
            if event["n"] == 1:
                # What a bug in our encoding would hand redis-py:
                fields["data"] = object()  # type: ignore[assignment]
        return kept, rows

    monkeypatch.setattr(sink, "_encode", one_unencodable)
    for n in range(3):
        sink.emit("completion", {"tenant": "acme", "n": n})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [0, 2]
    assert (sink.written, sink.dropped) == (2, 1)
    assert "could not encode" in caplog.text
    assert link.up and link.failures == 0 and link.refusals == 0


async def test_an_event_holding_a_lone_surrogate_is_written_and_no_other_event_dropped(
    connected: Connected,
) -> None:
    # The reviewer's repro: a provider's error text held a lone surrogate; redis-py's encoder
    # raised UnicodeEncodeError (not DataError) and the flush dropped the whole batch, every
    # tenant's events with it.
    link, sink = connected
    for n in range(3):
        sink.emit("completion", {"tenant": "globex", "n": n})
    sink.emit("error", {"tenant": "acme", "message": "HTTP 503: overloaded \ud83d"})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "globex")] == [0, 1, 2]
    (error,) = await read_events(link, KeySpace(), "acme")
    assert error["message"] == "HTTP 503: overloaded \ufffd"
    assert (sink.written, sink.dropped) == (4, 0)


async def test_an_event_whose_field_redis_py_cannot_encode_as_utf8_is_dropped_alone(
    connected: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    # A `kind` holding a lone surrogate (the stream entry's own field, not the JSON `data`):
    # UnicodeEncodeError from redis-py's encoder is a value it cannot encode, like DataError.
    link, sink = connected
    sink.emit("completion", {"tenant": "globex", "n": 0})
    sink.emit("odd \ud800", {"tenant": "acme", "n": 1})
    sink.emit("completion", {"tenant": "globex", "n": 2})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "globex")] == [0, 2]
    assert (sink.written, sink.dropped) == (2, 1)
    assert "could not encode" in caplog.text
    assert link.up and link.failures == 0


async def test_a_batch_redis_py_refuses_whole_is_dropped_as_a_bug_and_the_link_stays_up(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server)
    assert await link.connect()
    sink = RedisStreamEventSink(link, KeySpace(), stream_max_len=-1)  # no event's fault
    try:
        sink.emit("completion", {"tenant": "acme", "n": 0})
        sink.emit("completion", {"tenant": "acme", "n": 1})
        with pytest.raises(Exception, match="maxlen"):  # the flush loop logs it
            await sink.flush()
        assert (sink.buffered, sink.dropped) == (0, 2)  # not tried again for ever
        assert link.up and link.failures == 0
    finally:
        await link.aclose()


async def test_reading_events_skips_a_stream_entry_without_data_or_with_bad_json(
    connected: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    link, sink = connected
    stream = KeySpace().of("acme").events
    sink.emit("completion", {"tenant": "acme", "n": 0})
    await sink.flush()
    await link.client.xadd(stream, {"kind": "completion"})  # written by another tool
    await link.client.xadd(stream, {"kind": "completion", "data": "{not json"})
    await link.client.xadd(stream, {"kind": "completion", "data": b"\xff\xfe"})
    await link.client.xadd(stream, {"kind": "completion", "data": "[3]"})  # not an object
    sink.emit("completion", {"tenant": "acme", "n": 4})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [0, 4]
    skipped = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(skipped) == 1 and "4 entries" in skipped[0].getMessage()  # once per read


async def test_reading_events_skips_a_stream_entry_nested_past_the_parser(
    connected: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: json.loads raised RecursionError on it, out of iter_events: export-events failed
    # and every good event around the entry went unread.
    link, sink = connected
    stream = KeySpace().of("acme").events
    sink.emit("completion", {"tenant": "acme", "n": 0})
    await sink.flush()
    await link.client.xadd(stream, {"kind": "x", "data": "[" * 100_000 + "]" * 100_000})
    sink.emit("completion", {"tenant": "acme", "n": 2})
    await sink.flush()
    assert [e["n"] for e in await read_events(link, KeySpace(), "acme")] == [0, 2]
    skipped = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(skipped) == 1 and "RecursionError" in skipped[0].getMessage()


async def test_reading_events_redis_refuses_raises_refused_and_leaves_the_link_up(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server)
    assert await link.connect()
    try:
        with redis_server.denied("xrange"), pytest.raises(RedisRefused):
            await read_events(link, KeySpace(), "acme")
        assert link.up and link.refusals == 1
    finally:
        await link.aclose()


async def test_events_still_buffered_at_stop_are_counted_dropped_and_logged_per_tenant(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: with Redis down the stop skipped the last flush and the buffered events ended
    # with the process, in no log line and no count.
    replica = await start_replica(replica_settings(own_redis_server.url), real_clock())
    events = replica.service.events
    assert isinstance(events, RedisStreamEventSink)
    await replica.service.pipeline.complete(ask("asked while redis is up"), ACME)
    own_redis_server.kill()
    for n in range(3):
        await replica.service.pipeline.complete(ask(f"asked while redis is down {n}"), ACME)
    held = events.buffered
    assert held >= 3
    with caplog.at_level(logging.WARNING, logger="routecache.backends"):
        await replica.service.aclose()
    assert (events.buffered, events.dropped) == (0, held)
    lost = [r.getMessage() for r in caplog.records if "never reached redis" in r.getMessage()]
    assert lost == [f"{held} events never reached redis and end with this process: acme {held}"]

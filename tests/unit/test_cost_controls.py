"""Rate limits per tenant and end user, spend caps with reservations, savings, budget alerts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from aiohttp import web

from routecache.backends.storage import EmbeddedStorage
from routecache.domain import (
    Budget,
    CacheControl,
    CacheOutcome,
    ChatRequest,
    Completion,
    GenerationParams,
    RateLimits,
    ResponseFormat,
    ResponseFormatType,
    Tenant,
    Tier,
    ValidationReport,
)
from routecache.errors import (
    FailedValidation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RouteCacheError,
    Unauthenticated,
    Unavailable,
    UpstreamError,
)
from routecache.router.alerts import BudgetAlerts
from routecache.router.budget import (
    Cap,
    CapReached,
    InMemorySpendLedger,
    Movement,
    Period,
    Reservation,
    SpendLedger,
    SpendRecord,
    Totals,
    period_ids,
    seconds_to_period_end,
)
from routecache.router.error_mapping import RETRY_AFTER_KEY, status_of, trailing_metadata_of
from routecache.router.events import InMemoryEventLog
from routecache.router.metrics import PrometheusTelemetry
from routecache.router.quotas import (
    Charge,
    InMemoryQuotaLimiter,
    admission_charges,
    completion_charges,
    user_slot,
)
from routecache.router.settings import SETTLE_MARGIN_SECONDS
from routecache.router.tokens import estimate_tokens, request_prompt_tokens
from routecache.router.upstream.failover import AllProvidersFailed
from tests.fakes import (
    ManualClock,
    RecordingTelemetry,
    count_shared_calls,
    cut_stream_after_two_deltas,
    eventually,
    prose_answer,
)
from tests.unit.conftest import KEYS, Harness, make_harness
from tests.unit.test_pipeline import ask, json_request

ACME = KEYS["acme"]
MAX_TOKENS = 100


def sized_answer(prompt: str, params: GenerationParams) -> str:
    """An answer of exactly max_tokens tokens as the fake upstream counts them."""
    return "x" * (4 * ((params.max_tokens or MAX_TOKENS) - 1))


def costly(prompt: str, user: str = "", tier: Tier | None = Tier.STRONG) -> ChatRequest:
    return ask(prompt, params=GenerationParams(max_tokens=MAX_TOKENS), force_tier=tier,
               cache=CacheControl(no_cache=True), end_user_id=user)  # fmt: skip


def budget_harness(**budget: object) -> Harness:
    harness = make_harness(validators=[], budget=budget)
    harness.strong.answer = sized_answer
    harness.cheap.answer = sized_answer
    return harness


async def test_user_and_tenant_request_buckets() -> None:
    harness = make_harness(rate={"requests": 3, "user_requests": 2, "window_seconds": 60})
    complete = harness.service.pipeline.complete
    await complete(ask("a", end_user_id="u1"), ACME)
    await complete(ask("b", end_user_id="u1"), ACME)
    with pytest.raises(ResourceExhausted, match="end user") as user_limited:
        await complete(ask("c", end_user_id="u1"), ACME)
    assert user_limited.value.retry_after_seconds == pytest.approx(30.0)
    # The user's refusal took nothing from the tenant's bucket: one request is left in it.
    await complete(ask("d", end_user_id="u2"), ACME)
    with pytest.raises(ResourceExhausted, match=r"\(requests\)") as tenant_limited:
        await complete(ask("e", end_user_id="u3"), ACME)
    assert tenant_limited.value.retry_after_seconds == pytest.approx(20.0)
    await complete(ask("e", end_user_id="u3"), KEYS["globex"])  # another tenant's buckets
    harness.clock.advance(30.0)
    await complete(ask("f", end_user_id="u1"), ACME)
    assert harness.telemetry.cost_controls.count(("acme", "rate_limited")) == 2
    await harness.service.aclose()


async def test_requests_without_an_end_user_take_only_the_tenants_buckets() -> None:
    # Before: they all shared one end user's buckets (user ''), so every caller that names
    # no end user together got one user's allowance. Per-user budgets skip them too (caps_of).
    harness = make_harness(rate={"requests": 4, "user_requests": 1, "user_tokens": 1,
                                 "window_seconds": 60})  # fmt: skip
    complete = harness.service.pipeline.complete
    for prompt in ("a", "b", "c", "d"):
        await complete(ask(prompt), ACME)
    with pytest.raises(ResourceExhausted, match=r"\(requests\)"):
        await complete(ask("e"), ACME)
    await harness.service.aclose()


@pytest.mark.parametrize("user", ["", "u1"])
def test_only_a_named_end_user_has_buckets_of_their_own(user: str) -> None:
    rate = RateLimits(60.0, requests=4, tokens=100, user_requests=1, user_tokens=10)
    tenant = Tenant("acme", None, 0.9, 3600, rate=rate)
    taken = [c.bucket for c in admission_charges(tenant, user, 5)]
    debited = [c.bucket for c in completion_charges(tenant, user, 5)]
    if user:
        assert (taken, debited) == (["req", "tok", "ureq:u1", "utok:u1"], ["tok", "utok:u1"])
    else:
        assert (taken, debited) == (["req", "tok"], ["tok"])


async def test_token_buckets_take_the_prompt_then_debit_the_answer() -> None:
    harness = make_harness(rate={"tokens": 100, "window_seconds": 10})  # 10 tokens a second
    complete = harness.service.pipeline.complete
    prompt = "p" * 200  # 50 tokens by the len/4 estimate
    done = await complete(ask(prompt), ACME)
    # 100 - 50 (prompt) - the answer's tokens: below 50, so the next prompt waits.
    left = 100 - 50 - done.usage.completion_tokens
    with pytest.raises(ResourceExhausted, match="tokens") as limited:
        await complete(ask(prompt + "?"), ACME)
    assert limited.value.retry_after_seconds == pytest.approx((51 - left) / 10)
    harness.clock.advance(limited.value.retry_after_seconds)
    await complete(ask(prompt + "?"), ACME)
    await harness.service.aclose()


async def test_a_request_takes_all_its_buckets_or_none() -> None:
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    tenant = Charge("req", 1.0, 10.0, 1.0)
    user = Charge("ureq:u", 0.1, 1.0, 1.0)
    assert (await limiter.take("t", [tenant, user])).allowed
    refused = await limiter.take("t", [tenant, user])
    assert (refused.bucket, refused.wait_seconds) == pytest.approx(("ureq:u", 10.0))
    for _ in range(9):  # the tenant bucket still holds the 9 left
        assert (await limiter.take("t", [tenant])).allowed
    assert not (await limiter.take("t", [tenant])).allowed
    # An amount above the capacity passes on a full bucket and leaves it in debt.
    big = Charge("tok", 1.0, 5.0, 8.0)
    assert (await limiter.take("t", [big])).allowed
    assert (await limiter.take("t", [big])).wait_seconds == pytest.approx(8.0)


async def test_a_refusal_waits_for_the_slowest_bucket_it_needs() -> None:
    limiter = InMemoryQuotaLimiter(ManualClock())
    slow = Charge("req", 0.1, 1.0, 1.0)  # refills in 10 s
    fast = Charge("ureq:u", 1.0, 1.0, 1.0)  # in 1 s
    assert (await limiter.take("t", [slow, fast])).allowed
    refused = await limiter.take("t", [slow, fast])
    assert (refused.bucket, refused.wait_seconds) == pytest.approx(("req", 10.0))


async def test_a_wall_clock_stepping_back_refills_no_bucket_twice() -> None:
    clock = ManualClock()
    quotas = InMemoryQuotaLimiter(clock)
    request = Charge("req", 1.0, 1.0, 1.0)
    assert (await quotas.take("t", [request])).allowed
    clock.advance(-10)  # an NTP step back
    assert not (await quotas.take("t", [request])).allowed
    clock.advance(10)  # back where the buckets were emptied: no time has passed for them
    assert not (await quotas.take("t", [request])).allowed


async def test_each_end_users_token_bucket_takes_their_prompt_then_their_answer() -> None:
    harness = make_harness(rate={"user_tokens": 100, "window_seconds": 10})  # 10 a second
    complete = harness.service.pipeline.complete
    # Ids over 64 characters are hashed to a slot: the answer must be debited from the
    # same bucket the prompt was taken from, not from one named by the raw id.
    alice, bob = "a" * 100, "b" * 100
    prompt = "p" * 200  # 50 tokens by the len/4 estimate
    done = await complete(ask(prompt, end_user_id=alice), ACME)
    assert done.usage.completion_tokens > 0
    left = 100 - 50 - done.usage.completion_tokens
    with pytest.raises(ResourceExhausted, match="tokens of this end user") as limited:
        await complete(ask(prompt + "?", end_user_id=alice), ACME)
    assert limited.value.retry_after_seconds == pytest.approx((51 - left) / 10)
    await complete(ask(prompt + "?", end_user_id=bob), ACME)  # bob's bucket is his own
    harness.clock.advance(limited.value.retry_after_seconds)
    await complete(ask(prompt + "?", end_user_id=alice), ACME)
    await harness.service.aclose()


async def test_requests_per_second_allows_a_burst_of_that_many_then_refills_at_that_rate() -> None:
    harness = make_harness(requests_per_second=2.0)
    complete = harness.service.pipeline.complete
    await complete(ask("one"), ACME)
    await complete(ask("two"), ACME)
    with pytest.raises(ResourceExhausted, match="requests per second") as limited:
        await complete(ask("three"), ACME)
    assert limited.value.retry_after_seconds == pytest.approx(0.5)
    harness.clock.advance(0.5)
    await complete(ask("three"), ACME)
    await harness.service.aclose()


async def test_an_idle_bucket_refills_to_its_capacity_and_no_further() -> None:
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    request = Charge("req", 1.0, 2.0, 1.0)  # a burst of 2, one more a second
    assert (await limiter.take("t", [request])).allowed
    clock.advance(100)  # idle for 100 seconds' worth of refill
    assert (await limiter.take("t", [request])).allowed
    assert (await limiter.take("t", [request])).allowed
    assert (await limiter.take("t", [request])).wait_seconds == pytest.approx(1.0)


async def test_a_wall_clock_stepping_back_takes_nothing_from_a_bucket() -> None:
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    request = Charge("req", 1.0, 1.0, 1.0)
    assert (await limiter.take("t", [request])).allowed
    clock.advance(-10)  # an NTP step back: the bucket waits as long as it did, no longer
    assert (await limiter.take("t", [request])).wait_seconds == pytest.approx(1.0)
    clock.advance(11)  # one second on from where the bucket was emptied
    assert (await limiter.take("t", [request])).allowed


async def test_only_idle_full_buckets_are_forgotten_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("routecache.router.quotas._MAX_BUCKETS", 2)
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    slow = Charge("ureq:slow", 0.01, 1.0, 1.0)  # 100 s to refill
    assert (await limiter.take("t", [slow])).allowed
    for user in ("u0", "u1", "u2"):
        assert (await limiter.take("t", [Charge(f"ureq:{user}", 1.0, 1.0, 1.0)])).allowed
    clock.advance(1.0)  # u0..u2 have refilled (not yet written back); slow has not
    assert (await limiter.take("t", [Charge("ureq:new", 1.0, 1.0, 1.0)])).allowed
    # A full bucket forgotten starts full again, as it was; forgetting one still refilling
    # would hand its user a fresh quota.
    assert len(limiter._buckets) == 2
    assert (await limiter.take("t", [slow])).wait_seconds == pytest.approx(99.0)


class _CountingBuckets(OrderedDict[Any, Any]):
    """The limiter's buckets, counting those a call walks over."""

    visits = 0

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            self.visits += 1
            yield key

    def items(self) -> Any:  # lazily, as the view is
        return ((key, self[key]) for key in self)


async def test_past_the_bound_a_take_visits_a_few_buckets_not_all_that_never_refill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Daily per-user buckets of many distinct end users never refill within the run: a scan
    # of all of them for full ones found none to drop, on every take of every tenant.
    monkeypatch.setattr("routecache.router.quotas._MAX_BUCKETS", 1000)
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    for i in range(1500):
        assert (await limiter.take("a", [Charge(f"ureq:u{i}", 1 / 86400, 100.0, 1.0)])).allowed
        clock.advance(0.05)
    counting = _CountingBuckets(limiter._buckets)
    limiter._buckets = counting
    for _ in range(5):
        assert (await limiter.take("b", [Charge("req", 1.0, 1000.0, 1.0)])).allowed
    assert counting.visits <= 5 * 8


async def test_past_twice_the_bound_the_least_recently_used_buckets_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("routecache.router.quotas._MAX_BUCKETS", 100)
    clock = ManualClock()
    limiter = InMemoryQuotaLimiter(clock)
    tenant = Charge("req", 1 / 86400, 1000.0, 1.0)  # the tenant's own, taken by every request
    first = Charge("ureq:first", 1 / 86400, 1.0, 1.0)
    assert (await limiter.take("a", [tenant, first])).allowed
    for i in range(500):  # a flood of distinct end users, none of whose buckets refill
        user = Charge(f"ureq:u{i}", 1 / 86400, 1.0, 1.0)
        assert (await limiter.take("a", [tenant, user])).allowed
    assert len(limiter._buckets) <= 200
    # The tenant's bucket, used all along, kept its count; the first user's, least recently
    # used, was forgotten: a fresh one (the price of the bound, docs/operations.md).
    assert (await limiter.take("a", [tenant])).allowed
    assert limiter._buckets[("a", "req")][0].tokens == pytest.approx(1000 - 502, abs=0.1)
    assert (await limiter.take("a", [first])).allowed


def test_end_user_ids_up_to_64_characters_name_their_slot_as_they_are() -> None:
    # docs/redis-keys.md: the ureq:/utok: buckets carry the id itself up to 64 characters.
    assert user_slot("u" * 64) == "u" * 64
    assert user_slot("u" * 65).startswith("h:")


def test_resource_exhausted_carries_the_retry_delay_in_trailing_metadata() -> None:
    error = ResourceExhausted("rate limit", 1.2345)
    assert status_of(error).name == "RESOURCE_EXHAUSTED"
    assert trailing_metadata_of(error) == ((RETRY_AFTER_KEY, "1235"),)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("messages", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthenticated("no key"), grpc.StatusCode.UNAUTHENTICATED),
        (NotFound("no such response"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("cap", 1.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (FailedValidation("blocked", ValidationReport()), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (AllProvidersFailed(Tier.CHEAP, ["cheap: HTTP 503"]), grpc.StatusCode.UNAVAILABLE),
        (RouteCacheError("unforeseen"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_its_status_code(error: RouteCacheError, code: grpc.StatusCode) -> None:
    assert status_of(error) is code


async def test_reservations_adding_up_to_a_cap_exactly_fit_despite_float_sums() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    caps = [Cap(Period.DAY, 0.3)]
    for _ in range(3):  # 0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats
        assert isinstance(await ledger.reserve("t", "", 0.1, caps), Reservation)
    assert isinstance(await ledger.reserve("t", "", 1e-6, caps), CapReached)


async def test_a_per_user_cap_counts_that_users_reservations_only() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    caps = [Cap(Period.DAY, 0.3, per_user=True)]
    assert isinstance(await ledger.reserve("t", "u1", 0.3, caps), Reservation)
    assert isinstance(await ledger.reserve("t", "u2", 0.3, caps), Reservation)
    refused = await ledger.reserve("t", "u1", 0.1, caps)
    assert isinstance(refused, CapReached) and refused.committed_usd == pytest.approx(0.3)


async def test_a_reservation_never_settled_stops_holding_the_cap_at_its_ttl() -> None:
    clock = ManualClock()
    ledger = InMemorySpendLedger(clock, reservation_ttl_seconds=600)
    caps = [Cap(Period.DAY, 1.0)]
    assert isinstance(await ledger.reserve("t", "", 1.0, caps), Reservation)  # then lost
    clock.advance(599)
    assert isinstance(await ledger.reserve("t", "", 0.5, caps), CapReached)
    clock.advance(1)
    assert isinstance(await ledger.reserve("t", "", 0.5, caps), Reservation)


async def test_a_tenant_wide_cap_counts_every_users_spend_and_reservations() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    caps = [Cap(Period.DAY, 1.0)]
    await ledger.settle(None, SpendRecord("t", "u1", cost_usd=0.4))
    assert isinstance(await ledger.reserve("t", "u2", 0.4, caps), Reservation)
    # u3 has spent and reserved nothing, but the tenant's cap holds all its users together.
    refused = await ledger.reserve("t", "u3", 0.4, caps)
    assert isinstance(refused, CapReached) and refused.committed_usd == pytest.approx(0.8)


async def test_one_tenants_reservations_leave_another_tenants_cap_alone() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    caps = [Cap(Period.DAY, 1.0)]
    assert isinstance(await ledger.reserve("acme", "", 1.0, caps), Reservation)
    assert isinstance(await ledger.reserve("globex", "", 1.0, caps), Reservation)


async def test_a_reservation_must_fit_under_each_of_the_caps() -> None:
    clock = ManualClock(dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC).timestamp())
    ledger = InMemorySpendLedger(clock)
    day, month = Cap(Period.DAY, 1.0), Cap(Period.MONTH, 1.5)
    refused = await ledger.reserve("t", "", 1.2, [day, month])  # over the day's cap alone
    assert isinstance(refused, CapReached) and refused.cap == day
    await ledger.settle(None, SpendRecord("t", cost_usd=0.9))
    clock.advance(86400)  # a new day, the same month: yesterday's spend still counts in it
    refused = await ledger.reserve("t", "", 0.9, [day, month])
    assert isinstance(refused, CapReached) and refused.cap == month
    assert refused.committed_usd == pytest.approx(0.9)


def test_periods_are_utc_days_whatever_the_servers_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    new_year_eve = dt.datetime(2026, 12, 31, 23, 0, tzinfo=dt.UTC).timestamp()
    monkeypatch.setenv("TZ", "UTC-14")  # POSIX for 14 hours ahead of UTC: 2027 there
    time.tzset()
    try:
        assert period_ids(new_year_eve) == {Period.DAY: "2026-12-31", Period.MONTH: "2026-12"}
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_refusal_a_moment_before_the_period_ends_still_waits_a_second() -> None:
    # A retry-after of a few milliseconds reads as "retry now" to most clients.
    midnight = dt.datetime(2026, 3, 11, tzinfo=dt.UTC).timestamp()
    assert seconds_to_period_end(midnight - 0.25, Period.DAY) == 1.0


async def test_a_settled_reservation_stops_holding_the_cap_and_its_cost_counts() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    caps = [Cap(Period.DAY, 1.0)]
    held = await ledger.reserve("t", "", 1.0, caps)  # the worst case
    assert isinstance(held, Reservation)
    await ledger.settle(held, SpendRecord("t", cost_usd=0.25))  # what the call cost
    assert isinstance(await ledger.reserve("t", "", 0.75, caps), Reservation)
    assert isinstance(await ledger.reserve("t", "", 1e-6, caps), CapReached)


@pytest.mark.parametrize(
    "rest",
    [
        SpendRecord("t", saved_usd=0.3),  # a cache hit's saving, no spend
        SpendRecord("t", cost_usd=0.001),  # a spend of a tenth of a cent
        SpendRecord("t", prompt_tokens=5, completion_tokens=3, calls=1),  # a free model
    ],
)
async def test_taking_back_a_flushed_record_leaves_the_rest_of_the_periods_books(
    rest: SpendRecord,
) -> None:
    # The Redis ledger's fallback takes back what reached Redis; a record without an end user
    # is the tenant's only, and must come out of the tenant's totals once.
    ledger = InMemorySpendLedger(ManualClock())
    flushed = SpendRecord("t", "", 0.25, 10, 20, saved_usd=0.05, calls=1, routing_saved_usd=0.1)
    await ledger.settle(None, flushed)
    await ledger.settle(None, rest)
    ledger.take_back(flushed, period_ids(ledger.clock()))
    expected = Totals()
    expected.add(rest)
    for totals in (await ledger.totals("t")).values():
        assert vars(totals) == pytest.approx(vars(expected))


async def test_taking_back_every_record_leaves_no_books_behind_despite_float_residue() -> None:
    # The fallback holds only what has not reached Redis yet; books taken back to nothing
    # (float sums leave ~1e-17) must go, or every tenant and user ever seen stays in memory.
    ledger = InMemorySpendLedger(ManualClock())
    records = [SpendRecord("t", "u", cost_usd=0.1), SpendRecord("t", "u", cost_usd=0.2)]
    for record in records:
        await ledger.settle(None, record)
    for record in records:
        ledger.take_back(record, period_ids(ledger.clock()))
    assert ledger._totals == {}


def test_merged_totals_add_up_every_field() -> None:
    # The Redis ledger reports Redis' totals merged with those held here while it was down.
    totals = Totals(1.0, 2, 3, 4.0, 5, 6.0)
    totals.merge(Totals(10.0, 20, 30, 40.0, 50, 60.0))
    assert vars(totals) == pytest.approx(vars(Totals(11.0, 22, 33, 44.0, 55, 66.0)))


async def test_spent_today_is_what_record_spent_since_utc_midnight() -> None:
    clock = ManualClock(dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC).timestamp())
    ledger = InMemorySpendLedger(clock)
    await ledger.record("t", 0.5)
    clock.advance(86400)
    await ledger.record("t", 0.25)
    assert await ledger.spent_today("t") == pytest.approx(0.25)
    assert (await ledger.totals("t"))[Period.MONTH].cost_usd == pytest.approx(0.75)


async def test_totals_of_ended_days_and_months_are_dropped_not_kept_forever() -> None:
    clock = ManualClock(dt.datetime(2026, 3, 31, 12, tzinfo=dt.UTC).timestamp())
    ledger = InMemorySpendLedger(clock)
    for i in range(10):
        await ledger.settle(None, SpendRecord("t", f"u{i}", cost_usd=0.1, saved_usd=0.01))
    clock.advance(86400)  # April the first: a new day and a new month
    await ledger.settle(None, SpendRecord("t", "late", cost_usd=0.2))
    assert sorted({key[2] for key in ledger._totals}) == ["2026-04", "2026-04-01"]
    assert len(ledger._totals) == 4  # the tenant's and the late user's, day and month
    clock.advance(86400)  # a new day, the same month: the month's totals stay
    await ledger.settle(None, SpendRecord("t", cost_usd=0.3))
    assert sorted({key[2] for key in ledger._totals}) == ["2026-04", "2026-04-02"]
    assert (await ledger.totals("t", "late"))[Period.MONTH].cost_usd == pytest.approx(0.2)
    clock.advance(-86400)  # a clock stepped back: the later day is not "ended", it stays
    await ledger.settle(None, SpendRecord("t", cost_usd=0.1))
    clock.advance(86400)
    assert (await ledger.totals("t"))[Period.DAY].cost_usd == pytest.approx(0.3)


async def test_free_hits_of_ever_new_end_users_past_the_bound_count_for_the_tenant_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cache hit spends nothing: with a new end_user_id each, they would add two totals
    # a hit for as long as the month lasts. Spend always has its user's (per-user caps).
    monkeypatch.setattr("routecache.router.budget._MAX_TOTALS", 40, raising=False)
    ledger = InMemorySpendLedger(ManualClock())
    await ledger.settle(None, SpendRecord("t", "known", saved_usd=0.5))
    for i in range(100):
        await ledger.settle(None, SpendRecord("t", f"u{i}", saved_usd=0.01))
    assert len(ledger._totals) <= 40
    await ledger.settle(None, SpendRecord("t", "known", saved_usd=0.5))  # already held
    await ledger.settle(None, SpendRecord("t", "payer", cost_usd=0.25))
    tenant = await ledger.totals("t")
    assert tenant[Period.DAY].saved_usd == pytest.approx(2.0)
    assert (await ledger.totals("t", "known"))[Period.DAY].saved_usd == pytest.approx(1.0)
    assert (await ledger.totals("t", "payer"))[Period.MONTH].cost_usd == pytest.approx(0.25)


async def test_totals_read_are_not_changed_by_later_spend() -> None:
    ledger = InMemorySpendLedger(ManualClock())
    await ledger.record("t", 0.5)
    read = await ledger.totals("t")
    await ledger.record("t", 0.25)
    assert read[Period.DAY].cost_usd == pytest.approx(0.5)


async def spend_of(harness: Harness, tenant: str = "acme", user: str = "") -> float:
    totals = await harness.service.pipeline.costs.ledger.totals(tenant, user)
    return totals[Period.DAY].cost_usd


async def has_spent(harness: Harness, user: str = "") -> bool:
    """For eventually(): a spend written by a task or finaliser the test does not await."""
    return await spend_of(harness, user=user) > 0


def held_usd(harness: Harness) -> float:
    """What the harness's in-process ledger holds reserved for acme as a whole."""
    ledger = harness.service.pipeline.costs.ledger
    assert isinstance(ledger, InMemorySpendLedger)
    return ledger.held_usd("acme", "", False)


def metered_cost(prometheus: PrometheusTelemetry, tenant: str = "acme") -> float:
    """routecache_cost_usd_total of the tenant, both tiers together."""
    return sum(prometheus.registry.get_sample_value(
        "routecache_cost_usd_total", {"tenant": tenant, "tier": tier.value}) or 0.0
        for tier in Tier)  # fmt: skip


def metered_tokens(prometheus: PrometheusTelemetry, tenant: str = "acme") -> tuple[float, float]:
    """routecache_tokens_total of the tenant, both tiers together: (prompt, completion)."""

    def of(kind: str) -> float:
        return sum(prometheus.registry.get_sample_value("routecache_tokens_total",
                   {"tenant": tenant, "tier": tier.value, "kind": kind}) or 0.0
                   for tier in Tier)  # fmt: skip

    return of("prompt"), of("completion")


async def served(harness: Harness, request: ChatRequest, *, streamed: bool) -> Completion:
    """The answer to one request of acme's, asked whole or streamed."""
    pipeline = harness.service.pipeline
    if not streamed:
        return await pipeline.complete(request, ACME)
    *_, final = [e async for e in pipeline.complete_stream(request, ACME)]
    assert isinstance(final, Completion)
    return final


async def one_request_usd(prompt: str) -> float:
    """What one strong request of `prompt` reserves, measured on a harness of its own."""
    probe = budget_harness()
    pipeline = probe.service.pipeline
    tenant = pipeline._p.authenticator.authenticate(ACME)
    usd = pipeline.costs.worst_case_usd(tenant, costly(prompt), Tier.STRONG, cheap_only=False)
    await probe.service.aclose()
    return usd


async def strong_and_cheap_usd(request: ChatRequest) -> tuple[float, float]:
    """What `request` reserves routed strong, and downgraded to cheap-only, on a harness of its
    own."""
    probe = make_harness()
    tenant = probe.service.pipeline._p.authenticator.authenticate(ACME)
    worst = probe.service.pipeline.costs.worst_case_usd
    full = worst(tenant, request, Tier.STRONG, cheap_only=False)
    cheap = worst(tenant, request, Tier.CHEAP, cheap_only=True)
    await probe.service.aclose()
    return full, cheap


async def concurrent_wave(harness: Harness, wave: int, n: int = 50) -> tuple[int, int]:
    """n requests in flight together: all reserve before any upstream call returns."""
    harness.strong.gate = gate = asyncio.Event()
    harness.cheap.gate = gate
    complete = harness.service.pipeline.complete
    calls_before = len(harness.strong.calls) + len(harness.cheap.calls)
    tasks = [asyncio.create_task(complete(costly(f"w{wave} q{i:02d}"), ACME)) for i in range(n)]

    # Until every request is refused or waiting in its upstream call (the fakes record a
    # call as it starts; nothing signals it).
    def waiting() -> int:
        calls = len(harness.strong.calls) + len(harness.cheap.calls) - calls_before
        return calls + sum(t.done() for t in tasks)

    await eventually(lambda: waiting() >= n, f"all {n} requests refused or in their call")
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    refused = sum(isinstance(r, ResourceExhausted) for r in results)
    assert all(not isinstance(r, BaseException) or isinstance(r, ResourceExhausted)
               for r in results)  # fmt: skip
    return n - refused, refused


async def test_fifty_concurrent_requests_overrun_a_hard_cap_by_one_request_at_most() -> None:
    one = await one_request_usd("w0 q00")
    cap = 10.5 * one
    harness = budget_harness(daily_usd=cap)
    served, refused = await concurrent_wave(harness, 0)
    assert (served, refused) == (10, 40)
    served_later, _ = await concurrent_wave(harness, 1)
    assert served_later == 0
    spent = await spend_of(harness)
    assert cap - one <= spent <= cap + one
    assert harness.telemetry.cost_controls.count(("acme", "cap_refused")) == 90
    await harness.service.aclose()


async def test_the_downgrade_policy_serves_the_cheap_tier_at_the_cap() -> None:
    one = await one_request_usd("q0")
    # Under the cap, a cheap request still reserves for its strong fallback (one strong
    # request's worth): that no longer fits, the cheap tier alone does.
    harness = budget_harness(daily_usd=0.5 * one, policy="downgrade")
    complete = harness.service.pipeline.complete
    done = [await complete(costly(f"q{i}", tier=t), ACME)
            for i, t in enumerate((None, Tier.STRONG, None))]  # fmt: skip
    assert [d.tier for d in done] == [Tier.CHEAP] * 3 and harness.strong.calls == []
    assert harness.telemetry.cost_controls.count(("acme", "downgraded")) == 3
    assert 0 < await spend_of(harness) <= 0.5 * one
    refusing = budget_harness(daily_usd=0.5 * one)  # the default policy refuses instead
    with pytest.raises(ResourceExhausted):
        await refusing.service.pipeline.complete(costly("q0", tier=None), ACME)
    await refusing.service.aclose()
    await harness.service.aclose()


async def test_the_downgrade_policy_refuses_a_tenant_without_the_cheap_tier() -> None:
    one = await one_request_usd("q0")
    harness = make_harness(validators=[], budget={"daily_usd": 0.5 * one, "policy": "downgrade"},
                           models_allowed=["gpt-4-1106-preview"])  # fmt: skip
    with pytest.raises(ResourceExhausted, match="daily spend cap"):
        await harness.service.pipeline.complete(costly("q0", tier=None), ACME)
    assert harness.cheap.calls == [] and harness.strong.calls == []
    assert harness.telemetry.cost_controls == [("acme", "cap_refused")]
    await harness.service.aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_refusal_waits_until_the_day_ends_and_a_failed_call_releases(streamed: bool) -> None:
    one = await one_request_usd("q0")
    harness = budget_harness(daily_usd=1.5 * one)
    complete = harness.service.pipeline.complete
    harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
    with pytest.raises(Unavailable):
        await served(harness, costly("q0"), streamed=streamed)
    harness.strong.fail_with = None
    await complete(costly("q1"), ACME)  # the failed call's reservation was released
    with pytest.raises(ResourceExhausted, match="daily spend cap") as refused:
        await complete(costly("q2"), ACME)
    # What was refused is the request's worst case on top of the spend so far: both are said.
    assert f"USD spent or reserved, and this request may cost up to {one:.6g} USD" in str(
        refused.value
    )
    now = dt.datetime.fromtimestamp(harness.clock(), tz=dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert refused.value.retry_after_seconds == pytest.approx((midnight - now).total_seconds())
    await harness.service.aclose()


async def test_per_user_caps_hold_each_user_and_leave_requests_without_one_alone() -> None:
    one = await one_request_usd("q0")
    harness = budget_harness(user_daily_usd=1.5 * one)
    complete = harness.service.pipeline.complete
    await complete(costly("q0", user="u1"), ACME)
    await complete(costly("q1", user="u2"), ACME)
    with pytest.raises(ResourceExhausted, match="per-user daily spend cap"):
        await complete(costly("q2", user="u1"), ACME)
    # The tenant has spent more than one user's cap, but a request naming no end user is no
    # user's: it must not be held to a per-user cap measured against the whole tenant.
    assert await spend_of(harness) > 1.5 * one
    await complete(costly("q3"), ACME)
    await harness.service.aclose()


async def two_identical_in_flight(
    harness: Harness,
) -> tuple[asyncio.Task[Completion], asyncio.Task[Completion], asyncio.Event]:
    """Two identical requests, the second sharing the first's call, held until `gate` opens."""
    harness.strong.gate = gate = asyncio.Event()
    complete = harness.service.pipeline.complete
    flight = count_shared_calls(harness.service.pipeline)
    first = asyncio.create_task(complete(costly("same"), ACME))
    await eventually(lambda: harness.strong.calls == ["same"], "the first request's call")
    second = asyncio.create_task(complete(costly("same"), ACME))
    await eventually(lambda: len(flight.arrived) == 2, "the second request joins the call")
    return first, second, gate


async def test_a_request_sharing_a_call_in_flight_reserves_nothing() -> None:
    # Room under the cap for one worst case: the call made for both takes it, and the
    # identical request that shares the call's answer costs nothing, so it is not refused.
    one = await one_request_usd("same")
    harness = budget_harness(daily_usd=1.5 * one)
    first, second, gate = await two_identical_in_flight(harness)
    gate.set()
    made, shared = await asyncio.gather(first, second)
    assert harness.strong.calls == ["same"]
    assert made.usage.cost_usd > 0 and shared.usage.cost_usd == 0
    assert shared.usage.saved_usd == made.usage.cost_usd
    await harness.service.aclose()


async def test_a_request_that_takes_over_a_cancelled_call_reserves_for_it() -> None:
    one = await one_request_usd("same")
    harness = budget_harness(daily_usd=1.5 * one)
    first, second, gate = await two_identical_in_flight(harness)
    complete = harness.service.pipeline.complete
    first.cancel()  # its reservation goes; the second request makes the call and reserves
    await eventually(lambda: harness.strong.calls == ["same"] * 2, "the second request's call")
    with pytest.raises(ResourceExhausted):  # no room left beside the second's reservation
        await complete(costly("other"), ACME)
    gate.set()
    done = await second
    assert done.usage.cost_usd > 0 and await spend_of(harness) <= 1.5 * one
    await harness.service.aclose()


class SlowLedger:
    """A spend ledger whose `held` method (a reservation by default) waits for `gate`: holds
    a booking, or a settle, in progress; `waiting` is set once one waits."""

    def __init__(self, ledger: SpendLedger, gate: asyncio.Event, held: str = "reserve") -> None:
        self.ledger, self._gate, self._held = ledger, gate, held
        self.waiting = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.ledger, name)
        if name != self._held:
            return method

        async def after_the_gate(*args: Any) -> Any:
            self.waiting.set()
            await self._gate.wait()
            return await method(*args)

        return after_the_gate


async def test_a_request_sharing_a_call_refused_by_another_users_cap_makes_the_call() -> None:
    # u1 is at its per-user cap; u2 asks the same while u1's reservation is being decided:
    # u1's refusal is u1's alone, so u2 makes the call under its own caps.
    one = await one_request_usd("same")
    harness = budget_harness(user_daily_usd=1.5 * one)
    complete, costs = harness.service.pipeline.complete, harness.service.pipeline.costs
    await complete(costly("before", user="u1"), ACME)
    costs.ledger = held = SlowLedger(costs.ledger, gate := asyncio.Event())
    flight = count_shared_calls(harness.service.pipeline)
    u1 = asyncio.create_task(complete(costly("same", user="u1"), ACME))
    await asyncio.wait_for(held.waiting.wait(), timeout=10)  # u1's reservation is held
    u2 = asyncio.create_task(complete(costly("same", user="u2"), ACME))
    await eventually(lambda: len(flight.arrived) == 2, "u2 joins u1's call")
    gate.set()
    with pytest.raises(ResourceExhausted, match="per-user"):
        await u1
    done = await u2
    assert done.usage.cost_usd > 0 and harness.strong.calls == ["before", "same"]
    await harness.service.aclose()


@pytest.mark.parametrize("checked", [False, True])
async def test_a_request_does_not_share_a_call_downgraded_by_another_users_cap(
    checked: bool,
) -> None:
    # u1 is over its per-user cap (downgrade policy), so its call is cheap alone; u2, under
    # its own cap, asks the same meanwhile. Before: u2 shared u1's narrowed call and got u1's
    # cheap answer (routed strong), or u1's FAILED_PRECONDITION when the cheap answer failed
    # a check it could not escalate (`checked`), where alone it would get a strong answer.
    params = GenerationParams(max_tokens=MAX_TOKENS)
    if checked:  # the fake cheap model's answer is no JSON
        params = replace(params, response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT))

    def same(user: str) -> ChatRequest:
        return ask("same", params=params, end_user_id=user, force_tier=Tier.STRONG)

    full, cheap = await strong_and_cheap_usd(same("u1"))
    harness = make_harness(budget={"user_daily_usd": full, "policy": "downgrade"})
    pipeline = harness.service.pipeline
    await pipeline.costs.ledger.settle(None, SpendRecord("acme", "u1", cost_usd=full - cheap))
    harness.cheap.gate = harness.strong.gate = gate = asyncio.Event()
    flight = count_shared_calls(pipeline)
    u1 = asyncio.create_task(pipeline.complete(same("u1"), ACME))
    await eventually(lambda: harness.cheap.calls == ["same"], "u1's downgraded call")
    u2 = asyncio.create_task(pipeline.complete(same("u2"), ACME))
    await eventually(lambda: len(flight.arrived) == 2, "u2 asks the same")
    # u2 makes its own call at once, under its own caps, rather than wait for u1's.
    await eventually(lambda: harness.strong.calls == ["same"], "u2's own call")
    gate.set()
    first, second = await asyncio.gather(u1, u2, return_exceptions=True)
    assert harness.telemetry.cost_controls == [("acme", "downgraded")]
    if checked:
        assert isinstance(first, FailedValidation)
    else:
        assert isinstance(first, Completion) and first.tier is Tier.CHEAP
    assert isinstance(second, Completion) and second.tier is Tier.STRONG
    assert second.usage.cost_usd > 0
    await harness.service.aclose()


async def test_one_users_identical_requests_share_a_call_downgraded_by_its_own_cap() -> None:
    # u1 is over its per-user cap (downgrade policy) and sends the same request three times;
    # u2 asks the same meanwhile. The downgrade binds all of u1's requests, so they share one
    # cheap call; u2 still makes its own. Before: the maker went alone, the next u1 request
    # became maker, was downgraded and went alone too: three paid cheap calls for u1.
    params = GenerationParams(max_tokens=MAX_TOKENS)

    def same(user: str) -> ChatRequest:
        return ask("same", params=params, end_user_id=user, force_tier=Tier.STRONG)

    full, cheap = await strong_and_cheap_usd(same("u1"))
    harness = make_harness(budget={"user_daily_usd": full * 10, "policy": "downgrade"})
    pipeline = harness.service.pipeline
    # Room left for five cheap calls of u1, none strong.
    await pipeline.costs.ledger.settle(
        None, SpendRecord("acme", "u1", cost_usd=full * 10 - cheap * 5)
    )
    harness.cheap.gate = harness.strong.gate = gate = asyncio.Event()
    flight = count_shared_calls(pipeline)
    u1 = [asyncio.create_task(pipeline.complete(same("u1"), ACME)) for _ in range(3)]
    await eventually(lambda: len(flight.arrived) == 3, "u1's three requests")
    u2 = asyncio.create_task(pipeline.complete(same("u2"), ACME))
    await eventually(lambda: harness.strong.calls == ["same"], "u2's own call")
    gate.set()
    *mine, theirs = await asyncio.gather(*u1, u2)
    assert harness.cheap.calls == ["same"] and harness.strong.calls == ["same"]
    assert harness.telemetry.cost_controls == [("acme", "downgraded")]
    assert all(done.tier is Tier.CHEAP for done in mine)
    assert sorted(done.shared for done in mine) == [False, True, True]
    assert sorted(done.usage.cost_usd > 0 for done in mine) == [False, False, True]
    assert theirs.tier is Tier.STRONG and not theirs.shared and theirs.usage.cost_usd > 0
    events = [e for e in harness.events.events if e["kind"] == "completion"]
    assert sorted(e["shared"] for e in events) == [False, False, True, True]
    await harness.service.aclose()


async def test_a_call_downgraded_by_the_tenants_cap_is_shared() -> None:
    # The tenant's cap binds every end user: the downgrade would be u2's too, so u2 shares.
    one = await one_request_usd("same")
    harness = budget_harness(daily_usd=0.5 * one, policy="downgrade")
    harness.cheap.gate = gate = asyncio.Event()
    complete, flight = (
        harness.service.pipeline.complete,
        count_shared_calls(harness.service.pipeline),
    )
    u1 = asyncio.create_task(complete(costly("same", user="u1"), ACME))
    await eventually(lambda: harness.cheap.calls == ["same"], "u1's downgraded call")
    u2 = asyncio.create_task(complete(costly("same", user="u2"), ACME))
    await eventually(lambda: len(flight.arrived) == 2, "u2 joins u1's call")
    gate.set()
    made, shared = await asyncio.gather(u1, u2)
    assert harness.cheap.calls == ["same"] and harness.strong.calls == []
    assert made.tier is shared.tier is Tier.CHEAP and shared.usage.cost_usd == 0
    await harness.service.aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_request_cancelled_while_its_spend_is_settled_still_counts_it(
    streamed: bool,
) -> None:
    # The answer was paid for: a caller gone (deadline, disconnect) while its cost is written
    # must not take the write with it. Before: the spend was lost and the reservation held.
    harness, held, gate = await cancelled_while_settling(streamed)
    closing = asyncio.create_task(harness.service.pipeline.costs.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the stop waits for the write of the caller gone
    gate.set()
    await closing
    assert await spend_of(harness) > 0
    harness.service.pipeline.costs.ledger = held.ledger
    assert held_usd(harness) == 0
    await harness.service.aclose()


async def test_a_stop_cancelled_while_it_waits_leaves_the_spend_writes_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness, _, gate = await cancelled_while_settling(streamed=False)
    closing = asyncio.create_task(harness.service.pipeline.costs.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()  # e.g. a stop that gave up waiting
    with pytest.raises(asyncio.CancelledError):
        await closing
    gate.set()
    await eventually(lambda: has_spent(harness), "the spend write ran on after the stop")
    assert "spend write" not in caplog.text  # written: nothing to report
    await harness.service.aclose()


async def test_a_spend_write_failing_after_its_caller_left_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness, _, gate = await cancelled_while_settling(streamed=False, failing=True)
    gate.set()
    await harness.service.pipeline.costs.aclose()
    assert "the spend write of a request whose caller left failed" in caplog.text
    await harness.service.aclose()


async def test_a_request_cancelled_while_its_reservation_is_released_still_releases_it() -> None:
    # No provider answered, so the reservation is given back; the caller leaves meanwhile.
    # Before: the release was cancelled with it, holding the cap until the reservation's TTL,
    # and finish_writes did not wait for it.
    harness = budget_harness(daily_usd=10.0)
    harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
    costs = harness.service.pipeline.costs
    costs.ledger = held = SlowLedger(costs.ledger, gate := asyncio.Event(), "release")
    request = asyncio.create_task(served(harness, costly("q"), streamed=False))
    await held.waiting.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    closing = asyncio.create_task(costs.finish_writes())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the stop waits for the release of the caller gone
    gate.set()
    await closing
    costs.ledger = held.ledger
    assert held_usd(harness) == 0
    await harness.service.aclose()


async def test_a_callers_long_deadline_ends_the_call_while_its_reservation_still_holds() -> None:
    # A reservation expires after budgets.reservation_ttl_seconds whether its call runs or
    # not. Before: a stream with an hour's deadline ran on after it, out of every cap.
    ttl = 120.0
    harness = make_harness(service={"budgets": {"reservation_ttl_seconds": ttl}})
    generator = harness.service.generator
    long_call = generator.deadline(3600.0) - time.monotonic()  # read after: no later than
    assert long_call <= ttl - SETTLE_MARGIN_SECONDS  # time to settle once the call ends
    started = time.monotonic()
    assert generator.deadline(5.0) - started == pytest.approx(5.0, abs=1.0)  # shorter: kept
    assert generator.deadline(None) - started == pytest.approx(60.0, abs=1.0)  # the default
    await harness.service.aclose()


async def test_a_stream_cut_by_the_shutdown_is_paid_for_before_the_service_closes() -> None:
    # The server's stop cancels the calls still running past the grace period and returns
    # before their handlers have run their cleanup. Before: the cut stream's spend was written
    # after the ledger's last flush (Redis: lost, its reservation held until its TTL).
    harness = budget_harness(daily_usd=10.0)
    cut_stream_after_two_deltas(harness.strong)
    sent: list[str | Completion] = []

    async def consume() -> None:
        stream = harness.service.pipeline.complete_stream(costly("q"), ACME)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                sent.append(event)

    call = asyncio.create_task(consume())
    await eventually(lambda: len(sent) == 2, "the stream sent its two deltas")
    call.cancel()  # what the gRPC server's stop does to a call past the grace period
    await harness.service.aclose()
    assert await spend_of(harness) > 0
    assert held_usd(harness) == 0
    assert call.done()


async def cancelled_while_settling(
    streamed: bool, failing: bool = False
) -> tuple[Harness, SlowLedger, asyncio.Event]:
    """A request of acme's cancelled while its spend is being written by the ledger returned,
    which waits for the gate returned (and then fails, if `failing`)."""
    harness = budget_harness(daily_usd=10.0)
    costs = harness.service.pipeline.costs
    if failing:

        async def unreachable(reservation: Reservation | None, record: SpendRecord) -> Movement:
            raise ConnectionError("the ledger went away")

        setattr(costs.ledger, "settle", unreachable)  # noqa: B010  # a method, replaced
    costs.ledger = held = SlowLedger(costs.ledger, gate := asyncio.Event(), "settle")
    request = asyncio.create_task(served(harness, costly("q"), streamed=streamed))
    await held.waiting.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    return harness, held, gate


@pytest.mark.parametrize("streamed", [False, True])
async def test_answers_refused_by_validation_are_paid_for(streamed: bool) -> None:
    validators = [{"kind": "regex", "must_match": ["^never$"], "on_fail": "block"}]
    prometheus = PrometheusTelemetry()
    harness = make_harness(validators=validators, budget={"daily_usd": 10.0},
                           telemetry=prometheus)  # fmt: skip
    with pytest.raises(FailedValidation) as refused:
        await served(harness, ask("q", end_user_id="u1"), streamed=streamed)
    # At the price of the model that answered (a stream cut short pays the dearest one's).
    assert refused.value.cost_usd > 0
    assert await spend_of(harness) == pytest.approx(refused.value.cost_usd)
    assert metered_cost(prometheus) == pytest.approx(refused.value.cost_usd)  # as the ledger
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert day.calls == refused.value.calls >= 1
    assert await spend_of(harness, user="u1") == await spend_of(harness)
    await harness.service.aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_stats_count_the_calls_and_cost_of_answers_refused_by_validation(
    streamed: bool,
) -> None:
    # GetStats must agree with the spend ledger: the refused answers were paid for.
    harness = make_harness(validators=[{"kind": "json_schema", "on_fail": "escalate"}])
    harness.strong.answer = harness.cheap.answer  # neither model follows JSON mode
    with pytest.raises(FailedValidation) as refused:
        await served(harness, json_request("give JSON"), streamed=streamed)
    stats = await harness.service.pipeline.admin.stats(ACME)
    # Whole: cheap, then strong (escalated); streamed: one call, checked at the end.
    assert (stats.cheap_calls, stats.strong_calls) == ((1, 0) if streamed else (1, 1))
    assert stats.cost_usd == pytest.approx(refused.value.cost_usd) and stats.cost_usd > 0
    assert stats.cost_usd == pytest.approx(await spend_of(harness))
    await harness.service.aclose()


def broken_plugin(fails_in: str, on_fail: str) -> dict[str, object]:
    return {"kind": "custom", "import_path": "tests.unit.custom_validator:Broken",
            "options": {"fails_in": fails_in}, "on_fail": on_fail}  # fmt: skip


def error_events(harness: Harness) -> list[dict[str, Any]]:
    return [e for e in harness.events.events if e["kind"] == "error"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_validator_that_raises_fails_the_answer_and_the_call_is_paid_for(
    streamed: bool,
) -> None:
    # Before: the validator's OverflowError ended the call INTERNAL, the reservation was
    # released instead of settled (the model's answer never charged) and no event was written.
    validators = [broken_plugin("check", "escalate")]
    harness = make_harness(validators=validators, budget={"daily_usd": 10.0})
    with pytest.raises(FailedValidation) as refused:
        await served(harness, ask("q"), streamed=streamed)
    assert "OverflowError" in str(refused.value)
    assert refused.value.cost_usd > 0
    assert await spend_of(harness) == pytest.approx(refused.value.cost_usd)
    assert held_usd(harness) == 0
    assert [e["reason"] for e in error_events(harness)] == ["failed_validation"]
    await harness.service.aclose()


async def test_a_call_paid_for_before_a_later_call_fails_is_charged() -> None:
    # The cheap answer fails JSON mode; the escalation's strong call fails: the cheap call
    # was paid for all the same (before, the whole reservation was released).
    harness = make_harness(validators=[{"kind": "json_schema"}], budget={"daily_usd": 10.0})
    harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
    with pytest.raises(Unavailable):
        await harness.service.pipeline.complete(json_request("q"), ACME)
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert day.calls == 1 and day.cost_usd > 0
    assert held_usd(harness) == 0
    assert harness.telemetry.spending == [("acme", "cheap", day.cost_usd)]  # metered too
    await harness.service.aclose()


async def test_the_tokens_of_a_call_paid_before_a_later_call_failed_are_metered() -> None:
    # routecache_tokens_total counted served and refused answers only, not the ledger's all.
    prometheus = PrometheusTelemetry()
    harness = make_harness(validators=[{"kind": "json_schema"}], budget={"daily_usd": 10.0},
                           telemetry=prometheus)  # fmt: skip
    harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
    with pytest.raises(Unavailable):
        await harness.service.pipeline.complete(json_request("q"), ACME)
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert metered_tokens(prometheus) == (day.prompt_tokens, day.completion_tokens) != (0, 0)
    await harness.service.aclose()


async def test_an_unexpected_error_after_a_paid_call_is_charged_and_recorded_as_internal() -> None:
    harness = make_harness(
        validators=[broken_plugin("redact", "redact")], budget={"daily_usd": 10.0}
    )
    with pytest.raises(RuntimeError):
        await harness.service.pipeline.complete(ask("q"), ACME)
    assert await spend_of(harness) > 0 and held_usd(harness) == 0
    assert [e["reason"] for e in error_events(harness)] == ["internal"]
    assert harness.telemetry.failed == [("acme", "internal", ())]
    await harness.service.aclose()


async def failed_after_paying(harness: Harness, case: str) -> None:
    """One request of acme's that fails after a call was paid for, in the way `case` says."""
    if case == "escalation's strong call fails":  # the cheap answer fails JSON mode
        harness.strong.fail_with = UpstreamError("HTTP 400", retryable=False)
        with pytest.raises(Unavailable):
            await harness.service.pipeline.complete(json_request("q"), ACME)
    elif case == "stream cut short":

        async def cut_short(messages: object, params: GenerationParams) -> AsyncIterator[str]:
            yield "half an answer "
            raise UpstreamError("connection reset", retryable=True)

        harness.cheap.stream = cut_short  # type: ignore[method-assign]
        with pytest.raises(Unavailable):
            await served(harness, ask("tell me a story"), streamed=True)
    else:  # a plugin's bug after the answer came: INTERNAL
        with pytest.raises(RuntimeError):
            await harness.service.pipeline.complete(ask("q"), ACME)


# Each way a request can fail after a call was paid for, with the validators it needs.
FAILED_AFTER_PAYING = [
    ("escalation's strong call fails", [{"kind": "json_schema"}]),
    ("stream cut short", None),
    ("internal", [broken_plugin("redact", "redact")]),
]


async def harness_failed_after_paying(
    case: str, validators: list[dict[str, object]] | None
) -> Harness:
    harness = make_harness() if validators is None else make_harness(validators=validators)
    await failed_after_paying(harness, case)
    return harness


@pytest.mark.parametrize(("case", "validators"), FAILED_AFTER_PAYING)
async def test_stats_count_the_request_calls_and_cost_of_a_request_that_failed_after_paying(
    case: str, validators: list[dict[str, object]] | None
) -> None:
    # GetStats agrees with the spend ledger (docs/operations.md): before, a failure counted
    # the request only (an INTERNAL one not even that) and left out the calls it had paid for.
    harness = await harness_failed_after_paying(case, validators)
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    stats = await harness.service.pipeline.admin.stats(ACME)
    assert stats.requests == 1
    assert (stats.cheap_calls, stats.strong_calls) == (day.calls, 0) == (1, 0)
    assert stats.cost_usd == pytest.approx(day.cost_usd) and day.cost_usd > 0
    await harness.service.aclose()


@pytest.mark.parametrize(("case", "validators"), FAILED_AFTER_PAYING)
async def test_the_error_event_of_a_request_that_failed_after_paying_carries_its_cost(
    case: str, validators: list[dict[str, object]] | None
) -> None:
    # Before: error events had no cost, so the event log (and the notebook's "spent", which
    # sums cost_usd over completion and error events) left out what failed requests paid.
    harness = await harness_failed_after_paying(case, validators)
    [event] = error_events(harness)
    assert event["cost_usd"] == pytest.approx(await spend_of(harness)) and event["cost_usd"] > 0
    await harness.service.aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_error_event_of_an_answer_refused_by_validation_carries_its_cost(
    streamed: bool,
) -> None:
    validators = [{"kind": "regex", "must_match": ["^never$"], "on_fail": "block"}]
    harness = make_harness(validators=validators)
    with pytest.raises(FailedValidation) as refused:
        await served(harness, ask("q"), streamed=streamed)
    [event] = error_events(harness)
    assert event["cost_usd"] == pytest.approx(refused.value.cost_usd) and event["cost_usd"] > 0
    await harness.service.aclose()


async def test_only_the_maker_of_a_shared_call_reports_its_cost_when_it_is_refused() -> None:
    # SingleFlight raises one error object to every caller sharing the call: the cost rides
    # on the request, not the error, or the log would count it once per caller.
    validators = [{"kind": "regex", "must_match": ["^never$"], "on_fail": "block"}]
    harness = make_harness(validators=validators)
    first, second, gate = await two_identical_in_flight(harness)
    gate.set()
    for task in (first, second):
        with pytest.raises(FailedValidation):
            await task
    costs = sorted(event["cost_usd"] for event in error_events(harness))
    assert costs[0] == 0 and costs[1] == pytest.approx(await spend_of(harness)) and costs[1] > 0
    await harness.service.aclose()


async def test_each_request_reports_only_its_own_cost() -> None:
    # Two requests in one task (a client library's loop): the second, refused before any
    # call, must not report what the first paid.
    validators = [{"kind": "regex", "must_match": ["^never$"], "on_fail": "block"}]
    harness = make_harness(validators=validators)
    with pytest.raises(FailedValidation):
        await harness.service.pipeline.complete(ask("q"), ACME)
    with pytest.raises(Unauthenticated):
        await harness.service.pipeline.complete(ask("q"), "wrong")
    refused, unauthenticated = error_events(harness)
    assert refused["cost_usd"] > 0 and unauthenticated["cost_usd"] == 0
    await harness.service.aclose()


async def test_an_escalation_whose_strong_call_fails_is_counted_as_an_escalation() -> None:
    # The cheap answer failed a validator and went to the strong model (operations.md): an
    # escalation, whether or not the strong model then answers.
    prometheus = PrometheusTelemetry()
    harness = make_harness(validators=[{"kind": "json_schema"}], telemetry=prometheus)
    await failed_after_paying(harness, "escalation's strong call fails")
    assert (await harness.service.pipeline.admin.stats(ACME)).escalations == 1
    escalations = prometheus.registry.get_sample_value(
        "routecache_escalations_total", {"tenant": "acme"}
    )
    assert escalations == 1
    await harness.service.aclose()


async def test_an_answer_refused_after_escalating_is_metered_under_the_strong_tier(
    harness: Harness,
) -> None:
    harness.strong.answer = prose_answer  # no JSON from either model
    with pytest.raises(FailedValidation) as refused:
        await harness.service.pipeline.complete(json_request("q"), ACME)
    assert refused.value.report.escalated
    ((tenant, tier, cost),) = harness.telemetry.spending
    assert (tenant, tier) == ("acme", "strong") and cost == pytest.approx(refused.value.cost_usd)


async def test_spend_and_savings_per_tenant_and_user_per_day_and_month(harness: Harness) -> None:
    complete, ledger = harness.service.pipeline.complete, harness.service.pipeline.costs.ledger
    miss = await complete(ask("what is the boiling point of water", end_user_id="u1"), ACME)
    hit = await complete(ask("what is the boiling point of water", end_user_id="u2"), ACME)
    assert miss.tier is Tier.CHEAP and hit.usage.saved_usd == miss.usage.cost_usd > 0
    tenant, u1, u2 = [await ledger.totals("acme", u) for u in ("", "u1", "u2")]
    for period in (Period.DAY, Period.MONTH):
        assert tenant[period].cost_usd == u1[period].cost_usd == miss.usage.cost_usd
        assert tenant[period].prompt_tokens == miss.usage.prompt_tokens
        assert tenant[period].completion_tokens == miss.usage.completion_tokens
        assert tenant[period].saved_usd == u2[period].saved_usd == miss.usage.cost_usd
        assert tenant[period].calls == 1 and u2[period].calls == 0
        # The cheap answer at the strong model's prices (10 and 30 USD per million tokens).
        strong = (miss.usage.prompt_tokens * 10 + miss.usage.completion_tokens * 30) / 1e6
        assert u1[period].routing_saved_usd == pytest.approx(strong - miss.usage.cost_usd)
    assert (await ledger.totals("globex"))[Period.DAY].cost_usd == 0


async def test_an_escalated_answer_saves_nothing_by_routing(harness: Harness) -> None:
    # It made the cheap call and then the strong one: more than the strong call alone.
    done = await harness.service.pipeline.complete(json_request("q"), ACME)
    assert done.tier is Tier.STRONG and done.validation.escalated
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert day.calls == 2 and day.routing_saved_usd == 0


async def test_a_cheap_answer_dearer_than_the_strong_model_saves_nothing_by_routing() -> None:
    # A cheap tier priced over the strong one (a misconfiguration, or a dear fallback):
    # routing cost money, and a negative saving would lower the figure routing is credited.
    dear = {"model": "cheap-model", "input_usd_per_mtok": 50.0, "output_usd_per_mtok": 50.0}
    harness = make_harness(service={"upstream": {"cheap": dear}})
    done = await harness.service.pipeline.complete(ask("q"), ACME)
    assert done.tier is Tier.CHEAP and done.usage.cost_usd > 0
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert day.cost_usd == done.usage.cost_usd and day.routing_saved_usd == 0
    await harness.service.aclose()


async def test_a_tenant_kept_off_the_strong_tier_saves_nothing_by_routing() -> None:
    # Its requests go cheap whatever the router says: counting the strong model's price as
    # saved credited routing with money no decision of it saved.
    harness = make_harness(models_allowed=["mixtral-8x7b-instruct"])
    done = await harness.service.pipeline.complete(ask("q"), ACME)
    assert done.tier is Tier.CHEAP and done.usage.cost_usd > 0
    day = (await harness.service.pipeline.costs.ledger.totals("acme"))[Period.DAY]
    assert day.calls == 1 and day.routing_saved_usd == 0
    await harness.service.aclose()


async def test_models_allowed_keeps_a_tenant_off_a_tier() -> None:
    harness = make_harness(score=0.9, models_allowed=["mixtral-8x7b-instruct"])
    complete = harness.service.pipeline.complete
    done = await complete(ask("hard question"), ACME)  # the classifier says strong
    assert done.tier is Tier.CHEAP and harness.strong.calls == []
    with pytest.raises(InvalidArgument, match="force_tier"):
        await complete(ask("q", force_tier=Tier.STRONG), ACME)
    json_mode = GenerationParams(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT))
    with pytest.raises(FailedValidation):  # no escalation to a model it may not use
        await complete(ask("json please", params=json_mode), ACME)
    assert harness.strong.calls == []
    await harness.service.aclose()


async def test_a_forced_tier_the_tenant_may_not_use_is_refused_even_when_cached() -> None:
    # Before: the tier was checked only on a miss, so the same request was INVALID_ARGUMENT
    # or a cached answer depending on the cache, and took from the rate limit either way.
    harness = make_harness(models_allowed=["mixtral-8x7b-instruct"], requests_per_second=1)
    complete = harness.service.pipeline.complete
    await complete(ask("cached question"), ACME)
    harness.clock.advance(1.0)
    with pytest.raises(InvalidArgument, match="force_tier"):
        await complete(ask("cached question", force_tier=Tier.STRONG), ACME)
    again = await complete(ask("cached question"), ACME)  # the refusal took no request
    assert again.cache.outcome is CacheOutcome.EXACT
    await harness.service.aclose()


class Hook:
    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.status = 204
        self.delay = 0.0  # seconds before it answers

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status)


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, Hook]]:
    hook = Hook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/hook", hook
    await runner.cleanup()


async def test_crossing_a_soft_budget_alerts_once(
    webhook: tuple[str, Hook], caplog: pytest.LogCaptureFixture
) -> None:
    url, hook = webhook
    harness = make_harness(service={"budgets": {"alert_webhook_url": url}},
                           budget={"soft_daily_usd": 2e-5, "soft_monthly_usd": 1.0})  # fmt: skip
    for i in range(8):
        await harness.service.pipeline.complete(ask(f"question number {i}"), ACME)
    await harness.service.pipeline.costs.alerts.drain()
    assert await spend_of(harness) >= 2e-5
    assert harness.telemetry.budget_alerts == [("acme", "day")]
    alerts = [e for e in harness.events.events if e["kind"] == "budget_alert"]
    assert len(alerts) == 1 and alerts[0]["soft_budget_usd"] == 2e-5
    assert len(hook.bodies) == 1
    body = hook.bodies[0]
    assert (body["tenant"], body["period"], body["alert"]) == ("acme", "day", "soft_budget_crossed")
    assert float(str(body["spent_usd"])) >= 2e-5
    assert "tenant acme crossed its daily soft budget of 2e-05 USD" in caplog.text
    await harness.service.aclose()


def test_periods_roll_over_at_utc_midnight_and_month_end() -> None:
    new_year_eve = dt.datetime(2026, 12, 31, 23, 0, tzinfo=dt.UTC).timestamp()
    assert period_ids(new_year_eve) == {Period.DAY: "2026-12-31", Period.MONTH: "2026-12"}
    assert seconds_to_period_end(new_year_eve, Period.DAY) == 3600
    assert seconds_to_period_end(new_year_eve, Period.MONTH) == 3600
    mid_month = dt.datetime(2026, 2, 10, tzinfo=dt.UTC).timestamp()
    assert math.isclose(seconds_to_period_end(mid_month, Period.MONTH), 19 * 86400)


async def test_streams_are_paid_for_whole_or_cut_short() -> None:
    harness = budget_harness(daily_usd=10.0)
    harness.strong.answer = lambda prompt, params: " ".join(["word"] * 40)
    pipeline = harness.service.pipeline
    events = [e async for e in pipeline.complete_stream(costly("whole", user="u1"), ACME)]
    whole = events[-1]
    assert isinstance(whole, Completion) and whole.usage.cost_usd > 0
    assert await spend_of(harness, user="u1") == pytest.approx(whole.usage.cost_usd)
    stream = pipeline.complete_stream(costly("cut short", user="u2"), ACME)
    assert isinstance(await anext(stream), str)
    await stream.aclose()
    # The inner generators are closed by the loop's finaliser.
    await eventually(lambda: has_spent(harness, user="u2"), "the cut stream's spend")
    assert 0 < await spend_of(harness, user="u2") < whole.usage.cost_usd
    await harness.service.aclose()


def test_an_end_user_id_that_looks_like_a_hashed_one_gets_a_slot_of_its_own() -> None:
    long_id = "u" * 100
    hashed = user_slot(long_id)
    assert len(hashed) <= 64 and user_slot("alice") == "alice"
    # A user of the same tenant naming themselves after another's slot must not share its
    # buckets and per-user caps.
    assert user_slot(hashed) != hashed


async def test_a_capped_request_without_max_tokens_is_called_with_the_services_bound() -> None:
    # Its worst case was reserved for limits.max_output_tokens: the call must be held to it.
    harness = budget_harness(daily_usd=10.0)
    asked: list[int | None] = []

    def answer(prompt: str, params: GenerationParams) -> str:
        asked.append(params.max_tokens)
        return "fine"

    harness.cheap.answer = answer
    await harness.service.pipeline.complete(ask("no bound given"), ACME)
    assert asked == [4096]
    await harness.service.aclose()


async def test_a_tenant_downgraded_at_its_cap_never_falls_back_to_the_strong_tier() -> None:
    one = await one_request_usd("q0")
    harness = budget_harness(daily_usd=0.5 * one, policy="downgrade")
    harness.cheap.fail_with = UpstreamError("HTTP 400", retryable=False)
    with pytest.raises(Unavailable):
        await harness.service.pipeline.complete(costly("q0", tier=None), ACME)
    assert harness.strong.calls == []  # its reservation covered the cheap tier only
    assert await spend_of(harness) == 0
    await harness.service.aclose()


async def test_a_downgrade_refused_by_the_monthly_cap_waits_until_the_month_ends() -> None:
    # The strong worst case is over the daily cap; the cheap one fits it but not the monthly
    # cap: the refusal is the monthly cap's, with the cheap worst case and the month's wait.
    one = await one_request_usd("q0")
    harness = budget_harness(daily_usd=0.5 * one, monthly_usd=1e-9, policy="downgrade")
    pipeline = harness.service.pipeline
    tenant = pipeline._p.authenticator.authenticate(ACME)
    cheap = pipeline.costs.worst_case_usd(tenant, costly("q0"), Tier.CHEAP, cheap_only=True)
    with pytest.raises(ResourceExhausted, match="monthly spend cap") as refused:
        await pipeline.complete(costly("q0", tier=None), ACME)
    assert f"this request may cost up to {cheap:.6g} USD" in str(refused.value)
    wait = seconds_to_period_end(harness.clock(), Period.MONTH)
    assert wait > seconds_to_period_end(harness.clock(), Period.DAY)
    assert refused.value.retry_after_seconds == pytest.approx(wait)
    await harness.service.aclose()


async def test_the_worst_case_adds_up_every_call_and_the_prompt() -> None:
    # An escalating validator: a cheap call (which may fall back to the strong model), then a
    # strong one. Each call is priced at the dearest provider it may reach, prompt included.
    harness = make_harness(validators=[{"kind": "refusal"}])
    costs = harness.service.pipeline.costs
    tenant = harness.service.pipeline._p.authenticator.authenticate(ACME)
    request = costly("q", tier=None)
    strong = costs.worst_case_usd(tenant, request, Tier.STRONG, cheap_only=False)
    assert costs.worst_case_usd(tenant, request, Tier.CHEAP, cheap_only=False) == (
        pytest.approx(2 * strong)
    )
    streamed = costs.worst_case_usd(tenant, request, Tier.CHEAP, cheap_only=False, streaming=True)
    assert streamed == pytest.approx(strong)  # a stream makes one call
    long = costly("q" * 400)
    more = request_prompt_tokens(long) - request_prompt_tokens(request)
    longer = costs.worst_case_usd(tenant, long, Tier.STRONG, cheap_only=False)
    assert more > 0 and longer == pytest.approx(strong + more * 10.0 / 1e6)  # 10 USD/Mtok
    await harness.service.aclose()


async def test_the_worst_case_counts_a_json_schema_as_prompt_tokens() -> None:
    # The schema goes to the model with the messages and is billed as prompt tokens.
    harness = make_harness(validators=[])
    costs = harness.service.pipeline.costs
    tenant = harness.service.pipeline._p.authenticator.authenticate(ACME)
    plain = costly("q")
    schema = '{"type":"object","properties":{"answer":{"type":"string"}}}'
    form = ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
    schemed = replace(plain, params=replace(plain.params, response_format=form))
    more = request_prompt_tokens(schemed) - request_prompt_tokens(plain)
    assert more == estimate_tokens("q\n" + schema) - estimate_tokens("q") > 10
    worst = costs.worst_case_usd(tenant, schemed, Tier.STRONG, cheap_only=False)
    base = costs.worst_case_usd(tenant, plain, Tier.STRONG, cheap_only=False)
    assert worst == pytest.approx(base + more * 10.0 / 1e6)  # 10 USD/Mtok
    await harness.service.aclose()


async def test_a_stream_reserves_one_calls_worst_case() -> None:
    # Not the retry and escalation a whole answer may need: a stream cannot take them.
    one = await one_request_usd("s")
    harness = make_harness(validators=[{"kind": "refusal"}], budget={"daily_usd": 1.5 * one})
    pipeline = harness.service.pipeline
    events = [e async for e in pipeline.complete_stream(costly("s", tier=None), ACME)]
    assert isinstance(events[-1], Completion) and events[-1].tier is Tier.CHEAP
    with pytest.raises(ResourceExhausted):  # the same whole answer reserves two calls
        await pipeline.complete(costly("t", tier=None), ACME)
    await harness.service.aclose()


async def test_a_settled_request_stops_holding_its_reservation() -> None:
    one = await one_request_usd("q0")
    harness = budget_harness(daily_usd=1.5 * one)
    harness.strong.answer = lambda prompt, params: "short"  # costs far less than reserved
    complete = harness.service.pipeline.complete
    await complete(costly("q0"), ACME)
    await complete(costly("q1"), ACME)  # fits beside the first's spend, not its reservation
    assert held_usd(harness) == 0
    await harness.service.aclose()


async def test_a_request_sharing_a_call_is_booked_as_saved_in_its_users_slot() -> None:
    harness = budget_harness(daily_usd=10.0)
    harness.strong.gate = gate = asyncio.Event()
    complete = harness.service.pipeline.complete
    flight = count_shared_calls(harness.service.pipeline)
    long_id = "v" * 100  # hashed into its slot
    first = asyncio.create_task(complete(costly("same", user="u1"), ACME))
    await eventually(lambda: harness.strong.calls == ["same"], "the first request's call")
    second = asyncio.create_task(complete(costly("same", user=long_id), ACME))
    await eventually(lambda: len(flight.arrived) == 2, "the second request joins the call")
    gate.set()
    made, _ = await asyncio.gather(first, second)
    ledger = harness.service.pipeline.costs.ledger
    tenant, sharer = [(await ledger.totals("acme", u))[Period.DAY]
                      for u in ("", user_slot(long_id))]  # fmt: skip
    assert harness.strong.calls == ["same"]
    assert tenant.cost_usd == made.usage.cost_usd and tenant.calls == 1
    assert sharer.saved_usd == tenant.saved_usd == made.usage.cost_usd and sharer.cost_usd == 0
    await harness.service.aclose()


async def cut_short(harness: Harness, request: ChatRequest) -> tuple[str, Totals]:
    """Stream the request on the cheap tier, close it after its first piece, and return that
    piece and the end user u1's spend of the day once the stream has settled."""
    harness.cheap.answer = lambda prompt, params: " ".join(["word"] * 40)
    stream = harness.service.pipeline.complete_stream(request, ACME)
    first = await anext(stream)
    assert isinstance(first, str)
    await stream.aclose()
    # The inner generators are closed by the loop's finaliser.
    await eventually(lambda: has_spent(harness), "the cut stream's spend")
    day = (await harness.service.pipeline.costs.ledger.totals("acme", "u1"))[Period.DAY]
    return first, day


async def test_a_stream_cut_short_pays_one_call_at_the_tiers_price() -> None:
    # A tenant kept to the cheap tier: the strong providers were out of its reach.
    prometheus = PrometheusTelemetry()
    harness = make_harness(validators=[], budget={"daily_usd": 10.0}, telemetry=prometheus,
                           models_allowed=["mixtral-8x7b-instruct"])  # fmt: skip
    request = costly("cut short", user="u1", tier=None)
    first, day = await cut_short(harness, request)
    tokens = request_prompt_tokens(request) + estimate_tokens(first)
    assert day.cost_usd == pytest.approx(tokens * 0.6 / 1e6) and day.calls == 1
    assert metered_cost(prometheus) == pytest.approx(day.cost_usd)  # the metric as the ledger
    assert metered_tokens(prometheus) == (day.prompt_tokens, day.completion_tokens) != (0, 0)
    await harness.service.aclose()


async def test_a_stream_cut_short_pays_the_dearest_price_it_could_have_reached() -> None:
    # On the cheap tier with the strong fallback in reach: which provider sent the text is not
    # known, so it is paid at the strong price (10 USD/Mtok in, 30 out).
    harness = make_harness(validators=[], budget={"daily_usd": 10.0})
    request = costly("cut short", user="u1", tier=Tier.CHEAP)
    first, day = await cut_short(harness, request)
    prompt, completion = request_prompt_tokens(request), estimate_tokens(first)
    assert day.cost_usd == pytest.approx((prompt * 10.0 + completion * 30.0) / 1e6)
    assert day.calls == 1
    await harness.service.aclose()


async def test_a_stream_cancelled_before_its_first_word_pays_nothing() -> None:
    harness = budget_harness(daily_usd=10.0)
    harness.strong.gate = asyncio.Event()  # the call never answers
    stream = harness.service.pipeline.complete_stream(costly("q"), ACME)
    waiting = asyncio.create_task(anext(stream))
    await eventually(lambda: bool(harness.strong.calls), "the stream's upstream call")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await spend_of(harness) == 0
    assert held_usd(harness) == 0
    await harness.service.aclose()


async def test_the_service_stop_delivers_the_budget_alert_webhooks_under_way(
    webhook: tuple[str, Hook],
) -> None:
    url, hook = webhook
    harness = make_harness(service={"budgets": {"alert_webhook_url": url}},
                           budget={"soft_daily_usd": 1e-9})  # fmt: skip
    await harness.service.pipeline.complete(ask("over at once"), ACME)
    await harness.service.aclose()
    assert len(hook.bodies) == 1


async def test_a_soft_budget_crossed_by_the_storages_last_spend_flush_is_posted_at_stop(
    webhook: tuple[str, Hook], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis storage's stop flushes the spend settled while Redis was down, and its listener
    # judges soft budgets (CostControl.spend_flushed). The alerts were closed before it: the
    # crossing it found posted nothing, counted as a failed delivery.
    url, hook = webhook

    async def last_flush_crossing(storage: EmbeddedStorage) -> None:
        harness.service.pipeline.costs.spend_flushed("acme", {Period.DAY: (0.0, 1.0)})

    monkeypatch.setattr(EmbeddedStorage, "aclose", last_flush_crossing)
    harness = make_harness(service={"budgets": {"alert_webhook_url": url}},
                           budget={"soft_daily_usd": 0.5})  # fmt: skip
    await harness.service.pipeline.complete(ask("a question"), ACME)  # well under 0.5 USD
    await harness.service.aclose()
    assert harness.service.pipeline.costs.alerts.failed_deliveries == 0
    assert [(b["tenant"], b["period"]) for b in hook.bodies] == [("acme", "day")]


def alerts_to(
    url: str | None = None, timeout: float = 2.0
) -> tuple[BudgetAlerts, InMemoryEventLog]:
    events = InMemoryEventLog()
    return BudgetAlerts(events, RecordingTelemetry(), url, timeout), events


async def test_a_soft_budget_is_crossed_by_the_settle_that_reaches_it_not_the_next() -> None:
    alerts, events = alerts_to()
    budget = Budget(soft_daily_usd=1.0)
    alerts.check("t", budget, {Period.DAY: (0.5, 1.0)})  # reaches it exactly: crossed
    alerts.check("t", budget, {Period.DAY: (1.0, 1.5)})  # was there already
    alerts.check("t", budget, {Period.MONTH: (0.5, 1.5)})  # no monthly soft budget
    assert [(e["period"], e["spent_usd"]) for e in events.events] == [("day", 1.0)]
    alerts.check("u", budget, {Period.DAY: (0.25, 2.5)})
    assert events.events[-1]["spent_usd"] == 2.5  # what was spent, not the budget


async def test_a_soft_budget_of_zero_is_crossed_by_the_first_spend() -> None:
    # Before: it never alerted (no spend is below 0 before it).
    alerts, events = alerts_to()
    budget = Budget(soft_daily_usd=0.0)
    alerts.check("t", budget, {Period.DAY: (0.0, 0.0)})  # a cache hit: nothing spent
    alerts.check("t", budget, {Period.DAY: (0.0, 0.25)})
    alerts.check("t", budget, {Period.DAY: (0.25, 0.5)})  # was past it already
    assert [(e["soft_budget_usd"], e["spent_usd"]) for e in events.events] == [(0.0, 0.25)]


async def test_a_webhook_that_fails_or_hangs_is_counted_and_logged_as_failed(
    webhook: tuple[str, Hook], caplog: pytest.LogCaptureFixture
) -> None:
    url, hook = webhook
    alerts, _ = alerts_to(url, timeout=0.2)
    budget = Budget(soft_daily_usd=1.0)
    alerts.check("t", budget, {Period.DAY: (0.0, 1.0)})
    await alerts.drain()
    assert (alerts.delivered, alerts.failed_deliveries) == (1, 0)
    hook.status = 500
    alerts.check("t", budget, {Period.DAY: (0.0, 1.0)})
    await alerts.drain()
    assert (alerts.delivered, alerts.failed_deliveries) == (1, 1)
    assert "budget alert webhook failed" in caplog.text
    hook.status, hook.delay = 204, 1.0
    alerts.check("t", budget, {Period.DAY: (0.0, 1.0)})
    async with asyncio.timeout(0.8):  # the configured timeout, not httpx's default 5 s
        await alerts.aclose()
    assert (alerts.delivered, alerts.failed_deliveries) == (1, 2)
    assert alerts._client is not None and alerts._client.is_closed


async def test_a_webhook_post_that_raises_something_unforeseen_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # httpx raises OverflowError (no HTTPError) for a port past 65535: the delivery task
    # ended in an exception no one retrieved, neither counted nor logged as failed.
    alerts, _ = alerts_to("http://127.0.0.1:99999/b")
    alerts.check("t", Budget(soft_daily_usd=1.0), {Period.DAY: (0.0, 1.0)})
    await alerts.drain()
    assert (alerts.delivered, alerts.failed_deliveries) == (0, 1)
    assert "budget alert webhook failed" in caplog.text
    await alerts.aclose()


async def test_a_failed_webhook_is_logged_without_its_secret_path(
    webhook: tuple[str, Hook], caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the ERROR held str(HTTPStatusError), the whole URL with the token a Slack-style
    # webhook carries in its path. Now the status for an answer, else the error's type and
    # the URL's scheme and host.
    url, hook = webhook
    hook.status = 404
    secret = "/services/T0SECRET/B0SECRET/xoxTOKENabc123"
    caplog.set_level(logging.INFO, logger="httpx")  # its request line (routecache -v)
    alerts, _ = alerts_to(url + secret, timeout=0.5)
    alerts.check("t", Budget(soft_daily_usd=1.0), {Period.DAY: (0.0, 1.0)})
    await alerts.drain()
    assert "budget alert webhook failed: HTTP 404" in caplog.text
    alerts._url = "http://127.0.0.1:1" + secret  # nothing listens on port 1: a ConnectError
    alerts.check("t", Budget(soft_daily_usd=1.0), {Period.DAY: (0.0, 1.0)})
    await alerts.aclose()
    assert "ConnectError (http://127.0.0.1:1)" in caplog.text
    assert alerts.failed_deliveries == 2
    assert "HTTP Request: POST http://127.0.0.1:" in caplog.text  # kept, without its path
    assert "SECRET" not in caplog.text and "TOKEN" not in caplog.text


async def test_the_webhook_path_filter_lives_as_long_as_its_alerts() -> None:
    # Before: a module-level filter on httpx's logger and a process-wide set of URLs that
    # every BudgetAlerts added its secret URL to and nothing removed. Now each one's own
    # filter, holding its URL, is on httpx's logger from __init__ until aclose.
    httpx_log = logging.getLogger("httpx")
    before = list(httpx_log.filters)
    without_url, _ = alerts_to()
    assert httpx_log.filters == before  # nothing to hide
    alerts, _ = alerts_to("https://hooks.example/services/T0SECRET")
    added = [f for f in httpx_log.filters if f not in before]
    assert len(added) == 1
    await alerts.aclose()
    await without_url.aclose()
    assert httpx_log.filters == before


@pytest.mark.parametrize("posted_before", [True, False], ids=["client-open", "no-client-yet"])
async def test_an_alert_raised_after_aclose_is_logged_as_not_delivered(
    webhook: tuple[str, Hook], caplog: pytest.LogCaptureFixture, posted_before: bool
) -> None:
    # A settle finishing during shutdown once posted on the closed client: the RuntimeError
    # ended as "Task exception was never retrieved" (or a new client was left open).
    url, hook = webhook
    alerts, events = alerts_to(url)
    budget = Budget(soft_daily_usd=1.0)
    if posted_before:
        alerts.check("t", budget, {Period.DAY: (0.0, 1.0)})
    await alerts.aclose()
    delivered = alerts.delivered
    alerts.check("late", budget, {Period.DAY: (0.0, 1.0)})
    await alerts.drain()
    assert (alerts.delivered, alerts.failed_deliveries) == (delivered, 1)
    assert len(hook.bodies) == delivered  # nothing posted after aclose
    assert events.events[-1]["tenant"] == "late"  # the log line and event still go out
    assert "budget alert webhook not sent, the alerts were closed" in caplog.text
    assert alerts._client is None or alerts._client.is_closed

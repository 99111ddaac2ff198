"""Cost controls on a real redis-server: how exact the rate limits are under concurrent callers
on two replicas, how far concurrent requests pass a hard cap, and what each Redis step costs.

    python -m benchmarks.cost_controls --callers 50 --ops 2000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisLink
from routecache.backends.redis_keys import RedisKeyRegistry
from routecache.backends.redis_limits import RedisQuotaLimiter
from routecache.backends.redis_spend import RedisSpendLedger
from routecache.router.budget import Cap, Period, Reservation, SpendRecord
from routecache.router.keyring import add_key
from routecache.router.quotas import Charge
from tests.fakes import ManualClock
from tests.redis_fixture import temporary_redis_server

ROUNDS, TRIES = 10, 3


def link_to(url: str) -> RedisLink:
    return RedisLink(url, 2.0, 64, 0.05)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p50, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.99))
    return f"p50 {p50 * 1000:.3f} ms  p99 {p99 * 1000:.3f} ms"


async def rate_limits(url: str, callers: int) -> None:
    clock = ManualClock()
    links = [link_to(url), link_to(url)]
    for link in links:
        await link.connect()
    limiters = [RedisQuotaLimiter(link, KeySpace(), clock) for link in links]
    scenarios = {
        "tenant requests (100 / 10 s)": ([Charge("req", 10.0, 100.0, 1.0)], 1, 100 + 10.0 * 9),
        "tenant tokens (2000 / 10 s, 30 a call)": ([Charge("tok", 200.0, 2000.0, 30.0)], 30,
                                                   2000 + 200.0 * 9),
    }  # fmt: skip
    for name, (charges, unit, allowance) in scenarios.items():
        admitted = await _hammer(limiters, clock, [charges] * callers)
        error = (admitted * unit - allowance) / allowance
        print(f"{name}: admitted {admitted * unit} of an allowance of {allowance:.0f} "
              f"({error:+.1%}), {callers} callers, 2 replicas")  # fmt: skip
    per_user = [[Charge(f"ureq:u{i}", 0.6, 6.0, 1.0)] for i in range(callers)]
    admitted = await _hammer(limiters, clock, per_user)
    allowance = callers * (6 + 0.6 * 9)
    print(
        f"user requests (6 / 10 s each): admitted {admitted} of {allowance:.0f} "
        f"({(admitted - allowance) / allowance:+.1%}; whole requests of a fractional refill)"
    )
    for link in links:
        await link.aclose()


async def _hammer(limiters: list[RedisQuotaLimiter], clock: ManualClock,
                  charges_of: list[list[Charge]]) -> int:  # fmt: skip
    admitted = 0

    async def caller(i: int) -> None:
        nonlocal admitted
        for _ in range(TRIES):
            if (await limiters[i % 2].take("acme", charges_of[i])).allowed:
                admitted += 1

    for round_number in range(ROUNDS):
        if round_number:
            clock.advance(1.0)
        await asyncio.gather(*(caller(i) for i in range(len(charges_of))))
    return admitted


async def hard_cap(url: str, callers: int) -> None:
    """Concurrent reserve → settle cycles on two replicas against a cap of 10.5 requests."""
    clock = ManualClock()
    links = [link_to(url), link_to(url)]
    for link in links:
        await link.connect()
    ledgers = [RedisSpendLedger(link, KeySpace(), clock) for link in links]
    one, cap = 0.01, 0.105
    caps = [Cap(Period.DAY, cap)]

    async def request(i: int) -> bool:
        ledger = ledgers[i % 2]
        held = await ledger.reserve("capped", "", one, caps)
        if not isinstance(held, Reservation):
            return False
        await asyncio.sleep(0.01)  # the upstream call
        await ledger.settle(held, SpendRecord("capped", cost_usd=one, calls=1))
        return True

    served = sum(await asyncio.gather(*(request(i) for i in range(callers))))
    spent = (await ledgers[0].totals("capped"))[Period.DAY].cost_usd
    print(
        f"hard cap {cap:.3f} USD, {callers} concurrent requests of {one:.3f} USD on 2 "
        f"replicas: served {served}, spent {spent:.3f} USD (over the cap by "
        f"{max(0.0, spent - cap):.3f})"
    )
    for link in links:
        await link.aclose()


async def step_costs(url: str, ops: int) -> None:
    clock = ManualClock()
    link = link_to(url)
    await link.connect()
    limiter = RedisQuotaLimiter(link, KeySpace(), clock)
    ledger = RedisSpendLedger(link, KeySpace(), clock)
    registry = RedisKeyRegistry(link, KeySpace())
    _, record = await add_key(registry, "acme", clock())
    charges = [Charge("req", 1e9, 1e9, 1.0), Charge("tok", 1e9, 1e9, 40.0),
               Charge("ureq:u1", 1e9, 1e9, 1.0), Charge("utok:u1", 1e9, 1e9, 40.0)]  # fmt: skip
    caps = [Cap(Period.DAY, 1e9), Cap(Period.MONTH, 1e9), Cap(Period.DAY, 1e9, per_user=True)]
    timings: dict[str, list[float]] = {"key lookup (HGET)": [], "take 4 buckets": [],
                                       "reserve (3 caps)": [], "settle": []}  # fmt: skip
    for _ in range(ops):
        started = time.perf_counter()
        await registry.find(record.sha256)
        timings["key lookup (HGET)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        await limiter.take("acme", charges)
        timings["take 4 buckets"].append(time.perf_counter() - started)
        started = time.perf_counter()
        held = await ledger.reserve("acme", "u1", 0.01, caps)
        timings["reserve (3 caps)"].append(time.perf_counter() - started)
        assert isinstance(held, Reservation)
        started = time.perf_counter()
        await ledger.settle(held, SpendRecord("acme", "u1", 0.005, 40, 100, calls=1))
        timings["settle"].append(time.perf_counter() - started)
    for name, values in timings.items():
        print(f"{name}: {percentiles(values)} ({ops} sequential calls)")
    await link.aclose()


async def main(args: argparse.Namespace) -> None:
    with temporary_redis_server(appendfsync="everysec") as url:
        await rate_limits(url, args.callers)
        await hard_cap(url, args.callers)
        await step_costs(url, args.ops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--ops", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))

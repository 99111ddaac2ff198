"""How long an open circuit breaker takes to shed a call, over a real HTTP provider.

A provider on the replay upstream answers only HTTP 503; a few calls open its breaker; then
every call is timed until the failover chain gives up (AllProvidersFailed) without sending
anything. Prints p50 / p99 / max in microseconds and how many requests reached the provider.

    python benchmarks/breaker_shed.py --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

from routecache.domain import ChatRequest, Message, Role, Tier
from routecache.replay import FaultKind, ReplayConfig, start_replay_server
from routecache.router.ports import Pricing
from routecache.router.upstream.breaker import BreakerState, CircuitBreaker
from routecache.router.upstream.failover import AllProvidersFailed, Failover, Provider
from routecache.router.upstream.openai_client import OpenAIChatClient


async def run(calls: int) -> None:
    config = ReplayConfig(fault_rate=1.0, fault_kinds=(FaultKind.HTTP_503,))
    async with await start_replay_server(config) as replay:
        client = OpenAIChatClient(replay.base_url, "mixtral-8x7b-instruct", max_attempts=1)
        breaker = CircuitBreaker(failure_threshold=3, open_seconds=3600)
        provider = Provider("cheap", client, Pricing(0.6, 0.6), breaker)
        failover = Failover({Tier.CHEAP: [provider], Tier.STRONG: [provider]})
        request = ChatRequest(messages=(Message(Role.USER, "What is 2 + 2?"),))
        while breaker.state is not BreakerState.OPEN:
            with contextlib.suppress(AllProvidersFailed):
                await failover.complete(request, Tier.STRONG, time.monotonic() + 5)
        sent_before = replay.chat_requests
        timings = []
        for _ in range(calls):
            started = time.perf_counter()
            with contextlib.suppress(AllProvidersFailed):
                await failover.complete(request, Tier.STRONG, time.monotonic() + 5)
            timings.append((time.perf_counter() - started) * 1e6)
        await client.aclose()
        timings.sort()
        p99 = timings[int(len(timings) * 0.99) - 1]
        p999 = timings[int(len(timings) * 0.999) - 1]
        print(f"shed calls: {calls}; requests that reached the provider while open: "
              f"{replay.chat_requests - sent_before}")  # fmt: skip
        print(f"time to shed (us): p50 {statistics.median(timings):.1f}  p99 {p99:.1f}  "
              f"p99.9 {p999:.1f}  max {timings[-1]:.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    asyncio.run(run(parser.parse_args().calls))


if __name__ == "__main__":
    main()

"""What recording one request costs: PrometheusTelemetry against NullTelemetry, per call.

python benchmarks/telemetry_overhead.py --calls 200000
"""

from __future__ import annotations

import argparse
import time

from routecache.domain import (
    CacheInfo,
    CacheOutcome,
    Completion,
    LatencyBreakdown,
    Tier,
    Usage,
    ValidationReport,
    ValidatorResult,
)
from routecache.router.metrics import PrometheusTelemetry
from routecache.router.telemetry import NullTelemetry, Telemetry

MISS = Completion(
    "r", "text", "m", Tier.CHEAP, CacheInfo(), Usage(40, 120, 0.0001, 0.0),
    ValidationReport((ValidatorResult("length", True),)), LatencyBreakdown(total_ms=150.0),
)  # fmt: skip
HIT = Completion(
    "r", "text", "m", Tier.CHEAP, CacheInfo(CacheOutcome.SEMANTIC, 0.95, "e"),
    Usage(saved_usd=0.0001), ValidationReport(), LatencyBreakdown(total_ms=3.0),
)  # fmt: skip


def per_call_us(telemetry: Telemetry, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        telemetry.request_started()
        telemetry.request_completed("acme", HIT if i % 2 else MISS, 0.01)
        telemetry.request_ended()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    null = per_call_us(NullTelemetry(), args.calls)
    prometheus = per_call_us(PrometheusTelemetry(), args.calls)
    print(f"calls={args.calls}  null={null:.2f} us/request  prometheus={prometheus:.2f} us/request"
          f"  overhead={prometheus - null:.2f} us/request")  # fmt: skip


if __name__ == "__main__":
    main()

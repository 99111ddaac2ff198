"""The load benchmark's per-path summary: client latency plus the server's own stage timings."""

from __future__ import annotations

from benchmarks.grpc_load import PathResults, _server_part
from routecache.v1 import routecache_pb2 as pb


def test_summary_reports_the_servers_stage_medians_beside_client_latency() -> None:
    results = PathResults()
    for client_ms, embed_ms, search_ms in ((20.0, 6.0, 9.0), (30.0, 8.0, 11.0), (25.0, 7.0, 10.0)):
        latency = pb.LatencyBreakdown(
            total_ms=embed_ms + search_ms + 1, embed_ms=embed_ms, search_ms=search_ms
        )
        results.record(client_ms, latency)

    summary = results.summary(seconds=1.0)

    assert summary["p50_ms"] == 25.0
    assert summary["server_total_ms_p50"] == 18.0
    assert summary["server_embed_ms_p50"] == 7.0
    assert summary["server_search_ms_p50"] == 10.0
    assert _server_part(summary) == " [server p50: total 18.0, embed 7.0, search 10.0 ms]"


def test_a_system_without_server_timings_reports_client_latency_only() -> None:
    results = PathResults()
    results.record(12.5)

    summary = results.summary(seconds=2.0)

    assert summary["count"] == 1
    assert not any(key.startswith("server_") for key in summary)
    assert _server_part(summary) == ""

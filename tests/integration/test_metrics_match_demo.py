"""A demo run's /metrics (scraped over HTTP at its end) agree with the demo's own summary,
which is counted on the client side from the responses; a demo that cannot start leaves
nothing listening."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from routecache.replay import ReplayConfig, RunningReplayServer, start_replay_server
from routecache.router import demo
from routecache.router.demo import run_demo
from routecache.router.settings import ConfigError, Settings

pytestmark = pytest.mark.integration


def totals(metrics_text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def test_scraped_metrics_match_the_demo_summary(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    report = await run_demo(n_recorded=3, concurrency=4, events_out=events)
    tally, m = report.tally, totals(report.metrics_text)
    requests = "routecache_requests_total"
    assert total(m, requests) == tally.requests
    assert total(m, requests, path="exact_hit") == tally.exact_hits
    assert total(m, requests, path="semantic_hit") == tally.semantic_hits
    assert total(m, requests, path="cheap") == tally.cheap
    assert total(m, requests, path="strong") == tally.strong
    assert total(m, requests, path="error") == tally.errors
    for path, count in (("exact_hit", tally.exact_hits), ("strong", tally.strong)):
        assert total(m, "routecache_request_latency_seconds_count", path=path) == count
    assert total(m, "routecache_escalations_total") == tally.escalated
    assert total(m, "routecache_cost_usd_total") == pytest.approx(tally.cost_usd)
    assert total(m, "routecache_saved_usd_total") == pytest.approx(tally.saved_usd)
    # The printed figures are the tallied ones.
    assert f"  cost               {tally.cost_usd:.4f} USD vs " in report.text
    assert f"hits saved {tally.saved_usd:.4f} USD" in report.text
    assert total(m, "routecache_tokens_total", kind="prompt") == tally.prompt_tokens
    assert total(m, "routecache_tokens_total", kind="completion") == tally.completion_tokens
    assert total(m, "routecache_feedback_total", rating="up") == report.feedback[0]
    assert total(m, "routecache_feedback_total", rating="down") == report.feedback[1]
    assert total(m, "routecache_in_flight_requests") == 0
    assert ("routecache_queue_depth", frozenset({("queue", "embedding")})) in m
    # The event log written alongside holds one event per request and per feedback.
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds.count("completion") + kinds.count("error") == tally.requests
    assert kinds.count("feedback") == sum(report.feedback)


async def test_a_demo_whose_service_fails_to_start_closes_the_replay_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[RunningReplayServer] = []

    async def replay(config: ReplayConfig) -> RunningReplayServer:
        started.append(await start_replay_server(config))
        return started[-1]

    async def service_that_fails(settings: Settings) -> None:
        raise ConfigError("the service cannot start")

    monkeypatch.setattr(demo, "start_replay_server", replay)
    monkeypatch.setattr(demo, "start_service", service_that_fails)

    with pytest.raises(ConfigError):
        await run_demo()

    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", started[0].port)

"""`routecache export-events` reads the Redis event stream, for retraining and the notebook."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink
from routecache.backends.redis_events import RedisStreamEventSink
from routecache.router.cli import main
from routecache.training.outcomes import read_events as read_for_retrain
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration


def write_events(url: str, events: list[Mapping[str, Any]], prefix: str = "rc") -> None:
    """Events through the service's own sink, as a replica with no events.path writes them."""

    async def write() -> None:
        link = RedisLink(url, 2.0, 4, 0.05)
        assert await link.connect()
        sink = RedisStreamEventSink(link, KeySpace(prefix))
        for event in events:
            sink.emit(event["kind"], {k: v for k, v in event.items() if k != "kind"})
        await sink.flush()
        await link.aclose()

    asyncio.run(write())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_redis_stream_exports_as_the_jsonl_log_that_retrain_reads(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: export-events and retrain read only JSONL files, so a Redis deployment (events on
    # the stream rc:{T}:events) could not get its feedback into retraining at all.
    write_events(redis_server.url, [
        {"kind": "completion", "tenant": "acme", "prompt": "2+2?", "tier": "cheap"},
        {"kind": "feedback", "tenant": "acme", "response_id": "r1", "thumbs_up": True},
        {"kind": "completion", "tenant": "globex", "prompt": "not acme's"},
    ])  # fmt: skip
    out = tmp_path / "events.jsonl"
    argv = ["export-events", "--redis-url", redis_server.url, "--tenant", "acme"]
    assert main([*argv, "--format", "jsonl", "--out", str(out)]) == 0
    rows = jsonl(out)
    assert [(r["kind"], r["tenant"]) for r in rows] == [
        ("completion", "acme"), ("feedback", "acme"),
    ]  # fmt: skip
    assert rows[0]["prompt"] == "2+2?" and isinstance(rows[0]["ts"], float)
    assert read_for_retrain([out]) == rows
    assert out.stat().st_mode & 0o077 == 0  # events hold prompts: the service's user only
    assert capsys.readouterr().out == f"2 events written to {out}\n"


def test_a_config_on_the_redis_store_exports_every_tenants_stream_since(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    write_events(redis_server.url, [
        {"kind": "completion", "tenant": "acme", "prompt": "old", "ts": 10.0},
        {"kind": "completion", "tenant": "globex", "prompt": "new"},
        {"kind": "completion", "tenant": "acme", "prompt": "newer"},
    ], prefix="rcx")  # fmt: skip
    config = tmp_path / "rc.toml"
    config.write_text(
        f'[store]\nbackend = "redis"\nredis_url = "{redis_server.url}"\nkey_prefix = "rcx"\n'
        '[[tenants]]\nname = "acme"\napi_key_sha256 = ["' + "a" * 64 + '"]\n'
        '[[tenants]]\nname = "globex"\napi_key_sha256 = ["' + "b" * 64 + '"]\n'
    )
    out = tmp_path / "events.parquet"
    assert main(["export-events", "--config", str(config), "--since", "60", "--out", str(out)]) == 0
    assert pd.read_parquet(out)["prompt"].tolist() == ["new", "newer"]


def test_a_stream_longer_than_one_read_is_exported_whole(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    write_events(redis_server.url, [
        {"kind": "completion", "tenant": "acme", "n": n} for n in range(2500)
    ])  # fmt: skip
    out = tmp_path / "events.jsonl"
    argv = ["export-events", "--redis-url", redis_server.url, "--tenant", "acme"]
    assert main([*argv, "--format", "jsonl", "--out", str(out)]) == 0
    assert [row["n"] for row in jsonl(out)] == list(range(2500))


def test_a_stream_export_names_no_tenant_in_one_line_and_exit_2(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export-events", "--redis-url", redis_server.url, "--out", str(tmp_path / "e.pq")]
    assert main(argv) == 2
    assert "--tenant" in capsys.readouterr().err


def test_a_tenant_with_no_events_is_said_on_stderr(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a typo in --tenant exported 0 events, exit 0, not a word.
    write_events(redis_server.url, [{"kind": "completion", "tenant": "acme", "prompt": "hi"}])
    out = tmp_path / "events.jsonl"
    argv = ["export-events", "--redis-url", redis_server.url, "--tenant", "acme"]
    assert main([*argv, "--tenant", "acmee", "--format", "jsonl", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"1 events written to {out}\n"
    assert captured.err == "routecache: no events for tenant acmee\n"


def test_an_event_the_sink_wrote_twice_is_exported_once(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    # The reviewer's repro: a write that timed out but that Redis applied is requeued and
    # written again; export-events (and the notebook's savings, retrain's labels) counted it
    # twice.
    async def write_twice() -> None:
        link = RedisLink(own_redis_server.url, 0.3, 4, 0.05)
        assert await link.connect()
        sink = RedisStreamEventSink(link, KeySpace("rc"))
        for n in range(3):
            hit = {"response_id": f"r{n}", "prompt": "q", "path": "exact_hit", "saved_usd": 0.01}
            sink.emit("completion", {"tenant": "acme", **hit})
        stalling = asyncio.create_task(asyncio.to_thread(own_redis_server.debug_sleep, 1.0))
        await asyncio.to_thread(own_redis_server.wait_stalled)
        with pytest.raises(RedisDown):
            await sink.flush()
        await stalling
        await link.wait_up()
        await sink.flush()  # the requeued batch, which Redis had taken after all
        assert await link.client.xlen(KeySpace("rc").of("acme").events) == 6
        await link.aclose()

    asyncio.run(write_twice())
    argv = ["export-events", "--redis-url", own_redis_server.url, "--tenant", "acme"]
    out = tmp_path / "events.jsonl"
    assert main([*argv, "--format", "jsonl", "--out", str(out)]) == 0
    assert [r["response_id"] for r in jsonl(out)] == ["r0", "r1", "r2"]
    assert len(read_for_retrain([out])) == 3
    table = tmp_path / "events.parquet"
    assert main([*argv, "--out", str(table)]) == 0
    assert pd.read_parquet(table)["saved_usd"].sum() == pytest.approx(0.03)

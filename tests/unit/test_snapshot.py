"""The embedded store survives a restart through its snapshot."""

from __future__ import annotations

from pathlib import Path

from routecache.cache.hit_policy import HitRequirement
from routecache.domain import CacheControl, CacheOutcome, ChatRequest, Message, Role
from tests.unit.conftest import KEYS, make_harness

ACME = KEYS["acme"]


def ask(prompt: str, ttl: int | None = None) -> ChatRequest:
    return ChatRequest(messages=(Message(Role.USER, prompt),), cache=CacheControl(ttl_seconds=ttl))


async def test_a_restarted_process_keeps_its_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "snapshot.jsonl"
    first = make_harness(store={"snapshot_path": path})
    await first.service.start_storage()
    stored = await first.service.pipeline.complete(ask("how do I reset my password today"), ACME)
    short = await first.service.pipeline.complete(ask("a short lived answer", ttl=5), ACME)
    await first.service.aclose()  # saves the snapshot
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()

    second = make_harness(store={"snapshot_path": path})
    grace = second.service.settings.upstream.stale_grace_seconds
    # The short-lived entry has expired meanwhile, and its stale grace has passed too.
    second.clock.now = first.clock.now + 10 + grace
    await second.service.start_storage()
    try:
        near = await second.service.pipeline.complete(ask("how do I reset my password"), ACME)
        assert near.cache.outcome is CacheOutcome.SEMANTIC
        assert near.cache.entry_id == stored.cache.entry_id
        assert await second.service.pipeline.cache.get("acme", short.cache.entry_id) is None
        assert second.cheap.calls == []
    finally:
        await second.service.aclose()


async def test_no_snapshot_file_means_an_empty_start(tmp_path: Path) -> None:
    harness = make_harness(store={"snapshot_path": tmp_path / "absent.jsonl"})
    await harness.service.start_storage()
    assert await harness.service.pipeline.cache.entry_count("acme") == 0
    await harness.service.aclose()
    assert (tmp_path / "absent.jsonl").is_file()


async def test_an_expired_entry_within_the_stale_grace_is_restored_for_stale_answers_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.jsonl"
    first = make_harness(store={"snapshot_path": path})
    await first.service.start_storage()
    short = await first.service.pipeline.complete(ask("a short lived answer", ttl=5), ACME)
    await first.service.aclose()

    second = make_harness(store={"snapshot_path": path})
    second.clock.now = first.clock.now + 10  # expired, but well within the stale grace
    await second.service.start_storage()
    try:
        cache = second.service.pipeline.cache
        restored = await cache.get("acme", short.cache.entry_id)
        assert restored is not None
        assert await cache.lookup_exact(restored.scope, restored.prompt) is None
        stale = await cache.lookup_stale(restored.scope, restored.prompt, None, HitRequirement(0.9))
        assert stale is not None and stale.entry.entry_id == short.cache.entry_id
    finally:
        await second.service.aclose()

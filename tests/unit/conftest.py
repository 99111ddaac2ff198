from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.domain import Tier
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, build_service
from routecache.router.events import InMemoryEventLog
from routecache.router.settings import Settings, load_settings
from routecache.router.telemetry import Telemetry
from tests.fakes import FakeUpstream, ManualClock, RecordingTelemetry, json_answer, prose_answer

KEYS = {"acme": "key-acme", "globex": "key-globex"}


def record_fsyncs(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[tuple[bool, bool]]:
    """Each os.fsync from now on, as (of a folder, `path` in place at the time)."""
    synced: list[tuple[bool, bool]] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(descriptor).st_mode), path.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def record_synced(monkeypatch: pytest.MonkeyPatch) -> list[os.stat_result]:
    """What each os.fsync from now on synced, as it stood then: which file or folder (st_ino),
    and how much of a file was written (st_size)."""
    synced: list[os.stat_result] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.fstat(descriptor))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def unit_settings(
    store: dict[str, object] | None = None,
    service: dict[str, object] | None = None,
    **tenant_options: object,
) -> Settings:
    """`service`: more top-level sections (keys, budgets, ...); the rest: each tenant's."""
    return load_settings(
        None,
        cache={"embedder": "hash", "similarity_threshold": 0.8, "max_entries": 100},
        store=store or {},
        metrics={"port": 0},
        tenants=[
            {"name": name, "api_key_sha256": [hash_api_key(key)], **tenant_options}
            for name, key in KEYS.items()
        ],
        **(service or {}),
    )


@dataclass
class Harness:
    service: Service
    cheap: FakeUpstream
    strong: FakeUpstream
    events: InMemoryEventLog
    clock: ManualClock
    classifier: FixedScoreClassifier
    telemetry: RecordingTelemetry


def make_harness(
    score: float = 0.2,
    telemetry: Telemetry | None = None,
    store: dict[str, object] | None = None,
    service: dict[str, object] | None = None,
    **tenant_options: object,
) -> Harness:
    cheap = FakeUpstream("cheap-model", prose_answer)
    strong = FakeUpstream("strong-model", json_answer)
    events = InMemoryEventLog()
    clock = ManualClock()
    classifier = FixedScoreClassifier(score, version="fixed-v1", default_threshold=0.5)
    recording = RecordingTelemetry()
    built = build_service(
        unit_settings(store, service, **tenant_options),
        Overrides(
            embedder=HashEmbedder(),
            classifier=classifier,
            upstreams={Tier.CHEAP: cheap, Tier.STRONG: strong},
            events=events,
            clock=clock,
            telemetry=telemetry or recording,
        ),
    )
    return Harness(built, cheap, strong, events, clock, classifier, recording)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    built = make_harness()
    yield built
    await built.service.aclose()

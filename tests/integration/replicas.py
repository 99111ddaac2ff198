"""Service replicas on one real redis-server: the HashEmbedder, fake models, real Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass

from routecache.cache.embedder import HashEmbedder
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.scope import scope_key
from routecache.classifier.model import FixedScoreClassifier
from routecache.domain import CacheControl, ChatRequest, Message, Role, Tier
from routecache.router.auth import hash_api_key
from routecache.router.bootstrap import Overrides, Service, build_service, start_service
from routecache.router.settings import Settings, load_settings
from tests.fakes import FakeUpstream, ManualClock, json_answer, prose_answer
from tests.fakes import eventually as eventually  # the integration tests import it from here

KEYS = {"acme": "key-acme", "globex": "key-globex"}
ACME, GLOBEX = KEYS["acme"], KEYS["globex"]


def replica_settings(redis_url: str, max_entries: int = 1000, **store: object) -> Settings:
    return load_settings(
        server={"port": 0, "grace_seconds": 0},
        metrics={"port": 0},
        cache={"embedder": "hash", "similarity_threshold": 0.6, "max_entries": max_entries},
        store={"backend": "redis", "redis_url": redis_url, "probe_interval_seconds": 0.05,
               "purge_interval_seconds": 0.2, **store},
        tenants=[
            {"name": name, "api_key_sha256": [hash_api_key(key)], "requests_per_second": 1000}
            for name, key in KEYS.items()
        ],
    )  # fmt: skip


@dataclass
class Replica:
    service: Service
    cheap: FakeUpstream
    strong: FakeUpstream

    @property
    def index(self) -> ScopedFaissIndex:
        index = self.service.pipeline.cache.index
        assert isinstance(index, ScopedFaissIndex)
        return index


def _overrides(clock: ManualClock) -> tuple[Overrides, FakeUpstream, FakeUpstream]:
    cheap = FakeUpstream("cheap-model", prose_answer)
    strong = FakeUpstream("strong-model", json_answer)
    return (
        Overrides(
            embedder=HashEmbedder(),
            classifier=FixedScoreClassifier(0.2, version="fixed-v1", default_threshold=0.5),
            upstreams={Tier.CHEAP: cheap, Tier.STRONG: strong},
            clock=clock,
        ),
        cheap,
        strong,
    )


async def start_replica(settings: Settings, clock: ManualClock) -> Replica:
    """A replica without a gRPC server: storage started (index rebuilt) and ready."""
    overrides, cheap, strong = _overrides(clock)
    service = build_service(settings, overrides)
    await service.start_storage()
    return Replica(service, cheap, strong)


async def start_grpc_replica(settings: Settings, clock: ManualClock) -> Replica:
    overrides, cheap, strong = _overrides(clock)
    return Replica(await start_service(settings, overrides), cheap, strong)


def ask(
    prompt: str, ttl: int | None = None, tags: tuple[str, ...] = (), no_store: bool = False
) -> ChatRequest:
    control = CacheControl(ttl_seconds=ttl, tags=tags, no_store=no_store)
    return ChatRequest(messages=(Message(Role.USER, prompt),), cache=control)


def real_clock() -> ManualClock:
    """Starts at the real time, since Redis' own expiry backstop runs on it."""
    return ManualClock(time.time())


def ids_near(replica: Replica, tenant: str, prompt: str) -> list[str]:
    """The entry ids a replica's own index holds near this prompt (no store check)."""
    scope = scope_key(tenant, ask(prompt))
    vector = HashEmbedder().encode([prompt])[0]
    return [n.entry_id for n in replica.index.search(scope, vector, 8)]

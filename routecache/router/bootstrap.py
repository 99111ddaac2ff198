"""The one place where parts are chosen and wired: real ones from settings, or test doubles."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisLink
from routecache.backends.redis_events import RedisStreamEventSink
from routecache.backends.redis_limits import RedisRateLimiter, RedisSpendLedger
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions
from routecache.backends.replica_sync import ReplicaSync
from routecache.backends.storage import CacheHealth, EmbeddedStorage, RedisStorage, Storage
from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.embedding_worker import EmbeddingWorker
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import Embedder, EntryStore, VectorIndex
from routecache.cache.semantic_cache import SemanticCache
from routecache.classifier.model import load_artifact, packaged_artifact_path
from routecache.classifier.ports import DifficultyClassifier
from routecache.domain import Tenant, Tier
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.events import InMemoryEventLog
from routecache.router.generation import Generator, Provider
from routecache.router.limits import InMemoryRateLimiter, InMemorySpendLedger
from routecache.router.pipeline import Pipeline, PipelineParts
from routecache.router.ports import ChatUpstream, EventSink, Pricing, RateLimiter, SpendLedger
from routecache.router.server import RunningServer, start_server
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import ProviderSettings, Settings
from routecache.router.upstream.openai_client import OpenAIChatClient
from routecache.router.validators import JsonSchemaValidator, MaxLengthValidator


@dataclass
class Overrides:
    """Parts a test supplies instead of the real ones (never monkeypatching)."""

    embedder: Embedder | None = None
    classifier: DifficultyClassifier | None = None
    upstreams: Mapping[Tier, ChatUpstream] | None = None
    events: EventSink | None = None
    clock: Callable[[], float] = field(default=time.time)


@dataclass
class Service:
    settings: Settings
    pipeline: Pipeline
    embeddings: EmbeddingWorker
    generator: Generator
    events: EventSink
    storage: Storage
    server: RunningServer | None = None

    async def start_storage(self, cache_health: CacheHealth | None = None) -> None:
        """Loads the cache index from the store (rebuild from Redis, or the snapshot)."""
        if cache_health is None:
            await self.storage.start()
        else:
            await self.storage.start(cache_health)

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.storage.aclose()
        await self.generator.aclose()
        self.embeddings.close()


def build_embedder(settings: Settings) -> Embedder:
    if settings.cache.embedder == "hash":
        return HashEmbedder()
    return MiniLMEmbedder()


def build_classifier(settings: Settings) -> DifficultyClassifier:
    return load_artifact(settings.classifier.artifact or packaged_artifact_path())


def build_upstream(provider: ProviderSettings) -> ChatUpstream:
    return OpenAIChatClient(
        base_url=provider.base_url,
        model=provider.model,
        api_key=provider.api_key.get_secret_value() if provider.api_key else None,
        timeout_seconds=provider.timeout_seconds,
    )


def build_tenants(settings: Settings) -> ApiKeyAuthenticator:
    routing_default = settings.classifier.routing_threshold
    return ApiKeyAuthenticator(
        (
            Tenant(
                name=t.name,
                routing_threshold=t.routing_threshold if t.routing_threshold is not None
                else routing_default,
                similarity_threshold=t.similarity_threshold or settings.cache.similarity_threshold,
                default_ttl_seconds=t.default_ttl_seconds or settings.cache.default_ttl_seconds,
                requests_per_second=t.requests_per_second,
                daily_budget_usd=t.daily_budget_usd,
            ),
            t.api_key_sha256,
        )
        for t in settings.tenants
    )  # fmt: skip


@dataclass
class StorageParts:
    store: EntryStore
    rate_limiter: RateLimiter
    spend: SpendLedger
    events: EventSink
    storage: Storage


def build_storage(
    settings: Settings, index: VectorIndex, clock: Callable[[], float], events: EventSink | None
) -> StorageParts:
    store_settings = settings.store
    if store_settings.backend == "memory":
        store = InMemoryEntryStore(settings.cache.max_entries)
        return StorageParts(
            store, InMemoryRateLimiter(clock), InMemorySpendLedger(clock),
            events or InMemoryEventLog(),
            EmbeddedStorage(store, index, clock, store_settings.snapshot_path,
                            store_settings.snapshot_interval_seconds),
        )  # fmt: skip
    return build_redis_storage(settings, index, clock, events)


def build_redis_storage(
    settings: Settings, index: VectorIndex, clock: Callable[[], float], events: EventSink | None
) -> StorageParts:
    store_settings = settings.store
    link = RedisLink(
        store_settings.redis_url.get_secret_value(),
        store_settings.timeout_seconds,
        store_settings.max_connections,
        store_settings.probe_interval_seconds,
    )
    keyspace = KeySpace(store_settings.key_prefix)
    origin = uuid.uuid4().hex  # this replica, so it can skip its own sync messages
    redis_store = RedisEntryStore(
        link, keyspace,
        RedisStoreOptions(settings.cache.max_entries, store_settings.sync_stream_max_len),
        clock, origin,
    )  # fmt: skip
    sync = ReplicaSync(
        link, keyspace, [t.name for t in settings.tenants], index, redis_store, origin, clock,
        store_settings.purge_interval_seconds,
    )  # fmt: skip
    stream_events = RedisStreamEventSink(
        link, keyspace, store_settings.event_buffer_max, store_settings.event_stream_max_len
    )
    sink: EventSink = events if events is not None else stream_events
    spend = RedisSpendLedger(link, keyspace, clock)
    return StorageParts(
        redis_store, RedisRateLimiter(link, keyspace, clock), spend, sink,
        RedisStorage(link, sync, stream_events if events is None else None, spend),
    )  # fmt: skip


def build_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    parts = overrides or Overrides()
    providers = {
        Tier.CHEAP: settings.upstream.cheap,
        Tier.STRONG: settings.upstream.strong,
    }
    upstreams = parts.upstreams or {tier: build_upstream(p) for tier, p in providers.items()}
    generator = Generator(
        {
            tier: Provider(upstreams[tier], Pricing(p.input_usd_per_mtok, p.output_usd_per_mtok))
            for tier, p in providers.items()
        },
        [MaxLengthValidator(settings.limits.max_answer_chars), JsonSchemaValidator()],
    )
    embedder = parts.embedder or build_embedder(settings)
    embeddings = EmbeddingWorker(embedder)
    clock = parts.clock
    index = ScopedFaissIndex(embedder.dimension)
    storage = build_storage(settings, index, clock, parts.events)
    events = storage.events
    pipeline = Pipeline(
        PipelineParts(
            authenticator=build_tenants(settings),
            limits=settings.limits,
            rate_limiter=storage.rate_limiter,
            spend=storage.spend,
            cache=SemanticCache(storage.store, index, clock),
            embeddings=embeddings,
            classifier=parts.classifier or build_classifier(settings),
            generator=generator,
            events=events,
            clock=clock,
        )
    )
    return Service(settings, pipeline, embeddings, generator, events, storage.storage)


async def start_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    """Build the service and start its gRPC server; `service.server.port` is the bound port."""
    service = build_service(settings, overrides)
    # The first forward pass is several times slower than the rest; pay it before SERVING.
    await service.embeddings.embed("warm up")
    server = await start_server(
        RouteCacheServicer(service.pipeline), settings.server, serving=False
    )
    service.server = server
    # NOT_SERVING until the index holds what the store holds (a Redis rebuild can take a while).
    await service.start_storage(server.set_cache_serving)
    await server.set_serving(True)
    return service

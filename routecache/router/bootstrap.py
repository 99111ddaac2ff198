"""The one place where parts are chosen and wired: real ones from settings, or test doubles."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.embedding_worker import EmbeddingWorker
from routecache.cache.faiss_index import ScopedFaissIndex
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.ports import Embedder
from routecache.cache.semantic_cache import SemanticCache
from routecache.classifier.model import load_artifact, packaged_artifact_path
from routecache.classifier.ports import DifficultyClassifier
from routecache.domain import Tenant, Tier
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.events import InMemoryEventLog
from routecache.router.generation import Generator, Provider
from routecache.router.limits import InMemoryRateLimiter, InMemorySpendLedger
from routecache.router.pipeline import Pipeline, PipelineParts
from routecache.router.ports import ChatUpstream, EventSink, Pricing
from routecache.router.server import RunningServer, start_server
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import ProviderSettings, RetrySettings, Settings
from routecache.router.upstream.breaker import CircuitBreaker
from routecache.router.upstream.failover import Failover
from routecache.router.upstream.openai_client import OpenAIChatClient
from routecache.router.validation import RequestValidators, build_validators


@dataclass
class Overrides:
    """Parts a test supplies instead of the real ones (never monkeypatching)."""

    embedder: Embedder | None = None
    classifier: DifficultyClassifier | None = None
    upstreams: Mapping[Tier, ChatUpstream] | None = None  # the first provider of each tier
    providers: Mapping[str, ChatUpstream] | None = None  # any provider, by name
    monotonic: Callable[[], float] = field(default=time.monotonic)  # deadlines and breakers
    events: EventSink | None = None
    clock: Callable[[], float] = field(default=time.time)


@dataclass
class Service:
    settings: Settings
    pipeline: Pipeline
    embeddings: EmbeddingWorker
    generator: Generator
    events: EventSink
    server: RunningServer | None = None

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.generator.aclose()
        self.embeddings.close()


def build_embedder(settings: Settings) -> Embedder:
    if settings.cache.embedder == "hash":
        return HashEmbedder()
    return MiniLMEmbedder()


def build_classifier(settings: Settings) -> DifficultyClassifier:
    return load_artifact(settings.classifier.artifact or packaged_artifact_path())


def build_upstream(provider: ProviderSettings, retry: RetrySettings | None = None) -> ChatUpstream:
    return OpenAIChatClient.from_settings(provider, retry=retry)


def build_failover(settings: Settings, parts: Overrides) -> Failover:
    """Each tier's chain of providers, one client and one breaker per provider name."""
    upstream = settings.upstream
    given: dict[str, ChatUpstream] = dict(parts.providers or {})
    for tier, client in (parts.upstreams or {}).items():
        given.setdefault(tier.value, client)
    built: dict[str, Provider] = {}
    chains: dict[Tier, list[Provider]] = {}
    for tier in Tier:
        chains[tier] = []
        for name, config in upstream.chain(tier.value):
            if name not in built:
                client = given.get(name) or build_upstream(config, upstream.retry)
                built[name] = Provider(
                    name,
                    client,
                    Pricing(config.input_usd_per_mtok, config.output_usd_per_mtok),
                    CircuitBreaker(**upstream.breaker.model_dump(), clock=parts.monotonic),
                )
            chains[tier].append(built[name])
    return Failover(chains, parts.monotonic)


def build_generator(settings: Settings, parts: Overrides) -> Generator:
    limits = settings.limits
    return Generator(
        build_failover(settings, parts),
        build_validators(settings.validators, limits),
        tenant_validators={
            t.name: build_validators(t.validators, limits)
            for t in settings.tenants
            if t.validators is not None
        },
        default_timeout_seconds=settings.upstream.request_timeout_seconds,
        clock=parts.monotonic,
        request_validators=RequestValidators(limits),
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


def build_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    parts = overrides or Overrides()
    generator = build_generator(settings, parts)
    embedder = parts.embedder or build_embedder(settings)
    embeddings = EmbeddingWorker(embedder)
    events = parts.events or InMemoryEventLog()
    clock = parts.clock
    pipeline = Pipeline(
        PipelineParts(
            authenticator=build_tenants(settings),
            limits=settings.limits,
            rate_limiter=InMemoryRateLimiter(clock),
            spend=InMemorySpendLedger(clock),
            cache=SemanticCache(
                InMemoryEntryStore(settings.cache.max_entries),
                ScopedFaissIndex(embedder.dimension),
                clock,
                stale_grace_seconds=settings.upstream.stale_grace_seconds,
            ),
            embeddings=embeddings,
            classifier=parts.classifier or build_classifier(settings),
            generator=generator,
            events=events,
            clock=clock,
        )
    )
    return Service(settings, pipeline, embeddings, generator, events)


async def start_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    """Build the service and start its gRPC server; `service.server.port` is the bound port."""
    service = build_service(settings, overrides)
    # The first forward pass is several times slower than the rest; pay it before SERVING.
    await service.embeddings.embed("warm up")
    service.server = await start_server(RouteCacheServicer(service.pipeline), settings.server)
    return service

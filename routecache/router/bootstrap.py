"""The one place where parts are chosen and wired: real ones from settings, or test doubles."""

from __future__ import annotations

import asyncio
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
from routecache.classifier.registry import ModelRegistry
from routecache.classifier.reloading import ReloadingClassifier
from routecache.domain import OperatingPoint, Tenant, Tier
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.events import InMemoryEventLog
from routecache.router.generation import Generator, Provider
from routecache.router.limits import InMemoryRateLimiter, InMemorySpendLedger
from routecache.router.pipeline import Pipeline, PipelineParts
from routecache.router.ports import ChatUpstream, EventSink, Pricing
from routecache.router.server import RunningServer, start_server
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import ProviderSettings, Settings, TenantSettings
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
    server: RunningServer | None = None
    classifier: DifficultyClassifier | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def aclose(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()
        await self.generator.aclose()
        self.embeddings.close()


def build_embedder(settings: Settings) -> Embedder:
    if settings.cache.embedder == "hash":
        return HashEmbedder()
    return MiniLMEmbedder()


def build_classifier(settings: Settings) -> DifficultyClassifier:
    fallback = settings.classifier.artifact or packaged_artifact_path()
    if settings.classifier.registry_dir is not None:
        registry = ModelRegistry(settings.classifier.registry_dir)
        return ReloadingClassifier.from_registry(registry, load_artifact, fallback)
    return load_artifact(fallback)


def build_upstream(provider: ProviderSettings) -> ChatUpstream:
    return OpenAIChatClient(
        base_url=provider.base_url,
        model=provider.model,
        api_key=provider.api_key.get_secret_value() if provider.api_key else None,
        timeout_seconds=provider.timeout_seconds,
    )


def _routing_target(
    tenant: TenantSettings, settings: Settings
) -> tuple[float | None, OperatingPoint | None]:
    """The most specific of: tenant threshold, tenant target, default threshold, default target."""
    if tenant.routing_threshold is not None or tenant.operating_point() is not None:
        return tenant.routing_threshold, tenant.operating_point()
    return settings.classifier.routing_threshold, settings.classifier.operating_point()


def build_tenants(settings: Settings) -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(
        (
            Tenant(
                name=t.name,
                routing_threshold=_routing_target(t, settings)[0],
                similarity_threshold=t.similarity_threshold or settings.cache.similarity_threshold,
                default_ttl_seconds=t.default_ttl_seconds or settings.cache.default_ttl_seconds,
                requests_per_second=t.requests_per_second,
                daily_budget_usd=t.daily_budget_usd,
                operating_point=_routing_target(t, settings)[1],
            ),
            t.api_key_sha256,
        )
        for t in settings.tenants
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
    events = parts.events or InMemoryEventLog()
    clock = parts.clock
    classifier = parts.classifier or build_classifier(settings)
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
            ),
            embeddings=embeddings,
            classifier=classifier,
            generator=generator,
            events=events,
            clock=clock,
        )
    )
    return Service(settings, pipeline, embeddings, generator, events, classifier=classifier)


async def start_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    """Build the service and start its gRPC server; `service.server.port` is the bound port."""
    service = build_service(settings, overrides)
    # The first forward pass is several times slower than the rest; pay it before SERVING.
    await service.embeddings.embed("warm up")
    service.server = await start_server(RouteCacheServicer(service.pipeline), settings.server)
    if isinstance(service.classifier, ReloadingClassifier):
        interval = settings.classifier.reload_interval_seconds
        service.background.append(asyncio.create_task(service.classifier.watch(interval)))
    return service

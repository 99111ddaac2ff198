"""The one place where parts are chosen and wired: real ones from settings, or test doubles."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.embedding_worker import BatchPolicy, EmbeddingWorker
from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
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
    server: RunningServer | None = None

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.generator.aclose()
        self.embeddings.close()


def build_embedder(settings: Settings) -> Embedder:
    if settings.cache.embedder == "hash":
        return HashEmbedder()
    if settings.cache.embedder == "minilm":
        return MiniLMEmbedder()
    return OnnxMiniLMEmbedder(onnx_dir=settings.cache.onnx_dir)


def build_vector_index(settings: Settings, dimension: int) -> ScopedFaissIndex:
    import faiss

    # One lookup is one query vector: FAISS's OpenMP threads only add wake-up and contention
    # with the encoder (a 50k flat search took 4x longer with 2 threads than with 1 here).
    faiss.omp_set_num_threads(settings.cache.faiss_threads)
    policy = IndexPolicy(
        ivf_threshold=settings.cache.ivf_threshold, nprobe=settings.cache.ivf_nprobe
    )
    return ScopedFaissIndex(dimension, policy)


def build_embedding_worker(settings: Settings, embedder: Embedder) -> EmbeddingWorker:
    policy = BatchPolicy(
        max_batch=settings.cache.embed_max_batch,
        max_wait_seconds=settings.cache.embed_max_wait_ms / 1000,
    )
    return EmbeddingWorker(embedder, policy)


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
    embeddings = build_embedding_worker(settings, embedder)
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
                build_vector_index(settings, embedder.dimension),
                clock,
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

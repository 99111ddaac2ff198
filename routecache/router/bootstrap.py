"""The one place where parts are chosen and wired: real ones from settings, or test doubles."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisLink
from routecache.backends.redis_events import RedisStreamEventSink
from routecache.backends.redis_keys import RedisKeyRegistry
from routecache.backends.redis_limits import RedisQuotaLimiter
from routecache.backends.redis_spend import RedisSpendLedger, Retention
from routecache.backends.redis_store import RedisEntryStore, RedisStoreOptions
from routecache.backends.replica_sync import ReplicaSync
from routecache.backends.storage import CacheHealth, EmbeddedStorage, RedisStorage, Storage
from routecache.cache.cross_encoder import (
    GRAPH_FILE,
    POLICY_FILE,
    OnnxCrossEncoder,
    graph_sha256,
    packaged_verifier_dir,
)
from routecache.cache.embedder import HashEmbedder, MiniLMEmbedder
from routecache.cache.embedding_worker import BatchPolicy, EmbeddingWorker
from routecache.cache.faiss_index import IndexPolicy, ScopedFaissIndex
from routecache.cache.hit_policy import CosinePolicy, HitPolicy, PolicyCalibration, VerifiedPolicy
from routecache.cache.memory_store import InMemoryEntryStore
from routecache.cache.onnx_embedder import OnnxCacheError, OnnxMiniLMEmbedder
from routecache.cache.ports import Embedder, EntryStore, SeesWhole, VectorIndex
from routecache.cache.semantic_cache import Distrust, SemanticCache
from routecache.cache.snapshot import SnapshotError
from routecache.classifier.model import (
    ClassifierArtifactError,
    load_artifact,
    packaged_artifact_path,
)
from routecache.classifier.ports import DifficultyClassifier
from routecache.classifier.registry import ModelRegistry, RegistryError
from routecache.classifier.reloading import ClassifierMismatch, ReloadingClassifier, check_fits
from routecache.domain import Tier
from routecache.router.alerts import BudgetAlerts
from routecache.router.auth import ApiKeyAuthenticator
from routecache.router.budget import InMemorySpendLedger
from routecache.router.costs import CostControl
from routecache.router.events import InMemoryEventLog, JsonlEventLog
from routecache.router.generation import Generator, Provider
from routecache.router.keyring import FileKeyRegistry, KeyRegistry, KeyRegistryError
from routecache.router.metrics import MetricsServer, PrometheusTelemetry
from routecache.router.pipeline import Pipeline, PipelineParts
from routecache.router.ports import ChatUpstream, EventSink, Pricing, SpendLedger
from routecache.router.quotas import InMemoryQuotaLimiter, QuotaLimiter
from routecache.router.releasing import Acquired, ReleaseStep, release_all
from routecache.router.server import DEPENDENCIES, ListenError, RunningServer, start_server
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import (
    ConfigError,
    ProviderSettings,
    RetrySettings,
    Settings,
    StoreSettings,
)
from routecache.router.telemetry import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    NullTelemetry,
    Telemetry,
)
from routecache.router.tenants import tenant_from_settings
from routecache.router.upstream.breaker import BreakerState, CircuitBreaker
from routecache.router.upstream.failover import Failover
from routecache.router.upstream.metered import MeteredUpstream
from routecache.router.upstream.openai_client import OpenAIChatClient
from routecache.router.validation import RequestValidators, build_validators

log = logging.getLogger(__name__)

# How long a shutdown waits for the calls gRPC cancelled (past server.grace_seconds) to run
# their cleanup, before it closes what that cleanup writes to: a cut stream's spend and its
# reservation's release, the error event. A few loop turns, or a Redis round trip or two.
CALL_CLEANUP_SECONDS = 5.0


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
    telemetry: Telemetry | None = None
    hit_policy: HitPolicy | None = None


@dataclass
class Service:
    settings: Settings
    pipeline: Pipeline
    embeddings: EmbeddingWorker
    generator: Generator
    events: EventSink
    telemetry: Telemetry
    storage: Storage
    server: RunningServer | None = None
    metrics: MetricsServer | None = None
    classifier: DifficultyClassifier | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)
    costs: CostControl | None = None
    owned: Acquired = field(default_factory=Acquired)  # what build_service opened, to release

    async def start_storage(self, cache_health: CacheHealth | None = None) -> None:
        """Loads the cache index from the store (rebuild from Redis, or the snapshot)."""
        if cache_health is None:
            await self.storage.start()
        else:
            await self.storage.start(cache_health)

    async def aclose(self) -> None:
        """Drain in-flight calls (within server.grace_seconds), then release everything.

        Every step runs even when one fails; the first failure is raised after the last step.
        """
        await release_all(self._release_steps())

    def _release_steps(self) -> list[ReleaseStep]:
        steps: list[ReleaseStep] = [("background tasks", self._stop_background)]
        if self.server is not None:
            steps.append(("the gRPC server", self.server.stop))
        # The server's stop (or stop_now) returns once it has cancelled the calls still
        # running, not once they have cleaned up: what they write to is released next.
        steps.append(("the calls in flight", self._finish_calls))
        # Newest first: the cache's puts and owed removals, cost control (spend writes of callers
        # gone), storage (its last spend flush), the budget alerts (webhook deliveries under
        # way), the event log, the embedding worker, the upstream clients.
        steps += self.owned.steps()
        if self.metrics is not None:
            steps.append(("the metrics server", self.metrics.close))
        return steps

    async def _finish_calls(self) -> None:
        calls = self.pipeline.in_flight
        if not await calls.wait_idle(CALL_CLEANUP_SECONDS):
            log.warning("%d calls still running after %.0f s; closing the service under them",
                        calls.count, CALL_CLEANUP_SECONDS)  # fmt: skip

    async def _stop_background(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics is None else self.metrics.port


def build_embedder(settings: Settings) -> Embedder:
    if settings.cache.embedder == "hash":
        return HashEmbedder()
    if settings.cache.embedder == "minilm":
        return MiniLMEmbedder()
    try:
        return OnnxMiniLMEmbedder(onnx_dir=settings.cache.onnx_dir)
    except OnnxCacheError as error:  # a read-only folder, a graph this runtime cannot read
        raise ConfigError(f"cache.onnx_dir: {error}") from error


def build_hit_policy(settings: Settings, embedder_name: str | None = None) -> HitPolicy:
    """The verifier where it applies, else the cosine threshold.

    The verifier's cosine floor and features were calibrated on all-MiniLM-L6-v2's similarities,
    so `auto` turns it on only when that is the embedder in use.
    """
    mode = settings.cache.verifier
    name = embedder_name if embedder_name is not None else settings.cache.embedder
    if mode == "off" or (mode == "auto" and not name.lower().startswith(("all-minilm", "minilm"))):
        return CosinePolicy()
    directory = settings.cache.verifier_dir or packaged_verifier_dir()
    try:
        calibration = PolicyCalibration.load(directory / POLICY_FILE)
    except (ValueError, KeyError, TypeError) as error:  # JSON, but not a calibration
        raise ConfigError(
            f"cache.verifier_dir: {directory / POLICY_FILE} is not a verifier calibration "
            f"({type(error).__name__}: {error})"
        ) from error
    try:
        scorer = OnnxCrossEncoder(directory / GRAPH_FILE, symmetric=calibration.symmetric)
    except ValueError as error:  # torn, or another model (missing: an OSError, "cannot start")
        raise ConfigError(f"cache.verifier_dir: {error}") from error
    _check_calibrated_graph(calibration, directory / GRAPH_FILE)
    return VerifiedPolicy(calibration, scorer)


def _check_calibrated_graph(calibration: PolicyCalibration, graph: Path) -> None:
    """ConfigError unless `graph` is the one the calibration's thresholds were chosen on (its
    graph_sha256): a train-verifier run cut off between publishing the two, or a graph copied
    from another run, would serve one model's scores against another's thresholds. Hashed
    once per start (23 MB: some tens of milliseconds)."""
    named = calibration.metadata.get("graph_sha256")
    actual = graph_sha256(graph)
    if named != actual:
        said = f"names {str(named)[:16]}…" if named else "names no graph_sha256"
        raise ConfigError(
            f"cache.verifier_dir: {graph} is not the graph {graph.parent / POLICY_FILE} was "
            f"calibrated on (sha256 {actual[:16]}…, the policy {said}): run train-verifier "
            "again, or restore the pair it published"
        )


def build_vector_index(settings: Settings, dimension: int) -> ScopedFaissIndex:
    # One lookup is one query vector: FAISS's OpenMP threads only add wake-up and contention
    # with the encoder (a 50k flat search took 4x longer with 2 threads than with 1 here).
    # The index sets them on each thread that searches: this one (start_service's build
    # thread) is not the loop's.
    policy = IndexPolicy(
        ivf_threshold=settings.cache.ivf_threshold,
        nprobe=settings.cache.ivf_nprobe,
        threads=settings.cache.faiss_threads,
    )
    return ScopedFaissIndex(dimension, policy)


def build_embedding_worker(settings: Settings, embedder: Embedder) -> EmbeddingWorker:
    policy = BatchPolicy(
        max_batch=settings.cache.embed_max_batch,
        max_wait_seconds=settings.cache.embed_max_wait_ms / 1000,
    )
    return EmbeddingWorker(embedder, policy)


def build_classifier(settings: Settings, embedder: Embedder | None = None) -> DifficultyClassifier:
    """The configured model; ConfigError if it cannot route on `embedder`'s vectors."""
    fallback = settings.classifier.artifact or packaged_artifact_path()
    dimension = None if embedder is None else embedder.dimension
    name = None if embedder is None else embedder.name
    try:
        if settings.classifier.registry_dir is not None:
            registry = ModelRegistry(settings.classifier.registry_dir)
            return ReloadingClassifier.from_registry(
                registry, load_artifact, fallback, dimension, name
            )
        classifier = load_artifact(fallback)
        check_fits(classifier, dimension, name)
    except ClassifierMismatch as error:
        raise ConfigError(
            f"{error}: point classifier.artifact or classifier.registry_dir at a model "
            f"trained on this embedder (routecache train-classifier --embedder ...)"
        ) from error
    except (ClassifierArtifactError, RegistryError) as error:
        # A file the settings name that cannot be used: one line and exit 2, not a traceback.
        # (A CURRENT saved in another encoding is a RegistryError.)
        setting = "artifact" if settings.classifier.registry_dir is None else "registry_dir"
        raise ConfigError(f"cannot start: classifier.{setting}: {error}") from error
    return classifier


def build_upstream(provider: ProviderSettings, retry: RetrySettings | None = None) -> ChatUpstream:
    return OpenAIChatClient.from_settings(provider, retry=retry)


def breaker_gauge(breaker: CircuitBreaker) -> Callable[[], float]:
    values = {
        BreakerState.CLOSED: BREAKER_CLOSED,
        BreakerState.HALF_OPEN: BREAKER_HALF_OPEN,
        BreakerState.OPEN: BREAKER_OPEN,
    }
    return lambda: values[breaker.state]


def given_upstreams(parts: Overrides) -> dict[str, ChatUpstream]:
    """The clients supplied in code, by provider name (a tier's first provider is its tier)."""
    given: dict[str, ChatUpstream] = dict(parts.providers or {})
    for tier, client in (parts.upstreams or {}).items():
        given.setdefault(tier.value, client)
    return given


def build_failover(settings: Settings, parts: Overrides, telemetry: Telemetry) -> Failover:
    """Each tier's chain of providers, one client and one breaker per provider name."""
    upstream = settings.upstream
    given = given_upstreams(parts)
    built: dict[str, Provider] = {}
    chains: dict[Tier, list[Provider]] = {}
    for tier in Tier:
        chains[tier] = []
        for name, config in upstream.chain(tier.value):
            if name not in built:
                client = given.get(name) or build_upstream(config, upstream.retry)
                breaker = CircuitBreaker(**upstream.breaker.model_dump(), clock=parts.monotonic)
                telemetry.watch_breaker(name, breaker_gauge(breaker))
                built[name] = Provider(
                    name,
                    MeteredUpstream(client, telemetry),
                    Pricing(config.input_usd_per_mtok, config.output_usd_per_mtok),
                    breaker,
                )
            chains[tier].append(built[name])
    return Failover(chains, parts.monotonic)


def build_generator(settings: Settings, parts: Overrides, telemetry: Telemetry) -> Generator:
    limits = settings.limits
    return Generator(
        build_failover(settings, parts, telemetry),
        build_validators(settings.validators, limits),
        tenant_validators={
            t.name: build_validators(t.validators, limits)
            for t in settings.tenants
            if t.validators is not None
        },
        default_timeout_seconds=settings.upstream.request_timeout_seconds,
        clock=parts.monotonic,
        request_validators=RequestValidators(limits),
        longest_call_seconds=settings.longest_call_seconds(),
        deliverable_chars=settings.deliverable_answer_chars(),
    )


def build_telemetry(settings: Settings) -> Telemetry:
    return PrometheusTelemetry() if settings.metrics.enabled else NullTelemetry()


def build_key_registry(settings: Settings, link: RedisLink | None) -> KeyRegistry | None:
    """keys.source: redis (the Redis backend's link), file (keys.registry_path) or none."""
    source, path = settings.keys.source, settings.keys.registry_path
    if source == "auto":
        source = "redis" if link is not None else ("file" if path is not None else "none")
    if source == "redis":
        if link is None:
            raise ConfigError("keys.source = 'redis' needs store.backend = 'redis'")
        return RedisKeyRegistry(link, KeySpace(settings.store.key_prefix))
    if source == "file":
        if path is None:
            raise ConfigError("keys.source = 'file' needs keys.registry_path")
        registry = FileKeyRegistry(path)
        # Absolute: a relative keys.registry_path is this process's working directory's, and
        # an admin running `keys --config` from elsewhere must see which file is served.
        log.info("API key registry: file %s", registry.path)
        try:
            registry.check()  # a damaged file would fail every call of a registered key
        except KeyRegistryError as error:
            raise ConfigError(f"keys.registry_path: {error}") from error
        return registry
    return None


def build_tenants(
    settings: Settings, registry: KeyRegistry | None = None, clock: Callable[[], float] = time.time
) -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(
        ((tenant_from_settings(t, settings), t.api_key_sha256) for t in settings.tenants),
        registry,
        clock,
    )


@dataclass
class StorageParts:
    store: EntryStore
    spend: SpendLedger
    events: EventSink
    storage: Storage
    quotas: QuotaLimiter
    link: RedisLink | None = None


def build_storage(
    settings: Settings,
    index: VectorIndex,
    clock: Callable[[], float],
    events: EventSink | None,
    telemetry: Telemetry | None = None,
) -> StorageParts:
    """`events`: the sink `open_events` chose (one given in code, or events.path's JSONL file);
    None: the backend's own, the Redis stream on the Redis backend, else memory."""
    store_settings = settings.store
    grace = settings.upstream.stale_grace_seconds
    if store_settings.backend == "memory":
        store = InMemoryEntryStore(settings.cache.max_entries, clock, grace)
        return StorageParts(
            store,
            InMemorySpendLedger(clock, settings.budgets.reservation_ttl_seconds),
            events or InMemoryEventLog(),
            EmbeddedStorage(store, index, clock, store_settings.snapshot_path,
                            store_settings.snapshot_interval_seconds, grace),
            InMemoryQuotaLimiter(clock),
        )  # fmt: skip
    return build_redis_storage(settings, index, clock, events, telemetry or NullTelemetry())


def build_redis_link(store_settings: StoreSettings) -> RedisLink:
    return RedisLink(
        store_settings.redis_url.get_secret_value(),
        store_settings.timeout_seconds,
        store_settings.max_connections,
        store_settings.probe_interval_seconds,
        connect_timeout_seconds=store_settings.connect_timeout_seconds,
    )


def build_redis_storage(
    settings: Settings,
    index: VectorIndex,
    clock: Callable[[], float],
    events: EventSink | None,
    telemetry: Telemetry,
) -> StorageParts:
    store_settings = settings.store
    grace = settings.upstream.stale_grace_seconds
    link = build_redis_link(store_settings)
    telemetry.watch_dependency("redis", lambda: link.up)
    # Degraded paths that keep health SERVING: without these only a log line shows them.
    telemetry.watch_count("redis_failures", lambda: link.failures)
    telemetry.watch_count("redis_refusals", lambda: link.refusals)
    keyspace = KeySpace(store_settings.key_prefix)
    origin = uuid.uuid4().hex  # this replica, so it can skip its own sync messages
    redis_store = RedisEntryStore(
        link, keyspace,
        RedisStoreOptions(settings.cache.max_entries, store_settings.sync_stream_max_len,
                          stale_grace_seconds=grace),
        clock, origin,
    )  # fmt: skip
    sync = ReplicaSync(
        link, keyspace, [t.name for t in settings.tenants], index, redis_store, origin, clock,
        store_settings.purge_interval_seconds, stale_grace_seconds=grace,
    )  # fmt: skip
    stream_events = RedisStreamEventSink(
        link, keyspace, store_settings.event_buffer_max, store_settings.event_stream_max_len
    )
    sink: EventSink = events if events is not None else stream_events
    if events is None:
        telemetry.watch_count("events_dropped", lambda: stream_events.dropped)
    budgets = settings.budgets
    retention = Retention(budgets.day_retention_days * 86400, budgets.month_retention_days * 86400)
    spend = RedisSpendLedger(link, keyspace, clock, budgets.reservation_ttl_seconds, retention)
    quotas = RedisQuotaLimiter(link, keyspace, clock)
    telemetry.watch_count("rate_limit_fallbacks", lambda: quotas.fallbacks)
    return StorageParts(
        redis_store, spend, sink,
        RedisStorage(link, sync, stream_events if events is None else None, spend),
        quotas, link,
    )  # fmt: skip


def build_service(
    settings: Settings, overrides: Overrides | None = None, acquired: Acquired | None = None
) -> Service:
    """`acquired` collects how to release each part as it is built, so that a caller can
    release them when a later part fails (a bad classifier, verifier or key registry)."""
    parts = overrides or Overrides()
    acquired = acquired if acquired is not None else Acquired()
    telemetry = parts.telemetry or build_telemetry(settings)
    generator = build_generator(settings, parts, telemetry)
    for name, release in generator.release_steps():
        acquired.add(name, release)
    embedder = parts.embedder or build_embedder(settings)
    embeddings = build_embedding_worker(settings, embedder)
    acquired.add("the embedding worker", embeddings.close)
    telemetry.watch_queue("embedding", lambda: embeddings.pending)
    clock = parts.clock
    classifier = parts.classifier or build_classifier(settings, embedder)
    index = build_vector_index(settings, embedder.dimension)
    events_sink = open_events(settings, parts, acquired, telemetry)
    storage = build_storage(settings, index, clock, events_sink, telemetry)
    alerts = build_budget_alerts(settings, storage.events, telemetry)
    # Closed after the storage: a Redis storage's stop flushes the spend settled while Redis
    # was down, and a soft budget that flush crosses is posted to the webhook too. Nothing
    # that can fail runs between the storage's build and its release step.
    acquired.add("budget alerts", alerts.aclose)
    acquired.add("storage", storage.storage.aclose)
    telemetry.watch_count("budget_webhook_failures", lambda: alerts.failed_deliveries)
    events = storage.events
    costs = build_cost_control(settings, storage, alerts, generator, clock, telemetry)
    # Before the storage: the spend writes of callers gone reach the ledger's last flush.
    acquired.add("cost control", costs.finish_writes)
    embedded = storage.storage if isinstance(storage.storage, EmbeddedStorage) else None
    cache = SemanticCache(
        storage.store,
        index,
        clock,
        distrust=Distrust(settings.cache.feedback_radius, settings.cache.feedback_penalty),
        stale_grace_seconds=settings.upstream.stale_grace_seconds,
        policy=parts.hit_policy or build_hit_policy(settings, embedder.name),
        seen_whole=embedder.sees_whole if isinstance(embedder, SeesWhole) else None,
        # An acknowledged removal is in the snapshot: a crash cannot bring it back.
        removals_saved=embedded.removals_saved if embedded is not None else None,
    )
    acquired.add("the cache's puts and owed removals", cache.aclose)
    telemetry.watch_count("cache_bypassed", lambda: cache.bypassed)
    if embedded is not None:
        embedded.keep_penalties(cache)  # in the snapshot, or a restart forgot them
    if isinstance(storage.storage, RedisStorage):
        # Entries other replicas (or the sweep) remove take their penalties along.
        storage.storage.sync.on_removed(cache.forget_removed)
    pipeline = Pipeline(
        PipelineParts(
            authenticator=build_tenants(settings, build_key_registry(settings, storage.link)),
            limits=settings.limits,
            spend=storage.spend,
            cache=cache,
            embeddings=embeddings,
            classifier=classifier,
            generator=generator,
            events=events,
            clock=clock,
            telemetry=telemetry,
            costs=costs,
        )
    )
    return Service(
        settings, pipeline, embeddings, generator, events, telemetry, storage.storage,
        classifier=classifier, costs=costs, owned=acquired,
    )  # fmt: skip


def open_events(
    settings: Settings, parts: Overrides, acquired: Acquired, telemetry: Telemetry
) -> EventSink | None:
    """The sink given in code, else events.path's JSONL file (opened here, so that a later
    failure of the build closes it), else None: build_storage picks the backend's own."""
    if parts.events is not None or settings.events.path is None:
        return parts.events
    event_log = JsonlEventLog(settings.events.path)
    acquired.add("the event log", event_log.close)
    # The events a full disk (or a read-only file system) dropped: without it only a log line.
    telemetry.watch_count("events_dropped", lambda: event_log.dropped)
    return event_log


def build_budget_alerts(
    settings: Settings, events: EventSink, telemetry: Telemetry
) -> BudgetAlerts:
    budgets = settings.budgets
    url = budgets.alert_webhook_url
    return BudgetAlerts(
        events,
        telemetry,
        url.get_secret_value() if url is not None else None,
        budgets.webhook_timeout_seconds,
    )


def build_cost_control(
    settings: Settings,
    storage: StorageParts,
    alerts: BudgetAlerts,
    generator: Generator,
    clock: Callable[[], float],
    telemetry: Telemetry,
) -> CostControl:
    costs = CostControl(
        storage.quotas, storage.spend, alerts, generator, settings.limits.max_output_tokens,
        clock, telemetry,
    )  # fmt: skip
    if isinstance(storage.spend, RedisSpendLedger):
        # Spend settled while Redis was down is judged against soft budgets when it lands.
        storage.spend.on_flushed(costs.spend_flushed)
    return costs


async def start_service(settings: Settings, overrides: Overrides | None = None) -> Service:
    """Start listening at once (health NOT_SERVING), load models, index and store, then serve.

    `service.server.port` is the bound gRPC port, `service.metrics_port` the metrics port.
    """
    # A missing secret stops the start before a port opens (a client given in code needs none).
    settings.upstream.check_keys(given_upstreams(overrides or Overrides()))
    servicer = RouteCacheServicer(None)
    server = await start_server(
        servicer, settings.server, DEPENDENCIES, max_request_bytes=settings.limits.max_request_bytes
    )
    acquired = Acquired()
    service: Service | None = None
    # Loading the models takes seconds: off the loop, so health checks answer meanwhile.
    building = asyncio.ensure_future(
        asyncio.to_thread(build_service, settings, overrides, acquired)
    )
    try:
        # Shielded: a cancel cannot stop the thread, so the build is waited out and released.
        service = await asyncio.shield(building)
        service.server = server
        # The first forward pass is several times slower than the rest; pay it before SERVING.
        await service.embeddings.embed("warm up")
        if settings.metrics.enabled and isinstance(service.telemetry, PrometheusTelemetry):
            registry = service.telemetry.registry
            host, port = settings.metrics.host, settings.metrics.port
            try:
                service.metrics = MetricsServer(registry, host, port)
            except OSError as error:
                raise ListenError(f"metrics on {host}:{port}: {error}") from error
        # NOT_SERVING until the index holds what the store holds (a Redis rebuild takes a while).
        await service.start_storage(server.set_cache_serving)
    except BaseException as error:
        await release_failed_start(service, server, acquired, building)
        if isinstance(error, OSError | SnapshotError) and not isinstance(error, ListenError):
            # A file the settings name (event log, verifier, snapshot) is missing or unusable:
            # not a port problem, and worth one line rather than a traceback.
            raise ConfigError(f"cannot start: {error}") from error
        raise
    servicer.attach(service.pipeline)
    for dependency in DEPENDENCIES:
        await server.set_dependency(dependency, serving=True)
    await server.set_serving(True)
    if isinstance(service.classifier, ReloadingClassifier):
        interval = settings.classifier.reload_interval_seconds
        service.background.append(asyncio.create_task(service.classifier.watch(interval)))
    return service


async def release_failed_start(
    service: Service | None,
    server: RunningServer,
    acquired: Acquired,
    building: asyncio.Future[Service],
) -> None:
    """The whole service if it was built, else the port and what the build acquired.

    The start's own error is the one worth reporting: a release failing too was logged.
    """
    with contextlib.suppress(Exception):
        if service is not None:
            await service.aclose()
        else:
            # Shielded: a second cancel by the caller ends its wait, not the release.
            await asyncio.shield(release_after_build(building, server, acquired))


async def release_after_build(
    building: asyncio.Future[Service], server: RunningServer, acquired: Acquired
) -> None:
    # A start cancelled mid-build: its thread goes on acquiring parts, so wait for it to end
    # (built or failed) before releasing what it acquired. Failures are logged by release_all;
    # none escapes, as after a second cancel nobody would read it.
    with contextlib.suppress(Exception):
        await building
    with contextlib.suppress(Exception):
        await release_all([("the gRPC server", server.stop), *acquired.steps()])

"""Prometheus telemetry: one CollectorRegistry per service, served over HTTP for scraping."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from routecache.domain import Completion
from routecache.router.budget import SpendRecord
from routecache.router.telemetry import WATCHED_COUNTS, RequestPath, path_of

# Exact hits take well under a millisecond, strong-model calls seconds: buckets span both.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _WatchedCounts(Collector):
    """Totals a part keeps itself (RedisLink.refusals, ...), read at scrape time, so no call
    site on a degraded path has to report to telemetry as well."""

    def __init__(self) -> None:
        self._counts: dict[str, Callable[[], float]] = {}

    def watch(self, name: str, count: Callable[[], float]) -> None:
        if name not in WATCHED_COUNTS:
            raise ValueError(f"unknown count {name!r}: add it to telemetry.WATCHED_COUNTS")
        self._counts[name] = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        # Every family, sampled once watched: like a labelled metric with no series yet, an
        # unwatched one (no Redis on the memory backend) is named with no sample.
        for name, help_text in WATCHED_COUNTS.items():
            family = CounterMetricFamily(f"routecache_{name}", help_text)
            if name in self._counts:
                family.add_metric([], self._counts[name]())
            yield family


class PrometheusTelemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._latency = Histogram(
            "routecache_request_latency_seconds",
            "Complete latency by path (error: a failed Complete)",
            ["path"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._requests = Counter(
            "routecache_requests", "Requests by tenant and path", ["tenant", "path"], registry=r
        )
        # `call`: complete (Complete and its stream, the calls routecache_requests_total
        # counts) or admin (Feedback, Invalidate, GetStats): an error ratio over requests
        # takes call="complete" alone, else a failing admin call raised it.
        self._errors = Counter(
            "routecache_errors", "Failed calls by reason", ["tenant", "reason", "call"],
            registry=r,
        )  # fmt: skip
        self._in_flight = Gauge("routecache_in_flight_requests", "Requests being handled",
                                registry=r)  # fmt: skip
        self._escalations = Counter(
            "routecache_escalations", "Cheap answers escalated to the strong model", ["tenant"],
            registry=r,
        )  # fmt: skip
        self._validator_failures = Counter(
            "routecache_validator_failures", "Failed validator checks", ["validator"], registry=r
        )
        self._tokens = Counter(
            "routecache_tokens", "Model tokens paid for", ["tenant", "tier", "kind"], registry=r
        )
        self._cost = Counter("routecache_cost_usd", "Spend on models", ["tenant", "tier"],
                             registry=r)  # fmt: skip
        self._saved = Counter(
            "routecache_saved_usd", "Model spend avoided by cache hits and shared calls",
            ["tenant"], registry=r,
        )  # fmt: skip
        self._upstream_latency = Histogram(
            "routecache_upstream_latency_seconds", "Model call latency", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._upstream_errors = Counter(
            "routecache_upstream_errors", "Failed model calls", ["model", "reason"], registry=r
        )
        self._feedback = Counter(
            "routecache_feedback", "Feedback by rating", ["tenant", "rating"], registry=r
        )
        self._feedback_invalidations = Counter(
            "routecache_feedback_invalidations", "Entries removed by a thumbs-down", ["tenant"],
            registry=r,
        )  # fmt: skip
        self._queue = Gauge("routecache_queue_depth", "Items waiting", ["queue"], registry=r)
        self._breaker = Gauge(
            "routecache_breaker_state", "0 closed, 1 half-open, 2 open", ["provider"], registry=r
        )
        self._budget_alerts = Counter(
            "routecache_budget_alerts", "Soft budgets crossed", ["tenant", "period"], registry=r
        )
        self._cost_control = Counter(
            "routecache_cost_control", "Requests rate limited, refused at a cap or downgraded",
            ["tenant", "outcome"], registry=r,
        )  # fmt: skip
        self._dependency = Gauge(
            "routecache_dependency_up", "1 if the dependency is reachable", ["dependency"],
            registry=r,
        )  # fmt: skip
        self._counts = _WatchedCounts()
        r.register(self._counts)

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_ended(self) -> None:
        self._in_flight.dec()

    def request_completed(self, tenant: str, completion: Completion, seconds: float,
                          failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        path = path_of(completion)
        self._latency.labels(path.value).observe(seconds)
        self._requests.labels(tenant, path.value).inc()
        if completion.usage.saved_usd:
            self._saved.labels(tenant).inc(completion.usage.saved_usd)
        for name in failed_validators:
            self._validator_failures.labels(name).inc()

    def escalated(self, tenant: str) -> None:
        self._escalations.labels(tenant).inc()

    def request_failed(self, tenant: str, reason: str, seconds: float,
                       failed_validators: tuple[str, ...] = ()) -> None:  # fmt: skip
        self._latency.labels(RequestPath.ERROR.value).observe(seconds)
        self._requests.labels(tenant, RequestPath.ERROR.value).inc()
        self._errors.labels(tenant, reason, "complete").inc()
        for name in failed_validators:
            self._validator_failures.labels(name).inc()

    def admin_call_failed(self, tenant: str, reason: str) -> None:
        self._errors.labels(tenant, reason, "admin").inc()

    def upstream_call(self, model: str, seconds: float, error: str | None) -> None:
        self._upstream_latency.labels(model).observe(seconds)
        if error is not None:
            self._upstream_errors.labels(model, error).inc()

    def feedback(self, tenant: str, thumbs_up: bool, invalidated: bool) -> None:
        self._feedback.labels(tenant, "up" if thumbs_up else "down").inc()
        if invalidated:
            self._feedback_invalidations.labels(tenant).inc()

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        self._queue.labels(name).set_function(depth)

    def watch_breaker(self, provider: str, state: Callable[[], float]) -> None:
        self._breaker.labels(provider).set_function(state)

    def watch_dependency(self, name: str, up: Callable[[], bool]) -> None:
        self._dependency.labels(name).set_function(lambda: float(up()))

    def watch_count(self, name: str, count: Callable[[], float]) -> None:
        self._counts.watch(name, count)

    def budget_alert(self, tenant: str, period: str) -> None:
        self._budget_alerts.labels(tenant, period).inc()

    def spent(self, tenant: str, tier: str, record: SpendRecord) -> None:
        # From the cost control's every spend write, not from completed requests: refused
        # answers, cut-short streams and calls before a later failure were paid for too, and
        # the ledger counts them.
        if record.cost_usd:
            self._cost.labels(tenant, tier).inc(record.cost_usd)
        if record.prompt_tokens or record.completion_tokens:
            self._tokens.labels(tenant, tier, "prompt").inc(record.prompt_tokens)
            self._tokens.labels(tenant, tier, "completion").inc(record.completion_tokens)

    def cost_control(self, tenant: str, outcome: str) -> None:
        self._cost_control.labels(tenant, outcome).inc()


class MetricsServer:
    """The /metrics HTTP endpoint of one registry, on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

"""The dashboard and alert rules only use series the service exports, and the deployment
examples parse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from routecache.router.metrics import PrometheusTelemetry
from routecache.router.pipeline import _SERVER_SIDE
from routecache.router.settings import load_settings
from routecache.router.telemetry import WATCHED_COUNTS

ROOT = Path(__file__).resolve().parents[2]
SERIES = re.compile(r"routecache_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported_families() -> set[str]:
    return {family.name for family in PrometheusTelemetry().registry.collect()}


def family_of(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


@pytest.mark.parametrize(
    "path", ["deploy/grafana/routecache.json", "deploy/prometheus/alerts.yaml"]
)
def test_queries_name_only_exported_series(path: str) -> None:
    text = (ROOT / path).read_text()
    used = {family_of(s) for s in SERIES.findall(text)}
    assert used, "no routecache series referenced"
    assert used <= exported_families(), used - exported_families()


def test_dashboard_is_valid_json_with_panels() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/routecache.json").read_text())
    assert dashboard["uid"] == "routecache" and len(dashboard["panels"]) >= 10


def test_deployment_examples_parse() -> None:
    kinds = set()
    for path in [*ROOT.glob("deploy/k8s/*.yaml"), ROOT / "deploy/compose.yaml"]:
        for document in yaml.safe_load_all(path.read_text()):
            kinds.add(document.get("kind", path.name))
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds


def test_kubernetes_config_is_a_valid_settings_file(tmp_path: Path) -> None:
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())
    config = tmp_path / "config.toml"
    config.write_text(configmap["data"]["config.toml"])
    settings = load_settings(config)
    assert settings.server.host == "0.0.0.0" and settings.metrics.port == 9464
    assert settings.logging.format == "json" and settings.tenants


def test_compose_replicas_share_the_redis_store(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    environment = compose["x-routecache"]["environment"]
    for name, value in environment.items():
        if name != "ROUTECACHE_CONFIG":  # mounted from examples/dev.toml
            monkeypatch.setenv(name, str(value))
    settings = load_settings(ROOT / "examples/dev.toml")
    assert settings.store.backend == "redis"
    assert settings.store.redis_url.get_secret_value() == "redis://redis:6379/0"
    assert "redis" in compose["services"]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/routecache.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_dashboard_shows_every_degraded_mode_count() -> None:
    # Before: the six counts of Redis, rate-limit, cache, event and webhook fallbacks were
    # exported but on no panel, so a replica running degraded looked healthy on the dashboard.
    queries = "\n".join(_dashboard_queries())
    missing = [n for n in WATCHED_COUNTS if f"increase(routecache_{n}_total[" not in queries]
    assert missing == []


def test_failed_budget_webhooks_raise_a_warning() -> None:
    # A webhook that stopped taking alerts silences the budget alerts sent through it.
    rules = [r for r in _alert_rules() if "routecache_budget_webhook_failures_total" in r["expr"]]
    assert [rule["labels"]["severity"] for rule in rules] == ["warning"]


def test_the_error_rate_alert_counts_every_server_side_failure_of_complete_calls_only() -> None:
    # Before: reason=~"unavailable|failed_validation" never fired when every request ended
    # INTERNAL, and the numerator held failed admin calls the denominator (Complete's
    # requests) leaves out.
    rule = next(r for r in _alert_rules() if r["alert"] == "RouteCacheHighErrorRate")
    found = re.search(r"routecache_errors_total\{([^}]*)\}", rule["expr"])
    assert found is not None
    matchers = dict(re.findall(r'(\w+)=~?"([^"]*)"', found.group(1)))
    assert matchers.get("call") == "complete"
    assert [r for r in sorted(_SERVER_SIDE) if not re.fullmatch(matchers["reason"], r)] == []


def test_every_alert_rule_has_a_row_in_the_operations_page() -> None:
    operations = (ROOT / "docs/operations.md").read_text()
    assert [r["alert"] for r in _alert_rules() if f"| {r['alert']} |" not in operations] == []


def _k8s(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()))


def test_kubernetes_replicas_share_the_redis_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the ConfigMap had no [store] section, so each of the 2-10 pods kept its own spend,
    # rate limits and cache (memory backend): N times the daily cap, Invalidate on one pod only.
    [deployment] = _k8s("deployment.yaml")
    hpa = next(d for d in _k8s("hpa.yaml") if d["kind"] == "HorizontalPodAutoscaler")
    assert deployment["spec"]["replicas"] > 1 and hpa["spec"]["maxReplicas"] > 1
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    secret = env["ROUTECACHE_STORE__REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"]  # the URL may carry a password: never in the file
    monkeypatch.setenv("ROUTECACHE_STORE__REDIS_URL", "redis://routecache-redis:6379/0")
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())
    config = tmp_path / "config.toml"
    config.write_text(configmap["data"]["config.toml"])
    assert load_settings(config).store.backend == "redis"


def test_kubernetes_example_ships_the_redis_it_points_at() -> None:
    resources = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())["resources"]
    documents = [d for name in resources for d in _k8s(name)]
    services = {d["metadata"]["name"] for d in documents if d["kind"] == "Service"}
    redis = [d for d in documents if d["kind"] == "Deployment" and "redis" in d["metadata"]["name"]]
    assert "routecache-redis" in services and len(redis) == 1
    assert redis[0]["spec"]["replicas"] == 1  # one node: the scripts need every key on it
    # The documented Secret command names the Service the manifest ships.
    kustomization = (ROOT / "deploy/k8s/kustomization.yaml").read_text()
    assert "url=redis://routecache-redis:6379/0" in kustomization


def test_the_settings_the_image_sets_by_environment_are_said_to_override_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The image's ENV ranks above an operator's TOML: `[server] host = "127.0.0.1"` in the
    # mounted file was silently ignored. Each such variable is named where operators look.
    runtime = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    code = "\n".join(line for line in runtime.splitlines() if not line.lstrip().startswith("#"))
    notes = "\n".join(line for line in runtime.splitlines() if line.lstrip().startswith("#"))
    baked = dict(re.findall(r"(ROUTECACHE_[A-Z_]+)=(\S+)", code))
    assert baked
    deployment = (ROOT / "docs/operations.md").read_text().split("## Deployment", 1)[1]
    for name in baked:
        assert name in notes and name in deployment, name
    # What the notes say is so: the variable beats the file.
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\n[metrics]\nhost = "127.0.0.1"\n')
    for name, value in baked.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert (settings.server.host, settings.metrics.host) == ("0.0.0.0", "0.0.0.0")

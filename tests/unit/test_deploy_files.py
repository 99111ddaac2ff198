"""The dashboard and alert rules only use series the service exports, and the deployment
examples parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from routecache.router.metrics import PrometheusTelemetry
from routecache.router.settings import load_settings

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

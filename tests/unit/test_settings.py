import math
import re
from pathlib import Path
from typing import Any

import pytest

from routecache.domain import Budget, OperatingPoint, OverCapPolicy, Tier
from routecache.router import bootstrap
from routecache.router.auth import ApiKeyAuthenticator, hash_api_key
from routecache.router.bootstrap import build_tenants
from routecache.router.budget import Cap, Period
from routecache.router.costs import caps_of
from routecache.router.settings import ConfigError, load_settings
from tests.fakes import FakeUpstream, RecordingTelemetry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/dev.toml"


def test_example_config_loads_and_its_keys_authenticate() -> None:
    settings = load_settings(EXAMPLE)
    auth: ApiKeyAuthenticator = build_tenants(settings)
    assert auth.authenticate("dev-key-acme").name == "acme"
    globex = auth.authenticate("dev-key-globex")
    assert globex.name == "globex" and globex.routing_threshold is None
    assert globex.operating_point == OperatingPoint(quality=0.9)
    assert auth.authenticate("dev-key-acme").operating_point is None


def test_operating_targets_are_one_at_most_and_tenants_inherit_the_default() -> None:
    with pytest.raises(ConfigError, match="at most one"):
        load_settings(classifier={"target_quality": 0.8, "max_cost_ratio": 0.5})
    settings = load_settings(
        classifier={"target_strong_fraction": 0.3},
        tenants=[
            {"name": "a", "api_key_sha256": [hash_api_key("ka")]},
            {"name": "b", "api_key_sha256": [hash_api_key("kb")], "max_cost_ratio": 0.4},
        ],
    )
    auth = build_tenants(settings)
    assert auth.authenticate("ka").operating_point == OperatingPoint(strong_fraction=0.3)
    assert auth.authenticate("kb").operating_point == OperatingPoint(cost_ratio=0.4)
    # A tenant's own target beats a service-wide threshold; a tenant threshold beats both.
    settings = load_settings(
        classifier={"routing_threshold": 0.2},
        tenants=[
            {"name": "a", "api_key_sha256": [hash_api_key("ka")], "target_quality": 0.9},
            {"name": "b", "api_key_sha256": [hash_api_key("kb")], "routing_threshold": 0.3},
            {"name": "c", "api_key_sha256": [hash_api_key("kc")]},
        ],
    )
    auth = build_tenants(settings)
    a, b, c = (auth.authenticate(key) for key in ("ka", "kb", "kc"))
    assert (a.routing_threshold, a.operating_point) == (None, OperatingPoint(quality=0.9))
    assert (b.routing_threshold, b.operating_point) == (0.3, None)
    assert (c.routing_threshold, c.operating_point) == (0.2, None)


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTECACHE_SERVER__PORT", "6000")
    assert load_settings(EXAMPLE).server.port == 6000


def test_missing_file_and_bad_values_fail_fast_with_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[cache]\nsimilarity_threshold = 1.5\n"
        '[[tenants]]\nname = "x"\napi_key_sha256 = ["nothex"]\n'
    )
    with pytest.raises(ConfigError) as error:
        load_settings(bad)
    assert "cache.similarity_threshold" in str(error.value)
    assert "tenants.0.api_key_sha256" in str(error.value)
    monkeypatch.setenv("ROUTECACHE_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings()


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("[cache]\nsimilarity_treshold = 0.9\n")
    with pytest.raises(ConfigError, match="similarity_treshold"):
        load_settings(typo)


def test_spend_retention_shorter_than_its_period_is_refused() -> None:
    # The monthly spend hash's expiry is renewed on each settle: kept for less than a month,
    # it would vanish in a quiet spell mid-month and the monthly hard cap would start over.
    with pytest.raises(ConfigError, match=r"budgets\.month_retention_days"):
        load_settings(budgets={"month_retention_days": 7})
    assert load_settings(budgets={"month_retention_days": 31}).budgets.month_retention_days == 31


def test_a_length_validator_no_answer_can_pass_is_refused() -> None:
    # Every answer failed it, after the cheap and the strong model were both paid for.
    with pytest.raises(ConfigError, match="min_chars must not exceed max_chars"):
        load_settings(validators=[{"kind": "length", "min_chars": 50, "max_chars": 10}])
    with pytest.raises(ConfigError, match=r"min_chars 30000 exceeds limits\.max_answer_chars"):
        too_long = {"kind": "length", "min_chars": 30_000}
        load_settings(tenants=[{"name": "acme", "validators": [too_long]}])
    fits = load_settings(limits={"max_answer_chars": 40_000},
                         validators=[{"kind": "length", "min_chars": 30_000}])  # fmt: skip
    assert fits.validators[0].min_chars == 30_000


def test_a_tenant_named_twice_is_refused() -> None:
    # Two entries of one name share its spend, buckets and cache, yet each of their keys would
    # carry its own caps; a registry key would get whichever came last.
    with pytest.raises(ConfigError, match="tenant acme is configured twice"):
        load_settings(tenants=[{"name": "acme", "budget": {"daily_usd": 1.0}},
                               {"name": "acme", "budget": {"daily_usd": 100.0}}])  # fmt: skip


@pytest.mark.parametrize(
    ("tenants", "message"),
    [([{"name": "a", "api_key_sha256": [hash_api_key("shared")]},
       {"name": "b", "api_key_sha256": [hash_api_key("shared")]}],
      "an API key digest is configured for tenants a and b"),
     ([{"name": "a", "api_key_sha256": [hash_api_key("shared")] * 2}],
      "tenant a lists an API key digest twice")],
    ids=["two tenants", "one tenant twice"],
)  # fmt: skip
def test_a_key_configured_twice_is_refused_when_the_settings_load(
    tenants: list[dict[str, object]], message: str
) -> None:
    # It was a ValueError traceback from serve, raised only after the port had opened and the
    # models had loaded; a key listed twice for one tenant was said to be for two tenants.
    with pytest.raises(ConfigError, match=f"{message}: {hash_api_key('shared')}"):
        load_settings(tenants=tenants)


def test_the_store_defaults_to_the_embedded_one_and_redis_is_chosen_by_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from routecache.backends.redis_store import RedisEntryStore
    from routecache.backends.storage import EmbeddedStorage, RedisStorage
    from routecache.cache.faiss_index import ScopedFaissIndex
    from routecache.router.bootstrap import build_storage

    default = load_settings()
    assert default.store.backend == "memory" and default.store.snapshot_path is None
    embedded = build_storage(default, ScopedFaissIndex(8), lambda: 0.0, None)
    assert isinstance(embedded.storage, EmbeddedStorage)

    monkeypatch.setenv("ROUTECACHE_STORE__BACKEND", "redis")
    monkeypatch.setenv("ROUTECACHE_STORE__REDIS_URL", "redis://127.0.0.1:1/0")
    chosen = load_settings()
    assert chosen.store.redis_url.get_secret_value() == "redis://127.0.0.1:1/0"
    assert "127.0.0.1:1" not in repr(chosen.store)  # the URL may carry a password
    parts = build_storage(chosen, ScopedFaissIndex(8), lambda: 0.0, None)
    assert isinstance(parts.store, RedisEntryStore) and isinstance(parts.storage, RedisStorage)
    with pytest.raises(ConfigError, match=r"store\.backend"):
        load_settings(store={"backend": "memcached"})


FAILOVER_EXAMPLE = EXAMPLE.parent / "failover.toml"


def test_failover_example_builds_chains_and_tenant_validators(tmp_path: Path) -> None:
    settings = load_settings(FAILOVER_EXAMPLE)
    assert [n for n, _ in settings.upstream.chain("cheap")] == ["cheap", "cheap-backup"]
    assert [n for n, _ in settings.upstream.chain("strong")] == ["strong", "strong-backup"]
    assert [v.kind for v in settings.validators] == ["length", "json_schema", "pii"]
    acme = settings.tenants[0]
    assert acme.validators is not None
    assert [(v.kind, v.on_fail) for v in acme.validators] == [
        ("refusal", "retry"),
        ("regex", "block"),
    ]


def test_a_provider_in_both_fallback_lists_is_one_client_and_one_breaker() -> None:
    # Two would leak the client providers() does not list, and a provider failing for one
    # tier would still be called, breaker closed, by the other.
    backup = {"model": "m", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}
    settings = load_settings(upstream={"providers": {"backup": backup},
                                       "cheap_fallbacks": ["backup"],
                                       "strong_fallbacks": ["backup"]})  # fmt: skip
    clients = {name: FakeUpstream(name) for name in ("cheap", "strong", "backup")}
    failover = bootstrap.build_failover(
        settings, bootstrap.Overrides(providers=clients), RecordingTelemetry()
    )
    cheap_backup = failover.chain(Tier.CHEAP, strong_fallback=False)[-1][1]
    strong_backup = failover.chain(Tier.STRONG)[-1][1]
    assert cheap_backup is strong_backup
    assert [p.name for p in failover.providers()] == ["cheap", "backup", "strong"]


def test_provider_keys_come_from_env_or_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(FAILOVER_EXAMPLE)
    strong = settings.upstream.strong
    with pytest.raises(ConfigError, match="ROUTECACHE_EXAMPLE_STRONG_KEY is not set"):
        strong.resolve_api_key()
    monkeypatch.setenv("ROUTECACHE_EXAMPLE_STRONG_KEY", "sk-env")
    assert strong.resolve_api_key() == "sk-env"
    backup = settings.upstream.providers["strong-backup"]
    with pytest.raises(ConfigError, match="cannot read api_key_file"):
        backup.resolve_api_key()
    secret = tmp_path / "key"
    secret.write_text("sk-file\n")
    assert backup.model_copy(update={"api_key_file": secret}).resolve_api_key() == "sk-file"


def test_a_key_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # A key saved in another encoding was a UnicodeDecodeError traceback from `serve`.
    secret = tmp_path / "key"
    secret.write_bytes(b"sk-caf\xe9\n")
    backup = load_settings(FAILOVER_EXAMPLE).upstream.providers["strong-backup"]
    with pytest.raises(ConfigError, match=rf"cannot read api_key_file {secret}: not UTF-8"):
        backup.model_copy(update={"api_key_file": secret}).resolve_api_key()


def test_an_empty_key_file_is_a_config_error(tmp_path: Path) -> None:
    # As with an empty key variable: the key would be sent as "Bearer " and fail every call.
    secret = tmp_path / "key"
    secret.write_text("\n")
    backup = load_settings(FAILOVER_EXAMPLE).upstream.providers["strong-backup"]
    with pytest.raises(ConfigError, match=rf"api_key_file {secret} is empty"):
        backup.model_copy(update={"api_key_file": secret}).resolve_api_key()


def test_fallback_to_an_undefined_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown provider.*nowhere"):
        load_settings(upstream={"cheap_fallbacks": ["nowhere"]})


@pytest.mark.parametrize("tier", ["cheap", "strong"])
def test_a_fallback_provider_named_like_a_tier_is_refused(tier: str) -> None:
    # A provider's name keys its client and breaker: one named like a tier would be replaced by
    # that tier's first provider, so a fallback list naming it would never call it.
    backup = {"model": "m-backup", "input_usd_per_mtok": 5, "output_usd_per_mtok": 5}
    with pytest.raises(ConfigError, match=rf"upstream.providers: '{tier}' is a tier's name"):
        load_settings(upstream={"providers": {tier: backup}, f"{tier}_fallbacks": [tier]})


def test_an_environment_variable_naming_no_section_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ROUTECACHE_SERVER__PROT was refused, but a typo in the section itself was ignored silently.
    monkeypatch.setenv("ROUTECACHE_LOGING__FORMAT", "json")
    with pytest.raises(ConfigError, match="ROUTECACHE_LOGING__FORMAT"):
        load_settings(EXAMPLE)


def test_a_nested_setting_with_one_underscore_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # ROUTECACHE_SERVER_PORT was ignored without a word: the service came up on the default port.
    monkeypatch.setenv("ROUTECACHE_SERVER_PORT", "6000")
    with pytest.raises(ConfigError, match=r"ROUTECACHE_SERVER_PORT.*ROUTECACHE_SERVER__PORT"):
        load_settings(EXAMPLE)


def test_a_key_variable_named_like_a_section_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTECACHE_UPSTREAM_STRONG_KEY", "k")
    strong = {
        "model": "gpt-4",
        "input_usd_per_mtok": 10.0,
        "output_usd_per_mtok": 30.0,
        "api_key_env": "ROUTECACHE_UPSTREAM_STRONG_KEY",
    }
    settings = load_settings(upstream={"strong": strong})
    assert settings.upstream.strong.resolve_api_key() == "k"


def test_a_section_variable_that_is_not_json_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before, pydantic-settings' own error escaped as a traceback.
    monkeypatch.setenv("ROUTECACHE_EVENTS", "/tmp/events.parquet")
    with pytest.raises(ConfigError, match=r'invalid configuration: .*"events"'):
        load_settings(EXAMPLE)


def test_a_config_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("server = [\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML: Invalid value"):
        load_settings(config)


def test_other_routecache_variables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Single-level names are not settings (ROUTECACHE_CONFIG, a provider's api_key_env).
    monkeypatch.setenv("ROUTECACHE_EXAMPLE_STRONG_KEY", "k")
    monkeypatch.setenv("routecache_logging__format", "json")
    assert load_settings(EXAMPLE).logging.format == "json"


async def test_a_missing_provider_key_stops_the_start_before_a_port_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ROUTECACHE_EXAMPLE_STRONG_KEY", raising=False)
    opened: list[object] = []

    async def start_server(*args: object, **kwargs: object) -> None:
        opened.append(args)
        raise AssertionError("the port opened before the configuration was checked")

    monkeypatch.setattr(bootstrap, "start_server", start_server)
    with pytest.raises(ConfigError, match="ROUTECACHE_EXAMPLE_STRONG_KEY is not set"):
        await bootstrap.start_service(load_settings(FAILOVER_EXAMPLE))
    assert opened == []


async def test_a_provider_given_in_code_needs_no_key_at_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its client is not built from the settings, so its key is never read (as before the
    # early check); only the keys of providers the service builds must be there.
    monkeypatch.delenv("ROUTECACHE_EXAMPLE_STRONG_KEY", raising=False)

    class PortOpened(Exception):
        pass

    async def start_server(*args: object, **kwargs: object) -> None:
        raise PortOpened

    monkeypatch.setattr(bootstrap, "start_server", start_server)
    settings = load_settings(FAILOVER_EXAMPLE)
    given = {name: FakeUpstream(name) for name in ("strong", "strong-backup")}
    with pytest.raises(PortOpened):
        await bootstrap.start_service(settings, bootstrap.Overrides(providers=given))
    unused = settings.model_copy(deep=True)
    unused.upstream.strong_fallbacks = []  # strong-backup is defined, but no chain calls it
    with pytest.raises(PortOpened):
        await bootstrap.start_service(
            unused, bootstrap.Overrides(providers={"strong": given["strong"]})
        )


def test_a_tenants_own_cache_thresholds_beat_the_defaults() -> None:
    settings = load_settings(
        cache={"similarity_threshold": 0.8, "max_false_hit_rate": 0.05},
        tenants=[
            {"name": "a", "api_key_sha256": [hash_api_key("ka")]},
            {"name": "b", "api_key_sha256": [hash_api_key("kb")],
             "similarity_threshold": 0.95, "max_false_hit_rate": 0.01, "default_ttl_seconds": 60},
        ],
    )  # fmt: skip
    auth = build_tenants(settings)
    a, b = auth.authenticate("ka"), auth.authenticate("kb")
    assert (a.similarity_threshold, a.max_false_hit_rate) == (0.8, 0.05)
    assert (b.similarity_threshold, b.max_false_hit_rate) == (0.95, 0.01)
    assert (a.default_ttl_seconds, b.default_ttl_seconds) == (7 * 24 * 3600, 60)


def test_a_tenants_daily_cap_is_budget_daily_usd_else_the_older_daily_budget_usd() -> None:
    settings = load_settings(
        tenants=[
            {"name": "both", "api_key_sha256": [hash_api_key("kb")], "daily_budget_usd": 5.0,
             "budget": {"daily_usd": 2.0}},
            {"name": "older", "api_key_sha256": [hash_api_key("ko")], "daily_budget_usd": 5.0},
            {"name": "zero", "api_key_sha256": [hash_api_key("kz")], "daily_budget_usd": 5.0,
             "budget": {"daily_usd": 0.0}},
            {"name": "none", "api_key_sha256": [hash_api_key("kn")]},
        ],
    )  # fmt: skip
    auth = build_tenants(settings)
    assert caps_of(auth.authenticate("kb").budget) == [Cap(Period.DAY, 2.0)]
    assert caps_of(auth.authenticate("ko").budget) == [Cap(Period.DAY, 5.0)]
    assert caps_of(auth.authenticate("kz").budget) == [Cap(Period.DAY, 0.0)]  # set, if 0
    assert caps_of(auth.authenticate("kn").budget) == []


def test_every_budget_setting_reaches_the_tenant() -> None:
    budget = {"daily_usd": 1.0, "monthly_usd": 2.0, "soft_daily_usd": 0.5,
              "soft_monthly_usd": 1.5, "user_daily_usd": 0.1, "user_monthly_usd": 0.2,
              "policy": "downgrade"}  # fmt: skip
    settings = load_settings(
        tenants=[{"name": "a", "api_key_sha256": [hash_api_key("ka")], "budget": budget}]
    )
    tenant = build_tenants(settings).authenticate("ka")
    assert tenant.budget == Budget(1.0, 2.0, 0.5, 1.5, 0.1, 0.2, OverCapPolicy.DOWNGRADE)


def test_the_vector_index_runs_faiss_on_the_configured_threads() -> None:
    import threading

    import faiss
    import numpy as np

    from routecache.cache.faiss_index import ScopedFaissIndex

    # On whichever thread calls it: OpenMP's count is per thread (rebuilds, to_thread work).
    for threads in (1, 2):
        index = bootstrap.build_vector_index(load_settings(cache={"faiss_threads": threads}), 8)
        seen: list[int] = []

        def search(index: ScopedFaissIndex = index, seen: list[int] = seen) -> None:
            index.search("s", np.ones(8, dtype=np.float32), 1)
            seen.append(faiss.omp_get_max_threads())

        worker = threading.Thread(target=search)
        worker.start()
        worker.join()
        assert seen == [threads]


async def test_searches_on_the_loop_run_faiss_on_the_configured_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import faiss

    from routecache.domain import ChatRequest, Message, Role
    from tests.fakes import eventually
    from tests.unit.conftest import KEYS, unit_settings

    # OpenMP's thread count is per thread: set in build_service (a worker thread, by
    # asyncio.to_thread), the loop thread that searches kept one thread per core.
    before = faiss.omp_get_max_threads()
    wanted = before + 1  # unlike the loop thread's own count on any machine
    seen: list[int] = []
    search: Any = faiss.IndexIDMap2.search  # overloaded in the stubs

    def spy(self: faiss.Index, *args: object, **kwargs: object) -> object:
        seen.append(faiss.omp_get_max_threads())
        return search(self, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexIDMap2, "search", spy)
    settings = unit_settings(service={"server": {"port": 0}})
    settings.cache.faiss_threads = wanted
    service = await bootstrap.start_service(settings, _fake_parts())
    try:
        # A miss that stores, then another prompt: a lookup that searches the scope made.
        for prompt in ("count the apples", "count the pears"):
            request = ChatRequest(messages=(Message(Role.USER, prompt),))
            await service.pipeline.complete(request, KEYS["acme"])
            await eventually(lambda: len(service.pipeline.cache.index) > 0, "the first put")
    finally:
        await service.aclose()
        faiss.omp_set_num_threads(before)
    assert seen and set(seen) == {wanted}


def test_models_allowed_must_name_a_configured_model_when_the_settings_load() -> None:
    # Before: refused only when the service was built, the port already open.
    with pytest.raises(ConfigError, match=r"tenant a: models_allowed .* names neither"):
        load_settings(
            tenants=[{"name": "a", "api_key_sha256": [hash_api_key("ka")],
                      "models_allowed": ["no-such-model"]}]
        )  # fmt: skip


def _fake_parts() -> bootstrap.Overrides:
    from routecache.cache.embedder import HashEmbedder
    from routecache.classifier.model import FixedScoreClassifier
    from routecache.domain import Tier

    return bootstrap.Overrides(
        embedder=HashEmbedder(),
        classifier=FixedScoreClassifier(0.2),
        upstreams={Tier.CHEAP: FakeUpstream("cheap"), Tier.STRONG: FakeUpstream("strong")},
    )


async def test_an_unusable_file_at_start_is_a_config_error_not_a_taken_port(
    tmp_path: Path,
) -> None:
    from routecache.router.server import ListenError
    from tests.unit.conftest import unit_settings

    # events.path is a folder: the start used to fail with an OSError that `serve` reported
    # as "cannot listen (server.port ..., metrics.port ...)".
    settings = unit_settings(service={"events": {"path": str(tmp_path)}, "server": {"port": 0}})
    with pytest.raises(ConfigError, match=rf"cannot start: .*{tmp_path}") as error:
        await bootstrap.start_service(settings, _fake_parts())
    assert not isinstance(error.value, ListenError)


@pytest.mark.parametrize("kind", ["a folder", "not a snapshot"])
async def test_a_snapshot_path_that_cannot_be_restored_stops_the_start_in_one_line(
    tmp_path: Path, kind: str
) -> None:
    from tests.unit.conftest import unit_settings

    # A folder started an empty cache that no save could ever write (an error in the log each
    # interval); a file that is no snapshot was a JSONDecodeError traceback from `serve`.
    path = tmp_path / "notes.txt"
    if kind == "a folder":
        path.mkdir()
    else:
        path.write_text("my notes\n")
    settings = unit_settings({"snapshot_path": str(path)}, {"server": {"port": 0}})
    with pytest.raises(ConfigError, match=f"cannot start: .*{path}"):
        await bootstrap.start_service(settings, _fake_parts())
    assert path.is_dir() if kind == "a folder" else path.read_text() == "my notes\n"


async def test_a_snapshot_path_that_cannot_be_written_stops_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    from tests.unit.conftest import unit_settings

    # Before: the start only read (no snapshot yet: an empty start), went SERVING, and the first
    # save failed; every Invalidate or thumbs-down that removed an entry was UNAVAILABLE forever.
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "a-file" / "cache.jsonl"  # its folder cannot be made
    settings = unit_settings({"snapshot_path": str(path)}, {"server": {"port": 0}})
    with pytest.raises(ConfigError, match=f"cannot start: store.snapshot_path {path}: "):
        await bootstrap.start_service(settings, _fake_parts())
    assert (tmp_path / "a-file").read_text() == "x"


async def test_a_writable_snapshot_path_is_checked_without_leaving_a_file(tmp_path: Path) -> None:
    from tests.unit.conftest import unit_settings

    path = tmp_path / "new-folder" / "cache.jsonl"  # made at start, as the first save would
    settings = unit_settings({"snapshot_path": str(path)}, {"server": {"port": 0}})
    service = await bootstrap.start_service(settings, _fake_parts())
    try:
        assert list(path.parent.iterdir()) == []  # the check's file is gone, no snapshot yet
    finally:
        await service.aclose()


async def test_a_classifier_artifact_that_cannot_be_loaded_stops_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    import dataclasses

    from tests.unit.conftest import unit_settings

    # It was a ClassifierArtifactError traceback from `serve` (exit 1), not exit 2.
    missing = tmp_path / "difficulty.skops"
    settings = unit_settings(service={"server": {"port": 0}})
    settings.classifier.artifact = missing
    parts = dataclasses.replace(_fake_parts(), classifier=None)  # the configured one is built
    with pytest.raises(ConfigError, match=rf"cannot start: classifier\.artifact: .*{missing}"):
        await bootstrap.start_service(settings, parts)


async def test_a_taken_metrics_port_is_a_listen_error_naming_it() -> None:
    import socket

    from routecache.router.server import ListenError
    from tests.unit.conftest import unit_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = unit_settings(service={"server": {"port": 0}})
        metrics = base.metrics.model_copy(update={"port": port})
        settings = base.model_copy(update={"metrics": metrics})
        with pytest.raises(ListenError, match=rf"metrics on 127\.0\.0\.1:{port}"):
            await bootstrap.start_service(settings, _fake_parts())


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:notaport/0", "Port could not be cast to integer"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://[::1/0", "Invalid IPv6 URL"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_redis_url_redis_cannot_parse_is_refused_at_load(url: str, problem: str) -> None:
    # Refused before serve opens its port, not by a ValueError traceback at the first connection.
    with pytest.raises(ConfigError, match=rf"store\.redis_url: .*not a valid Redis URL.*{problem}"):
        load_settings(store={"backend": "redis", "redis_url": url})


def test_a_redis_url_without_a_redis_scheme_is_refused_at_load() -> None:
    # redis-py refused it only when the store first connected: a traceback from `serve`.
    with pytest.raises(ConfigError, match=r"store\.redis_url: .*redis://, rediss://, unix://"):
        load_settings(store={"backend": "redis", "redis_url": "localhost:6379"})
    assert load_settings(store={"redis_url": "unix:///run/redis.sock"}).store.redis_url


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # tomllib decodes the file as UTF-8: a file saved as Latin-1 was a UnicodeDecodeError
    # traceback from `serve`.
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text"):
        load_settings(config)


def test_a_problem_of_the_whole_configuration_has_no_empty_field_name() -> None:
    # Checks across sections have no location: the line read "invalid configuration: : Value
    # error, ...".
    with pytest.raises(ConfigError) as error:
        load_settings(validators=[{"kind": "length", "min_chars": 30_000}])
    assert str(error.value).startswith("invalid configuration: Value error, validator length:")


def test_a_provider_key_variable_that_is_set_but_empty_counts_as_not_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An empty key would be sent as "Bearer " and fail every call at the provider instead.
    monkeypatch.setenv("ROUTECACHE_EXAMPLE_STRONG_KEY", "")
    strong = load_settings(FAILOVER_EXAMPLE).upstream.strong
    with pytest.raises(ConfigError, match="ROUTECACHE_EXAMPLE_STRONG_KEY is not set"):
        strong.resolve_api_key()


def test_a_strong_fallback_to_an_undefined_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"strong_fallbacks names unknown provider\(s\) gone"):
        load_settings(upstream={"strong_fallbacks": ["gone"]})


def test_a_fallback_providers_key_variable_named_like_a_section_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTECACHE_UPSTREAM_BACKUP_KEY", "k")
    backup = {"model": "m", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0,
              "api_key_env": "ROUTECACHE_UPSTREAM_BACKUP_KEY"}  # fmt: skip
    settings = load_settings(
        upstream={"providers": {"backup": backup}, "cheap_fallbacks": ["backup"]}
    )
    assert settings.upstream.providers["backup"].resolve_api_key() == "k"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [({"kind": "custom"}, "a custom validator needs import_path"),
     ({"kind": "regex"}, "a regex validator needs must_match or must_not_match")],
)  # fmt: skip
def test_a_validator_missing_what_it_checks_with_is_refused(
    spec: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(validators=[spec])


def test_length_bounds_that_meet_are_accepted() -> None:
    # Only a minimum above the maximum fails every answer; equal bounds pass answers of that length.
    settings = load_settings(
        limits={"max_answer_chars": 100},
        validators=[{"kind": "length", "min_chars": 5, "max_chars": 5},
                    {"kind": "length", "name": "at-the-limit", "min_chars": 100}],
    )  # fmt: skip
    assert [(v.min_chars, v.max_chars) for v in settings.validators] == [(5, 5), (100, None)]


@pytest.mark.parametrize(
    "digest",
    [hash_api_key("k").upper(), hash_api_key("k")[:63], hash_api_key("k") + "0",
     "g" * 64],
    ids=["upper case", "63 characters", "65 characters", "not hex"],
)  # fmt: skip
def test_a_key_digest_must_be_64_lowercase_hex_characters(digest: str) -> None:
    # Keys are compared by their lowercase hex digest: any other form could never match.
    with pytest.raises(ConfigError, match=r"tenants\.0\.api_key_sha256: .*lowercase hex SHA-256"):
        load_settings(tenants=[{"name": "a", "api_key_sha256": [digest]}])


def test_a_lower_case_variable_naming_no_section_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("routecache_loging__format", "json")
    with pytest.raises(ConfigError, match="routecache_loging__format"):
        load_settings()


def test_a_file_given_in_code_beats_routecache_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTECACHE_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert load_settings(EXAMPLE).server.port == 50051


def test_env_toml_and_code_merge_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each source overrides the fields it names, not the whole section below it.
    config = tmp_path / "service.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nport = 7000\ngrace_seconds = 9.0\n')
    monkeypatch.setenv("ROUTECACHE_SERVER__PORT", "6000")
    monkeypatch.setenv("ROUTECACHE_SERVER__GRACE_SECONDS", "8.0")
    server = load_settings(config, server={"grace_seconds": 1.0}).server
    assert (server.host, server.port, server.grace_seconds) == ("0.0.0.0", 6000, 1.0)


def test_one_provider_key_by_environment_keeps_the_tiers_other_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deploy/k8s sets ROUTECACHE_UPSTREAM__CHEAP__API_KEY alone: with no [upstream.cheap] in
    # the file, that one variable must not drop the default model and prices.
    config = tmp_path / "service.toml"
    config.write_text('[[tenants]]\nname = "acme"\n')
    monkeypatch.setenv("ROUTECACHE_UPSTREAM__CHEAP__API_KEY", "sk-cheap")
    monkeypatch.setenv("ROUTECACHE_UPSTREAM__STRONG__BASE_URL", "http://replay:8089/v1")
    upstream = load_settings(config).upstream
    cheap, strong = upstream.cheap, upstream.strong
    assert cheap.resolve_api_key() == "sk-cheap"
    assert (cheap.model, cheap.input_usd_per_mtok, cheap.output_usd_per_mtok) == (
        "mixtral-8x7b-instruct",
        0.6,
        0.6,
    )
    assert (strong.base_url, strong.model, strong.output_usd_per_mtok) == (
        "http://replay:8089/v1",
        "gpt-4-1106-preview",
        30.0,
    )
    # The same from code; a field given overrides only that field.
    cheap = load_settings(upstream={"cheap": {"input_usd_per_mtok": 0.5}}).upstream.cheap
    assert (cheap.model, cheap.input_usd_per_mtok, cheap.output_usd_per_mtok) == (
        "mixtral-8x7b-instruct",
        0.5,
        0.6,
    )


def test_another_model_for_a_tier_must_bring_its_own_prices() -> None:
    # The default prices are Mixtral's / GPT-4's: another model inheriting them would be
    # billed and routed on someone else's prices without a word.
    with pytest.raises(ConfigError, match=r"upstream\.cheap\.input_usd_per_mtok: Field required"):
        load_settings(upstream={"cheap": {"model": "llama-3-8b"}})
    llama = {"model": "llama-3-8b", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.2}
    cheap = load_settings(upstream={"cheap": llama}).upstream.cheap
    assert (cheap.model, cheap.input_usd_per_mtok, cheap.output_usd_per_mtok) == (
        "llama-3-8b",
        0.1,
        0.2,
    )


def test_a_config_path_that_is_a_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path}"):
        load_settings(tmp_path)


_UNREADABLE = Path("/proc/self/mem")  # a file, and reading it from its start fails (EIO)


@pytest.mark.skipif(not _UNREADABLE.is_file(), reason="needs Linux's /proc")
def test_a_config_file_that_cannot_be_read_is_one_line() -> None:
    # Permission denied, an I/O error: it escaped as a traceback from pydantic-settings.
    with pytest.raises(ConfigError, match=f"cannot read config file {_UNREADABLE}: "):
        load_settings(_UNREADABLE)


def test_a_section_variable_that_is_not_json_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTECACHE_SERVER", "{port: 1}")
    with pytest.raises(ConfigError, match=r'"server".*\(Expecting property name'):
        load_settings()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"server": {"port": 65536}}, "server.port"),
     ({"metrics": {"port": -1}}, "metrics.port"),
     ({"cache": {"embed_max_wait_ms": 51}}, "cache.embed_max_wait_ms"),
     ({"store": {"key_prefix": "rc:{x}"}}, "store.key_prefix"),
     ({"budgets": {"alert_webhook_url": "ftp://hooks.example/b"}}, "budgets.alert_webhook_url"),
     ({"budgets": {"alert_webhook_url": "http://127.0.0.1:99999/b"}}, "budgets.alert_webhook_url"),
     ({"budgets": {"alert_webhook_url": "http://"}}, "budgets.alert_webhook_url"),
     ({"budgets": {"alert_webhook_url": "http://hooks example/b"}}, "budgets.alert_webhook_url"),
     ({"limits": {"max_request_bytes": 4095}}, "limits.max_request_bytes"),
     ({"budgets": {"month_retention_days": 30}}, "budgets.month_retention_days"),
     ({"cache": {"max_false_hit_rate": 1}}, "cache.max_false_hit_rate"),
     ({"tenants": [{"name": "a", "max_false_hit_rate": 0}]}, "tenants.0.max_false_hit_rate"),
     ({"tenants": [{"name": "a", "models_allowed": []}]}, "tenants.0.models_allowed"),
     ({"tenants": [{"name": "a", "budget": {"daily_usd": -1}}]}, "tenants.0.budget.daily_usd")],
)  # fmt: skip
def test_values_past_their_bounds_are_refused_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ")):
        load_settings(None, **overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"tenants": [{"name": "a", "rate": {"tokens": math.inf}}]}, "tenants.0.rate.tokens"),
     ({"tenants": [{"name": "a", "budget": {"daily_usd": math.inf}}]},
      "tenants.0.budget.daily_usd"),
     ({"upstream": {"request_timeout_seconds": math.inf}}, "upstream.request_timeout_seconds"),
     ({"budgets": {"reservation_ttl_seconds": math.nan}}, "budgets.reservation_ttl_seconds")],
)  # fmt: skip
def test_infinite_or_nan_numbers_are_refused_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    # Before: `tenants.rate.tokens = inf` (valid TOML) loaded; Redis then refused each take
    # (its PEXPIRE of an infinite window) and every replica fell back to its own buckets.
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ")):
        load_settings(None, **overrides)


@pytest.mark.parametrize("ttl", [60.0, 89.0])
def test_a_reservation_ttl_a_call_could_outlast_is_refused(ttl: float) -> None:
    # A call's reservation must hold until the call is settled: a TTL not above the
    # request timeout (plus time to settle) would let a call run on out of every cap.
    with pytest.raises(ConfigError) as refused:
        load_settings(None, budgets={"reservation_ttl_seconds": ttl})
    message = str(refused.value)
    assert "budgets.reservation_ttl_seconds" in message
    assert "upstream.request_timeout_seconds" in message


def test_a_reservation_ttl_above_the_request_timeout_and_time_to_settle_loads() -> None:
    settings = load_settings(None, budgets={"reservation_ttl_seconds": 91.0})
    assert settings.budgets.reservation_ttl_seconds == 91.0


def test_values_at_their_bounds_are_accepted() -> None:
    settings = load_settings(server={"port": 65535}, metrics={"port": 0},
                             cache={"embed_max_wait_ms": 50}, store={"key_prefix": "a.b-c_1"},
                             budgets={"alert_webhook_url": "https://hooks.example/b"},
                             limits={"max_request_bytes": 4096})  # fmt: skip
    assert (settings.server.port, settings.cache.embed_max_wait_ms) == (65535, 50)


def test_the_webhook_url_is_a_secret_kept_out_of_reprs_and_errors() -> None:
    # A Slack-style webhook URL carries its token in the path: like the Redis URL it is a
    # SecretStr, and a refused one is not echoed in the start-up error.
    url = "https://hooks.example/services/T0/B0/xoxTOKEN"
    settings = load_settings(None, budgets={"alert_webhook_url": url})
    assert settings.budgets.alert_webhook_url is not None
    assert settings.budgets.alert_webhook_url.get_secret_value() == url
    assert "xoxTOKEN" not in repr(settings.budgets)
    for bad in ("https://hooks.example:99999/xoxTOKEN", "https://hooks example/xoxTOKEN",
                "ftp://hooks.example/xoxTOKEN"):  # fmt: skip
        with pytest.raises(ConfigError, match=r"budgets\.alert_webhook_url") as refused:
            load_settings(None, budgets={"alert_webhook_url": bad})
        assert "xoxTOKEN" not in str(refused.value)


def test_the_answer_limit_must_fit_the_servers_message_size() -> None:
    # An answer the limit lets through (4 UTF-8 bytes a character at worst, and the rest of the
    # response) must fit server.max_message_bytes, or it is paid for and never delivered.
    with pytest.raises(ConfigError, match=r"limits\.max_answer_chars 300000 .*max_message_bytes"):
        load_settings(limits={"max_answer_chars": 300_000})
    with pytest.raises(ConfigError, match=r"max_message_bytes"):
        load_settings(server={"max_message_bytes": 64 << 10})
    assert load_settings(limits={"max_answer_chars": 200_000}).limits.max_answer_chars == 200_000


def test_the_answer_limit_leaves_room_for_a_report_of_every_validator() -> None:
    # An escalated answer is served with the cheap answer's failed results: each validator's
    # result on each of three calls counts against what the answer may take.
    many = [{"kind": "regex", "name": f"r{i}", "must_match": ["x"]} for i in range(50)]
    with pytest.raises(ConfigError, match=r"max_answer_chars 200000 .* validation report"):
        load_settings(limits={"max_answer_chars": 200_000}, validators=many)
    fewer = load_settings(validators=many)
    assert fewer.deliverable_answer_chars() < load_settings().deliverable_answer_chars()


@pytest.mark.parametrize(
    ("url", "problem"),
    [("http://127.0.0.1:80890/v1", "port"),  # httpx failed every call (an OverflowError)
     ("http://127.0.0.1:0/v1", "port"),
     ("http://[::1/v1", "not a valid URL"),  # httpx.InvalidURL while building the service
     ("127.0.0.1:8089/v1", "http:// or https://"),  # every call: UnsupportedProtocol
     ("ftp://127.0.0.1:8089/v1", "http:// or https://"),
     ("http:///v1", "no host"),
     ("http://replay host:8089/v1", "no host, or holds a space")],
)  # fmt: skip
@pytest.mark.parametrize("where", ["cheap", "strong", "providers.backup"])
def test_a_provider_base_url_no_call_could_use_is_refused_at_load(
    url: str, problem: str, where: str
) -> None:
    # Loaded, such a URL failed each call of its tier INTERNAL (not an upstream failure, so
    # neither the fallbacks nor the strong chain were tried), or the service's build.
    provider = {"base_url": url}
    upstream: dict[str, object] = {"cheap": provider} if where == "cheap" else {"strong": provider}
    if where == "providers.backup":
        upstream = {"providers": {"backup": {"model": "m", "input_usd_per_mtok": 1.0,
                                             "output_usd_per_mtok": 1.0, **provider}}}  # fmt: skip
    with pytest.raises(ConfigError, match=rf"upstream\.{where}\.base_url: .*{problem}"):
        load_settings(None, upstream=upstream)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8089/v1", "https://api.example/v1/", "http://[::1]:8089/v1",
     "http://host.docker.internal:8089/v1", "HTTPS://api.example:443"],
)  # fmt: skip
def test_provider_base_urls_a_call_can_use_load(url: str) -> None:
    assert load_settings(None, upstream={"cheap": {"base_url": url}}).upstream.cheap.base_url == url


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_at_start_not_sent_as_no_key(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It overrode api_key_env and api_key_file, and the client sent no Authorization header:
    # 401 on every call. Compose's ${CHEAP_KEY} with CHEAP_KEY unset gives such a variable.
    secret = tmp_path / "key"
    secret.write_text("sk-file\n")
    given = load_settings(None, upstream={"cheap": {"api_key": key, "api_key_file": str(secret)}})
    with pytest.raises(ConfigError, match="api_key is empty"):
        given.upstream.check_keys()
    monkeypatch.setenv("ROUTECACHE_UPSTREAM__CHEAP__API_KEY", key)
    by_env = load_settings(None, upstream={"cheap": {"api_key_file": str(secret)}})
    with pytest.raises(ConfigError, match="api_key is empty"):
        by_env.upstream.check_keys()


def test_a_key_variable_of_white_space_only_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: accepted and sent as "Bearer   ", which httpx refuses: every call failed.
    monkeypatch.setenv("RC_BLANK_KEY", "   ")
    given = load_settings(None, upstream={"cheap": {"api_key_env": "RC_BLANK_KEY"}})
    with pytest.raises(ConfigError, match=r"\$RC_BLANK_KEY is empty"):
        given.upstream.check_keys()


def test_a_key_that_cannot_be_read_names_the_providers_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It named the model ("provider gpt-4-1106-preview"), which two entries may share, not the
    # setting to fix.
    upstream = load_settings(FAILOVER_EXAMPLE).upstream
    with pytest.raises(ConfigError, match=r"^upstream\.strong: \$ROUTECACHE_EXAMPLE_STRONG_KEY is"):
        upstream.check_keys()
    monkeypatch.setenv("ROUTECACHE_EXAMPLE_STRONG_KEY", "sk-env")
    with pytest.raises(ConfigError, match=r"^upstream\.providers\.strong-backup: cannot read"):
        upstream.check_keys()


@pytest.mark.parametrize("name", ["ROUTECACHE_TENANTS__0__DAILY_BUDGET_USD",
                                  "ROUTECACHE_VALIDATORS__0__KIND"])  # fmt: skip
def test_a_variable_indexing_into_a_list_setting_is_refused_naming_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydantic-settings reads it as a mapping: "tenants: Input should be a valid list", naming
    # no variable. A list is set whole (JSON) or in the file.
    monkeypatch.setenv(name, "5")
    with pytest.raises(ConfigError, match=rf"environment variable {name}: .* as JSON"):
        load_settings(EXAMPLE)


@pytest.mark.parametrize(
    ("url", "shown"),
    [("redis://:s3cret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
     ("rediss://user:s3cret@redis.example:6380/2?password=s3cret", "rediss://redis.example:6380/2"),
     ("redis://127.0.0.1/0?password=s3cret&db=1", "redis://127.0.0.1/1"),
     ("redis://[::1]:6379", "redis://[::1]:6379"),
     ("unix://:s3cret@/run/redis.sock?db=3&password=s3cret", "unix:///run/redis.sock?db=3"),
     ("unix:///run/redis.sock", "unix:///run/redis.sock")],
)  # fmt: skip
def test_a_redis_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    from routecache.router.settings import redis_url_for_display

    assert redis_url_for_display(url) == shown

from pathlib import Path

import pytest

from routecache.router.auth import ApiKeyAuthenticator, hash_api_key
from routecache.router.bootstrap import build_tenants
from routecache.router.settings import ConfigError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/dev.toml"


def test_example_config_loads_and_its_keys_authenticate() -> None:
    settings = load_settings(EXAMPLE)
    auth: ApiKeyAuthenticator = build_tenants(settings)
    assert auth.authenticate("dev-key-acme").name == "acme"
    globex = auth.authenticate("dev-key-globex")
    assert globex.name == "globex" and globex.routing_threshold == 0.6


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


def test_a_key_for_two_tenants_is_refused() -> None:
    digest = hash_api_key("shared")
    settings = load_settings(
        tenants=[
            {"name": "a", "api_key_sha256": [digest]},
            {"name": "b", "api_key_sha256": [digest]},
        ]
    )
    with pytest.raises(ValueError, match="two tenants"):
        build_tenants(settings)


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

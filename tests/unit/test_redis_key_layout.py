"""The Redis key names are a stored format (docs/redis-keys.md): a change strands the data a
running deployment holds, so each one is pinned here."""

from __future__ import annotations

from routecache.backends.keys import KeySpace, tenant_of_exact_key, tenant_of_id


def test_every_tenant_key_carries_the_prefix_and_the_tenant_hash_tag() -> None:
    keys = KeySpace("rc").of("acme")
    assert keys.entry("acme:0f3a") == "rc:{acme}:e:acme:0f3a"
    assert keys.exact("acme:scope:prompt") == "rc:{acme}:x:scope:prompt"
    assert keys.tag("faq") == "rc:{acme}:tag:faq"
    assert (keys.lru, keys.expiry, keys.sync) == (
        "rc:{acme}:lru",
        "rc:{acme}:exp",
        "rc:{acme}:sync",
    )
    assert (keys.events, keys.rate) == ("rc:{acme}:events", "rc:{acme}:rate")
    assert keys.spend("d:2024-05-01") == "rc:{acme}:spend:d:2024-05-01"


def test_the_key_registry_is_one_untagged_hash_under_the_prefix() -> None:
    assert KeySpace().api_keys == "rc:apikeys"
    assert KeySpace("other").api_keys == "other:apikeys"


def test_the_tenant_is_read_from_entry_ids_and_exact_keys() -> None:
    assert tenant_of_id("acme:0f3a") == "acme"
    assert tenant_of_exact_key("acme:scope:prompt") == "acme"

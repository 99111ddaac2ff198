"""API keys at run time: the registry file, the admin CLI, rotation and revocation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from routecache.errors import Unauthenticated
from routecache.router.auth import ApiKeyAuthenticator, hash_api_key
from routecache.router.bootstrap import build_tenants
from routecache.router.cli import build_parser, main
from routecache.router.keyring import (
    FileKeyRegistry,
    KeyRecord,
    add_key,
    revoke_key,
    rotate_key,
)
from routecache.router.keys_cli import run_keys
from routecache.router.settings import ConfigError, load_settings
from tests.fakes import ManualClock, RevokedAfterFirstRead
from tests.unit.conftest import make_harness
from tests.unit.test_pipeline import ask


async def keys_cli(*args: str) -> int:
    """`routecache keys ...` on the test's own event loop (main() runs one of its own)."""
    return await run_keys(build_parser().parse_args(["keys", *args]))


def authenticator(path: Path, clock: ManualClock) -> ApiKeyAuthenticator:
    settings = load_settings(tenants=[{"name": "acme"}, {"name": "globex"}])
    return build_tenants(settings, FileKeyRegistry(path), clock)


async def test_a_revoked_key_fails_on_the_very_next_call(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    auth = authenticator(path, clock)
    admin = FileKeyRegistry(path)  # another process's view, as the CLI's
    plain, record = await add_key(admin, "acme", clock())
    assert (await auth.resolve(plain)).name == "acme"
    await revoke_key(admin, record.key_id, clock())
    with pytest.raises(Unauthenticated):
        await auth.resolve(plain)


async def test_rotation_keeps_the_old_key_for_the_overlap_only(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    auth, admin = authenticator(path, clock), FileKeyRegistry(path)
    old_plain, old = await add_key(admin, "globex", clock())
    new_plain, new, retired = await rotate_key(admin, old.key_id, clock(), overlap_seconds=60)
    assert new.tenant == "globex" and retired.expires_at == clock() + 60
    assert (await auth.resolve(old_plain)).name == "globex"
    clock.advance(60)
    with pytest.raises(Unauthenticated):
        await auth.resolve(old_plain)
    assert (await auth.resolve(new_plain)).name == "globex"
    # Overlap 0: the old key is gone at once.
    newer_plain, _, _ = await rotate_key(admin, new.key_id, clock(), overlap_seconds=0)
    with pytest.raises(Unauthenticated):
        await auth.resolve(new_plain)
    assert (await auth.resolve(newer_plain)).name == "globex"


async def test_a_key_revoked_while_it_is_rotated_stays_revoked(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    auth = authenticator(path, clock)
    old_plain, old = await add_key(FileKeyRegistry(path), "acme", clock())
    rotating = RevokedAfterFirstRead(
        FileKeyRegistry(path), FileKeyRegistry(path), old.key_id, clock()
    )
    new_plain, _, retired = await rotate_key(rotating, old.key_id, clock(), overlap_seconds=60)
    assert retired.revoked_at == clock()
    with pytest.raises(Unauthenticated):
        await auth.resolve(old_plain)
    assert (await auth.resolve(new_plain)).name == "acme"


async def test_a_key_of_an_unconfigured_tenant_is_refused(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    plain, _ = await add_key(FileKeyRegistry(path), "initech", clock())
    with pytest.raises(Unauthenticated, match="not configured"):
        await authenticator(path, clock).resolve(plain)


async def test_rotate_says_until_when_the_old_key_stays_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With --overlap-seconds 0 it printed "old key ID: expired until T".
    registry = ("--registry", str(tmp_path / "keys.json"))
    assert await keys_cli(*registry, "--json", "add", "--tenant", "acme") == 0
    first = json.loads(capsys.readouterr().out)["key_id"]
    assert await keys_cli(*registry, "rotate", first) == 0
    out = capsys.readouterr().out
    assert f"old key {first}: rotating, valid until 20" in out
    second = out.split("key id ", 1)[1].split()[0]
    assert await keys_cli(*registry, "rotate", second, "--overlap-seconds", "0") == 0
    out = capsys.readouterr().out
    assert f"old key {second}: expired at 20" in out and "until" not in out


async def test_keys_are_stored_hashed_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    caplog.set_level(logging.DEBUG)
    assert await keys_cli("--registry", str(path), "--json", "add", "--tenant", "acme") == 0
    plain = json.loads(capsys.readouterr().out)["api_key"]
    stored = path.read_text()
    assert plain not in stored and hash_api_key(plain) in stored
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(Unauthenticated):
        await authenticator(path, ManualClock()).resolve(plain + "x")
    assert plain not in caplog.text


async def test_the_cli_revokes_a_key_the_running_service_then_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    harness = make_harness(service={"keys": {"registry_path": path}})
    pipeline = harness.service.pipeline
    registry = ["--registry", str(path), "--json"]
    try:
        assert await keys_cli(*registry, "add", "--tenant", "acme") == 0
        added = json.loads(capsys.readouterr().out)
        assert (await pipeline.complete(ask("q1"), added["api_key"])).text
        assert await keys_cli(*registry, "rotate", added["key_id"], "--overlap-seconds", "0") == 0
        rotated = json.loads(capsys.readouterr().out)
        assert rotated["old"]["status"] == "expired"
        with pytest.raises(Unauthenticated):
            await pipeline.complete(ask("q2"), added["api_key"])
        assert (await pipeline.complete(ask("q3"), rotated["api_key"])).text
        assert await keys_cli(*registry, "revoke", rotated["key_id"]) == 0
        capsys.readouterr()
        with pytest.raises(Unauthenticated):
            await pipeline.complete(ask("q4"), rotated["api_key"])
        assert await keys_cli(*registry, "list") == 0
        listed = json.loads(capsys.readouterr().out)["keys"]
        assert [k["status"] for k in listed[-2:]] == ["expired", "revoked"]
        assert all("sha256" not in k and "api_key" not in k for k in listed)
        assert await keys_cli(*registry, "revoke", "no-such-id") == 1
    finally:
        await harness.service.aclose()


def test_the_cli_checks_the_tenant_against_the_config(tmp_path: Path) -> None:
    config = tmp_path / "rc.toml"
    config.write_text(f'[keys]\nregistry_path = "{tmp_path / "k.json"}"\n'
                      '[[tenants]]\nname = "acme"\n')  # fmt: skip
    assert main(["keys", "--config", str(config), "add", "--tenant", "globex"]) == 2
    assert main(["keys", "--config", str(config), "add", "--tenant", "acme"]) == 0
    assert "acme" in (tmp_path / "k.json").read_text()


def test_a_registry_source_without_its_store_fails_fast() -> None:
    from routecache.router.bootstrap import build_key_registry

    with pytest.raises(ConfigError, match=r"store\.backend"):
        build_key_registry(load_settings(keys={"source": "redis"}), None)
    with pytest.raises(ConfigError, match="registry_path"):
        build_key_registry(load_settings(keys={"source": "file"}), None)


async def test_rotating_a_rotating_key_never_extends_its_overlap(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    admin = FileKeyRegistry(path)
    _, old = await add_key(admin, "acme", clock())
    await rotate_key(admin, old.key_id, clock(), overlap_seconds=60)
    _, _, retired = await rotate_key(admin, old.key_id, clock(), overlap_seconds=3600)
    assert retired.expires_at == clock() + 60


def test_a_revocation_dated_later_takes_effect_then_for_both_validity_and_status() -> None:
    record = KeyRecord("k", hash_api_key("x"), "acme", created_at=0.0, revoked_at=100.0)
    assert record.valid_at(99.0) and record.status(99.0) == "active"
    assert not record.valid_at(100.0) and record.status(100.0) == "revoked"


async def test_a_deleted_registry_file_drops_every_key(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    auth = authenticator(path, clock)
    plain, _ = await add_key(FileKeyRegistry(path), "acme", clock())
    assert (await auth.resolve(plain)).name == "acme"
    path.unlink()
    with pytest.raises(Unauthenticated):
        await auth.resolve(plain)


def _rewrite_in_place(path: Path, old: str, new: str) -> None:
    with open(path, "r+", encoding="utf-8") as file:  # the inode stays
        text = file.read().replace(old, new)
        file.seek(0)
        file.write(text)


async def test_a_registry_file_rewritten_within_its_timestamp_is_read_again(
    tmp_path: Path,
) -> None:
    # Same inode, size and mtime: only "changed too recently to trust" makes it re-read.
    path = tmp_path / "keys.json"
    registry = FileKeyRegistry(path)
    _, record = await add_key(registry, "acme", 0.0, api_key="first")
    assert await registry.find(record.sha256) == record
    before = path.stat()
    replacement = hash_api_key("other")
    _rewrite_in_place(path, record.sha256, replacement)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_ino == before.st_ino and path.stat().st_size == before.st_size
    assert await registry.find(record.sha256) is None
    assert await registry.find(replacement) is not None


async def test_an_empty_api_key_is_reported_missing(tmp_path: Path) -> None:
    auth = authenticator(tmp_path / "keys.json", ManualClock())
    for absent in ("", None):
        with pytest.raises(Unauthenticated, match="missing API key"):
            await auth.resolve(absent)


def test_a_redis_url_without_a_scheme_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "--redis-url", "localhost:6379", "list"])
    assert exit_.value.code == 2
    assert "--redis-url: a Redis URL starts with redis://" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", ""], ids=["not JSON", "not an object", "empty"]
)
def test_a_damaged_registry_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    registry = tmp_path / "keys.json"
    registry.write_text(content)
    for action in (["list"], ["add", "--tenant", "acme"]):
        assert main(["keys", "--registry", str(registry), *action]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"routecache: key registry {registry}: ")
    assert registry.read_text() == content


def test_a_registry_in_an_unwritable_place_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert main(["keys", "--registry", str(blocker / "keys.json"), "add", "--tenant", "a"]) == 2
    assert capsys.readouterr().err.startswith("routecache: key registry: ")


def test_a_negative_rotation_overlap_is_a_usage_error(tmp_path: Path) -> None:
    # It was taken: the old key "expired" before the rotation that retired it.
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "--registry", str(tmp_path / "k.json"), "rotate", "id", "--overlap-seconds",
              "-100"])  # fmt: skip
    assert exit_.value.code == 2


def test_the_service_refuses_to_start_on_a_damaged_registry_file(tmp_path: Path) -> None:
    registry = tmp_path / "keys.json"
    registry.write_text("not json")
    with pytest.raises(ConfigError, match=r"keys\.registry_path: key registry .*keys\.json"):
        make_harness(service={"keys": {"registry_path": str(registry)}})

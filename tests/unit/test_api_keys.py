"""API keys at run time: the registry file, the admin CLI, rotation and revocation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from routecache.domain import Tenant
from routecache.errors import Unauthenticated, Unavailable
from routecache.router.auth import ApiKeyAuthenticator, hash_api_key
from routecache.router.bootstrap import build_tenants
from routecache.router.cli import build_parser, main
from routecache.router.keyring import (
    FileKeyRegistry,
    KeyNotFound,
    KeyNotLive,
    KeyRecord,
    KeyRegistryError,
    add_key,
    new_api_key,
    revoke_key,
    rotate_key,
)
from routecache.router.keys_cli import run_keys
from routecache.router.settings import ConfigError, load_settings
from tests.fakes import ManualClock, RacedAfterFirstRead
from tests.redis_fixture import free_port
from tests.unit.conftest import make_harness, record_fsyncs
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


async def test_a_revoked_or_expired_key_is_not_rotated_into_a_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rotating a dead key handed its tenant a fresh, valid key under a revoked key's name.
    registry = ("--registry", str(tmp_path / "keys.json"), "--json")
    assert await keys_cli(*registry, "add", "--tenant", "acme") == 0
    revoked = json.loads(capsys.readouterr().out)["key_id"]
    assert await keys_cli(*registry, "revoke", revoked) == 0
    capsys.readouterr()
    assert await keys_cli(*registry, "add", "--tenant", "acme") == 0
    expired = json.loads(capsys.readouterr().out)["key_id"]
    assert await keys_cli(*registry, "rotate", expired, "--overlap-seconds", "0") == 0
    capsys.readouterr()
    for key_id, state in ((revoked, "revoked"), (expired, "expired")):
        assert await keys_cli(*registry, "rotate", key_id) == 1
        assert capsys.readouterr().err == (
            f"routecache: key registry {tmp_path / 'keys.json'}: key {key_id} is {state}:"
            " only a live key is rotated"
            " (`keys add --tenant acme` issues a new one)\n"
        )
    assert len(await FileKeyRegistry(tmp_path / "keys.json").records()) == 3


async def test_a_key_revoked_while_it_is_rotated_fails_the_rotation_and_leaves_no_new_key(
    tmp_path: Path,
) -> None:
    # Before: the rotation kept the revocation but still wrote a new, valid key for the tenant
    # of a key an admin had just revoked (as a leaked one, say).
    path, clock = tmp_path / "keys.json", ManualClock()
    auth = authenticator(path, clock)
    old_plain, old = await add_key(FileKeyRegistry(path), "acme", clock())
    rotating = RacedAfterFirstRead(
        FileKeyRegistry(path), lambda: revoke_key(FileKeyRegistry(path), old.key_id, clock())
    )
    with pytest.raises(KeyNotLive, match=f"key {old.key_id} was revoked during the rotation"):
        await rotate_key(rotating, old.key_id, clock(), overlap_seconds=60)
    [kept] = await FileKeyRegistry(path).records()
    assert kept.key_id == old.key_id and kept.revoked_at == clock()
    with pytest.raises(Unauthenticated):
        await auth.resolve(old_plain)


async def test_a_key_revoked_during_a_cli_rotation_is_exit_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    _, old = await add_key(FileKeyRegistry(path), "acme", now=0.0)
    revoke_first = FileKeyRegistry.records

    async def revoked_after_read(self: FileKeyRegistry) -> list[KeyRecord]:
        found = await revoke_first(self)
        await revoke_key(FileKeyRegistry(path), old.key_id, now=0.0)
        return found

    monkeypatch.setattr(FileKeyRegistry, "records", revoked_after_read)
    assert await keys_cli("--registry", str(path), "rotate", old.key_id) == 1
    assert capsys.readouterr().err == (
        f"routecache: key registry {path}: key {old.key_id} was revoked during the rotation:"
        " no new key was issued"
        " (`keys add --tenant acme` issues a new one)\n"
    )
    assert len(await revoke_first(FileKeyRegistry(path))) == 1


def _delete_by_hand(path: Path, key_id: str) -> None:
    body = json.loads(path.read_text())
    body["keys"] = [k for k in body["keys"] if k["key_id"] != key_id]
    path.write_text(json.dumps(body))


async def test_a_key_deleted_while_it_is_rotated_fails_the_rotation_and_leaves_no_new_key(
    tmp_path: Path,
) -> None:
    # Before: the new key was written first, then retiring the old one failed; the new key
    # stayed valid and was never shown to anyone.
    path, clock = tmp_path / "keys.json", ManualClock()
    _, old = await add_key(FileKeyRegistry(path), "acme", clock())
    _, kept = await add_key(FileKeyRegistry(path), "acme", clock())
    rotating = RacedAfterFirstRead(
        FileKeyRegistry(path), lambda: asyncio.to_thread(_delete_by_hand, path, old.key_id)
    )
    with pytest.raises(KeyNotFound, match=f"no key with id {old.key_id}"):
        await rotate_key(rotating, old.key_id, clock(), overlap_seconds=60)
    assert await FileKeyRegistry(path).records() == [kept]


async def test_a_key_of_an_unconfigured_tenant_is_refused(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    plain, _ = await add_key(FileKeyRegistry(path), "initech", clock())
    with pytest.raises(Unauthenticated, match="not configured"):
        await authenticator(path, clock).resolve(plain)


async def test_a_key_of_an_unconfigured_tenant_is_logged_once_per_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One WARNING per call: whoever holds such a key could fill the log.
    path, clock = tmp_path / "keys.json", ManualClock()
    first, _ = await add_key(FileKeyRegistry(path), "initech", clock())
    second, _ = await add_key(FileKeyRegistry(path), "initech", clock())
    auth = authenticator(path, clock)
    caplog.set_level(logging.WARNING, logger="routecache.router.auth")
    for key in (first, second) * 5:
        with pytest.raises(Unauthenticated, match="not configured"):
            await auth.resolve(key)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("'initech', which is not configured" in w for w in warnings)


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
    assert f"old key {second}: expired at 20" in out and "valid until" not in out


async def test_a_rotation_overlap_past_the_platforms_dates_still_shows_the_new_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # time.gmtime overflowed after the rotation was written: a traceback instead of the new
    # key, which was then registered but never shown, and every later `keys list` failed too.
    registry = ("--registry", str(tmp_path / "keys.json"))
    assert await keys_cli(*registry, "--json", "add", "--tenant", "acme") == 0
    first = json.loads(capsys.readouterr().out)["key_id"]
    assert await keys_cli(*registry, "rotate", first, "--overlap-seconds", "1e300") == 0
    out = capsys.readouterr().out
    assert "api key (shown once; only its SHA-256 is kept): rck_" in out
    assert f"old key {first}: rotating, valid until 1e+300 (unix time)" in out
    assert await keys_cli(*registry, "list") == 0
    assert "expires 1e+300 (unix time)" in capsys.readouterr().out


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


async def test_a_registry_file_keeps_its_mode_and_owner_when_a_command_replaces_it(
    tmp_path: Path,
) -> None:
    # `sudo routecache keys add` replaced a registry the service's user could read with a
    # root-owned 0600 file: its lookups of registered keys failed until someone chowned it.
    path = tmp_path / "keys.json"
    path.write_text('{"keys": []}')
    os.chmod(path, 0o640)
    owner = (path.stat().st_uid, path.stat().st_gid)
    if os.geteuid() == 0:  # only root may give a file away, and so keep another's owner
        owner = (65534, 65534)
        os.chown(path, *owner)
    assert await keys_cli("--registry", str(path), "add", "--tenant", "acme") == 0
    kept = path.stat()
    assert (kept.st_mode & 0o777, kept.st_uid, kept.st_gid) == (0o640, *owner)
    assert "acme" in path.read_text()


async def test_a_key_change_syncs_the_folder_after_replacing_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename lives in the folder: unsynced, a power loss may bring a revoked key back (or
    # drop a new one) though the command returned.
    path = tmp_path / "keys.json"
    synced = record_fsyncs(monkeypatch, path)
    await add_key(FileKeyRegistry(path), "acme", now=0.0)
    assert synced[-1] == (True, True)


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


def test_the_cli_reads_the_config_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As serve does: ROUTECACHE_CONFIG stands for --config (its registry and its tenants).
    config = tmp_path / "rc.toml"
    config.write_text(f'[keys]\nregistry_path = "{tmp_path / "k.json"}"\n'
                      '[[tenants]]\nname = "acme"\n')  # fmt: skip
    monkeypatch.setenv("ROUTECACHE_CONFIG", str(config))
    assert main(["keys", "add", "--tenant", "globex"]) == 2
    assert main(["keys", "add", "--tenant", "acme"]) == 0
    assert "acme" in (tmp_path / "k.json").read_text()


def test_the_cli_given_a_registry_ignores_the_config_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --registry says where the keys are: a ROUTECACHE_CONFIG naming a missing file is not read.
    monkeypatch.setenv("ROUTECACHE_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["keys", "--registry", str(tmp_path / "k.json"), "add", "--tenant", "a"]) == 0


def test_a_bad_settings_variable_is_one_line_and_exit_2_without_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUTECACHE_KEYS__ROTATION_OVERLAP_SECONDS", "a day")
    assert main(["keys", "--registry", str(tmp_path / "k.json"), "add", "--tenant", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routecache: invalid configuration: keys.rotation_overlap_seconds")
    assert err.count("\n") == 1 and not (tmp_path / "k.json").exists()


def test_a_registry_source_without_its_store_fails_fast() -> None:
    from routecache.router.bootstrap import build_key_registry

    with pytest.raises(ConfigError, match=r"store\.backend"):
        build_key_registry(load_settings(keys={"source": "redis"}), None)
    with pytest.raises(ConfigError, match="registry_path"):
        build_key_registry(load_settings(keys={"source": "file"}), None)


async def test_the_auto_registry_source_is_redis_on_the_redis_backend_else_the_file(
    tmp_path: Path,
) -> None:
    from routecache.backends.redis_keys import RedisKeyRegistry
    from routecache.router.bootstrap import build_key_registry, build_redis_link

    path = tmp_path / "keys.json"
    settings = load_settings(store={"backend": "redis"}, keys={"registry_path": path})
    link = build_redis_link(settings.store)  # connects at its first call: none is made
    try:
        assert isinstance(build_key_registry(settings, link), RedisKeyRegistry)
    finally:
        await link.aclose()
    assert isinstance(build_key_registry(settings, None), FileKeyRegistry)
    assert build_key_registry(load_settings(), None) is None


async def test_rotating_a_rotating_key_never_extends_its_overlap(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    admin = FileKeyRegistry(path)
    _, old = await add_key(admin, "acme", clock())
    await rotate_key(admin, old.key_id, clock(), overlap_seconds=60)
    _, _, retired = await rotate_key(admin, old.key_id, clock(), overlap_seconds=3600)
    assert retired.expires_at == clock() + 60


def test_a_revocation_dated_later_holds_at_once_for_both_validity_and_status() -> None:
    # The date is the revoking machine's clock, which may be ahead of this one's.
    record = KeyRecord("k", hash_api_key("x"), "acme", created_at=0.0, revoked_at=100.0)
    assert not record.valid_at(99.0) and record.status(99.0) == "revoked"
    assert not record.valid_at(100.0) and record.status(100.0) == "revoked"


async def test_a_key_revoked_from_a_clock_ahead_of_the_servers_fails_on_the_next_call(
    tmp_path: Path,
) -> None:
    # Before: revoked_at was compared with the server's clock; revoked from a machine 30 s
    # ahead, a leaked key stayed valid 30 s more.
    path, clock = tmp_path / "keys.json", ManualClock()
    auth, admin = authenticator(path, clock), FileKeyRegistry(path)
    plain, record = await add_key(admin, "acme", clock())
    await revoke_key(admin, record.key_id, clock() + 30)
    with pytest.raises(Unauthenticated):
        await auth.resolve(plain)


async def test_revoking_a_revoked_key_again_keeps_its_first_revocation(tmp_path: Path) -> None:
    # Before: a second revoke from a clock an hour ahead moved revoked_at an hour later, and
    # the revoked key was valid again until then.
    path, clock = tmp_path / "keys.json", ManualClock()
    auth, admin = authenticator(path, clock), FileKeyRegistry(path)
    plain, record = await add_key(admin, "acme", clock())
    await revoke_key(admin, record.key_id, clock() - 10)
    again = await revoke_key(admin, record.key_id, clock() + 3600)
    assert again.revoked_at == clock() - 10
    with pytest.raises(Unauthenticated):
        await auth.resolve(plain)


async def test_a_rotation_with_no_overlap_ends_the_old_key_at_once_whatever_the_clocks(
    tmp_path: Path,
) -> None:
    # Before: the old key expired at the rotating machine's "now"; from a clock 30 s ahead of
    # the server's it stayed valid 30 s more.
    path, clock = tmp_path / "keys.json", ManualClock()
    auth, admin = authenticator(path, clock), FileKeyRegistry(path)
    old_plain, old = await add_key(admin, "acme", clock())
    _, _, retired = await rotate_key(admin, old.key_id, clock() + 30, overlap_seconds=0)
    with pytest.raises(Unauthenticated):
        await auth.resolve(old_plain)
    assert retired.status(clock()) == "expired"


_SOUND_FIELDS = {"key_id": "k", "sha256": "d" * 64, "tenant": "acme", "created_at": 0.0}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([1], r"key None: not a key record \(not a JSON object\)"),
        ({"key_id": "k", "tenant": "acme"}, r"key 'k': not a key record \(.*sha256"),
        ({**_SOUND_FIELDS, "owner": "x"}, r"key 'k': not a key record \(.*owner"),
        ({**_SOUND_FIELDS, "tenant": 7}, "key 'k': tenant must be text"),
        ({**_SOUND_FIELDS, "created_at": None}, "key 'k': created_at must be a unix time"),
        ({**_SOUND_FIELDS, "expires_at": True}, "key 'k': expires_at must be a unix time"),
        ({**_SOUND_FIELDS, "revoked_at": float("nan")}, "key 'k': revoked_at must be a unix"),
    ],
    ids=["not an object", "a field missing", "an unknown field", "a tenant not text",
         "no creation time", "a flag for a time", "a revocation at NaN"],
)  # fmt: skip
def test_a_record_read_back_names_its_key_and_its_wrong_field(fields: object, message: str) -> None:
    # One check for the file and the Redis registries, which each had their own.
    with pytest.raises(KeyRegistryError, match=f"^{message}"):
        KeyRecord.from_fields(fields)


def test_a_sound_record_read_back_is_the_record_written() -> None:
    record = KeyRecord("k", "d" * 64, "acme", 1.0, expires_at=2, revoked_at=None)
    assert KeyRecord.from_fields(json.loads(json.dumps(asdict(record)))) == record


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


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "a Redis URL starts with redis://"),
        ("redis://127.0.0.1:notaport/0", "not a valid Redis URL: Port could not be cast"),
    ],
)
def test_a_redis_url_redis_cannot_use_is_a_usage_error(
    url: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "--redis-url", url, "list"])
    assert exit_.value.code == 2
    assert f"--redis-url: {problem}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b"", b"\xff\xfe{}", b'{"keys": [1]}', b'{"keys": [{"key_id": "k"}]}',
     b'{"keys": [{"key_id": "k", "sha256": "d", "tenant": "acme", "created_at": 0,'
     b' "revoked_at": "2026-01-01"}]}',
     b'{"keys": [{"key_id": "k", "sha256": "d", "tenant": "acme", "created_at": 0,'
     b' "revoked_at": NaN}]}',
     b'{"keys": [{"created_at": ' + b"9" * 5000 + b"}]}", b'{"keys": ' + b"[" * 100_000,
     # Read as an empty registry, then replaced whole by the next `keys add`.
     b'{"kyes": [{"key_id": "a1", "tenant": "acme"}]}', b'{"name": "app", "version": "1.2.3"}',
     b'{"keys": [], "owner": "ops"}', b'{"keys": {}}'],
    ids=["not JSON", "not an object", "empty", "not UTF-8", "no records", "records lack fields",
         "a date as text", "a revocation at NaN", "a number too long", "nested too deeply",
         "a misspelled member", "another JSON object", "another member", "keys not a list"],
)  # fmt: skip
def test_a_damaged_registry_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    registry = tmp_path / "keys.json"
    registry.write_bytes(content)
    with pytest.raises(KeyRegistryError, match=f"key registry {registry}: "):
        FileKeyRegistry(registry).check()  # the service's start check
    for action in (["list"], ["add", "--tenant", "acme"]):
        assert main(["keys", "--registry", str(registry), *action]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"routecache: key registry {registry}: ")
    assert registry.read_bytes() == content


async def test_a_damaged_record_fails_its_own_lookup_only_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One hand-edited record refused every lookup of every key (the whole file was refused);
    # as in the Redis registry, it now fails its own key's lookup only. The start-up check and
    # the admin commands stay strict.
    path, clock = tmp_path / "keys.json", ManualClock()
    plain, _ = await add_key(FileKeyRegistry(path), "acme", clock())
    body = json.loads(path.read_text())
    body["keys"] += [
        {"key_id": "bad", "sha256": "d" * 64, "tenant": "acme", "created_at": 0,
         "revoked_at": "2026-01-01"},
        {"key_id": "short", "sha256": "e" * 64},
    ]  # fmt: skip
    path.write_text(json.dumps(body))
    auth, registry = authenticator(path, clock), FileKeyRegistry(path)
    caplog.set_level(logging.WARNING, logger="routecache.router.keyring")
    for _ in range(3):
        assert (await auth.resolve(plain)).name == "acme"
        with pytest.raises(KeyRegistryError, match=r"key 'bad': revoked_at must be"):
            await registry.find("d" * 64)
        with pytest.raises(KeyRegistryError, match=r"key 'short': not a key record"):
            await registry.find("e" * 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(f"{path}: key 'bad'" in m for m in warnings) == 2  # one per registry instance
    assert sum(f"{path}: key 'short'" in m for m in warnings) == 2
    assert len(warnings) == 4
    with pytest.raises(KeyRegistryError, match="key 'bad'"):
        FileKeyRegistry(path).check()
    with pytest.raises(KeyRegistryError, match="key 'bad'"):
        await registry.records()


async def test_a_record_damaged_again_after_it_was_mended_is_logged_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each damage is one warning; remembered for good, the second went unlogged.
    path = tmp_path / "keys.json"
    record = {"key_id": "k", "sha256": "d" * 64, "tenant": "acme", "created_at": 0}
    registry = FileKeyRegistry(path)
    caplog.set_level(logging.WARNING, logger="routecache.router.keyring")
    for revoked_at in ("2026-01-01", None, "2026-01-01"):
        path.write_text(json.dumps({"keys": [{**record, "revoked_at": revoked_at}]}))
        with contextlib.suppress(KeyRegistryError):
            await registry.find("d" * 64)
    assert sum("key 'k'" in r.getMessage() for r in caplog.records) == 2


async def test_a_damaged_record_refuses_its_key_as_unauthenticated_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the KeyRegistryError went through authentication: INTERNAL, with an ERROR
    # traceback on every call made with that key.
    path, clock = tmp_path / "keys.json", ManualClock()
    record = {"key_id": "k", "sha256": hash_api_key("damaged"), "tenant": "acme",
              "created_at": 0, "revoked_at": "2026-01-01"}  # fmt: skip
    path.write_text(json.dumps({"keys": [record]}))
    auth = authenticator(path, clock)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="record is damaged"):
            await auth.resolve("damaged")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "key 'k': revoked_at must be" in caplog.records[0].getMessage()


async def test_a_registry_file_that_cannot_be_read_is_unavailable_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: every call with a key not in the config was INTERNAL with an ERROR traceback,
    # whoever sent it (keys guessed at random too): the log flooded while an operator's edit
    # was half written.
    path, clock = tmp_path / "keys.json", ManualClock()
    plain, _ = await add_key(FileKeyRegistry(path), "acme", clock())
    auth = authenticator(path, clock)
    path.write_text('{"keys": [')
    caplog.set_level(logging.WARNING)
    for key in (plain, "guess-1", "guess-2"):
        with pytest.raises(Unavailable, match="the API key registry cannot be read"):
            await auth.resolve(key)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert f"key registry {path}: cannot read it" in caplog.records[0].getMessage()
    path.write_text('{"keys": []}')  # mended; broken again later: logged again
    with pytest.raises(Unauthenticated):
        await auth.resolve("guess-3")
    path.write_text('{"keys": [')
    with pytest.raises(Unavailable):
        await auth.resolve("guess-4")
    assert len(caplog.records) == 2


async def test_a_registry_file_that_is_not_json_fails_every_lookup(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("not json")
    with pytest.raises(KeyRegistryError, match="cannot read it"):
        await FileKeyRegistry(path).find("d" * 64)


def test_a_registry_in_an_unwritable_place_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert main(["keys", "--registry", str(blocker / "keys.json"), "add", "--tenant", "a"]) == 2
    assert capsys.readouterr().err.startswith(f"routecache: key registry {blocker / 'keys.json'}: ")


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


async def test_a_key_given_to_add_is_the_one_registered(tmp_path: Path) -> None:
    plain, record = await add_key(FileKeyRegistry(tmp_path / "k.json"), "acme", 0.0, "given")
    assert plain == "given" and record.sha256 == hash_api_key("given")


def test_a_new_key_carries_256_random_bits() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("rck_") and len(k) == len("rck_") + 43 for k in keys)


def _age(path: Path, seconds: float = 10.0) -> int:
    """Sets the file's mtime `seconds` back, past the racy window; returns it."""
    mtime = path.stat().st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(mtime, mtime))
    return mtime


async def test_a_registry_file_changed_after_a_quiet_while_is_read_again(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.json", ManualClock()
    auth, admin = authenticator(path, clock), FileKeyRegistry(path)
    plain, record = await add_key(admin, "acme", clock())
    _age(path)
    assert (await auth.resolve(plain)).name == "acme"  # read, and trusted from now on
    await revoke_key(admin, record.key_id, clock())
    with pytest.raises(Unauthenticated):
        await auth.resolve(plain)


@pytest.mark.parametrize("how", ["in place, another size", "replaced, the same size"])
async def test_a_registry_file_changed_under_its_old_mtime_is_read_again(
    tmp_path: Path, how: str
) -> None:
    # Same mtime (a restored backup, a copy keeping times): the size or the inode tells.
    path = tmp_path / "keys.json"
    registry = FileKeyRegistry(path)
    _, record = await add_key(registry, "acme", 0.0, api_key="k")
    mtime = _age(path)
    assert await registry.find(record.sha256) == record
    if how == "in place, another size":
        _rewrite_in_place(path, '"acme"', '"globex"')
        tenant = "globex"
    else:
        copy = tmp_path / "copy.json"
        copy.write_text(path.read_text().replace('"acme"', '"abcd"'))
        os.replace(copy, path)
        tenant = "abcd"
    os.utime(path, ns=(mtime, mtime))
    found = await registry.find(record.sha256)
    assert found is not None and found.tenant == tenant


async def test_an_empty_registry_object_holds_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{}")
    registry = FileKeyRegistry(path)
    assert await registry.records() == [] and await registry.find("0" * 64) is None


async def test_a_registry_in_a_folder_not_made_yet_is_made(tmp_path: Path) -> None:
    path = tmp_path / "new" / "keys.json"
    _, record = await add_key(FileKeyRegistry(path), "acme", 0.0)
    assert await FileKeyRegistry(path).records() == [record]


async def test_a_failed_write_leaves_the_registry_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    registry = FileKeyRegistry(path)
    _, kept = await add_key(registry, "acme", 0.0)

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        await add_key(registry, "acme", 1.0)
    assert await registry.records() == [kept]
    assert sorted(os.listdir(tmp_path)) == ["keys.json", "keys.json.lock"]


def test_an_admin_write_waits_for_another_admins_change_and_keeps_it(tmp_path: Path) -> None:
    # Two `routecache keys` runs at once: the second one's write must not be made over a
    # read the first one is about to replace, or one of the two changes is lost.
    path = tmp_path / "keys.json"
    _, record = asyncio.run(add_key(FileKeyRegistry(path), "acme", 0.0))
    inside, leave = threading.Event(), threading.Event()

    def revoke_slowly(current: KeyRecord) -> KeyRecord:
        inside.set()
        leave.wait(5)
        return replace(current, revoked_at=1.0)

    first = threading.Thread(
        target=lambda: asyncio.run(FileKeyRegistry(path).update(record.key_id, revoke_slowly))
    )
    second = threading.Thread(
        target=lambda: asyncio.run(add_key(FileKeyRegistry(path), "globex", 2.0))
    )
    first.start()
    assert inside.wait(5)
    second.start()
    second.join(0.2)
    assert second.is_alive()  # held by the first admin's lock
    leave.set()
    first.join(5)
    second.join(5)
    records = {r.tenant: r for r in asyncio.run(FileKeyRegistry(path).records())}
    assert set(records) == {"acme", "globex"} and records["acme"].revoked_at == 1.0


def test_one_api_key_digest_for_two_tenants_is_refused() -> None:
    acme, globex = Tenant("acme", None, 0.9, 3600), Tenant("globex", None, 0.9, 3600)
    digest = hash_api_key("k")
    with pytest.raises(ValueError) as refused:
        ApiKeyAuthenticator([(acme, [digest]), (globex, [digest])])
    assert str(refused.value) == (
        f"an API key digest is configured for tenants acme and globex: {digest}"
    )


def test_one_api_key_digest_listed_twice_by_one_tenant_is_refused_as_such() -> None:
    # The message said "configured for two tenants" of a digest only one tenant lists.
    acme, digest = Tenant("acme", None, 0.9, 3600), hash_api_key("k")
    with pytest.raises(ValueError) as refused:
        ApiKeyAuthenticator([(acme, [digest, digest])])
    assert str(refused.value) == f"tenant acme lists an API key digest twice: {digest}"


def test_a_static_key_check_refuses_an_unknown_key() -> None:
    auth = ApiKeyAuthenticator([(Tenant("acme", None, 0.9, 3600), [hash_api_key("right")])])
    assert auth.authenticate("right").name == "acme"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        auth.authenticate("wrong")


@pytest.mark.parametrize("tenant", ["a b", "acme\n"])  # `$` alone would let the newline in
def test_the_cli_refuses_a_tenant_name_no_config_could_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tenant: str
) -> None:
    registry = tmp_path / "keys.json"
    assert main(["keys", "--registry", str(registry), "add", "--tenant", tenant]) == 2
    assert "names are 1-64 of" in capsys.readouterr().err and not registry.exists()


def test_a_config_whose_registry_source_is_none_names_no_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "rc.toml"
    config.write_text(f'[keys]\nsource = "none"\nregistry_path = "{tmp_path / "k.json"}"\n'
                      '[[tenants]]\nname = "acme"\n')  # fmt: skip
    assert main(["keys", "--config", str(config), "add", "--tenant", "acme"]) == 2
    assert "names no key registry" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


async def test_list_shows_the_keys_of_the_tenant_asked_for_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ("--registry", str(tmp_path / "keys.json"), "--json")
    for tenant in ("acme", "globex", "acme"):
        assert await keys_cli(*registry, "add", "--tenant", tenant) == 0
    capsys.readouterr()
    assert await keys_cli(*registry, "list", "--tenant", "acme") == 0
    assert [k["tenant"] for k in json.loads(capsys.readouterr().out)["keys"]] == ["acme", "acme"]


async def test_list_shows_no_expiry_for_a_key_that_never_expires(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ("--registry", str(tmp_path / "keys.json"))
    assert await keys_cli(*registry, "add", "--tenant", "acme") == 0
    capsys.readouterr()
    assert await keys_cli(*registry, "list") == 0
    row = capsys.readouterr().out
    assert " active " in row and row.rstrip().endswith("expires -")


def test_an_unreachable_redis_registry_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens there
    assert main(["keys", "--redis-url", f"redis://:s3cret@127.0.0.1:{port}/0", "list"]) == 2
    err = capsys.readouterr().err
    assert err == f"routecache: cannot reach Redis at redis://127.0.0.1:{port}/0\n"  # no password


def test_an_unreachable_redis_registry_never_shows_a_password_in_the_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # redis-py's documented unix-socket form carries the password in the query: it was shown.
    url = f"unix://{tmp_path}/none.sock?db=2&password=s3cret"
    assert main(["keys", "--redis-url", url, "list"]) == 2
    err = capsys.readouterr().err
    assert err == f"routecache: cannot reach Redis at unix://{tmp_path}/none.sock?db=2\n"


def test_revoking_an_unknown_key_exits_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    assert main(["keys", "--registry", str(path), "revoke", "nope"]) == 1
    assert capsys.readouterr().err == f"routecache: key registry {path}: no key with id nope\n"


def test_every_keys_command_names_the_absolute_registry_it_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A relative keys.registry_path is relative to the working directory (as every path
    # setting is): `keys --config` run from another folder edited another file and said
    # nothing of which. Every command now names the file it used, output and errors alike.
    config = tmp_path / "rc.toml"
    config.write_text('[keys]\nregistry_path = "var/keys.json"\n[[tenants]]\nname = "acme"\n')
    monkeypatch.chdir(tmp_path)
    used = tmp_path / "var" / "keys.json"
    cfg = ["keys", "--config", str(config)]
    assert main([*cfg, "--json", "add", "--tenant", "acme"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["registry"] == str(used)
    assert main([*cfg, "add", "--tenant", "acme"]) == 0
    assert f"key registry {used}" in capsys.readouterr().out
    assert main([*cfg, "list"]) == 0
    assert f"key registry {used}" in capsys.readouterr().out
    assert main([*cfg, "revoke", "nope"]) == 1
    assert capsys.readouterr().err == f"routecache: key registry {used}: no key with id nope\n"
    assert main([*cfg, "add", "--tenant", "globex"]) == 2
    assert str(used) in capsys.readouterr().err


def test_the_service_logs_the_absolute_registry_path_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from routecache.router.bootstrap import build_key_registry

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="routecache.router.bootstrap")
    registry = build_key_registry(load_settings(keys={"registry_path": "var/keys.json"}), None)
    assert isinstance(registry, FileKeyRegistry)
    assert registry.path == tmp_path / "var" / "keys.json"
    assert f"API key registry: file {tmp_path / 'var' / 'keys.json'}" in caplog.text


def _as_user(uid: int, argv: list[str]) -> int:
    """`routecache ARGV` in a child that runs as `uid` (imports made here, as root: the
    interpreter may be one only root can read); its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.setegid(uid)
            os.seteuid(uid)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = main(argv)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as two users")
def test_a_lock_made_by_root_still_lets_the_registrys_owner_write(tmp_path: Path) -> None:
    # `sudo routecache keys add` left keys.json.lock root's 0644 (opened for append): every
    # later write command of the service user, revoking a leaked key included, was exit 2.
    folder = Path(tempfile.mkdtemp(prefix="rc-lock-"))  # tmp_path's parents are root's alone
    try:
        os.chmod(folder, 0o755)
        os.chown(folder, 65534, 65534)
        path = folder / "keys.json"
        path.write_text('{"keys": []}')
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o600)
        registry = ["keys", "--registry", str(path)]
        assert main([*registry, "add", "--tenant", "acme"]) == 0  # as root: makes the lock
        lock = folder / "keys.json.lock"
        made = lock.stat()
        assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (65534, 65534, 0o600)
        key_id = json.loads(path.read_text())["keys"][0]["key_id"]
        assert _as_user(65534, [*registry, "revoke", key_id]) == 0
        # A lock an older version left root's 0644: readable, so lockable, by the owner too.
        os.chown(lock, 0, 0)
        os.chmod(lock, 0o644)
        assert _as_user(65534, [*registry, "add", "--tenant", "acme"]) == 0
        assert main([*registry, "add", "--tenant", "acme"]) == 0
        keys = json.loads(path.read_text())["keys"]
        assert len(keys) == 3 and [k["key_id"] for k in keys if k["revoked_at"]] == [key_id]
    finally:
        shutil.rmtree(folder)


async def test_a_registry_file_changed_just_now_is_parsed_again_only_when_its_bytes_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # For 2 s after each write (for good if its mtime is ahead of the clock) every lookup
    # parsed and checked the whole file on the event loop: 40 ms a call at 10,000 keys.
    path = tmp_path / "keys.json"
    registry = FileKeyRegistry(path)
    records = [(await add_key(registry, "acme", 0.0, api_key=f"k{i}"))[1] for i in range(3)]
    ahead = time.time_ns() + 3600 * 10**9  # racy for the whole test, however slow
    os.utime(path, ns=(ahead, ahead))
    parsed: list[object] = []
    checked = KeyRecord.from_fields.__func__  # type: ignore[attr-defined]

    def counted(cls: type[KeyRecord], fields: object) -> KeyRecord:
        parsed.append(fields)
        return checked(cls, fields)  # type: ignore[no-any-return]

    monkeypatch.setattr(KeyRecord, "from_fields", classmethod(counted))
    for _ in range(20):
        assert await registry.find(records[0].sha256) == records[0]
    assert len(parsed) == 3  # once, not once per lookup
    await revoke_key(FileKeyRegistry(path), records[0].key_id, 1.0)
    os.utime(path, ns=(ahead, ahead))
    before = len(parsed)
    found = await registry.find(records[0].sha256)
    assert found is not None and found.revoked_at == 1.0 and len(parsed) == before + 3

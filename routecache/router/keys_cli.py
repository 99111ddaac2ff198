"""`routecache keys add|rotate|revoke|list`: API key administration without a restart.

The registry is the one the service reads (see routecache/router/keyring.py): the file of
keys.registry_path, or Redis on the Redis backend, as the --config settings say; --registry
FILE or --redis-url URL name one directly. A new key is printed once and never stored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from redis.exceptions import RedisError

from routecache.cli_args import number_between
from routecache.router.keyring import (
    FileKeyRegistry,
    KeyAdmin,
    KeyNotFound,
    KeyNotLive,
    KeyRecord,
    KeyRegistryError,
    add_key,
    revoke_key,
    rotate_key,
)
from routecache.router.settings import (
    CONFIG_ENV_VAR,
    TENANT_NAME_PATTERN,
    ConfigError,
    Settings,
    check_redis_url,
    read_settings,
    redis_url_for_display,
)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="the service's TOML settings (its registry)")
    where.add_argument("--registry", type=Path, help="a key registry file")
    where.add_argument(
        "--redis-url", type=_redis_url, help="a Redis key registry (with --key-prefix)"
    )
    parser.add_argument("--key-prefix", default="rc", help="with --redis-url: store.key_prefix")
    parser.add_argument("--json", action="store_true", help="print JSON")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a new key for a tenant (printed once)")
    add.add_argument("--tenant", required=True)
    rotate = actions.add_parser("rotate", help="a new key; the old one expires after an overlap")
    rotate.add_argument("key_id")
    rotate.add_argument("--overlap-seconds", type=number_between(0, math.inf), default=None,
                        help="how long the old key stays valid (0: revoked at once; default: "
                        "keys.rotation_overlap_seconds)")  # fmt: skip
    revoke = actions.add_parser("revoke", help="the key fails from the next call on")
    revoke.add_argument("key_id")
    listing = actions.add_parser("list", help="key ids, tenants and states (never the keys)")
    listing.add_argument("--tenant", default=None)


def _redis_url(text: str) -> str:
    try:
        return check_redis_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


@asynccontextmanager
async def open_admin(
    args: argparse.Namespace, settings: Settings
) -> AsyncIterator[tuple[KeyAdmin, str]]:
    """The registry the arguments name, and where it is, for the output and every error: a
    file's absolute path (a relative one is the working directory's, so an admin in another
    folder than the service's edits another file) or the Redis hash and server."""
    redis_url, prefix, path = args.redis_url, args.key_prefix, args.registry
    if args.config is not None:
        source = settings.keys.source
        if source == "redis" or (source == "auto" and settings.store.backend == "redis"):
            redis_url = settings.store.redis_url.get_secret_value()
            prefix = settings.store.key_prefix
        elif source != "none" and settings.keys.registry_path is not None:
            path = settings.keys.registry_path
        else:
            raise ConfigError("the config names no key registry: set keys.registry_path "
                              "or use the redis store backend")  # fmt: skip
    if redis_url is not None:
        from routecache.backends.keys import KeySpace
        from routecache.backends.link import RedisLink
        from routecache.backends.redis_keys import RedisKeyRegistry

        link = RedisLink(redis_url, 5.0, 2, 1.0)
        keyspace = KeySpace(prefix)
        try:
            if not await link.connect():
                raise ConfigError(f"cannot reach Redis at {redis_url_for_display(redis_url)}")
            where = f"{keyspace.api_keys} in Redis at {redis_url_for_display(redis_url)}"
            yield RedisKeyRegistry(link, keyspace), where
        finally:
            await link.aclose()
        return
    if path is None:
        raise ConfigError("name the registry: --config FILE, --registry FILE or --redis-url URL")
    registry = FileKeyRegistry(path)
    yield registry, str(registry.path)


def _check_tenant(settings: Settings, args: argparse.Namespace, tenant: str) -> None:
    if not re.fullmatch(TENANT_NAME_PATTERN, tenant):
        raise ConfigError(f"tenant {tenant!r}: names are 1-64 of A-Z a-z 0-9 _ . -")
    if args.config is not None and tenant not in {t.name for t in settings.tenants}:
        raise ConfigError(f"tenant {tenant!r} is not configured in {args.config}")


def _show(record: KeyRecord, now: float) -> dict[str, object]:
    shown = {k: v for k, v in asdict(record).items() if k != "sha256"}
    return {**shown, "status": record.status(now)}


async def run_keys(args: argparse.Namespace) -> int:
    # As serve does: the config ROUTECACHE_CONFIG names stands for --config (its registry),
    # unless --registry or --redis-url says where the keys are (then it is not read at all).
    # read_settings on every path: ROUTECACHE_* variables apply, and a bad one is one line.
    named = os.environ.get(CONFIG_ENV_VAR)
    if named and args.config is None and args.registry is None and args.redis_url is None:
        args.config = Path(named)
    settings = read_settings(args.config)
    async with open_admin(args, settings) as (admin, where):
        try:
            out = await _act(args, settings, admin)
        except (KeyNotFound, KeyNotLive) as error:
            print(f"routecache: key registry {where}: {error.args[0]}", file=sys.stderr)
            return 1
        except KeyRegistryError as error:  # its message names the registry
            raise ConfigError(str(error)) from error
        except ConfigError as error:  # a tenant the config lacks
            raise ConfigError(f"key registry {where}: {error}") from error
        except RedisError as error:  # reached at start, failing since (or a key of another type)
            raise ConfigError(f"key registry {where}: {error}") from error
        except OSError as error:  # the file's folder, or its lock, cannot be written
            raise ConfigError(f"key registry {where}: {error}") from error
    _print(args, {"registry": where, **out})
    return 0


async def _act(args: argparse.Namespace, settings: Settings, admin: KeyAdmin) -> dict[str, object]:
    now = time.time()
    if args.action == "add":
        _check_tenant(settings, args, args.tenant)
        plain, record = await add_key(admin, args.tenant, now)
        return {"api_key": plain, **_show(record, now)}
    if args.action == "rotate":
        overlap = args.overlap_seconds
        if overlap is None:
            overlap = settings.keys.rotation_overlap_seconds
        plain, record, old = await rotate_key(admin, args.key_id, now, overlap)
        return {"api_key": plain, **_show(record, now), "old": _show(old, now)}
    if args.action == "revoke":
        return _show(await revoke_key(admin, args.key_id, now), now)
    records = [r for r in await admin.records() if args.tenant is None or r.tenant == args.tenant]
    return {"keys": [_show(r, now) for r in sorted(records, key=lambda r: r.created_at)]}


def _print(args: argparse.Namespace, out: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"key registry {out['registry']}")
    if "keys" in out:
        for row in out["keys"]:  # type: ignore[attr-defined]
            created, expires = _when(row["created_at"]), _when(row["expires_at"])
            print(f"{row['key_id']}  {row['tenant']:<20} {row['status']:<9} "
                  f"created {created}  expires {expires}")  # fmt: skip
        return
    if "api_key" in out:
        print(f"api key (shown once; only its SHA-256 is kept): {out['api_key']}")
    print(f"key id {out['key_id']} of tenant {out['tenant']}: {out['status']}")
    old = out.get("old")
    if isinstance(old, dict):
        state, ends = old["status"], _when(old["expires_at"])
        if state == "rotating":
            state = f"rotating, valid until {ends}"
        elif state == "expired":
            state = f"expired at {ends}"
        print(f"old key {old['key_id']}: {state}")


def _when(ts: object) -> str:
    if not isinstance(ts, float | int):
        return "-"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):  # a huge overlap, past the platform's time_t
        return f"{ts:g} (unix time)"

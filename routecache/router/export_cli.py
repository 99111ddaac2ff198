"""`routecache export-events`: the event log, from its JSONL file or the Redis stream, as a
parquet table (the notebook) or as JSONL lines (`retrain --events`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routecache.router.events import SkippedLines
from routecache.router.settings import (
    TENANT_NAME_PATTERN,
    ConfigError,
    Settings,
    check_redis_url,
    load_settings,
    redis_url_for_display,
)

# pandas and pyarrow (the analysis extra) are imported only when exporting.


@dataclass(frozen=True)
class RedisStream:
    """The tenants' event streams rc:{T}:events (store.backend = "redis", no events.path)."""

    url: str = field(repr=False)  # never shown: it may hold a password
    key_prefix: str
    tenants: tuple[str, ...]

    def __str__(self) -> str:
        return f"redis event stream of {', '.join(self.tenants)}"


def add_arguments(export: argparse.ArgumentParser) -> None:
    config_help = "TOML settings file: its events.path, else its Redis store's streams, is read"
    export.add_argument("--config", type=Path, help=config_help)
    # One source: --events with --redis-url read the file and ignored the Redis flags.
    source = export.add_mutually_exclusive_group()
    source.add_argument("--events", type=Path, help="the JSONL event log (default: events.path)")
    source.add_argument(
        "--redis-url", type=_redis_url, help="read the tenants' Redis event streams instead"
    )
    export.add_argument(
        "--tenant", action="append", default=[], metavar="NAME", type=_tenant_name,
        help="a tenant whose stream is read; repeat (default: the config's tenants)",
    )  # fmt: skip
    export.add_argument("--since", help="only events since: 90m, 24h, 7d, an ISO date or epoch")
    export.add_argument(
        "--format", choices=("parquet", "jsonl"), default="parquet",
        help="parquet: one table (the notebook); jsonl: events.path's lines (retrain --events)",
    )  # fmt: skip
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.set_defaults(run=run)


def _redis_url(text: str) -> str:
    try:
        return check_redis_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _tenant_name(text: str) -> str:
    """A name a tenant can have: any other has no stream, and exported nothing, exit 0."""
    if not re.fullmatch(TENANT_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: not a tenant name (1 to 64 of A-Z a-z 0-9 _ . -)"
        )
    return text


def run(args: argparse.Namespace) -> int:
    _check_analysis_extra()
    from routecache.analysis.export import parse_since

    source = _source(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as error:
        raise ConfigError(str(error)) from error
    skipped = SkippedLines()
    events = _read(source, since, skipped)
    count = _write(args, events, source)
    print(f"{count} events written to {args.out}")
    if skipped.total:
        print(
            f"{skipped.total} lines of {source} skipped: {skipped.torn} not a JSON object (torn by"
            f" a crash?), {skipped.no_time} with a ts that is no time",
            file=sys.stderr,
        )
    return 0


def _check_analysis_extra() -> None:
    try:
        importlib.import_module("routecache.analysis.export")
    except ImportError as error:
        raise ConfigError(
            f"export-events needs the analysis extra ({error.name} is missing): "
            "pip install 'routecache[analysis]'"
        ) from error


def _source(args: argparse.Namespace) -> Path | RedisStream:
    """--events, else --redis-url, else the config's events.path, else its Redis store."""
    if args.events is not None:
        return _existing(_no_tenant(args.events, args.tenant))
    settings = load_settings(args.config)
    if args.redis_url is not None:
        return _stream(args.redis_url, settings, args.tenant)
    if settings.events.path is not None:
        return _existing(_no_tenant(settings.events.path, args.tenant))
    if settings.store.backend == "redis":
        return _stream(settings.store.redis_url.get_secret_value(), settings, args.tenant)
    raise ConfigError(
        "no event log: pass --events FILE or --redis-url URL, or set events.path (or "
        'store.backend = "redis") in the config'
    )


def _no_tenant(path: Path, tenants: list[str]) -> Path:
    """`path`, unless --tenant was given: it picks Redis streams, and was ignored for a file."""
    if tenants:
        raise ConfigError(
            f"--tenant picks the Redis streams to read, but the events come from the file "
            f"{path}, which holds every tenant's: drop --tenant, or read --redis-url URL"
        )
    return path


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"event log not found: {path}")
    return path


def _stream(url: str, settings: Settings, tenants: list[str]) -> RedisStream:
    named = tuple(dict.fromkeys(tenants)) or tuple(t.name for t in settings.tenants)
    if not named:
        raise ConfigError("name the tenants whose event stream to read: --tenant NAME, or "
                          "--config FILE with [[tenants]]")  # fmt: skip
    return RedisStream(url, settings.store.key_prefix, named)


def _read(
    source: Path | RedisStream, since: float | None, skipped: SkippedLines
) -> list[dict[str, Any]]:
    from routecache.analysis.export import events_since, read_events

    try:
        if isinstance(source, Path):
            return list(read_events(source, since, skipped))
        picked = events_since(asyncio.run(_read_streams(source)), since, skipped)
        # The tenants' streams, one after the other, merged in time as one events.path holds
        # them (a picked event's ts is a number, or absent or null: 0).
        return sorted(picked, key=lambda event: event.get("ts") or 0.0)
    except UnicodeDecodeError as error:
        raise ConfigError(f"event log {source} is not UTF-8 text ({error})") from error


async def _read_streams(source: RedisStream) -> list[dict[str, Any]]:
    """Every event of the tenants' streams, a tenant after the other."""
    from routecache.backends.keys import KeySpace
    from routecache.backends.link import RedisDown, RedisLink
    from routecache.backends.redis_events import iter_events

    link = RedisLink(source.url, 5.0, 2, 1.0)
    try:
        if not await link.connect():
            raise ConfigError(f"cannot reach Redis at {redis_url_for_display(source.url)}")
        keyspace = KeySpace(source.key_prefix)
        events: list[dict[str, Any]] = []
        for tenant in source.tenants:
            read = [event async for event in iter_events(link, keyspace, tenant)]
            if not read:  # a typo in --tenant exported nothing without a word
                print(f"routecache: no events for tenant {tenant}", file=sys.stderr)
            events += read
        return events
    except RedisDown as error:  # RedisRefused too: one line, not a traceback
        raise ConfigError(f"reading the {source}: {error}") from error
    finally:
        await link.aclose()


def _write(
    args: argparse.Namespace, events: list[dict[str, Any]], source: Path | RedisStream
) -> int:
    from routecache.analysis.export import MixedColumnError, write_jsonl, write_parquet

    origin = f"event log {source}" if isinstance(source, Path) else str(source)
    try:
        if args.format == "jsonl":
            return write_jsonl(events, args.out)
        return write_parquet(events, args.out, origin)
    except MixedColumnError as error:
        raise ConfigError(str(error)) from error
    except OSError as error:  # --out cannot be written (a folder, no such place)
        raise ConfigError(f"export-events: {error}") from error

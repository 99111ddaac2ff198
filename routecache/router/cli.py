"""The `routecache` command: serve, demo, ask, replay-upstream and the offline jobs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from routecache.cli_args import at_least, number_between
from routecache.router.settings import ConfigError, load_settings

T = TypeVar("T")


def _serve(args: argparse.Namespace) -> int:
    from routecache.router.bootstrap import start_service
    from routecache.router.logs import configure_logging
    from routecache.router.server import ListenError

    settings = load_settings(args.config)
    level = "debug" if args.verbose else settings.logging.level
    configure_logging(settings.logging.format, level, quiet_libraries=not args.verbose)
    if not settings.tenants:
        raise ConfigError(
            "no tenants configured: add [[tenants]] to a TOML file (see examples/dev.toml) "
            "and pass --config FILE or set ROUTECACHE_CONFIG"
        )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Installed before loading: a SIGTERM during start-up cancels the start (below).
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            service = await _start_unless_stopped(start_service(settings), stop)
        except ListenError as error:
            raise ConfigError(
                f"cannot listen (server.port {settings.server.port}, "
                f"metrics.port {settings.metrics.port}): {error}"
            ) from error
        log = logging.getLogger(__name__)
        if service is None:
            log.info("SIGTERM/SIGINT during the start: stopped before serving")
            return
        assert service.server is not None
        metrics = f", metrics on :{service.metrics_port}" if service.metrics_port else ""
        print(f"routecache serving on {settings.server.host}:{service.server.port}{metrics}",
              flush=True)  # fmt: skip
        await stop.wait()
        log.info("SIGTERM/SIGINT: draining and stopping")
        # A second signal stops at once, as most servers do: the calls still in flight are
        # cancelled, not waited for (server.grace_seconds may be long); the rest still closes.
        server = service.server
        cutting: list[asyncio.Task[None]] = []

        def stop_now() -> None:
            log.warning("second SIGTERM/SIGINT: stopping without waiting for calls in flight")
            cutting.append(loop.create_task(server.stop_now()))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_now)
        await service.aclose()
        await asyncio.gather(*cutting)

    asyncio.run(run())
    return 0


async def _start_unless_stopped(start: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """The start's result; None when `stop` is set first. The start (loading models, index and
    snapshot: seconds to minutes) is then cancelled, which releases what it had taken: a
    SIGTERM waited for the whole start, and the service went SERVING before it stopped."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():  # also when both are: serve, then stop as after any signal
        return starting.result()
    starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        # Ours, unless this task itself is being cancelled: then it goes on up.
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise
        return None
    return starting.result()  # it finished before the cancel landed: serve, then stop


def _writable_file(path: Path, flag: str) -> None:
    """ConfigError unless `path` can be made a file: checked before a run that ends by writing
    it, not found out once the run is over."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: no folder {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {path.parent} is not writable")


def _demo(args: argparse.Namespace) -> int:
    from routecache.router.demo import run_demo

    if args.metrics_out:
        _writable_file(args.metrics_out, "--metrics-out")
    print("starting the replay upstream and routecache (loading the embedding model)...")
    report = asyncio.run(
        run_demo(n_recorded=args.recorded, concurrency=args.concurrency, seed=args.seed,
                 upstream_latency_ms=args.upstream_latency_ms, events_out=args.events_out,
                 similarity_threshold=args.similarity_threshold)
    )  # fmt: skip
    print(report.text)
    if args.events_out:
        print(f"events appended to {args.events_out}")
    if args.metrics_out:
        try:
            args.metrics_out.write_text(report.metrics_text, encoding="utf-8")
        except OSError as error:  # a folder, no such place: the report above is printed
            raise ConfigError(f"--metrics-out {args.metrics_out}: {error}") from error
        print(f"/metrics at the end of the run written to {args.metrics_out}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from routecache.cache.onnx_embedder import OnnxCacheError, ensure_onnx_export

    try:
        print(ensure_onnx_export(onnx_dir=args.onnx_dir))
    except OnnxCacheError as error:  # a read-only folder: one line, not a traceback
        raise ConfigError(f"--onnx-dir: {error}") from error
    return 0


def _ask(args: argparse.Namespace) -> int:
    from routecache.router.ask import ask

    return asyncio.run(ask(args))


def _replay_upstream(args: argparse.Namespace) -> int:
    from routecache.replay.config import config_from_args
    from routecache.replay.recordings import Recordings
    from routecache.replay.server import serve_forever

    try:
        config = config_from_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0 to 65535")
    try:
        recordings = Recordings.load(config.recordings_path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"--recordings {config.recordings_path}: {error}") from error
    if not len(recordings):
        raise ConfigError(f"--recordings {config.recordings_path}: no recordings in it")
    try:
        asyncio.run(serve_forever(config, args.host, args.port, recordings))
    except OSError as error:  # the bind: nothing else in the server raises one
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {error}") from error
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from routecache.router.auth import check_presentable_key, hash_api_key

    try:  # a digest no request can match configured a key that never authenticates
        check_presentable_key(args.key)
    except ValueError as error:
        raise ConfigError(f"hash-key: {error}") from error
    print(hash_api_key(args.key))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from routecache.router.keys_cli import run_keys

    return asyncio.run(run_keys(args))


def _rollback_classifier(args: argparse.Namespace) -> int:
    from routecache.classifier.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(args.registry)
    try:
        previous = registry.current_version()
        version = registry.rollback(args.to)
    except (RegistryError, OSError) as error:  # OSError: a file it cannot read, say why
        print(f"routecache: {error}", file=sys.stderr)
        return 1
    print(
        f"classifier rolled back: {previous} -> {version}; services pick it up at their next check"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from routecache.replay.config import add_cli_arguments as replay_arguments
    from routecache.router import export_cli, keys_cli
    from routecache.router.ask import add_cli_arguments as ask_arguments
    from routecache.training import (
        eval_cache,
        eval_router,
        retrain,
        train_classifier,
        train_verifier,
    )

    parser = argparse.ArgumentParser(prog="routecache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", type=Path, help="TOML settings file (or ROUTECACHE_CONFIG)")
    serve.set_defaults(run=_serve)

    demo = verbs.add_parser("demo", help="replay upstream + service + mixed traffic, summarised")
    demo.add_argument("--recorded", type=at_least(1), default=45, help="recorded prompts to ask")
    demo.add_argument("--concurrency", type=at_least(1), default=4)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--upstream-latency-ms", type=at_least(0), default=0)
    demo.add_argument("--similarity-threshold", type=number_between(0, 1, above_low=True),
                      default=None,
                      help="serve by this cosine threshold instead of the hit verifier "
                      "(lower: more false hits)")  # fmt: skip
    demo.add_argument("--events-out", type=Path, help="also append the run's events to this JSONL")
    demo.add_argument("--metrics-out", type=Path, help="write /metrics as scraped at the end")
    demo.set_defaults(run=_demo)

    export_cli.add_arguments(
        verbs.add_parser(
            "export-events", help="event log (JSONL or Redis stream) → parquet or JSONL"
        )
    )

    ask = verbs.add_parser("ask", help="send one request to a running server, print JSON")
    ask_arguments(ask)
    ask.set_defaults(run=_ask)

    replay = verbs.add_parser("replay-upstream", help="OpenAI-compatible server of recordings")
    replay_arguments(replay)
    replay.set_defaults(run=_replay_upstream)

    train = verbs.add_parser("train-classifier", help="train the difficulty classifier")
    train_classifier.add_cli_arguments(train)
    train.set_defaults(run=train_classifier.run)

    evaluate = verbs.add_parser("eval-router", help="APGR/CPT of the classifier on labelled data")
    eval_router.add_cli_arguments(evaluate)
    evaluate.set_defaults(run=eval_router.run)

    evaluate_cache = verbs.add_parser(
        "eval-cache", help="precision/recall/false-hit rate of the cache on labelled pairs"
    )
    eval_cache.add_cli_arguments(evaluate_cache)
    evaluate_cache.set_defaults(run=eval_cache.run)

    verifier = verbs.add_parser(
        "train-verifier", help="train + export + calibrate the cache hit verifier (about 1 h)"
    )
    train_verifier.add_cli_arguments(verifier)
    verifier.set_defaults(run=train_verifier.run)

    onnx = verbs.add_parser("export-onnx", help="export the packaged MiniLM to ONNX (once)")
    onnx.add_argument("--onnx-dir", type=Path, help="default: ~/.cache/routecache/onnx")
    onnx.set_defaults(run=_export_onnx)

    retrain_verb = verbs.add_parser(
        "retrain", help="train on labelled data + logged events; promote if not worse"
    )
    retrain.add_cli_arguments(retrain_verb)
    retrain_verb.set_defaults(run=retrain.run)

    rollback = verbs.add_parser(
        "rollback-classifier", help="point the registry back to the previously promoted model"
    )
    rollback.add_argument("--registry", type=Path, required=True, help="model registry folder")
    rollback.add_argument("--to", default=None, help="a version (default: the previous one)")
    rollback.set_defaults(run=_rollback_classifier)

    keys = verbs.add_parser("keys", help="add, rotate, revoke and list API keys (no restart)")
    keys_cli.add_cli_arguments(keys)
    keys.set_defaults(run=_keys)

    hash_key = verbs.add_parser("hash-key", help="print the SHA-256 digest to configure a key")
    hash_key.add_argument("key")
    hash_key.set_defaults(run=_hash_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # One line per HTTP call drowns the service's own messages; -v brings them back.
        for chatty in ("httpx", "httpcore", "aiohttp.access", "faiss.loader"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        code: int = args.run(args)
    except ConfigError as error:
        print(f"routecache: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


__all__ = ["build_parser", "main"]

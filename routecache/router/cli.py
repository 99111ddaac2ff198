"""The `routecache` command: serve, demo, ask, replay-upstream and the offline jobs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from routecache.router.settings import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    from routecache.router.bootstrap import start_service

    settings = load_settings(args.config)
    if not settings.tenants:
        raise ConfigError(
            "no tenants configured: add [[tenants]] to a TOML file (see examples/dev.toml) "
            "and pass --config FILE or set ROUTECACHE_CONFIG"
        )

    async def run() -> None:
        service = await start_service(settings)
        assert service.server is not None
        print(f"routecache serving on {settings.server.host}:{service.server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await service.aclose()

    asyncio.run(run())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from routecache.router.demo import run_demo

    print("starting the replay upstream and routecache (loading the embedding model)...")
    summary = asyncio.run(
        run_demo(n_recorded=args.recorded, concurrency=args.concurrency, seed=args.seed,
                 upstream_latency_ms=args.upstream_latency_ms)
    )  # fmt: skip
    print(summary)
    return 0


def _ask(args: argparse.Namespace) -> int:
    from routecache.router.ask import ask

    return asyncio.run(ask(args))


def _replay_upstream(args: argparse.Namespace) -> int:
    from routecache.replay.config import config_from_args
    from routecache.replay.server import serve_forever

    try:
        config = config_from_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    asyncio.run(serve_forever(config, args.host, args.port))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from routecache.router.auth import hash_api_key

    print(hash_api_key(args.key))
    return 0


def _rollback_classifier(args: argparse.Namespace) -> int:
    from routecache.classifier.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(args.registry)
    try:
        previous = registry.current_version()
        version = registry.rollback(args.to)
    except RegistryError as error:
        print(f"routecache: {error}", file=sys.stderr)
        return 1
    print(
        f"classifier rolled back: {previous} -> {version}; services pick it up at their next check"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from routecache.replay.config import add_cli_arguments as replay_arguments
    from routecache.router.ask import add_cli_arguments as ask_arguments
    from routecache.training import eval_router, retrain, train_classifier

    parser = argparse.ArgumentParser(prog="routecache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", type=Path, help="TOML settings file (or ROUTECACHE_CONFIG)")
    serve.set_defaults(run=_serve)

    demo = verbs.add_parser("demo", help="replay upstream + service + mixed traffic, summarised")
    demo.add_argument("--recorded", type=int, default=45, help="recorded prompts to ask")
    demo.add_argument("--concurrency", type=int, default=4)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--upstream-latency-ms", type=int, default=0)
    demo.set_defaults(run=_demo)

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

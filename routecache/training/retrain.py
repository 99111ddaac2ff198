"""Offline retraining: labelled files + logged events -> candidate -> promote only if not worse.

    routecache retrain --data routing_train.jsonl [--events events.jsonl ...] --registry DIR

1. Reads the labelled routing files and the service's event logs (labels from events:
   training/outcomes.py). A hash of the prompt holds out a slice of the labelled rows; event
   labels never enter it, and an event whose prompt is held out is dropped (also one the
   embedder's tokenizer reads as it: see same_request_keys), so the holdout
   stays clean and is the same for every run with the same data and seed.
2. Embeds every prompt, reusing DIR/embeddings/EMBEDDER.npz for prompts seen before.
3. Fits a candidate on the rest and scores the holdout with it and with the model in service
   (the registry's CURRENT version, else the packaged model), both through the service's code.
4. Adds the candidate to the registry, and points CURRENT at it only if its holdout APGR is
   not below the incumbent's (minus --tolerance), and CURRENT still names that incumbent:
   a promotion or rollback made meanwhile is kept (exit 3). Earlier versions stay for rollback
   (`routecache rollback-classifier --registry DIR`). Services hot-reload CURRENT.

An incumbent trained with this holdout in its training data looks better than it is here, which
only makes promotion more conservative.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routecache.cache.scope import normalise_prompt
from routecache.classifier import metrics
from routecache.classifier.model import (
    ClassifierArtifactError,
    load_artifact,
    packaged_artifact_path,
    save_artifact,
)
from routecache.classifier.registry import CurrentMovedError, ModelRegistry, RegistryError
from routecache.cli_args import (
    fraction,
    number_between,
    positive_int,
    positive_number,
    random_seed,
)
from routecache.router.events import SkippedLines
from routecache.training.data_files import (
    DataFileError,
    distinct_files,
    exits_2_on_data_error,
    writable_folder,
)
from routecache.training.outcomes import EventLabel, labels_from_events, read_events
from routecache.training.routing_data import (
    RoutingRow,
    holdout_mask,
    outcomes,
    read_routing_rows,
    require_both_sides,
)
from routecache.training.train_classifier import (
    DEFAULT_C,
    LabelledSet,
    describe,
    embed_prompts,
    make_embedder,
    score_rows,
    train_candidate,
)
from routecache.unicode_text import uncased_form


def event_set(labels: Sequence[EventLabel], embeddings: np.ndarray[Any, Any]) -> LabelledSet:
    return LabelledSet(
        [label.prompt for label in labels],
        embeddings,
        np.array([not label.weak_correct for label in labels], dtype=np.float64),
        np.array(
            [np.nan if label.strong_correct is None else float(not label.strong_correct)
             for label in labels],
            dtype=np.float64,
        ),
    )  # fmt: skip


def same_request_keys(prompt: str) -> set[tuple[str, str]]:
    """Forms under which two prompts are one request to the model: the uncased MiniLM gives
    prompts its tokenizer reads alike (unicode_text.uncased_form: case, accents, white space,
    around punctuation too) the same vector, and the service's exact cache key
    (scope.normalise_prompt) folds end punctuation too.
    Only for dropping event labels of held-out prompts: the holdout split hashes the prompt
    as written (the packaged model's split depends on it)."""
    return {("embedded", uncased_form(prompt)), ("exact_key", normalise_prompt(prompt))}


def outside_holdout(
    labels: Sequence[EventLabel], held_rows: Sequence[RoutingRow]
) -> list[EventLabel]:
    """The labels whose prompt is no held-out prompt in any of its same_request_keys: one
    that is would sit in the candidate's bank at similarity 1 and grade the holdout itself."""
    held: set[tuple[str, str]] = set()
    for row in held_rows:
        held |= same_request_keys(row.prompt)
    return [label for label in labels if held.isdisjoint(same_request_keys(label.prompt))]


def check_readable(registry: ModelRegistry) -> None:
    """Reads CURRENT before the minutes of embedding: a damaged one (another encoding) is one
    line and exit 2, not a traceback after the candidate was registered."""
    try:
        registry.current_version()
    except RegistryError as error:
        raise DataFileError(f"--registry {registry.root}: {error}") from error


def incumbent_path(registry: ModelRegistry, in_service: str | None) -> Path:
    """The artifact of the model in service: CURRENT's (`in_service`), else the packaged one."""
    return packaged_artifact_path() if in_service is None else registry.artifact_path(in_service)


def check_same_embedder(registry: ModelRegistry, embedder_name: str) -> None:
    """DataFileError if the model in service learned from another embedder than the candidate
    will: the services embed with the incumbent's, and every replica would refuse the
    candidate (classifier/reloading.py), or cannot start on it. --allow-embedder-change skips
    this, for a planned switch of the services' cache.embedder."""
    try:
        incumbent = load_artifact(incumbent_path(registry, registry.current_version()))
    except ClassifierArtifactError:  # reported when compared; it must not block its replacement
        return
    theirs = incumbent.metadata.get("embedder")
    if theirs != embedder_name:
        raise DataFileError(
            f"the model in service ({incumbent.version}) was trained on embedder {theirs!r}, "
            f"this run embeds with {embedder_name!r}: services embedding with {theirs!r} "
            "would refuse the candidate. Retrain with the services' --embedder, or pass "
            "--allow-embedder-change when switching the services' cache.embedder too"
        )


def incumbent_apgr(
    artifact: Path,
    rows: Sequence[RoutingRow],
    embeddings: np.ndarray[Any, Any],
    embedder_name: str,
) -> tuple[str | None, float | None]:
    """(version, holdout APGR) of the model in service, at `artifact`; None where none is
    comparable."""
    try:
        incumbent = load_artifact(artifact)
    except ClassifierArtifactError as error:
        print(
            f"the model in service cannot be loaded ({error}); comparing with none", file=sys.stderr
        )
        return None, None
    if incumbent.metadata.get("embedder") != embedder_name:
        return incumbent.version, None  # another embedder: its scores mean nothing here
    scores, _ = score_rows(incumbent, embeddings, rows)
    weak, strong = outcomes(rows)
    return incumbent.version, metrics.apgr(scores, weak, strong)


def promote_unless_moved(registry: ModelRegistry, version: str, in_service: str | None) -> bool:
    """Promote `version` if CURRENT still names the model it was compared with: a promotion
    or rollback since (another retrain, an operator) is not overridden unseen. False if not."""
    try:
        registry.promote(version, expected_current=in_service)
    except CurrentMovedError as error:
        print(
            f"routecache: {version} not promoted: the version in service changed while it was "
            f"compared ({error}); compare again, or promote it by hand",
            file=sys.stderr,
        )
        return False
    return True


@exits_2_on_data_error
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    registry = ModelRegistry(Path(args.registry))
    data_paths = distinct_files([Path(p) for p in args.data])
    event_paths = distinct_files([Path(p) for p in args.events or []])
    rows = read_routing_rows(data_paths)
    writable_folder(registry.root, "--registry")
    check_readable(registry)
    held = holdout_mask([r.prompt for r in rows], args.holdout_fraction, args.seed)
    held_rows = [r for r, h in zip(rows, held, strict=True) if h]
    train_rows = [r for r, h in zip(rows, held, strict=True) if not h]
    skipped = SkippedLines()
    events = read_events(event_paths, skipped)
    if skipped.torn:  # said, as export-events says it: a log read short looked complete
        print(
            f"routecache: {skipped.torn} lines of {', '.join(map(str, event_paths))} skipped: "
            "not a JSON object (torn by a crash?)",
            file=sys.stderr,
        )
    labels = outside_holdout(labels_from_events(events), held_rows)
    # Both checked before the minutes of embedding, and before anything is registered.
    require_both_sides(len(train_rows) + len(labels), len(held_rows))
    embedder = make_embedder(args.embedder, args.hash_dimension)
    if not args.allow_embedder_change:
        check_same_embedder(registry, embedder.name)
    cache = registry.root / "embeddings" / f"{embedder.name.replace('/', '_')}.npz"
    texts = [r.prompt for r in rows] + [e.prompt for e in labels]
    embeddings = embed_prompts(embedder, texts, cache)
    embed_seconds = time.perf_counter() - started
    labelled, from_events = embeddings[: len(rows)], embeddings[len(rows) :]

    train = LabelledSet.from_rows(train_rows, labelled[~held])
    if labels:
        train = train + event_set(labels, from_events)
    try:
        candidate = train_candidate(train, held_rows, labelled[held], args.c, args.seed)
    except ValueError as error:
        print(f"cannot train: {error}", file=sys.stderr)
        return 2
    metadata = describe(candidate, "difficulty", [*data_paths, *event_paths], embedder, args)
    metadata["n_event_labels"] = len(labels)
    version = str(metadata["version"])
    with tempfile.TemporaryDirectory() as staging:
        model_path, _ = save_artifact(candidate.model, metadata, Path(staging), "candidate")
        registry.add(model_path, version)

    # CURRENT read once: the version scored is the one the promotion expects in service.
    in_service = registry.current_version()
    current_version, current_apgr = incumbent_apgr(
        incumbent_path(registry, in_service), held_rows, labelled[held], embedder.name
    )
    candidate_apgr = float(candidate.metadata["holdout"]["apgr"])  # type: ignore[index]
    promote = current_apgr is None or candidate_apgr >= current_apgr - args.tolerance
    if promote:
        promote = promote_unless_moved(registry, version, in_service)
    summary = {
        "candidate": version,
        "candidate_apgr": candidate_apgr,
        "incumbent": current_version,
        "incumbent_apgr": current_apgr,
        "promoted": promote,
        "current": registry.current_version(),
        "n_train": len(train.texts),
        "n_event_labels": len(labels),
        "n_holdout": len(held_rows),
        "embed_seconds": round(embed_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(summary))
    return 0 if promote else 3


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", action="append", required=True, metavar="FILE.jsonl", help="labelled routing data"
    )
    parser.add_argument(
        "--events", action="append", metavar="EVENTS.jsonl", help="the service's event log(s)"
    )
    parser.add_argument("--registry", required=True, help="model registry folder")
    parser.add_argument("--holdout-fraction", type=fraction, default=0.2)
    parser.add_argument("--seed", type=random_seed, default=0, help="salts the holdout hash")
    parser.add_argument("--c", type=positive_number, default=DEFAULT_C)
    parser.add_argument(
        "--tolerance",
        type=number_between(-1.0, 1.0),  # an APGR difference; NaN would block every promotion
        default=0.0,
        help="promote if candidate APGR >= incumbent APGR - tolerance",
    )
    parser.add_argument("--embedder", choices=["minilm", "hash"], default="minilm")
    parser.add_argument("--hash-dimension", type=positive_int, default=64)
    parser.add_argument(
        "--allow-embedder-change",
        action="store_true",
        help="train on another embedder than the model in service's (the services' "
        "cache.embedder must change with it, or they refuse the new model)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routecache retrain", description=__doc__)
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""What the replay upstream serves and how it misbehaves: its config, faults and CLI flags."""

from __future__ import annotations

import argparse
import math
import os
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from routecache.replay.recordings import MODEL_ROLES, ModelRole

DEFAULT_PORT = 8089  # the port ProviderSettings' default base_url points at
API_KEY_ENV_VAR = "ROUTECACHE_REPLAY_API_KEY"
FAULT_HEADER = "x-replay-fault"
LATENCY_HEADER = "x-replay-latency-ms"
NO_FAULT = "none"
MAX_LATENCY_MS = 60_000.0  # a minute: past any client timeout, short of a hung test run


class FaultKind(StrEnum):
    HTTP_429 = "http_429"
    HTTP_500 = "http_500"
    HTTP_503 = "http_503"
    TIMEOUT = "timeout"
    MALFORMED_JSON = "malformed_json"
    TRUNCATED_STREAM = "truncated_stream"
    EMPTY_ANSWER = "empty_answer"


def _default_models() -> Mapping[str, ModelRole]:
    return MappingProxyType({"mixtral-8x7b-instruct": "weak", "gpt-4-1106-preview": "strong"})


@dataclass(frozen=True)
class ReplayConfig:
    """Everything the replay upstream does differently from a well-behaved provider.

    Faults are drawn from a RNG seeded with `fault_seed`, one draw per chat request in arrival
    order, so a run with the same requests meets the same faults.
    """

    models: Mapping[str, ModelRole] = field(default_factory=_default_models)
    default_role: ModelRole = "strong"
    recordings_path: Path | None = None  # None: the packaged GSM8K recordings
    api_key: str | None = None
    latency_ms: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[FaultKind, ...] = tuple(FaultKind)
    fault_seed: int = 0
    # Faults (None: a good answer) for the first requests, in arrival order, before any
    # drawn by fault_rate: "fail twice, then answer" without randomness.
    fault_script: tuple[FaultKind | None, ...] = ()
    hang_seconds: float = 30.0
    retry_after_seconds: int = 1
    stream_chunk_chars: int = 24

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.fault_rate <= 1.0:
            problems.append(f"fault_rate must lie in [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.fault_kinds:
            problems.append("fault_rate > 0 needs at least one fault kind")
        timings = (self.latency_ms, self.hang_seconds, self.retry_after_seconds)
        if not all(math.isfinite(t) and t >= 0 for t in timings):
            problems.append(
                "latency_ms, hang_seconds and retry_after_seconds must be finite and >= 0"
            )
        if self.stream_chunk_chars < 1:
            problems.append("stream_chunk_chars must be >= 1")
        roles = {self.default_role, *self.models.values()}
        if bad := sorted(roles - set(MODEL_ROLES)):
            problems.append(f"model roles must be weak or strong, got {', '.join(bad)}")
        if problems:
            raise ValueError("invalid replay config: " + "; ".join(problems))

    def role_of(self, model: str) -> ModelRole:
        return self.models.get(model, self.default_role)


def header_latency_ms(value: str) -> float:
    """The x-replay-latency-ms header as milliseconds.

    Raises ValueError unless it is a number from 0 to MAX_LATENCY_MS (so not inf or nan).
    """
    try:
        latency_ms = float(value)
    except ValueError:
        latency_ms = math.nan
    if not 0 <= latency_ms <= MAX_LATENCY_MS:  # False for nan too
        raise ValueError(
            f"{LATENCY_HEADER} must be a number of milliseconds from 0 to "
            f"{MAX_LATENCY_MS:.0f}, got {value!r}"
        )
    return latency_ms


class FaultSchedule:
    """Decides, request by request, which fault (if any) the server injects."""

    def __init__(self, config: ReplayConfig) -> None:
        self._rate = config.fault_rate
        self._kinds = config.fault_kinds
        self._rng = random.Random(config.fault_seed)
        self._script: deque[FaultKind | None] = deque(config.fault_script)

    def script(self, faults: Iterable[FaultKind | None]) -> None:
        """Queue faults for the next requests (after any still queued)."""
        self._script.extend(faults)

    def clear_script(self) -> None:
        self._script.clear()

    def next_fault(self, requested: str | None) -> FaultKind | None:
        """The fault for this request; a header naming one (or "none") overrides the draw.

        Raises ValueError for a header naming no known fault.
        """
        if requested is not None:
            return fault_named(requested)
        if self._script:
            return self._script.popleft()
        # Draw both numbers every time so one request's outcome never shifts the next one's.
        roll, pick = self._rng.random(), self._rng.randrange(max(len(self._kinds), 1))
        return self._kinds[pick] if roll < self._rate else None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The `routecache replay-upstream` flags; turn the parsed result into a config with
    config_from_args."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument(
        "--recordings", type=Path, default=None, help="recordings JSONL (default: packaged GSM8K)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID=ROLE",
        help="serve model ID with the weak or strong answers (repeatable; adds to the defaults)",
    )
    parser.add_argument(
        "--api-key", default=None, help=f"required bearer key (default: ${API_KEY_ENV_VAR})"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of faulty answers")
    parser.add_argument(
        "--fault-kinds",
        default=",".join(FaultKind),
        help=f"comma-separated, from: {', '.join(FaultKind)}",
    )
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument(
        "--fault-script",
        default="",
        help="comma-separated faults (or 'none') for the first requests, before --fault-rate",
    )
    parser.add_argument("--hang-seconds", type=float, default=30.0, help="how long 'timeout' hangs")


def fault_named(name: str) -> FaultKind | None:
    """A fault by name, as the header and the flags give it (any case; "none": no fault).

    Raises ValueError, listing the names it takes, for a name of no known fault."""
    name = name.strip().lower()
    if name == NO_FAULT:
        return None
    try:
        return FaultKind(name)
    except ValueError:
        known = ", ".join([*FaultKind, NO_FAULT])
        raise ValueError(f"no fault is named {name!r} (known: {known})") from None


def _faults_named(flag: str, names: str) -> tuple[FaultKind | None, ...]:
    """A flag's comma-separated fault names (empty ones skipped), each read by fault_named.

    Raises ValueError naming the flag for a name of no known fault."""
    try:
        return tuple(fault_named(name) for name in names.split(",") if name.strip())
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    """Raises ValueError with a readable message for a bad flag value."""
    models = dict(_default_models())
    for item in args.model:
        model_id, sep, role = item.partition("=")
        if not sep or not model_id or role not in MODEL_ROLES:
            raise ValueError(f"--model expects ID=weak or ID=strong, got {item!r}")
        models[model_id] = role
    named_kinds = _faults_named("--fault-kinds", args.fault_kinds)
    kinds = tuple(kind for kind in named_kinds if kind is not None)
    if len(kinds) < len(named_kinds):  # "none" is a script step, not a kind to draw
        raise ValueError(
            f"--fault-kinds: {NO_FAULT!r} is no fault kind (--fault-rate 0 injects none)"
        )
    script = _faults_named("--fault-script", args.fault_script)
    return ReplayConfig(
        fault_script=script,
        models=MappingProxyType(models),
        recordings_path=args.recordings,
        api_key=args.api_key or os.environ.get(API_KEY_ENV_VAR) or None,
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        fault_kinds=kinds,
        fault_seed=args.fault_seed,
        hang_seconds=args.hang_seconds,
    )

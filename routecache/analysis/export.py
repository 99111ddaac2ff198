"""`routecache export-events`: the JSONL event log → one flat parquet table for analysis."""

from __future__ import annotations

import json
import math
import re
import stat
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from routecache.atomic_file import replacing, replacing_bytes
from routecache.router.events import SkippedLines, event_lines, unique_events

# The epoch seconds a time column can hold (pandas' nanosecond range, years 1677 to 2262).
_TS_RANGE = (math.ceil(pd.Timestamp.min.timestamp()), math.floor(pd.Timestamp.max.timestamp()))
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (90m, 24h, 7d), an ISO date or time, or epoch seconds."""
    text = text.strip()
    if match := _RELATIVE.match(text):
        amount, unit = match.groups()
        return (time.time() if now is None else now) - float(amount) * _UNIT_SECONDS[unit]
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(epoch):  # float() also reads nan and inf: no instant to cut at
            return epoch
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise ValueError(
            f"--since {text!r}: use a duration (90m, 24h, 7d), an ISO date/time or epoch seconds"
        ) from error
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def read_events(
    path: Path, since: float | None = None, skipped: SkippedLines | None = None
) -> Iterator[dict[str, Any]]:
    """The events of a JSONL log at or after `since`.

    Skipped, and counted in `skipped` when given: a torn line (a crash), even one cut inside a
    character, a line of JSON that is no object (router.events.event_lines, shared with
    retrain), and a hand-edited line whose `ts` is not a number. An event written twice (the
    same `event_id`) is read once. Raises UnicodeDecodeError for any other line not UTF-8.
    """
    skipped = skipped if skipped is not None else SkippedLines()
    lines = (event for _, event in event_lines(path, skipped))
    yield from events_since(unique_events(lines), since, skipped)


def events_since(
    events: Iterable[dict[str, Any]], since: float | None, skipped: SkippedLines
) -> Iterator[dict[str, Any]]:
    """The events at or after `since`; one whose `ts` is no time is counted in `skipped`. The
    same pick for the JSONL log and the Redis stream."""
    for event in events:
        if (ts := _timestamp(event)) is None:
            skipped.no_time += 1
        elif since is None or ts >= since:
            yield event


def _timestamp(event: dict[str, Any]) -> float | None:
    """The event's `ts` (0 when absent or null), or None when it is not a number, or no
    instant a time column holds (NaN, Infinity, 1e20)."""
    ts = event.get("ts")
    if ts is None:
        return 0.0
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    if not _TS_RANGE[0] <= ts <= _TS_RANGE[1]:  # False for NaN too
        return None
    return float(ts)


def events_frame(events: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per event, an event written twice (the same `event_id`) once; nested fields
    flattened (latency.embed_ms → latency_embed_ms)."""
    events = list(unique_events(events))
    frame = pd.json_normalize(events, sep="_") if events else pd.DataFrame({"kind": [], "ts": []})
    # Lists (failed validators) do not fit a flat table; parquet keeps them as JSON text.
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    # An event without `ts` (or with null) counts as 0, as in read_events: NaN would make its
    # time NaT and sort it last.
    frame["ts"] = frame["ts"].fillna(0.0) if "ts" in frame else 0.0
    frame["time"] = pd.to_datetime(frame["ts"], unit="s", utc=True)
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


class MixedColumnError(ValueError):
    """A field of the log whose values parquet cannot put in one column (1 in one line, "a" in
    another)."""


def write_jsonl(events: Iterable[dict[str, Any]], out: Path) -> int:
    """The events as `events.path` holds them (one JSON object a line), for `retrain --events`;
    returns the count. A new file is readable by its owner only: events hold prompts.
    `out` is replaced whole: a failure mid-write leaves the previous export as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with replacing(out, _kept_mode(out, 0o600)) as lines:
        for event in events:
            lines.write(json.dumps(event, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_parquet(events: list[dict[str, Any]], out: Path, origin: str) -> int:
    """The events as one flat table in `out`; returns the count. `origin` names where they
    came from in an error."""
    frame = events_frame(events)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Replaced whole: written in place, a full disk mid-write left a torn --out and the
        # previous export gone.
        with replacing_bytes(out, _kept_mode(out, None)) as table:
            frame.to_parquet(table, index=False)
    except pa.ArrowException as error:  # the whole table is converted before the file is opened
        column = _column_parquet_refuses(frame)
        if column is None:
            raise
        raise MixedColumnError(
            f"{origin}: field {column!r} holds values of different types (a "
            "hand-edited line?); a parquet column holds one"
        ) from error
    return len(frame)


def _kept_mode(out: Path, new: int | None) -> int | None:
    """The permission bits `out` has, kept when it is replaced (writing in place kept them, the
    operator's choice); `new` for a file not there yet."""
    return stat.S_IMODE(out.stat().st_mode) if out.is_file() else new


def _column_parquet_refuses(frame: pd.DataFrame) -> str | None:
    for column in frame.columns:
        try:
            pa.Array.from_pandas(frame[column])
        except pa.ArrowException:
            return str(column)
    return None

"""Event sinks: what happened to each request, for feedback, analysis and retraining."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class InMemoryEventLog:
    """The newest events, bounded so a long-running process cannot grow without limit."""

    def __init__(self, max_events: int = 100_000) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.events.append({"kind": kind, "ts": time.time(), **payload})


class JsonlEventLog:
    """Appends one JSON object a line; the file survives restarts and feeds offline jobs."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Events hold prompts: a new log is readable by the service's user only (an existing
        # one keeps the mode its operator gave it).
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(descriptor, "a", encoding="utf-8")
        if _ends_mid_line(path):  # a crash tore the last line: the next event starts its own
            self._file.write("\n")
            self._file.flush()

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None:
        record = {"kind": kind, "ts": time.time(), **payload}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether a regular file's last byte is not a newline (a pipe or a device is not read)."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as log:
            if log.seek(0, os.SEEK_END) == 0:
                return False
            log.seek(-1, os.SEEK_END)
            return log.read(1) != b"\n"
    except OSError:  # a log the service may append to but not read: nothing to repair
        return False


@dataclass
class SkippedLines:
    """Lines a reader of the log passed over, so a caller can say so: an export or a retrain
    that dropped lines without a word looked complete."""

    torn: int = 0  # not JSON (a crash mid-write), or not a JSON object
    no_time: int = 0  # a `ts` that is not a number, or no instant (NaN, 1e20): export only

    @property
    def total(self) -> int:
        return self.torn + self.no_time


def event_lines(path: Path, skipped: SkippedLines) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each event of a JSONL log with its line number, for every reader of the log
    (export-events, retrain --events): here, with no pandas, so retrain need not import it.

    Skipped, and counted in `skipped.torn`: a line that is not JSON (a crash mid-write:
    JsonlEventLog leaves it in place and starts the next event on a line of its own), even one
    cut inside a character, and a line of JSON that is not an object. Blank lines hold no event.
    Raises UnicodeDecodeError for any other line not UTF-8.
    """
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if _cut_inside_a_character(raw):
                    skipped.torn += 1
                    continue
                raise
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, past the digit limit, too deep
                skipped.torn += 1
                continue
            if not isinstance(event, dict):
                skipped.torn += 1
                continue
            yield number, event


def _cut_inside_a_character(raw: bytes) -> bool:
    """Whether the line is valid UTF-8 but for a character it ends in the middle of."""
    try:
        raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"
    return False

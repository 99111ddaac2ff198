"""Event sinks: what happened to each request, for feedback, analysis and retraining."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routecache.unicode_text import replace_lone_surrogates

log = logging.getLogger(__name__)


def new_event(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """An event as every sink records it when emitted: its kind, the time and an `event_id`
    of its own, then the payload. The id is set once, here, so an event the Redis sink writes
    again (a write that timed out after Redis had applied it) keeps it, and readers
    (`unique_events`) drop the second copy, which the notebook and retrain counted twice."""
    return {"kind": kind, "ts": time.time(), "event_id": uuid.uuid4().hex, **payload}


def first_sight(event: Mapping[str, Any], seen: set[str]) -> bool:
    """False for an event whose `event_id` is in `seen` (a copy written twice); else True, the
    id noted. An event without one (a log older than the field, a grader's outcome line) is
    always kept: nothing tells its copies from two events alike."""
    event_id = event.get("event_id")
    if not isinstance(event_id, str):
        return True
    if event_id in seen:
        return False
    seen.add(event_id)
    return True


def unique_events(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The events, each `event_id` the first time only (see `first_sight`), in their order."""
    seen: set[str] = set()
    return (event for event in events if first_sight(event, seen))


class InMemoryEventLog:
    """The newest events, bounded so a long-running process cannot grow without limit."""

    def __init__(self, max_events: int = 100_000) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.events.append(new_event(kind, payload))


class JsonlEventLog:
    """Appends one JSON object a line; the file survives restarts and feeds offline jobs.

    An event that cannot be written (a full disk, a read-only file system, a quota) is dropped
    and counted in `dropped` (the events_dropped metric), never raised: the request it tells of
    was answered, paid for and cached, and a raise here turned it into an INTERNAL error."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        # Events hold prompts: a new log is readable by the service's user only (an existing
        # one keeps the mode its operator gave it).
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Unbuffered: a failed write leaves nothing in a buffer to go out with a later event.
        self._file = os.fdopen(descriptor, "ab", buffering=0)
        self.dropped = 0
        self._failing = False  # an outage is logged at its first failure and at its end
        # A crash (or a write the disk cut short) tore the last line: the next event starts
        # its own, else it was lost with the torn one.
        self._torn = _ends_mid_line(path)

    def emit(self, kind: str, payload: Mapping[str, Any]) -> None:
        record = new_event(kind, payload)
        try:
            line = event_json(record) + "\n"
            # In the handling too: a line that could not be encoded was raised to the request.
            data = ("\n" + line if self._torn else line).encode("utf-8")
        except NOT_ENCODABLE as exc:
            self.dropped += 1
            log.error("an event %r could not be encoded as JSON and was dropped: %s", kind, exc)
            return
        try:
            self._write(data)
        except OSError as exc:
            self._torn = True  # part of the line may be in the file
            self._dropped_one(exc)
            return
        self._torn = False
        if self._failing:
            self._failing = False
            log.warning("event log %s written again (%d events dropped so far)",
                        self._path, self.dropped)  # fmt: skip

    def _write(self, data: bytes) -> None:
        """All of `data`, however many writes it takes (one the disk cuts short returns
        less, and the next raises)."""
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def _dropped_one(self, error: OSError) -> None:
        self.dropped += 1
        if not self._failing:
            self._failing = True
            log.error("event log %s cannot be written (%s): events are dropped and counted "
                      "in routecache_events_dropped_total until a write works",
                      self._path, error)  # fmt: skip

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


# What event_json raises for an event JSON has no form for even so (a tuple key, a cycle).
NOT_ENCODABLE = (TypeError, ValueError, RecursionError)


def event_json(event: Mapping[str, Any]) -> str:
    """An event as every sink writes it (the JSONL log's line, the Redis stream's `data`): a
    value JSON has no form for (a datetime, an enum) goes as its text, and a lone surrogate
    (a provider's error text) as U+FFFD, so the text always encodes as UTF-8: one raised
    from the write, failing the request it told of, or the Redis batch it was in."""
    return replace_lone_surrogates(json.dumps(event, ensure_ascii=False, default=str))


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
    cut inside a character, and a line of JSON that is not an object. Blank lines hold no event;
    a byte-order mark opening the file is no part of its first.
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
            if number == 1:  # a file saved as "UTF-8 with BOM" (an editor's grades file)
                line = line.removeprefix("\ufeff")
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

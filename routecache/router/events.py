"""Event sinks: what happened to each request, for feedback, analysis and retraining."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Mapping
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

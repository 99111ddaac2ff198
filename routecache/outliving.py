"""Work that must finish after the caller who started it has left (a cancelled request)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Outliving:
    """Runs each coroutine given to `run` to its end: a caller gone meanwhile (deadline,
    disconnect) ends its own wait, not the work, whose failure is then logged (no one else is
    left to see it). `wait` returns once the work still running has ended."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what  # e.g. "the spend write", in the log line
        self._running: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._log_if_lost)
            raise

    async def wait(self) -> None:
        """wait(), not gather(): a cancelled stop must not cancel the work the shield keeps."""
        if self._running:
            await asyncio.wait(set(self._running))

    def _log_if_lost(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            why = "cancelled"
        elif (error := task.exception()) is not None:
            why = repr(error)
        else:
            return
        self._log.error("%s of a request whose caller left failed: %s", self._what, why)

"""Work that must finish after the caller who started it has left (a cancelled request)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable


def log_if_lost(log: logging.Logger, what: str) -> Callable[[asyncio.Task[object]], None]:
    """A done-callback for a task no caller awaits any more: logs how it failed, if it did
    (no one else is left to see it)."""

    def done(task: asyncio.Task[object]) -> None:
        if task.cancelled():
            why = "cancelled"
        elif (error := task.exception()) is not None:
            why = repr(error)
        else:
            return
        log.error("%s of a request whose caller left failed: %s", what, why)

    return done

"""Releasing what a service holds: every step runs even when an earlier one fails."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

ReleaseStep = tuple[str, Callable[[], Awaitable[None] | None]]  # (what it releases, how)


async def release_all(steps: Iterable[ReleaseStep]) -> None:
    """Runs every step in order; each failure is logged and the first re-raised at the end.

    Stopping at the first failure would leak whatever the later steps hold (HTTP clients,
    threads, a file handle, a port). Cancellation and KeyboardInterrupt still stop at once.
    """
    first: Exception | None = None
    for name, release in steps:
        try:
            outcome = release()
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as error:
            log.error("releasing %s failed: %s", name, error, exc_info=error)
            if first is None:
                first = error
    if first is not None:
        raise first


class Acquired:
    """What a build has acquired so far, so that a build failing partway can release it."""

    def __init__(self) -> None:
        self._steps: list[ReleaseStep] = []

    def add(self, name: str, release: Callable[[], Awaitable[None] | None]) -> None:
        self._steps.append((name, release))

    def steps(self) -> list[ReleaseStep]:
        """Newest first: later parts may use earlier ones."""
        return self._steps[::-1]

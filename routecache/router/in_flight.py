"""The calls running in the pipeline, so that a shutdown can wait for their cleanup."""

from __future__ import annotations

import asyncio
import contextlib


class InFlight:
    """Counts the calls in flight. gRPC's stop returns once it has cancelled the calls still
    running past the grace period, not once their handlers have run their cleanup (a cut
    stream's spend, a reservation's release, the error event): the service waits here before
    it closes the ledger, the storage and the event log those use."""

    def __init__(self) -> None:
        self._count = 0
        # Set while none is in flight. Made here, in the build's thread: an asyncio.Event
        # binds to the loop that first waits on it, not to the one current when it is made.
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def leave(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Whether every call ended within `seconds` (False: some are still running)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return self._idle.is_set()

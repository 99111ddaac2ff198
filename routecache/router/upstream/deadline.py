"""The time a provider call may take, readable by the client making it.

The failover chain bounds each provider call with a timeout; a client that plans a pause (a
provider's Retry-After) must know how much of that time is left, or it sleeps into the
timeout and leaves none for the next provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

# When the current provider call must end, on the event loop's clock; None: no bound.
_END: ContextVar[float | None] = ContextVar("routecache_provider_call_end", default=None)


@asynccontextmanager
async def provider_deadline(seconds: float) -> AsyncIterator[None]:
    """asyncio.timeout(seconds), with the time left readable by seconds_left() inside it."""
    token = _END.set(asyncio.get_running_loop().time() + seconds)
    try:
        async with asyncio.timeout(seconds):
            yield
    finally:
        _END.reset(token)


def seconds_left() -> float | None:
    """Seconds until the enclosing provider_deadline ends the call; None outside one."""
    end = _END.get()
    return None if end is None else end - asyncio.get_running_loop().time()

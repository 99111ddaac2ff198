"""The time a provider call may take, readable by the client making it.

The failover chain bounds each provider call with a timeout; a client that plans a pause (a
provider's Retry-After) must know how much of that time is left, or it sleeps into the
timeout and leaves none for the next provider. The client also notes each try that failed:
a call the deadline ends after a failed try is the provider's failure, not the deadline's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class ProviderCall:
    end: float  # when the call must end, on the event loop's clock
    failed_tries: int = 0  # tries the client saw fail (and retried) within it


_CALL: ContextVar[ProviderCall | None] = ContextVar("routecache_provider_call", default=None)


@asynccontextmanager
async def provider_deadline(seconds: float) -> AsyncIterator[ProviderCall]:
    """asyncio.timeout(seconds), with the time left readable by seconds_left() inside it."""
    call = ProviderCall(asyncio.get_running_loop().time() + seconds)
    token = _CALL.set(call)
    try:
        async with asyncio.timeout(seconds):
            yield call
    finally:
        _CALL.reset(token)


def seconds_left() -> float | None:
    """Seconds until the enclosing provider_deadline ends the call; None outside one."""
    call = _CALL.get()
    return None if call is None else call.end - asyncio.get_running_loop().time()


def note_failed_try() -> None:
    """A try of the enclosing provider call failed (nothing outside one)."""
    call = _CALL.get()
    if call is not None:
        call.failed_tries += 1

"""Identical requests in flight at the same time share one upstream call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._in_flight: dict[str, asyncio.Future[T]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns the result and whether this caller shared another caller's call."""
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await work()
        except BaseException as exc:
            future.set_exception(exc)
            # Followers re-raise it; mark it retrieved so asyncio does not warn when none wait.
            future.exception()
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            del self._in_flight[key]

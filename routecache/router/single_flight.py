"""Identical requests in flight at the same time share one upstream call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _never(error: BaseException) -> bool:
    return False


class WaitedTooLong(Exception):
    """A caller stopped waiting for another caller's call (which goes on for the others)."""


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._in_flight: dict[str, asyncio.Future[T]] = {}

    async def run(
        self,
        key: str,
        work: Callable[[], Awaitable[T]],
        not_mine: Callable[[BaseException], bool] = _never,
        patience: float | None = None,
    ) -> tuple[T, bool]:
        """Returns the result and whether this caller shared another caller's call.

        `not_mine(error)`: the shared call failed for a reason of the caller that made it
        alone (its deadline, say), so this caller makes the call itself instead of failing.
        `patience`: the most seconds this caller waits for another caller's call (its own
        deadline may be shorter than the maker's); past it, WaitedTooLong is raised and the
        call goes on for its maker and the others sharing it.
        """
        loop = asyncio.get_running_loop()
        give_up_at = None if patience is None else loop.time() + patience
        while (pending := self._in_flight.get(key)) is not None:
            # asyncio.wait never cancels what it waits on and raises CancelledError only when
            # this caller itself is cancelled, so a leader's cancellation can be told apart.
            timeout = None if give_up_at is None else max(give_up_at - loop.time(), 0.0)
            await asyncio.wait((pending,), timeout=timeout)
            if not pending.done():
                raise WaitedTooLong(f"no answer within {max(patience or 0.0, 0.0):.2f}s")
            if pending.cancelled():
                # The caller that made the call went away and its call with it, or kept the call
                # to itself (go_alone): this request is still wanted, so it makes the call itself
                # (or joins whoever did so first).
                continue
            error = pending.exception()
            if error is None or not not_mine(error):
                return pending.result(), True
        future: asyncio.Future[T] = loop.create_future()
        self._in_flight[key] = future
        try:
            result = await work()
        except asyncio.CancelledError:
            future.cancel()  # followers try again rather than inherit this caller's cancellation
            raise
        except BaseException as exc:
            if not future.done():  # done: go_alone let the followers go
                future.set_exception(exc)
                # Followers re-raise it; mark it retrieved so asyncio does not warn when none wait.
                future.exception()
            raise
        else:
            if not future.done():
                future.set_result(result)
            return result, False
        finally:
            # After go_alone the key may be another caller's call by now: leave that one be.
            if self._in_flight.get(key) is future:
                del self._in_flight[key]

    def go_alone(self, key: str) -> None:
        """Called by the work of the caller making the call under `key`: the call turned out to
        be that caller's alone (its end user's cap narrowed it), so the callers waiting for it
        stop waiting and make (or share) a call of their own, as when the maker goes away, and
        later callers do not join it. The work goes on, and its caller gets its result (and so
        do the callers its caller leads in a flight of its own: the pipeline's per end user)."""
        future = self._in_flight.pop(key, None)
        if future is not None:
            future.cancel()

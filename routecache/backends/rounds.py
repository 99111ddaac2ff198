"""One round of a Redis-backed background loop (the replica sync, the event flush), guarded so
that whatever fails it ends that round alone and never the loop: such a task is awaited only at
stop, and a loop that ended unseen left the index behind, or the events piling up, for good."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from redis.exceptions import RedisError

from routecache.backends.link import RedisDown, RedisLink, RedisRefused

log = logging.getLogger(__name__)


class Rounds:
    """Runs the rounds of the loop `name` on `link`; the loop waits for the link to be up."""

    def __init__(self, link: RedisLink, name: str) -> None:
        self._link = link
        self._name = name
        # The unexpected error of the last round, if it failed so: logged with its traceback
        # when an episode begins, not once per probe interval while it lasts.
        self._failing: str | None = None

    async def run(self, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except RedisRefused:
            # Redis is up and answered with an error (no permission, out of memory, a script
            # error; the link logged it): no outage to wait out, so a pause, else the loop
            # tried again at once, hundreds of times a second.
            await self._pause()
            return
        except RedisDown:
            return  # the link is down: the next round waits until it is up
        except (RedisError, OSError) as exc:  # a call that did not go through the link
            await self._link.mark_down(exc)
            return
        except Exception as exc:
            # A bug, or data this replica cannot take: logged, then tried again after a pause.
            error = _raised_where(exc)
            if error != self._failing:
                log.exception("%s round failed: trying again every %.2f s", self._name,
                              self._link.probe_interval_seconds)  # fmt: skip
            self._failing = error
            await self._pause()
            return
        if self._failing is not None:
            log.info("%s round works again", self._name)
            self._failing = None

    async def _pause(self) -> None:
        await asyncio.sleep(self._link.probe_interval_seconds)


def _raised_where(exc: BaseException) -> str:
    """The error's type and the line that raised it: the same bug failing again with another
    id or size in its message is the same episode, not a traceback every round."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else "?"
    return f"{type(exc).__name__} at {where}"


class TryAgain(Exception):
    """A tenant's step that could not finish this time, for a reason its message tells (no
    bug, no Redis error): logged without a traceback, and owed like any failed step."""


class EachTenant:
    """One step of a round for each tenant: one tenant's failure (refused, or a bug) is logged
    once an episode and leaves the others to go on; Redis down ends the round, since every
    call after it would fail too. `failing` holds the tenants whose last step failed."""

    def __init__(self, failed: str, works_again: str, retry_seconds: float) -> None:
        # failed: a %-format of (tenant, error, retry_seconds); works_again: of (tenant,).
        self._failed = failed
        self._works_again = works_again
        self._retry_seconds = retry_seconds
        self.failing: set[str] = set()

    async def run(self, tenants: Iterable[str], step: Callable[[str], Awaitable[object]]) -> None:
        for tenant in tenants:
            try:
                await step(tenant)
            except (RedisRefused, TryAgain) as exc:
                self._failed_once(tenant, exc)  # the link (or the message) tells it all
            except (RedisDown, RedisError, OSError):
                raise  # Redis down (or a call beside the link, which the round marks down)
            except Exception as exc:
                self._failed_once(tenant, exc, trace=True)
            else:
                if tenant in self.failing:
                    self.failing.discard(tenant)
                    log.info(self._works_again, tenant)

    def _failed_once(self, tenant: str, exc: Exception, trace: bool = False) -> None:
        if tenant in self.failing:
            return
        self.failing.add(tenant)
        log.warning(self._failed, tenant, exc, self._retry_seconds,
                    exc_info=exc if trace else None)  # fmt: skip

"""release_all: every release step runs, the failures are logged, the first is raised."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from routecache.router.releasing import Acquired, release_all


async def test_every_step_runs_after_failures_and_the_first_failure_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def port() -> None:
        ran.append("port")
        raise OSError("port would not close")

    async def clients() -> None:
        ran.append("clients")
        raise RuntimeError("clients would not close")

    with pytest.raises(OSError, match="port would not close"):
        await release_all(
            [("the port", port), ("the clients", clients), ("the file", lambda: ran.append("file"))]
        )
    assert ran == ["port", "clients", "file"]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert failed == [
        "releasing the port failed: port would not close",
        "releasing the clients failed: clients would not close",
    ]


async def test_acquired_parts_are_released_newest_first() -> None:
    ran: list[str] = []
    acquired = Acquired()
    for name in ("clients", "worker", "event log"):
        acquired.add(name, functools.partial(ran.append, name))
    await release_all(acquired.steps())
    assert ran == ["event log", "worker", "clients"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, asyncio.CancelledError])
async def test_an_interrupt_stops_the_release_at_once(interrupt: type[BaseException]) -> None:
    # Ctrl-C or a cancel is not a step failing: it is not logged and waited out, it stops.
    ran: list[str] = []

    def interrupted() -> None:
        ran.append("interrupted")
        raise interrupt

    with pytest.raises(interrupt):
        await release_all([("the port", interrupted), ("the file", lambda: ran.append("file"))])
    assert ran == ["interrupted"]

"""release_all: every release step runs, the failures are logged, the first is raised."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import pytest

from routecache.cache.embedder import HashEmbedder
from routecache.classifier.model import FixedScoreClassifier
from routecache.router.bootstrap import Overrides, build_service
from routecache.router.events import InMemoryEventLog
from routecache.router.releasing import Acquired, release_all
from tests.fakes import RecordingTelemetry
from tests.unit.conftest import unit_settings


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


class _FailingWebhookWatch(RecordingTelemetry):
    """Refuses the budget alerts' metric, the build's first step after the storage."""

    def watch_count(self, name: str, count: Callable[[], float]) -> None:
        if name == "budget_webhook_failures":
            raise RuntimeError("a collector of that name is registered already")
        super().watch_count(name, count)


async def test_a_build_failing_right_after_the_storage_is_built_releases_it() -> None:
    # The budget alerts were built (and their metric watched) between the storage's build and
    # its release step: a failure there left the storage (a Redis link, its tasks) open.
    acquired = Acquired()
    overrides = Overrides(embedder=HashEmbedder(), classifier=FixedScoreClassifier(0.2),
                          events=InMemoryEventLog(), telemetry=_FailingWebhookWatch())  # fmt: skip
    with pytest.raises(RuntimeError, match="registered already"):
        build_service(unit_settings(), overrides, acquired)
    assert "storage" in [name for name, _ in acquired.steps()]
    await release_all(acquired.steps())

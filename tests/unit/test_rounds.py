"""Rounds of a background loop: an unexpected failure is told once an episode, not each round."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from routecache.backends.rounds import EachTenant, Rounds, TryAgain


class QuietLink:
    """The part of the Redis link Rounds reads: no pause between rounds."""

    probe_interval_seconds = 0.0


async def test_a_bug_failing_again_with_another_message_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the episode was keyed on the message, so an id in it logged a traceback a round.
    link: Any = QuietLink()
    rounds = Rounds(link, "tail")
    failures = iter(range(3))

    async def failing() -> None:
        raise KeyError(f"entry {next(failures)}")

    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            await rounds.run(failing)
    assert len([r for r in caplog.records if r.exc_info]) == 1


async def test_another_bug_or_a_round_that_works_begins_a_new_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link: Any = QuietLink()
    rounds = Rounds(link, "tail")

    async def one_bug() -> None:
        raise KeyError("a")

    async def another_bug() -> None:
        raise TypeError("b")

    async def works() -> None:
        return None

    with caplog.at_level(logging.INFO):
        for step in (one_bug, another_bug, another_bug, works, another_bug):
            await rounds.run(step)
    logged = [r for r in caplog.records if r.exc_info]
    assert [type(r.exc_info[1]).__name__ for r in logged if r.exc_info] == [
        "KeyError", "TypeError", "TypeError",
    ]  # fmt: skip
    assert "tail round works again" in caplog.text


async def test_a_tenant_step_to_try_again_is_owed_and_told_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # E.g. a rebuild whose sync stream was trimmed past where it began: no bug to trace.
    each = EachTenant("step of %s failed (%s): again in %.1f s", "%s works again", 1.0)

    async def again(tenant: str) -> None:
        raise TryAgain("stream trimmed")

    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            await each.run(["acme"], again)
    assert each.failing == {"acme"}
    assert [r.getMessage() for r in caplog.records] == [
        "step of acme failed (stream trimmed): again in 1.0 s"
    ]
    assert not any(r.exc_info for r in caplog.records)

"""SingleFlight on its own: who makes the call, who shares it, and what a failure leaves."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from routecache.router.single_flight import SingleFlight, WaitedTooLong
from tests.fakes import eventually


async def test_a_failed_call_nobody_shared_leaves_no_unretrieved_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Else asyncio logs "Future exception was never retrieved" for every lone failure.
    flight: SingleFlight[str] = SingleFlight()

    async def fails() -> str:
        raise RuntimeError("upstream down")

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(RuntimeError):
            await flight.run("k", fails)
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_callers_left_by_a_cancelled_maker_share_one_new_call() -> None:
    flight: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    calls: list[int] = []

    async def work() -> str:
        calls.append(len(calls))
        await gate.wait()
        return f"answer {len(calls)}"

    maker = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    maker.cancel()
    await eventually(lambda: len(calls) == 2, "one of the callers left makes a new call")
    gate.set()
    results = await asyncio.gather(*waiting)
    assert calls == [0, 1]  # the maker's, then one more for the three it left
    assert sorted(shared for _, shared in results) == [False, True, True]
    assert {answer for answer, _ in results} == {"answer 2"}


async def test_by_default_a_shared_calls_failure_is_every_sharers_failure() -> None:
    flight: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    calls: list[int] = []

    async def fails() -> str:
        calls.append(1)
        await gate.wait()
        raise RuntimeError("upstream down")

    callers = [asyncio.create_task(flight.run("k", fails)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert calls == [1] and all(isinstance(r, RuntimeError) for r in results)


async def test_a_sharer_makes_its_own_call_when_the_failure_was_the_makers_alone() -> None:
    # not_mine: e.g. the maker's own deadline or caps; another caller still wants an answer.
    flight: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    calls: list[int] = []

    async def work() -> str:
        calls.append(1)
        if len(calls) == 1:
            await gate.wait()
            raise TimeoutError("the maker's deadline")
        return "answer"

    def not_mine(error: BaseException) -> bool:
        return isinstance(error, TimeoutError)

    maker = asyncio.create_task(flight.run("k", work, not_mine))
    await asyncio.sleep(0)
    sharer = asyncio.create_task(flight.run("k", work, not_mine))
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(TimeoutError):
        await maker
    assert await sharer == ("answer", False) and calls == [1, 1]


async def test_a_sharer_out_of_patience_gives_up_and_the_call_goes_on_for_its_maker() -> None:
    # A sharer with a shorter deadline than the maker's must not wait past it; its giving up
    # must neither cancel the call nor take the answer from the maker.
    flight: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    calls: list[int] = []

    async def work() -> str:
        calls.append(1)
        await gate.wait()
        return "answer"

    maker = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    with pytest.raises(WaitedTooLong):
        await flight.run("k", work, patience=0.0)
    assert not maker.done()
    gate.set()
    assert await maker == ("answer", False) and calls == [1]


async def test_a_call_its_maker_keeps_to_itself_is_made_again_for_the_callers_waiting() -> None:
    # The maker's call turned out to be its own alone (its end user's cap narrowed it): those
    # waiting stop waiting and share one call of their own, while the maker's call goes on.
    flight: SingleFlight[str] = SingleFlight()
    gate, kept = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def work() -> str:
        calls.append(len(calls))
        if len(calls) == 1:
            await kept.wait()
            flight.go_alone("k")
        await gate.wait()
        return f"answer {len(calls)}"

    maker = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    kept.set()
    await eventually(lambda: len(calls) == 2, "one of the callers waiting makes a new call")
    gate.set()
    results = await asyncio.gather(*waiting)
    assert calls == [0, 1]
    assert sorted(shared for _, shared in results) == [False, True, True]
    assert await maker == ("answer 2", False)  # its own call's answer, shared with nobody
    assert await flight.run("k", work) == ("answer 3", False)  # nothing left in flight

"""``deadline``, the upstream calls' timeout: asyncio.timeout's behaviour with one timer per event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from embedgate.providers import deadline as deadline_module
from embedgate.providers.deadline import deadline

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_block_that_outlasts_its_deadline_raises_timeout_error_on_time() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline(0.05):
            await asyncio.sleep(5)
    assert 0.045 <= time.monotonic() - started < 0.5


async def test_a_block_within_its_deadline_is_left_alone() -> None:
    async with deadline(0.05):
        # One loop pass, not a 10 ms timer: a loop stalled past 50 ms (a loaded machine) ran both timers in one
        # pass, the deadline's cancellation before the task's wake-up, and the block timed out.
        await asyncio.sleep(0)
    await asyncio.sleep(0.08)  # past the deadline: no late cancellation reaches the task
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def call() -> None:
        async with deadline(5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(call())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_deadlines_of_many_concurrent_calls_expire_each_at_its_own_time() -> None:
    outcomes: dict[int, str] = {}

    async def call(i: int, delay: float, work: float) -> None:
        try:
            async with deadline(delay):
                await asyncio.sleep(work)
            outcomes[i] = "done"
        except TimeoutError:
            outcomes[i] = "timeout"

    # out of order: later calls with earlier deadlines (the single timer must re-arm for them). Each call's work and
    # deadline are far apart (>= 0.2 s): at 30 ms (0.15 s vs 0.12 s) a loop stalled that long expired "done" calls.
    deadlines = (0.9, 0.7, 0.5, 0.1, 0.05)
    plan = [(i, deadlines[i % 5], 0.3) for i in range(200)]
    started = time.monotonic()
    await asyncio.gather(*(call(i, d, w) for i, d, w in plan))
    assert time.monotonic() - started < 1.0
    assert outcomes == {i: "timeout" if d < w else "done" for i, d, w in plan}
    watch = deadline_module._watch(asyncio.get_running_loop())
    assert watch.heap == [] and watch.active == 0


async def test_finished_calls_do_not_pile_up_behind_a_long_one() -> None:
    release = asyncio.Event()

    async def slow() -> None:
        async with deadline(5):  # the earliest deadline: every later entry sits below it in the heap
            # Held until the short calls are done, not a 0.1 s sleep under a 0.2 s deadline: a loop stalled 0.1 s
            # (a loaded machine) ran both timers in one pass and the block timed out.
            await release.wait()

    long = asyncio.ensure_future(slow())
    await asyncio.sleep(0)
    for _ in range(5000):
        async with deadline(10):
            await asyncio.sleep(0)
    watch = deadline_module._watch(asyncio.get_running_loop())
    assert len(watch.heap) <= 2 * max(watch.active, 64) + 1
    release.set()
    await long
    assert watch.active == 0


async def test_it_needs_a_task() -> None:
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[str] = loop.create_future()

    def outside_any_task() -> None:  # a loop callback, as asyncio.timeout refuses it too
        entering = deadline(1).__aenter__()
        try:
            entering.send(None)
        except RuntimeError as exc:
            refused.set_result(str(exc))
        finally:
            entering.close()

    loop.call_soon(outside_any_task)
    assert "inside a task" in await refused

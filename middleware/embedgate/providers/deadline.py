"""``deadline``: ``asyncio.timeout`` for upstream calls, with one timer per event loop instead of one per call.

``asyncio.timeout`` arms and cancels an event-loop timer for every call (measured in place: ~10 us of a ~300 us
cache miss, most of it uvloop's timer). Upstream calls mostly finish long before their deadline, so here each call
only enters a heap of the loop's active deadlines; a single timer, armed for the earliest, expires what is due and
re-arms itself for the next. A call that finishes leaves the heap when it reaches the top (or in a compaction, when
finished entries outnumber active ones), so the heap holds about as many entries as there are calls in flight.

The semantics are ``asyncio.timeout``'s: when the deadline passes, the task is cancelled; the ``async with`` then
raises ``TimeoutError`` (from the ``CancelledError``), unless the task was also cancelled from outside, in which
case the ``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
import heapq
from types import TracebackType
from typing import Final

__all__ = ["deadline"]

_EARLY_S: Final = 0.001  # a timer may fire up to a clock tick early: a deadline this close counts as due


class _Watch:
    """One event loop's active deadlines, and the one timer armed for the earliest of them."""

    __slots__ = ("active", "heap", "loop", "seq", "timer", "timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, deadline]] = []
        self.active = 0
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")

    def add(self, entry: deadline) -> None:
        self.seq += 1
        self.active += 1
        heapq.heappush(self.heap, (entry.when, self.seq, entry))
        if entry.when < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(entry.when, self._fire)
            self.timer_at = entry.when

    def remove(self) -> None:
        """One entry is done (marked so): pop finished entries off the top, compact when they pile up."""
        self.active -= 1
        heap = self.heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        if len(heap) > 64 and len(heap) > 2 * self.active:  # finished entries stuck below a long one
            heap[:] = [item for item in heap if not item[2].done]
            heapq.heapify(heap)

    def _fire(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        heap = self.heap
        due = self.loop.time() + _EARLY_S
        while heap:
            when, _, entry = heap[0]
            if not entry.done and when > due:
                break
            heapq.heappop(heap)
            if not entry.done:
                entry.expire()
        if heap:
            self.timer_at = heap[0][0]
            self.timer = self.loop.call_at(self.timer_at, self._fire)


_watches: Final[dict[asyncio.AbstractEventLoop, _Watch]] = {}


def _watch(loop: asyncio.AbstractEventLoop) -> _Watch:
    found = _watches.get(loop)
    if found is None:
        # loops of finished runs (tests); list() copies in one step, should another thread's loop register now
        for old in [other for other in list(_watches) if other.is_closed()]:
            _watches.pop(old, None)
        found = _watches[loop] = _Watch(loop)
    return found


class deadline:  # lower case: used as asyncio.timeout is
    """``async with deadline(seconds):`` raises ``TimeoutError`` if the block outlasts ``seconds``."""

    __slots__ = ("_cancelling", "_delay", "_task", "_watch", "done", "expired", "when")

    def __init__(self, seconds: float) -> None:
        self._delay = seconds
        self.done = False
        self.expired = False

    async def __aenter__(self) -> deadline:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("deadline() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.when = loop.time() + self._delay
        self._watch = _watch(loop)
        self._watch.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.done = True
        self._watch.remove()
        if self.expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def expire(self) -> None:
        """Called by the watch when the deadline has passed: cancel the task inside the block."""
        self.expired = True
        self._task.cancel()

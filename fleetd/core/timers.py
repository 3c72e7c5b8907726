"""Deadlines that move later often and come up rarely: leases renewed by heartbeats.

    DeadlineHeap   which item comes up next; pure, every question is given `now`
    Alarm          one task sleeps until the next deadline, or until woken for a recount

A renewal must cost no heap work: with 10,000 leases heartbeated at 1 Hz, a push per
heartbeat would be 10,000 pushes a second for nothing. So the heap does not own deadlines.
Its owner keeps each item's current deadline (a dict, an attribute) and tells the heap how to
read it (`current`); the heap holds an item at the deadline it was pushed with, and when that
comes up it asks `current`: later now (renewed) puts the item back at its new deadline, gone
(None) drops it, passed makes it due. An item thus comes up about once per TTL, whatever the
number of heartbeats, and deleting one is lazy: the owner forgets it, the heap drops it later.

The one rule for owners: push an item once; its deadline may then only move later. To bring
a deadline earlier, forget the item and push a new one (fleetd.leases makes a new Entry).
"""

import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class DeadlineHeap(Generic[T]):
    """Items by the deadline they were pushed with, each checked against `current` when it
    comes up. `current(item)` is the item's deadline now, or None once it is forgotten."""

    def __init__(self, current: Callable[[T], float | None]) -> None:
        self._current = current
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # ties go first in, first out; items need no ordering

    def __len__(self) -> int:
        """Items held, forgotten ones not yet dropped included."""
        return len(self._heap)

    def push(self, item: T, deadline: float) -> bool:
        """Hold `item` until `deadline`; whether it is now the earliest (wake the Alarm)."""
        earliest = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, next(self._order), item))
        return earliest

    def next_deadline(self) -> float | None:
        """When the next item comes up (it may turn out renewed or forgotten), or None."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[T]:
        """Every item whose current deadline is `now` or earlier, taken out of the heap.
        Renewed items go back at their current deadline; forgotten ones are dropped."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, _, item = heapq.heappop(self._heap)
            deadline = self._current(item)
            if deadline is None:
                continue
            if deadline <= now:
                due.append(item)
            else:
                heapq.heappush(self._heap, (deadline, next(self._order), item))
        return due

    def clear(self) -> None:
        self._heap.clear()


class Alarm:
    """Sleeps until a deadline on `clock`, or until `wake()`: one task waits on it at a time
    (the owner's timer task), and a caller that pushed an earlier deadline wakes it to sleep
    again for the shorter time. A wake while nobody sleeps is kept for the next sleep."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._woken = anyio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def sleep_until(self, deadline: float | None) -> None:
        """Return at `deadline` (None: never), or as soon as woken."""
        delay = math.inf if deadline is None else deadline - self._clock()
        with anyio.move_on_after(delay):
            await self._woken.wait()
        self._woken = anyio.Event()

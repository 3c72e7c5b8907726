"""The deadline heap and the alarm that leases (fleetd.leases) and the store's leases
(fleetd.store.sqlite) share, with an explicit clock."""

import time

import anyio
from hypothesis import given
from hypothesis import strategies as st

from fleetd.core.timers import Alarm, DeadlineHeap


class Deadlines:
    """An owner as both users are: the deadlines in a dict, the heap reading it."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}
        self.heap = DeadlineHeap(self.now.get)

    def add(self, name: str, deadline: float) -> bool:
        self.now[name] = deadline
        return self.heap.push(name, deadline)


def test_items_come_up_in_deadline_order_and_only_once_due() -> None:
    deadlines = Deadlines()
    assert deadlines.add("b", 20.0) is True
    assert deadlines.add("a", 10.0) is True
    assert deadlines.add("c", 30.0) is False
    assert deadlines.heap.next_deadline() == 10.0
    assert deadlines.heap.pop_due(9.9) == []
    assert deadlines.heap.pop_due(20.0) == ["a", "b"]
    assert deadlines.heap.next_deadline() == 30.0


def test_a_renewal_costs_no_push_and_postpones_the_item() -> None:
    deadlines = Deadlines()
    deadlines.add("a", 10.0)
    for renewed_at in range(1, 100):
        deadlines.now["a"] = renewed_at + 10.0  # a heartbeat: the owner's dict only
    assert len(deadlines.heap) == 1
    assert deadlines.heap.pop_due(10.0) == []  # came up early: back in at its deadline
    assert deadlines.heap.next_deadline() == 109.0
    assert deadlines.heap.pop_due(109.0) == ["a"]


def test_a_forgotten_item_is_dropped_when_it_comes_up() -> None:
    deadlines = Deadlines()
    deadlines.add("a", 10.0)
    deadlines.add("b", 11.0)
    del deadlines.now["a"]
    assert len(deadlines.heap) == 2  # lazy: still held
    assert deadlines.heap.pop_due(12.0) == ["b"]
    assert len(deadlines.heap) == 0 and deadlines.heap.next_deadline() is None


def test_items_need_no_ordering_of_their_own() -> None:
    heap: DeadlineHeap[object] = DeadlineHeap(lambda item: 5.0)
    first, second = object(), object()
    heap.push(first, 5.0)
    heap.push(second, 5.0)
    assert heap.pop_due(5.0) == [first, second]


names = st.text("abcdef", max_size=2)


@given(
    st.dictionaries(names, st.floats(0, 100), max_size=20),
    st.dictionaries(names, st.floats(0, 100), max_size=20),
    st.sets(names, max_size=5),
    st.floats(0, 200),
)
def test_what_comes_up_is_exactly_what_is_due(
    pushed: dict[str, float], postponed: dict[str, float], forgotten: set[str], now: float
) -> None:
    deadlines = Deadlines()
    for name, deadline in pushed.items():
        deadlines.add(name, deadline)
    for name, later in postponed.items():
        if name in deadlines.now:
            deadlines.now[name] += later  # only ever later: the owners' rule
    for name in forgotten:
        deadlines.now.pop(name, None)
    due = deadlines.heap.pop_due(now)
    assert sorted(due) == sorted(name for name, d in deadlines.now.items() if d <= now)
    for name in due:
        del deadlines.now[name]
    after = deadlines.heap.next_deadline()
    assert after is None or after > now
    if deadlines.now:
        assert after is not None and after <= min(deadlines.now.values())


async def test_the_alarm_sleeps_until_the_deadline_on_its_clock() -> None:
    at = 1000.0
    alarm = Alarm(lambda: at)  # frozen: the delay is the deadline minus this
    started = time.monotonic()
    await alarm.sleep_until(at + 0.05)
    assert 0.04 <= time.monotonic() - started < 1.0


async def test_a_past_deadline_returns_at_once() -> None:
    alarm = Alarm(lambda: 1000.0)
    with anyio.fail_after(1):
        await alarm.sleep_until(999.0)


async def test_a_wake_ends_the_sleep_early_and_is_used_up() -> None:
    alarm = Alarm(lambda: 0.0)
    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:  # ends only once the sleeper returns
            tg.start_soon(alarm.sleep_until, None)
            await anyio.wait_all_tasks_blocked()
            alarm.wake()
    alarm.wake()  # nobody sleeps: kept for the next sleep
    with anyio.fail_after(1):
        await alarm.sleep_until(None)
    with anyio.move_on_after(0.05) as slept:
        await alarm.sleep_until(None)  # that wake was used up
    assert slept.cancelled_caught

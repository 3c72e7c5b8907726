"""fleetd.core.locks: one mutex per name, which exists only while someone holds or awaits it."""

import anyio

from fleetd.core.locks import NameLocks


async def test_a_name_is_forgotten_once_its_lock_is_released() -> None:
    locks = NameLocks()
    async with locks.hold("a"):
        assert "a" in locks
    assert "a" not in locks


async def test_waiters_take_a_name_in_the_order_they_came() -> None:
    locks = NameLocks()
    order: list[int] = []

    async def take(index: int) -> None:
        async with locks.hold("a"):
            order.append(index)

    async with anyio.create_task_group() as tg, locks.hold("a"):
        for index in range(5):
            tg.start_soon(take, index)
            await anyio.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]
    assert "a" not in locks


async def test_a_cancelled_waiter_leaves_the_name_to_the_next() -> None:
    locks = NameLocks()
    taken = anyio.Event()

    async def take() -> None:
        async with locks.hold("a"):
            taken.set()

    async with anyio.create_task_group() as tg, locks.hold("a"):
        tg.start_soon(take)  # queued behind us
        await anyio.wait_all_tasks_blocked()
        with anyio.move_on_after(0.01):
            await locks.acquire("a")  # queued behind it, then cancelled
    with anyio.fail_after(5):
        await taken.wait()
    assert "a" not in locks

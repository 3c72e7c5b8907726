"""One mutex per name (a lease, a claim, a cluster), existing only while in use: a daemon that
has seen a million names holds no lock for any it does not use now."""

import asyncio
from collections import deque
from contextlib import suppress


class NameLocks:
    """One mutex per name, existing only while in use, handed to waiters in FIFO order.

    Taking a free name costs a dict insert and no checkpoint: this sits on the path of every
    grant and release, where an anyio.Lock per name (and a dict of them) cost more than the
    decision itself. A waiter waits on a bare future: an anyio.Event cost a backend lookup
    more (a pipelined release waits for the acquire before it on its name)."""

    def __init__(self) -> None:
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def hold(self, name: str) -> "NameLock":
        return NameLock(self, name)

    async def acquire(self, name: str) -> None:
        waiters = self._waiters.get(name)
        if waiters is None:
            self._waiters[name] = deque()
            return
        turn = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # handed over as we were cancelled
                self.release(name)  # pass it on
            else:
                turn.cancel()
                with suppress(ValueError):  # not if a release passed it over, cancelled
                    waiters.remove(turn)
            raise

    def release(self, name: str) -> None:
        waiters = self._waiters[name]
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._waiters[name]

    def __contains__(self, name: str) -> bool:
        return name in self._waiters


class NameLock:
    __slots__ = ("_locks", "_name")

    def __init__(self, locks: NameLocks, name: str) -> None:
        self._locks, self._name = locks, name

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._name)

    async def __aexit__(self, *_: object) -> None:
        self._locks.release(self._name)

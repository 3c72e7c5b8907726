"""One mutex per name (a lease, a claim, a cluster), existing only while in use: a daemon that
has seen a million names holds no lock for any it does not use now."""

from collections import deque

import anyio


class NameLocks:
    """One mutex per name, existing only while in use, handed to waiters in FIFO order.

    Taking a free name costs a dict insert and no checkpoint: this sits on the path of every
    grant and release, where an anyio.Lock per name (and a dict of them) cost more than the
    decision itself."""

    def __init__(self) -> None:
        self._waiters: dict[str, deque[anyio.Event]] = {}

    def hold(self, name: str) -> "NameLock":
        return NameLock(self, name)

    async def acquire(self, name: str) -> None:
        waiters = self._waiters.get(name)
        if waiters is None:
            self._waiters[name] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed over just as we were cancelled: pass it on
                self.release(name)
            else:
                waiters.remove(turn)
            raise

    def release(self, name: str) -> None:
        waiters = self._waiters[name]
        if waiters:
            waiters.popleft().set()
        else:
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

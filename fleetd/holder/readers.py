"""Many descriptors watched through one event-loop reader: a holder reads two output pipes and
accepts on one socket per member, and a reader handle of the event loop costs about 600 bytes
each (uvloop: a handle, a poll handle and their callbacks), where an entry in an epoll set
costs a dict entry here and the kernel's own bookkeeping.

Level-triggered like the loop's add_reader: a callback is called again while its descriptor
stays readable (or hung up, or in error). A callback may be called when nothing is there to
read (a descriptor removed and another added under the same number while ready events were
being handed out): each one reads non-blocking and takes "would block" in its stride.
"""

import asyncio
import select
from collections.abc import Callable


class Readers:
    """Call `callback()` whenever `fd` is readable, for every descriptor added and until it is
    removed; remove a descriptor before closing it. The event loop that runs when the first
    is added watches them all."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, fd: int, callback: Callable[[], object]) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._dispatch)
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _dispatch(self) -> None:
        for fd, _ in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        """Stop watching every descriptor (they stay open: their owners close them)."""
        if self._loop is not None and not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()

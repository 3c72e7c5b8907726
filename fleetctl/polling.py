"""Keeping a loop, or a thread, awake for an answer that is tens of microseconds away.

An answer, or a client's next request, arrives tens of microseconds after the frame before it.
A loop asleep in epoll_wait (or a thread asleep in recv) by then needs a cross-CPU wakeup to
see it, which on a virtual machine cost more than the answer itself: a bare ping-pong between
two processes ran at 22k/s, and at 137k/s when both polled first. The async connection
(fleetctl.connection) and fleetd's servers poll with `Poller`; the blocking connection
(fleetctl.blocking) polls its socket for POLL_SECONDS before it blocks.

asyncio is imported only by the first Poller to run, so that the blocking client does not
load it.
"""

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio

POLL_SECONDS = 100e-6
"""How long a loop keeps polling after a request is sent or answered."""


class Poller:
    """Keeps the event loop polling for a moment instead of sleeping. While a ready callback
    is queued the loop polls without sleeping, so `poll_a_while` queues one that requeues
    itself until POLL_SECONDS have passed since the latest call. It yields the CPU between
    polls, in case the peer shares it. An idle loop does not poll at all."""

    def __init__(self) -> None:
        self._until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def poll_a_while(self) -> None:
        self._until = time.monotonic() + POLL_SECONDS
        if self._loop is None:
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        assert self._loop is not None
        if time.monotonic() < self._until:
            os.sched_yield()
            self._loop.call_soon(self._poll)
        else:
            self._loop = None

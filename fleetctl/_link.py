"""A unix-socket connection read and written by the event loop itself, for the async clients.

A request-answer round trip to a holder takes some 60 µs, and anyio's socket streams spent
much of it on themselves: every receive registered the socket with the loop and removed it
again, and sends and receives began with a full loop turn. A Protocol stays registered, is
handed what arrives from the loop's reader callback, and writes straight to the socket;
callers wait on one future per request (`Answers`). So the
async clients run on asyncio (uvloop included), as fleetd does.

`Poller` keeps a loop awake for the answer, or for the next request (fleetd's servers use it).
"""

import asyncio
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from fleetctl._peer import check_peer
from protocol.errors import ConnectionLost, PermissionDenied

T = TypeVar("T")

POLL_SECONDS = 100e-6
"""How long a loop keeps polling after a request is sent or answered (see Poller)."""


class Poller:
    """Keeps the event loop polling for a moment instead of sleeping.

    An answer, or a client's next request, arrives tens of microseconds after the frame
    before it. A loop asleep in epoll_wait by then needs a cross-CPU wakeup to see it, which
    on a virtual machine cost more than the answer itself: a bare ping-pong between two
    processes ran at 22k/s, and at 137k/s when both polled first. While a ready callback is
    queued the loop polls without sleeping, so `poll_a_while` queues one that requeues itself
    until POLL_SECONDS have passed since the latest call. It yields the CPU between polls, in
    case the peer shares it. An idle loop does not poll at all.
    """

    def __init__(self) -> None:
        self._until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def poll_a_while(self) -> None:
        self._until = time.monotonic() + POLL_SECONDS
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        assert self._loop is not None
        if time.monotonic() < self._until:
            os.sched_yield()
            self._loop.call_soon(self._poll)
        else:
            self._loop = None


class SocketLink(asyncio.Protocol):
    """Hands every chunk received to `on_data`, in order, and the end of the connection to
    `on_lost` once, whoever ended it. After each send the loop polls a moment for the answer.

    Who listens is checked as the connection is made, before the loop reads or anything is
    sent (fleetctl._peer): a peer of another user is cut off unheard, and `open` raises."""

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_lost: Callable[[], None],
        path: str,
        peer: str,
    ) -> None:
        self._on_data = on_data
        self._on_lost = on_lost
        self._path = path
        self._peer = peer
        self._transport: asyncio.WriteTransport | None = None
        self._refused: PermissionDenied | None = None
        self._poller = Poller()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        path: str,
        on_data: Callable[[bytes], None],
        on_lost: Callable[[], None],
        *,
        peer: str = "fleetd",
    ) -> "SocketLink":
        """Raises OSError when nothing listens at `path`, PermissionDenied when another user's
        process does (`peer` names it in the message)."""
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: cls(on_data, on_lost, path, peer), path)
        if link._refused is not None:
            await asyncio.shield(link._closed)  # the socket is closed when this raises
            raise link._refused
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's subclasses none
        try:
            check_peer(writer.get_extra_info("socket"), self._path, self._peer)
        except PermissionDenied as refused:
            self._refused = refused
            writer.abort()  # asyncio and uvloop both let connection_made abort: no reads
            return
        self._transport = writer

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set_result(None)
        if self._refused is None:  # a refused link was never opened, as its caller sees it
            self._on_lost()

    def send(self, data: bytes) -> None:
        """Queue `data` whole behind what was sent before; the loop writes what the socket
        does not take at once."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionLost("the connection is closed")
        transport.write(data)
        self._poller.poll_a_while()

    def close(self) -> None:
        """Close without waiting (from a callback); `aclose` waits for the end."""
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        self.close()
        await asyncio.shield(self._closed)


class Answers(Generic[T]):
    """Callers waiting for their answers by request id, one future each, bounded by a timer
    rather than a cancel scope. Filled from the loop's reader callback (`resolve`, `fail`)."""

    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    async def wait(self, request_id: int, timeout: float) -> T:
        """The answer to `request_id` (sent already: it cannot arrive before this awaits), or
        TimeoutError once `timeout` seconds have passed, or the error `fail` was given."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._futures[request_id] = future
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()
            self._futures.pop(request_id, None)

    def resolve(self, request_id: int | None, answer: T) -> bool:
        """Hand `answer` to its caller; False when nobody waits for it."""
        future = self._futures.pop(request_id, None) if request_id is not None else None
        if future is None:
            return False
        if not future.done():
            future.set_result(answer)
        return True

    def fail(self, error: Exception) -> None:
        """Every caller waiting now gets `error`."""
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()


def _expire(future: "asyncio.Future[T]") -> None:
    if not future.done():
        future.set_exception(TimeoutError())

"""The async connection: the sans-io core (protocol.connection) on a unix socket read and
written by the event loop itself. The async Client speaks to fleetd over one, and fleetd and
bound clusters to holders (fleetctl.members_client).

A request-answer round trip takes some 40 to 60 µs, and anyio's socket streams spent much of it
on themselves: every receive registered the socket with the loop and removed it again, and
sends and receives began with a full loop turn. An asyncio Protocol stays registered, is handed
what arrives from the loop's reader callback, and writes straight to the socket; callers wait
on one future per request, bounded by a timer rather than a cancel scope. There is no
background task, so a connection needs no task group, and a thousand callers in flight cost
one future each. So the async clients run on asyncio (uvloop included), as fleetd does.

Who listens is checked as the connection is made, before the loop reads or anything is sent
(fleetctl._peer): a peer of another user is cut off unheard, and `open` raises.
"""

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Self, cast

from fleetctl._peer import check_peer
from fleetctl.polling import Poller
from protocol.base import Op, R
from protocol.connection import Answer, ClientConnection, decode_result
from protocol.errors import ConnectionLost, FleetError, PermissionDenied, Timeout
from protocol.messages import RawResponse


class AsyncConnection(asyncio.Protocol):
    """One connection, many requests in flight. After each send the loop polls a moment for
    the answer (fleetctl.polling). `on_push` gets a watch's later frames, `on_failure` is
    called once when the connection fails (whoever ended it), both from the loop's reader."""

    def __init__(
        self,
        path: str,
        *,
        peer: str = "fleetd",
        on_push: Callable[[RawResponse], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.core = ClientConnection(peer=peer, on_answer=self._answered, on_push=on_push)
        self._on_failure = on_failure
        self._futures: dict[int, asyncio.Future[Answer]] = {}
        self._transport: asyncio.WriteTransport | None = None
        self._refused: PermissionDenied | None = None
        self._poller = Poller()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        path: str,
        timeout: float | None = None,
        *,
        peer: str = "fleetd",
        on_push: Callable[[RawResponse], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> Self:
        """Raises OSError when nothing listens at `path` (TimeoutError when connecting takes
        over `timeout` seconds), PermissionDenied when another user's process does (`peer`
        names it in the message)."""
        loop = asyncio.get_running_loop()

        made = functools.partial(cls, path, peer=peer, on_push=on_push, on_failure=on_failure)
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_unix_connection(made, path)
        if connection._refused is not None:
            await asyncio.shield(connection._closed)  # the socket is closed when this raises
            raise connection._refused
        return connection

    @property
    def failure(self) -> FleetError | None:
        """Why the connection failed (every request raises it now), or None."""
        return self.core.failure

    async def request(
        self, op: type[Op[R]], timeout: float, *, pushes: bool = False, **fields: Any
    ) -> R:
        """Send a request and wait at most `timeout` seconds for its answer's result. With
        `pushes`, the peer's later frames with its id go to `on_push` (a member socket's
        watch). Raises Timeout, the connection's failure, or the answer's error."""
        core = self.core
        request_id, frame = core.send(op, fields, pushes=pushes)
        result_type: type[R] = op.result_type  # type: ignore[assignment]  # Op[R] sets it to R
        transport = self._transport
        if transport is None or transport.is_closing():
            core.abandon(request_id)
            raise ConnectionLost("the connection is closed")
        transport.write(frame)
        self._poller.poll_a_while()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        self._futures[request_id] = future
        timer = loop.call_later(timeout, _expire, future)
        try:
            response = await future
        except TimeoutError:
            raise Timeout(f"no answer from {core.peer} within {timeout}s") from None
        finally:
            timer.cancel()
            del self._futures[request_id]
            core.abandon(request_id)
        return decode_result(response, result_type)

    def close(self) -> None:
        """Close without waiting (from a callback); `aclose` waits for the end."""
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        self.close()
        await asyncio.shield(self._closed)

    # -- the loop's callbacks (asyncio.Protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's subclasses none
        try:
            check_peer(writer.get_extra_info("socket"), self.path, self.core.peer)
        except PermissionDenied as refused:
            self._refused = refused
            writer.abort()  # asyncio and uvloop both let connection_made abort: no reads
            return
        self._transport = writer

    def data_received(self, data: bytes) -> None:
        core = self.core
        core.receive_data(data)
        if core.failure is not None:
            self._failed()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set_result(None)
        if self._refused is None:  # a refused connection was never opened, as its caller sees it
            self.core.receive_data(b"")
            self._failed()

    def _answered(self, request_id: int, response: Answer) -> None:
        future = self._futures.get(request_id)
        if future is not None and not future.done():
            future.set_result(response)

    def _failed(self) -> None:
        error = self.core.failure
        if error is None or self._transport is None:
            return
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        on_failure, self._on_failure = self._on_failure, None
        if on_failure is not None:
            on_failure()


def _expire(future: "asyncio.Future[Answer]") -> None:
    if not future.done():
        future.set_exception(TimeoutError())

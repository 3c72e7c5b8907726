"""The async client of fleetd's control socket.

Many requests may be in flight on one connection. There is no background task: whichever
caller is waiting reads the socket for everyone (one at a time, under a lock) and files each
answer under its request id, so the client needs no task group and works with plain
``connect()`` / ``aclose()`` as well as ``async with``.
"""

import enum
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import SocketStream

from fleetctl._conversation import (
    DEFAULT_TIMEOUT,
    Conversation,
    R,
    check_server_version,
    decode_result,
    resolve_socket,
    unavailable,
)
from protocol import PROTOCOL_VERSION
from protocol.errors import (
    ClientClosed,
    ConnectionLost,
    Timeout,
    Unavailable,
)
from protocol.messages import (
    Empty,
    Hello,
    HelloResult,
    Ping,
    RawResponse,
    Request,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.paths import socket_path_problem

_READ_SIZE = 65536


class State(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class Client:
    """A connection to fleetd. `timeout` bounds every call (connect included), in seconds."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout
        self.state = State.UNOPENED
        self.server: HelloResult | None = None
        self._stream: SocketStream | None = None
        self._conversation = Conversation()
        self._outbox = bytearray()
        self._sending = anyio.Lock()
        self._reading = anyio.Lock()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> HelloResult:
        """Connect and exchange protocol versions; raises Unavailable or Incompatible."""
        if self.state is not State.UNOPENED:
            raise ClientClosed(f"connect() on a {self.state.value} client")
        problem = socket_path_problem(self.socket_path)
        if problem:
            raise Unavailable(problem)
        try:
            with anyio.fail_after(self.timeout):
                self._stream = await anyio.connect_unix(self.socket_path)
        except TimeoutError:
            raise Timeout(f"connecting to {self.socket_path} took over {self.timeout}s") from None
        except OSError as exc:
            raise unavailable(self.socket_path, exc) from None
        self.state = State.OPENED
        try:
            hello = await self.request(
                Hello, HelloResult, version=PROTOCOL_VERSION, client="fleetctl"
            )
            self.server = check_server_version(hello)
        except BaseException:
            await self.aclose()
            raise
        return self.server

    async def aclose(self) -> None:
        self.state = State.CLOSED
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def ping(self) -> None:
        await self.request(Ping, Empty)

    async def version(self) -> VersionResult:
        return await self.request(Version, VersionResult)

    async def shutdown(self) -> None:
        """Ask fleetd to finish in-flight requests and exit."""
        await self.request(Shutdown, Empty)

    async def request(
        self,
        request_type: type[Request],
        result_type: type[R],
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> R:
        """Send one request and wait for its answer; the typed methods are built on this."""
        stream = self._opened()
        request_id, frame = self._conversation.request(request_type, fields)
        try:
            with anyio.fail_after(self.timeout if timeout is None else timeout):
                await self._send(stream, frame)
                response = await self._answer(stream, request_id)
        except TimeoutError:
            raise Timeout(f"no answer from fleetd within {timeout or self.timeout}s") from None
        finally:
            self._conversation.abandon(request_id)
        return decode_result(response, result_type)

    def _opened(self) -> SocketStream:
        if self._stream is None or self.state is not State.OPENED:
            raise ClientClosed(f"the client is {self.state.value}; connect() first")
        return self._stream

    async def _send(self, stream: SocketStream, frame: bytes) -> None:
        """Frames queued while another caller is writing go out together in its next write."""
        self._outbox += frame
        async with self._sending:
            if not self._outbox:
                return
            data = bytes(self._outbox)
            self._outbox.clear()
            try:
                await stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._conversation.fail(ConnectionLost(f"fleetd went away: {exc!r}"))

    async def _answer(self, stream: SocketStream, request_id: int) -> RawResponse:
        conversation = self._conversation
        while True:
            answer = conversation.outcome(request_id)
            if answer is not None:
                return answer
            async with self._reading:
                answer = conversation.outcome(request_id)
                if answer is not None:
                    return answer
                await self._read_once(stream)

    async def _read_once(self, stream: SocketStream) -> None:
        try:
            data = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._conversation.ended()
            return
        self._conversation.received(data)

"""The control socket: accepts connections, checks who they are, reads frames, writes answers.

Each connection is an error firewall: whatever a peer sends, the worst it can do is get an
error frame and lose its own connection. Nothing escapes into the accept loop.

The pieces a holder's member sockets share with it are public: `admit` (the SO_PEERCRED check),
`accept_forever` (the accept loop) and `Connection` (frames in, answers out).
"""

import errno
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

from fleetd.dispatch import Dispatcher, Peer, Pending
from protocol import MAX_FRAME
from protocol.errors import BadFrame, PermissionDenied
from protocol.framing import FrameSplitter, encode, encode_response, error_response
from protocol.messages import Response

log = structlog.get_logger("fleetd.server")

_PEERCRED = struct.Struct("3i")
_READ_SIZE = 65536
_ACCEPT_RETRY_DELAY = 0.1
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def peer_of(stream: SocketStream) -> Peer:
    sock = stream.extra(SocketAttribute.raw_socket)
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid=pid, uid=uid, gid=gid)


def may_connect(peer: Peer) -> bool:
    return peer.uid in (os.getuid(), 0)


async def admit(stream: SocketStream) -> Peer | None:
    """The peer, if it may use this socket; else it gets a refusal frame and None."""
    peer = peer_of(stream)
    structlog.contextvars.bind_contextvars(peer_pid=peer.pid, peer_uid=peer.uid)
    if may_connect(peer):
        return peer
    log.warning("peer_refused")
    await stream.send(encode(_refusal(peer)))
    return None


async def accept_forever(
    listener: SocketListener,
    connections: anyio.abc.TaskGroup,
    handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
) -> None:
    """Accept until cancelled, each connection handled in `connections`; running out of file
    descriptors or memory pauses accepting instead of ending it. `handle` must be an error
    firewall: an exception escaping it ends the whole task group."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("accept_failed", error=os.strerror(exc.errno or 0))
            await anyio.sleep(_ACCEPT_RETRY_DELAY)
            continue
        connections.start_soon(handle, stream)


class ControlServer:
    def __init__(self, dispatcher: Dispatcher, *, max_frame: int = MAX_FRAME) -> None:
        self._dispatcher = dispatcher
        self._max_frame = max_frame
        self._accepting = anyio.CancelScope()
        self._connections: set[Connection] = set()

    async def serve(
        self, listener: SocketListener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `stop_accepting`; returns once every connection has finished."""
        async with anyio.create_task_group() as connections:
            task_status.started()
            with self._accepting:
                async with listener:
                    await accept_forever(listener, connections, self._connection)

    def stop(self) -> None:
        """Stop accepting and stop reading new requests; in-flight requests still finish."""
        self._accepting.cancel()
        for connection in self._connections:
            connection.stop_reading()

    async def _connection(self, stream: SocketStream) -> None:
        try:
            await self._converse(stream)
        except Exception as exc:
            log.warning("connection_failed", error=repr(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: SocketStream) -> None:
        peer = await admit(stream)
        if peer is None:
            return
        connection = Connection(stream, self._dispatcher, peer, self._max_frame)
        self._connections.add(connection)
        try:
            if self._accepting.cancel_called:
                connection.stop_reading()
            async with anyio.create_task_group() as in_flight:
                await connection.read_requests(in_flight)
        finally:
            self._connections.discard(connection)


def _refusal(peer: Peer) -> Response:
    return error_response(
        None,
        PermissionDenied.code,
        f"uid {peer.uid} may not use this socket (it serves uid {os.getuid()} and root)",
    )


class Connection:
    """One peer's conversation: frames in, answers out, many requests in flight."""

    def __init__(self, stream: SocketStream, dispatcher: Dispatcher, peer: Peer, max_frame: int):
        self._stream = stream
        self._dispatcher = dispatcher
        self._peer = peer
        self._splitter = FrameSplitter(max_frame)
        self._sending = anyio.Lock()
        self._receiving = anyio.CancelScope()
        self._stopped = False

    def stop_reading(self) -> None:
        """Take no new requests; answers to those already read still go out."""
        self._stopped = True
        self._receiving.cancel()

    async def _receive(self) -> bytes | None:
        """The next chunk, or None at end of stream or once reading was stopped."""
        if self._stopped:
            return None
        with anyio.CancelScope() as self._receiving:
            try:
                return await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        return None

    async def read_requests(self, in_flight: anyio.abc.TaskGroup) -> None:
        while (data := await self._receive()) is not None:
            answers = bytearray()
            try:
                for frame in self._splitter.feed(data):
                    self._answer(frame, answers, in_flight)
            except BadFrame as exc:
                log.info("frame_refused", code=exc.code, reason=exc.message)
                encode_response(error_response(None, exc.code, exc.message), answers)
                await self.send(answers)
                return
            if answers:
                await self.send(answers)

    def _answer(self, frame: bytes, answers: bytearray, in_flight: anyio.abc.TaskGroup) -> None:
        answer = self._dispatcher.handle(frame, self._peer)
        if isinstance(answer, Response):
            encode_response(answer, answers)
        else:
            in_flight.start_soon(self._answer_later, answer)

    async def _answer_later(self, pending: Pending) -> None:
        answer = bytearray()
        encode_response(await pending, answer)
        await self.send(answer)

    async def send(self, data: bytes | bytearray) -> None:
        """Write frames whole, never interleaved with another writer's; a peer that has gone
        away is not an error (its answers have nobody to read them)."""
        async with self._sending:
            try:
                await self._stream.send(bytes(data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                log.debug("peer_gone_before_answer")

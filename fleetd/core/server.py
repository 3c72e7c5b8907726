"""Serving a unix socket of frames, for fleetd's control socket and a holder's member sockets:
accept connections, check who they are, read frames, write answers.

Each connection is an error firewall: whatever a peer sends, the worst it can do is get an
error frame and lose its own connection. Nothing escapes into the accept loop. What a peer can
make a server hold is bounded (fleetd.core.bounds): its unfinished frames against a budget
shared by the server's connections, its time stalled mid-frame, its requests in flight.

`ControlServer` is the daemon's listener; a holder builds its own from the same pieces:
`admit` (the SO_PEERCRED check), `accept_forever` (the accept loop) and `Connection` (frames
in, answers out).
"""

import asyncio
import errno
import os
import select
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

from fleetctl.polling import Poller
from fleetd.core.bounds import (
    LARGE_CONNECTION_IN_FLIGHT,
    LARGE_CONNECTION_PARTIAL,
    FrameBudget,
    Limits,
    Trim,
)
from fleetd.core.dispatch import Dispatcher, Peer, Pending
from fleetd.core.log import bind as bind_log
from protocol.errors import BadFrame, FleetError, LimitExceeded, PermissionDenied
from protocol.framing import FrameSplitter, encode, encode_response, error_response
from protocol.messages import Response

log = structlog.get_logger("fleetd.server")

_PEERCRED = struct.Struct("3i")
_READ_SIZE = 65536
_IDLE_WORKERS = 256
"""Idle workers a connection keeps for its next burst of requests answered by coroutines."""
ACCEPT_RETRY_DELAY = 0.1
TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def peer_of(stream: SocketStream) -> Peer:
    sock = stream.extra(SocketAttribute.raw_socket)
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid=pid, uid=uid, gid=gid)


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_AT_MOST = 65536
"""NGROUPS_MAX: a peer's supplementary groups fit in this many."""


def groups_of(stream: SocketStream) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel recorded them at connect (SO_PEERGROUPS:
    no /proc read, so no race with a reused pid)."""
    sock = stream.extra(SocketAttribute.raw_socket)
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= _GROUPS_AT_MOST * 4:
                return ()
            size *= 4
            continue
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def may_connect(peer: Peer, group: int | None = None, groups: Sequence[int] = ()) -> bool:
    """Our own uid and root; and, when the socket grants a `group` access, its members (by
    primary or supplementary group)."""
    if peer.uid in (os.getuid(), 0):
        return True
    return group is not None and (peer.gid == group or group in groups)


async def admit(stream: SocketStream, group: int | None = None) -> Peer | None:
    """The peer, if it may use this socket; else it gets a refusal frame and None."""
    peer = peer_of(stream)
    bind_log(peer_pid=peer.pid, peer_uid=peer.uid)
    if may_connect(peer, group, groups_of(stream) if group is not None else ()):
        return peer
    log.warning("peer_refused")
    await stream.send(encode(_refusal(peer, group)))
    await _linger(stream)
    return None


REFUSAL_LINGER = 1.0
"""Seconds a refused peer has to finish sending its first request before the connection
closes: closed at once, the peer's write could fail (EPIPE) before it reads why."""


async def _linger(stream: SocketStream) -> None:
    """Half-close, then read (and drop) what the peer still sends, until it closes too."""
    with anyio.move_on_after(REFUSAL_LINGER):
        try:
            await stream.send_eof()
            while await stream.receive(_READ_SIZE):
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return


def socket_group(path: str) -> int | None:
    """The group the socket file at `path` grants access (write, which connecting needs), as
    the socket unit's SocketGroup= and SocketMode=0660 make it: fleetd admits its members too.
    None for a socket only its owner may use (the 0600 socket fleetd makes itself)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_gid if st.st_mode & stat.S_IWGRP else None


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
            if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("accept_failed", error=os.strerror(exc.errno or 0))
            await anyio.sleep(ACCEPT_RETRY_DELAY)
            continue
        connections.start_soon(handle, stream)


class ControlServer:
    """`group`: a group whose members are admitted besides our uid and root (socket_group)."""

    def __init__(
        self, dispatcher: Dispatcher, *, limits: Limits | None = None, group: int | None = None
    ) -> None:
        self._dispatcher = dispatcher
        self._group = group
        self._limits = limits or Limits()
        self._budget = FrameBudget(self._limits.partial_frame_budget)
        self._trim = Trim()
        self._poller = Poller()
        self._accepting = anyio.CancelScope()
        self._connections: set[Connection] = set()
        self._tasks: anyio.abc.TaskGroup | None = None

    async def serve(
        self, listener: SocketListener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `stop_accepting`; returns once every connection has finished."""
        async with anyio.create_task_group() as connections:
            self._tasks = connections
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
        except Exception as exc:  # a bug: peers hanging up or misbehaving are handled inside
            log.error("connection_failed", error=repr(exc), exc_info=exc)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: SocketStream) -> None:
        peer = await admit(stream, self._group)
        if peer is None:
            return
        connection = Connection(
            stream, self._dispatcher, peer, self._poller, limits=self._limits, budget=self._budget
        )
        self._connections.add(connection)
        try:
            if self._accepting.cancel_called:
                connection.stop_reading()
            async with anyio.create_task_group() as in_flight:
                await connection.read_requests(in_flight)
        finally:
            self._connections.discard(connection)
        if connection.large and self._tasks is not None:
            self._trim.soon(self._tasks)


def _hand(idle: "asyncio.Future[None]") -> bool:
    """Wake an idle worker; False if it is gone (cancelled with its connection)."""
    if idle.done():
        return False
    idle.set_result(None)
    return True


def _refusal(peer: Peer, group: int | None = None) -> Response:
    also = "" if group is None else f", and group {group}"
    return error_response(
        None,
        PermissionDenied.code,
        f"uid {peer.uid} may not use this socket (it serves uid {os.getuid()} and root{also})",
    )


class Connection:
    """One peer's conversation: frames in, answers out, many requests in flight.

    `budget` is shared by every connection of one server: it holds their unfinished frames'
    bytes. Only a connection mid-frame pays for the bounds' bookkeeping (a timer on its
    receives, the budget's sums); whole frames pay nothing but a count of requests in flight
    for those answered by coroutines."""

    def __init__(
        self,
        stream: SocketStream,
        dispatcher: Dispatcher,
        peer: Peer,
        poller: Poller,
        *,
        limits: Limits,
        budget: FrameBudget,
    ):
        self._stream = stream
        self._poller = poller
        self._dispatcher = dispatcher
        self._peer = peer
        self._limits = limits
        self._budget = budget
        self._splitter = FrameSplitter(limits.max_frame)
        self._held = 0
        """Bytes of an unfinished frame charged to the budget: nonzero only mid-frame."""
        self._outbox = bytearray()
        """Answers encoded and not yet handed to the stream, in the order they go out."""
        self._writing = False
        """A task is writing the outbox, and keeps writing until the outbox is empty."""
        self._flush_due = False
        """A task waits out the current loop turn, then writes the outbox."""
        self._written: anyio.Event | None = None
        self._waiting: deque[Pending] = deque()
        """Requests answered by coroutines, for the next free worker."""
        self._in_flight = 0
        """Requests handed to coroutines and not answered yet (waiting or being worked on)."""
        self._room: anyio.Event | None = None
        """The reader waits on it for the requests in flight to drop below the limit."""
        self._idle: list[asyncio.Future[None]] = []
        """One future per idle worker: resolve it to hand that worker the next request (a
        bare future: an anyio.Event cost a backend lookup and a second object per request)."""
        self._loop = asyncio.get_running_loop()
        self._raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
        """The stream's socket, to write without a loop turn first (see `_send`)."""
        self._reading = True
        self._receiving = anyio.CancelScope()
        """Around all reading: `stop_reading` cancels it (one scope, not one per receive)."""
        self.large = False
        """It held a large frame or many requests at once: worth a heap trim when it ends."""

    def stop_reading(self) -> None:
        """Take no new requests; answers to those already read still go out."""
        self._receiving.cancel()

    async def _receive(self) -> bytes | None:
        """The next chunk, or None at end of stream. Mid-frame, raises LimitExceeded when the
        peer sends nothing more for the frame idle timeout."""
        try:
            if not self._held:
                return await self._stream.receive(_READ_SIZE)
            with anyio.move_on_after(self._limits.frame_idle_timeout):
                return await self._stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
        timeout = self._limits.frame_idle_timeout
        raise LimitExceeded(
            f"{self._held} bytes of a frame and nothing more for {timeout:g}s: closing",
            limit="frame_idle_timeout",
            value=timeout,
        )

    async def read_requests(self, in_flight: anyio.abc.TaskGroup) -> None:
        """Read and answer until end of stream or `stop_reading`; coroutine answers run in
        `in_flight`, which they leave once every request read is answered. A peer that hung
        up (not one that only shut its writing half) or was refused has its long polls ended:
        nobody will read their answers."""
        try:
            with self._receiving:
                if not await self._read_until_end(in_flight) or self._hung_up():
                    self._peer.end_waits()
        finally:
            self._reading = False
            self._give_up_frame()
            while self._idle:
                _hand(self._idle.pop())

    async def _read_until_end(self, in_flight: anyio.abc.TaskGroup) -> bool:
        """False when the peer was refused (an error frame for the whole connection)."""
        try:
            while (data := await self._receive()) is not None:
                answered = len(self._outbox)
                for frame in self._splitter.feed(data):
                    answer = self._dispatcher.handle(frame, self._peer)
                    if isinstance(answer, Response):
                        encode_response(answer, self._outbox)
                    else:
                        self._queue(answer, in_flight)
                        if self._in_flight >= self._limits.max_in_flight:
                            await self._wait_for_room()
                            answered = 0  # the outbox went out meanwhile: send what is new
                if self._held or self._splitter.pending:
                    self._charge()
                if len(self._outbox) > answered:
                    await self._flush()
                self._poller.poll_a_while()
        except (BadFrame, LimitExceeded) as exc:
            await self._refuse(exc)
            return False
        return True

    def _charge(self) -> None:
        """Charge the budget for the unfinished frame's growth; raises LimitExceeded when that
        takes the server's total past it."""
        held, self._held = self._held, self._splitter.pending
        if self._held >= LARGE_CONNECTION_PARTIAL:
            self.large = True
        if not self._budget.charge(held, self._held):
            budget = self._budget.limit
            raise LimitExceeded(
                f"unfinished frames on this socket would pass their budget of {budget} bytes "
                "(all connections together): retry once others are finished",
                limit="partial_frame_budget",
                value=budget,
            )

    def _give_up_frame(self) -> None:
        self._budget.refund(self._held)
        self._held = 0
        self._splitter.discard()

    async def _refuse(self, exc: FleetError) -> None:
        """An error frame for the whole connection (no request id); nothing more is read."""
        log.info("connection_refused", code=exc.code, reason=exc.message)
        self._give_up_frame()
        encode_response(error_response(None, exc.code, exc.message, **exc.details), self._outbox)
        await self._flush()

    def _hung_up(self) -> bool:
        """Whether the peer closed its end entirely, not just its writing half (its reading
        half would still want answers)."""
        poll = select.poll()
        poll.register(self._raw, select.POLLHUP)
        return any(events & select.POLLHUP for _, events in poll.poll(0))

    def _queue(self, pending: Pending, in_flight: anyio.abc.TaskGroup) -> None:
        self._in_flight += 1
        if self._in_flight >= LARGE_CONNECTION_IN_FLIGHT:
            self.large = True
        self._waiting.append(pending)
        idle = self._idle
        while idle:
            handed = idle.pop()
            if not handed.done():  # not gone with its connection: wake it
                handed.set_result(None)
                return
        in_flight.start_soon(self._work)

    async def _wait_for_room(self) -> None:
        """Backpressure: the peer's requests in flight reached the limit, so read no more of
        them until one is answered (the answers so far go out first)."""
        await self._flush()
        while self._in_flight >= self._limits.max_in_flight:
            self._room = anyio.Event()
            await self._room.wait()

    async def _work(self) -> None:
        """A worker: answers waiting requests one at a time, then idles until handed more.

        Starting a task per request cost more than most handlers do: workers are started only
        when every one is busy, and kept (up to _IDLE_WORKERS) for the next burst. A request
        never waits behind a slow one: each request queued wakes or starts a worker of its own.
        Workers share the reader's context as it was when they started, as a task per request
        did; a handler must not leave context variables set (none binds any).

        The first answer of a loop turn writes, after the turn, every answer queued meanwhile
        in one write (a commit wakes a batch of them at once)."""
        waiting = self._waiting
        while True:
            while waiting:
                pending = waiting.popleft()
                try:
                    encode_response(await pending, self._outbox)
                finally:
                    self._answered()
                if not (self._writing or self._flush_due):
                    await self._write_after_turn()
            if not self._reading or len(self._idle) >= _IDLE_WORKERS:
                return
            handed = self._loop.create_future()
            self._idle.append(handed)
            await handed

    def _answered(self) -> None:
        self._in_flight -= 1
        if self._room is not None and self._in_flight < self._limits.max_in_flight:
            self._room.set()
            self._room = None

    async def _write_after_turn(self) -> None:
        """Write the outbox once this loop turn's answers are in it. The turn is waited out
        with asyncio's sleep(0): anyio's checkpoint looks its backend up first (three calls
        and a getpid on Python 3.11)."""
        self._flush_due = True
        try:
            await asyncio.sleep(0)
        finally:
            self._flush_due = False
        if not self._writing:
            await self._write()

    async def send(self, data: bytes | bytearray) -> None:
        """Write frames whole, after every answer queued before them, never interleaved with
        another writer's; returns once they are written. A peer that has gone away is not an
        error (its answers have nobody to read them)."""
        self._outbox += data
        await self._flush()

    async def _flush(self) -> None:
        """Returns once the outbox, as it is now, has been written (or the peer is gone)."""
        while self._writing:
            if self._written is None:
                self._written = anyio.Event()
            await self._written.wait()
        if self._outbox:
            await self._write()

    async def _send(self, data: bytearray) -> None:
        """What the socket takes at once goes straight to it (anyio's send would begin with a
        loop turn, a fifth of a small request's round trip), the rest through the stream; the
        outbox itself, not a copy of it (a 110 KB answer was copied once more)."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise anyio.BrokenResourceError from exc
        if sent < len(data):
            with anyio.CancelScope(shield=True):  # stop_reading must not cut a frame short
                await self._stream.send(bytes(data[sent:]))

    async def _write(self) -> None:
        self._writing = True
        try:
            while self._outbox:
                data, self._outbox = self._outbox, bytearray()  # handed over, never reused
                try:
                    await self._send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    log.debug("peer_gone_before_answer")
                    self._outbox.clear()
        finally:
            self._writing = False
            if self._written is not None:
                self._written.set()
                self._written = None

"""The blocking connection: the sans-io core (protocol.connection) on a plain blocking socket,
one request at a time. SyncClient speaks to fleetd over one, and a blocking cluster's status
to its holder (fleetctl.bound). It imports neither asyncio nor anyio.

Deadlines are kernel socket timeouts (SO_RCVTIMEO, SO_SNDTIMEO) on a socket in plain blocking
mode, set only when they change: Python's own socket timeouts poll before every receive,
which cost a third of a small request's round trip. The start of each answer is polled for a
moment before the thread blocks (fleetctl.polling says why): as long as the previous answer
took, within limits, since a thousand statuses take several times longer than one.
"""

import os
import socket
import struct
import time
from typing import Any, Self

from fleetctl._peer import check_peer
from fleetctl.polling import POLL_SECONDS
from protocol.base import Op, R
from protocol.connection import ClientConnection, decode_result
from protocol.errors import ConnectionLost, FleetError, Timeout

_READ_SIZE = 65536
_LONGEST = 1e9
"""Seconds (31 years): any longer timeout waits as long, and a socket's cannot hold much more
(Python's about 9e9 s, a struct timeval's C long 9e18)."""
_POLL_MOST = 1e-3
"""The longest a request polls for its answer before it blocks."""


class BlockingConnection:
    """One blocking connection: a request, then its answer."""

    @classmethod
    def open(cls, path: str, timeout: float | None = None, *, peer: str = "fleetd") -> Self:
        """Connect to `path` within `timeout` seconds, and check who listens (fleetctl._peer)
        before anything is sent. Raises OSError when nothing listens (TimeoutError when the
        connect takes too long), PermissionDenied when another user's process does (`peer`
        names it in the message)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout if timeout is None else min(timeout, _LONGEST))
            sock.connect(path)
            check_peer(sock, path, peer)
        except BaseException:
            sock.close()
            raise
        return cls(sock, peer=peer)

    def __init__(self, sock: socket.socket, *, peer: str = "fleetd") -> None:
        """Over `sock`, connected to a peer already checked (`open` does both)."""
        sock.settimeout(None)
        self._sock = sock
        self.core = ClientConnection(peer=peer)
        self._limit = 0.0
        """The receive and send timeout set on the socket now."""
        self._poll = POLL_SECONDS
        """How long the next request polls for the start of its answer."""

    @property
    def failure(self) -> FleetError | None:
        """Why the connection failed (every request raises it now), or None."""
        return self.core.failure

    def request(self, op: type[Op[R]], timeout: float, **fields: Any) -> R:
        """Send a request and wait at most `timeout` seconds for its answer's result. Raises
        Timeout, ConnectionLost, or the answer's error."""
        sock, core = self._sock, self.core
        request_id, frame = core.send(op, fields)
        result_type: type[R] = op.result_type  # type: ignore[assignment]  # Op[R] sets it to R
        deadline = time.monotonic() + timeout
        sent = time.perf_counter()
        try:
            self._limit_to(timeout)
            sock.sendall(frame)
            received = False
            while (answer := core.take(request_id)) is None:
                if received:  # the rest of an answer gets what is left of the time
                    self._limit_to(deadline - time.monotonic())
                    core.receive_data(sock.recv(_READ_SIZE))
                else:
                    core.receive_data(_receive_first(sock, sent + self._poll))
                    self._poll = min(max(time.perf_counter() - sent, POLL_SECONDS), _POLL_MOST)
                received = True
        except BlockingIOError:  # the kernel's timeout, in blocking mode
            raise Timeout(f"no answer from {core.peer} within {timeout}s") from None
        except OSError as exc:
            lost = ConnectionLost(f"{core.peer} went away: {exc.strerror or exc}")
            core.fail(lost)
            raise lost from None
        finally:
            core.abandon(request_id)
        return decode_result(answer, result_type)

    def _limit_to(self, seconds: float) -> None:
        if seconds <= 0:
            raise BlockingIOError
        if seconds != self._limit:
            value = _timeval(seconds)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self._limit = seconds

    def close(self) -> None:
        self._sock.close()


def _timeval(seconds: float) -> bytes:
    """A struct timeval of at least a millisecond (zero would mean no limit at all)."""
    seconds = min(max(seconds, 0.001), _LONGEST)
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def _receive_first(sock: socket.socket, end: float) -> bytes:
    """The start of an answer: polled for until perf_counter() `end`, then waited for."""
    while time.perf_counter() < end:
        try:
            return sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            os.sched_yield()  # to a process sharing this CPU, maybe the one answering
    return sock.recv(_READ_SIZE)

"""A blocking facade for callers without an event loop: plain sockets, no anyio import."""

import os
import socket
import struct
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from fleetctl._conversation import (
    DEFAULT_TIMEOUT,
    Conversation,
    R,
    check_server_version,
    decode_result,
    resolve_socket,
    unavailable,
)
from fleetctl._link import POLL_SECONDS
from fleetctl._peer import check_peer
from protocol import PROTOCOL_VERSION
from protocol.claims import (
    ClaimAcquire,
    ClaimGc,
    ClaimGcResult,
    ClaimInspect,
    ClaimList,
    ClaimListRequest,
    ClaimRelease,
    ClaimResult,
)
from protocol.clusters import (
    ClusterDown,
    ClusterResult,
    ClusterUp,
    LogPaths,
    MemberAdd,
    MemberList,
    MemberLogs,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import ClientClosed, ConnectionLost, Timeout, Unavailable
from protocol.leases import DEFAULT_TTL, MAX_WAIT
from protocol.messages import (
    Empty,
    Hello,
    HelloResult,
    LeaseAcquire,
    LeaseEvents,
    LeaseHeartbeat,
    LeaseInspect,
    LeaseList,
    LeaseListRequest,
    LeaseRelease,
    LeaseResult,
    LeaseWatch,
    Ping,
    Request,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.paths import socket_path_problem
from protocol.status import MemberStatus

_READ_SIZE = 65536


def _timeval(seconds: float) -> bytes:
    """A struct timeval of at least a millisecond (zero would mean no limit at all)."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


class BlockingLink:
    """One blocking connection speaking frames: a request, then its answer. What SyncClient
    speaks to fleetd, and a blocking cluster to its holder.

    Deadlines are kernel socket timeouts (SO_RCVTIMEO, SO_SNDTIMEO) on a socket in plain
    blocking mode, set only when they change: Python's own socket timeouts poll before every
    receive, which cost a third of a small request's round trip."""

    @classmethod
    def open(cls, path: str, timeout: float, *, peer: str = "fleetd") -> "BlockingLink":
        """Connect to `path` within `timeout` seconds, and check who listens (fleetctl._peer)
        before anything is sent. Raises OSError when nothing listens (TimeoutError when the
        connect takes too long), PermissionDenied when another user's process does (`peer`
        names it in the message)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
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
        self._conversation = Conversation(peer=peer)
        self._limit = 0.0
        """The receive and send timeout set on the socket now."""

    def request(
        self, request_type: type[Request], result_type: type[R], timeout: float, **fields: Any
    ) -> R:
        sock, conversation = self._sock, self._conversation
        request_id, frame = conversation.request(request_type, fields)
        deadline = time.monotonic() + timeout
        try:
            self._limit_to(timeout)
            sock.sendall(frame)
            received = False
            while (answer := conversation.outcome(request_id)) is None:
                if received:  # the rest of an answer gets what is left of the time
                    self._limit_to(deadline - time.monotonic())
                data = sock.recv(_READ_SIZE) if received else _receive_first(sock)
                received = True
                if data:
                    conversation.received(data)
                else:
                    conversation.ended()
        except BlockingIOError:  # the kernel's timeout, in blocking mode
            raise Timeout(f"no answer from {conversation.peer} within {timeout}s") from None
        except OSError as exc:
            raise ConnectionLost(f"{conversation.peer} went away: {exc.strerror or exc}") from None
        finally:
            conversation.abandon(request_id)
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


class SyncClient:
    """The same calls as Client, blocking. One request at a time (no pipelining needed)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout
        self.server: HelloResult | None = None
        self._link: BlockingLink | None = None
        self._closed = False

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> HelloResult:
        if self._link is not None or self._closed:
            raise ClientClosed("connect() on a client that was already connected")
        problem = socket_path_problem(self.socket_path)
        if problem:
            raise Unavailable(problem)
        try:
            self._link = BlockingLink.open(self.socket_path, self.timeout)
        except TimeoutError:
            raise Timeout(f"connecting to {self.socket_path} took over {self.timeout}s") from None
        except OSError as exc:
            raise unavailable(self.socket_path, exc) from None
        try:
            hello = self.request(Hello, HelloResult, version=PROTOCOL_VERSION, client="fleetctl")
            self.server = check_server_version(hello)
        except BaseException:
            self.close()
            raise
        return self.server

    def close(self) -> None:
        self._closed = True
        if self._link is not None:
            self._link.close()
            self._link = None

    def ping(self) -> None:
        self.request(Ping, Empty)

    def version(self) -> VersionResult:
        return self.request(Version, VersionResult)

    def shutdown(self) -> None:
        self.request(Shutdown, Empty)

    def lease_acquire(
        self, name: str, owner: str, ttl: float = DEFAULT_TTL, *, pid: int = 0
    ) -> LeaseResult:
        return self.request(LeaseAcquire, LeaseResult, name=name, owner=owner, ttl=ttl, pid=pid)

    def lease_heartbeat(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return self.request(
            LeaseHeartbeat, LeaseResult, timeout=timeout, name=name, owner=owner, token=token
        )

    def lease_release(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return self.request(
            LeaseRelease, LeaseResult, timeout=timeout, name=name, owner=owner, token=token
        )

    def lease_inspect(self, name: str) -> LeaseResult:
        return self.request(LeaseInspect, LeaseResult, name=name)

    def lease_list(self, prefix: str = "") -> LeaseList:
        return self.request(LeaseListRequest, LeaseList, prefix=prefix)

    def lease_watch(
        self, prefix: str = "", after: int | None = None, *, epoch: str = "", wait: float = 25.0
    ) -> LeaseEvents:
        return self.request(
            LeaseWatch,
            LeaseEvents,
            timeout=wait + self.timeout,
            prefix=prefix,
            after=after,
            epoch=epoch,
            wait=min(wait, MAX_WAIT),
        )

    # Claims (protocol.claims).

    def claim_acquire(self, kind: str, key: str, owner: str, content: bytes) -> ClaimResult:
        return self.request(
            ClaimAcquire, ClaimResult, kind=kind, key=key, owner=owner, content=content
        )

    def claim_release(self, kind: str, key: str, owner: str) -> ClaimResult:
        return self.request(ClaimRelease, ClaimResult, kind=kind, key=key, owner=owner)

    def claim_inspect(self, kind: str, key: str) -> ClaimResult:
        return self.request(ClaimInspect, ClaimResult, kind=kind, key=key)

    def claim_gc(self, *, dry_run: bool = False) -> ClaimGcResult:
        return self.request(ClaimGc, ClaimGcResult, dry_run=dry_run)

    def claim_list(self, kind: str = "", owner: str = "") -> ClaimList:
        return self.request(ClaimListRequest, ClaimList, kind=kind, owner=owner)

    # Detached clusters (protocol.clusters). Members are NAME, or CLUSTER/NAME when ambiguous.

    def cluster_up(self, spec: ClusterSpec, *, idempotent: bool = False) -> ClusterResult:
        """Start `spec` under a detached holder; answers once its member sockets listen."""
        return self.request(
            ClusterUp, ClusterResult, timeout=self.timeout + 30, spec=spec, idempotent=idempotent
        )

    def cluster_down(self, cluster: str, *, timeout: float = 60.0) -> ClusterResult:
        """Stop every member of `cluster` and wait for its holder to exit."""
        return self.request(ClusterDown, ClusterResult, timeout=timeout, cluster=cluster)

    def member_status(self, names: Sequence[str] = ()) -> list[MemberStatus]:
        """The named members (absent for unknown ones), else every live member."""
        answer = self.request(MemberStatusRequest, MemberList, names=list(names))
        return answer.members

    def member_wait(self, names: Sequence[str], timeout: float = 30.0) -> list[MemberStatus]:
        """Until every named member runs; raises MemberFailed, Absent or Timeout."""
        answer = self.request(
            MemberWait,
            MemberList,
            timeout=timeout + self.timeout,
            names=list(names),
            wait=timeout,
        )
        return answer.members

    def member_stop(self, name: str, *, timeout: float = 60.0) -> MemberStatus:
        return self.request(MemberStop, MemberStatus, timeout=timeout, name=name)

    def member_add(self, name: str, sibling: str, spec: MemberSpec | None = None) -> MemberStatus:
        """Boot `name` beside `sibling` (defined by `spec`, else like the sibling)."""
        return self.request(MemberAdd, MemberStatus, name=name, sibling=sibling, spec=spec)

    def member_logs(self, name: str) -> LogPaths:
        return self.request(MemberLogs, LogPaths, name=name)

    def request(
        self,
        request_type: type[Request],
        result_type: type[R],
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> R:
        if self._link is None:
            raise ClientClosed("the client is not connected; connect() first")
        return self._link.request(
            request_type, result_type, self.timeout if timeout is None else timeout, **fields
        )


def _receive_first(sock: socket.socket) -> bytes:
    """The start of an answer: polled for a moment, then waited for (see fleetctl._link.Poller:
    a thread asleep in recv needs the same costly wakeup as an event loop)."""
    end = time.perf_counter() + POLL_SECONDS
    while time.perf_counter() < end:
        try:
            return sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            os.sched_yield()  # to a process sharing this CPU, maybe the one answering
    return sock.recv(_READ_SIZE)

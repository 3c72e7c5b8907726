"""The async client of fleetd's control socket.

Many requests may be in flight on one connection. There is no background task: one waiting
caller at a time reads the socket for everyone and files each answer under its request id,
waking exactly the callers it answered (and, when it leaves with its own answer, one more to
read next). Likewise one caller at a time writes, taking along every frame queued meanwhile.
So the client needs no task group and works with plain ``connect()`` / ``aclose()`` as well
as ``async with``, and a thousand callers in flight cost one event each, not a lock queue.
"""

import enum
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import SocketStream

from fleetctl import _streamio as streamio
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
from protocol.errors import (
    ClientClosed,
    Compacted,
    ConnectionLost,
    Timeout,
    Unavailable,
)
from protocol.leases import DEFAULT_TTL, MAX_WAIT, LeaseEvent
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
    RawResponse,
    Request,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.paths import socket_path_problem
from protocol.status import MemberStatus

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
        self._raw: socket.socket | None = None
        """The stream's socket, for sends that need no loop turn (fleetctl._streamio)."""
        self._conversation = Conversation()
        self._outbox = bytearray()
        self._writing = False
        self._reading = False
        self._sleepers: dict[int, anyio.Event] = {}

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
                self._raw = streamio.raw_socket(self._stream)
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

    # Claims (protocol.claims): each answers a ClaimResult, or a ClaimList.

    async def claim_acquire(self, kind: str, key: str, owner: str, content: bytes) -> ClaimResult:
        return await self.request(
            ClaimAcquire, ClaimResult, kind=kind, key=key, owner=owner, content=content
        )

    async def claim_release(self, kind: str, key: str, owner: str) -> ClaimResult:
        return await self.request(ClaimRelease, ClaimResult, kind=kind, key=key, owner=owner)

    async def claim_inspect(self, kind: str, key: str) -> ClaimResult:
        return await self.request(ClaimInspect, ClaimResult, kind=kind, key=key)

    async def claim_gc(self, *, dry_run: bool = False) -> ClaimGcResult:
        return await self.request(ClaimGc, ClaimGcResult, dry_run=dry_run)

    async def claim_list(self, kind: str = "", owner: str = "") -> ClaimList:
        return await self.request(ClaimListRequest, ClaimList, kind=kind, owner=owner)

    # Leases: each answers a LeaseResult whose `outcome` says what happened (protocol.leases).

    async def lease_acquire(
        self, name: str, owner: str, ttl: float = DEFAULT_TTL, *, pid: int = 0
    ) -> LeaseResult:
        """Acquire `name` for `owner`, bound to this process (or `pid`, an ancestor of it)."""
        return await self.request(
            LeaseAcquire, LeaseResult, name=name, owner=owner, ttl=ttl, pid=pid
        )

    async def lease_heartbeat(self, name: str, owner: str, token: int = 0) -> LeaseResult:
        return await self.request(LeaseHeartbeat, LeaseResult, name=name, owner=owner, token=token)

    async def lease_release(self, name: str, owner: str, token: int = 0) -> LeaseResult:
        return await self.request(LeaseRelease, LeaseResult, name=name, owner=owner, token=token)

    async def lease_inspect(self, name: str) -> LeaseResult:
        return await self.request(LeaseInspect, LeaseResult, name=name)

    async def lease_list(self, prefix: str = "") -> LeaseList:
        return await self.request(LeaseListRequest, LeaseList, prefix=prefix)

    async def lease_watch(
        self, prefix: str = "", after: int | None = None, *, epoch: str = "", wait: float = 25.0
    ) -> LeaseEvents:
        """One long poll: events after cursor `after` (None: just the current cursor)."""
        return await self.request(
            LeaseWatch,
            LeaseEvents,
            timeout=wait + self.timeout,
            prefix=prefix,
            after=after,
            epoch=epoch,
            wait=min(wait, MAX_WAIT),
        )

    async def watch_leases(self, prefix: str = "") -> AsyncIterator[LeaseEvent]:
        """Every lease event under `prefix` from now on, long poll after long poll. Raises
        Compacted if this client fell too far behind (or fleetd restarted): list, then watch."""
        start = await self.lease_watch(prefix)
        cursor, epoch = start.cursor, start.epoch
        while True:
            answer = await self.lease_watch(prefix, cursor, epoch=epoch)
            if answer.epoch != epoch:
                raise Compacted("fleetd restarted while watching", epoch=answer.epoch)
            cursor = answer.cursor
            for event in answer.events:
                yield event

    # Detached clusters (protocol.clusters). Members are NAME, or CLUSTER/NAME when ambiguous.

    async def cluster_up(self, spec: ClusterSpec, *, idempotent: bool = False) -> ClusterResult:
        """Start `spec` under a detached holder; answers once its member sockets listen."""
        return await self.request(
            ClusterUp, ClusterResult, timeout=self.timeout + 30, spec=spec, idempotent=idempotent
        )

    async def cluster_down(self, cluster: str, *, timeout: float = 60.0) -> ClusterResult:
        """Stop every member of `cluster` and wait for its holder to exit."""
        return await self.request(ClusterDown, ClusterResult, timeout=timeout, cluster=cluster)

    async def member_status(self, names: Sequence[str] = ()) -> list[MemberStatus]:
        """The named members (absent for unknown ones), else every live member."""
        answer = await self.request(MemberStatusRequest, MemberList, names=list(names))
        return answer.members

    async def member_wait(self, names: Sequence[str], timeout: float = 30.0) -> list[MemberStatus]:
        """Until every named member runs; raises MemberFailed, Absent or Timeout."""
        answer = await self.request(
            MemberWait,
            MemberList,
            timeout=timeout + self.timeout,
            names=list(names),
            wait=timeout,
        )
        return answer.members

    async def member_stop(self, name: str, *, timeout: float = 60.0) -> MemberStatus:
        return await self.request(MemberStop, MemberStatus, timeout=timeout, name=name)

    async def member_add(
        self, name: str, sibling: str, spec: MemberSpec | None = None
    ) -> MemberStatus:
        """Boot `name` beside `sibling` (defined by `spec`, else like the sibling)."""
        return await self.request(MemberAdd, MemberStatus, name=name, sibling=sibling, spec=spec)

    async def member_logs(self, name: str) -> LogPaths:
        return await self.request(MemberLogs, LogPaths, name=name)

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
        limit = self.timeout if timeout is None else timeout
        request_id, frame = self._conversation.request(request_type, fields)
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + limit) as deadline:
                await self._send(stream, frame)
                response = await self._answer(stream, request_id)
        finally:
            self._conversation.abandon(request_id)
        if deadline.cancelled_caught:
            raise Timeout(f"no answer from fleetd within {limit}s")
        return decode_result(response, result_type)

    def _opened(self) -> SocketStream:
        if self._stream is None or self.state is not State.OPENED:
            raise ClientClosed(f"the client is {self.state.value}; connect() first")
        return self._stream

    async def _send(self, stream: SocketStream, frame: bytes) -> None:
        """Queue `frame`; the caller already writing sends it with its next write."""
        self._outbox += frame
        if self._writing:
            return
        self._writing = True
        try:
            while self._outbox:
                data = bytes(self._outbox)
                self._outbox.clear()
                assert self._raw is not None
                await streamio.send(stream, self._raw, data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._conversation.fail(ConnectionLost(f"fleetd went away: {exc!r}"))
            self._wake(self._sleepers)
        finally:
            self._writing = False

    async def _answer(self, stream: SocketStream, request_id: int) -> RawResponse:
        conversation = self._conversation
        while (answer := conversation.outcome(request_id)) is None:
            if self._reading:
                await self._sleep(request_id)
                continue
            self._reading = True
            try:
                await self._read_once(stream)
            finally:
                self._reading = False
                self._wake_answered()
        return answer

    async def _sleep(self, request_id: int) -> None:
        wakeup = self._sleepers[request_id] = anyio.Event()
        try:
            await wakeup.wait()
        finally:
            self._sleepers.pop(request_id, None)

    def _wake_answered(self) -> None:
        """Wake the callers whose answers came, or all on failure; and one more to read next."""
        conversation = self._conversation
        if conversation.failure is not None:
            self._wake(self._sleepers)
            return
        answered = [i for i in self._sleepers if i in conversation.answers]
        self._wake(answered)
        if self._sleepers:
            self._wake([next(iter(self._sleepers))])

    def _wake(self, request_ids: Iterable[int]) -> None:
        for request_id in list(request_ids):
            self._sleepers.pop(request_id).set()

    async def _read_once(self, stream: SocketStream) -> None:
        try:
            data = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._conversation.ended()
            return
        self._conversation.received(data)

"""The async client of fleetd's control socket.

Many requests may be in flight on one connection. There is no background task: the event loop
hands what arrives to the client (fleetctl._link), which files each answer under its request
id and resolves that caller's future. So the client needs no task group and works with plain
``connect()`` / ``aclose()`` as well as ``async with``, and a thousand callers in flight cost
one future each.
"""

import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
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
from fleetctl._link import Answers, SocketLink
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
        self._link: SocketLink | None = None
        self._conversation = Conversation()
        self._answers: Answers[RawResponse] = Answers()

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
            async with asyncio.timeout(self.timeout):
                self._link = await SocketLink.open(self.socket_path, self._received, self._ended)
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
        if self._link is not None:
            link, self._link = self._link, None
            await link.aclose()

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
        link = self._opened()
        conversation = self._conversation
        if conversation.failure is not None:
            raise conversation.failure
        limit = self.timeout if timeout is None else timeout
        request_id, frame = conversation.request(request_type, fields)
        try:
            link.send(frame)
            response = await self._answers.wait(request_id, limit)
        except TimeoutError:
            raise Timeout(f"no answer from fleetd within {limit}s") from None
        finally:
            conversation.abandon(request_id)
        return decode_result(response, result_type)

    def _opened(self) -> SocketLink:
        if self._link is None or self.state is not State.OPENED:
            raise ClientClosed(f"the client is {self.state.value}; connect() first")
        return self._link

    def _received(self, data: bytes) -> None:
        conversation = self._conversation
        conversation.received(data)
        for request_id, response in conversation.answers.items():
            self._answers.resolve(request_id, response)
        conversation.answers.clear()
        if conversation.failure is not None:
            self._answers.fail(conversation.failure)

    def _ended(self) -> None:
        self._conversation.ended()
        assert self._conversation.failure is not None
        self._answers.fail(self._conversation.failure)

"""The async client of fleetd's control socket, on one async connection (fleetctl.connection).

fleetctl/sync.py (SyncClient, the blocking client) is generated from this file by
tests/unasync.py (`make unasync`; a test fails when it is stale): change this file, then
regenerate, so that the two clients have the same calls with the same parameters. Each call
sends an op (protocol.base.Op) and returns its typed result; errors are fleet's
(protocol.errors), mapped at the boundary (fleetctl.boundary, the connection).
"""

import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

from fleetctl.boundary import connecting, resolve_socket
from fleetctl.connection import AsyncConnection
from protocol import PROTOCOL_VERSION
from protocol.base import Op, R
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
    ClusterApply,
    ClusterApplyToml,
    ClusterDown,
    ClusterResult,
    ClusterUp,
    ClusterUpToml,
    LogPaths,
    LogPathsList,
    LogsNamed,
    MemberAdd,
    MemberLogs,
    MemberRestart,
    MemberStart,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.connection import DEFAULT_TIMEOUT, State, check_version
from protocol.definitions import ClusterSpec, MemberSpec, in_directory
from protocol.errors import ClientClosed, Compacted
from protocol.leases import DEFAULT_TTL, MAX_WAIT, LeaseEvent
from protocol.messages import (
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
    Metrics,
    Ping,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.status import MemberStatus


class Client:
    """A connection to fleetd. `timeout` bounds every call (connect included), in seconds,
    unless the call takes a `timeout` of its own."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout
        self.state = State.UNOPENED
        self.server: HelloResult | None = None
        self._connection: AsyncConnection | None = None

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
        """Connect and exchange protocol versions; raises Unavailable, Timeout or
        Incompatible."""
        if self.state is not State.UNOPENED:
            raise ClientClosed(f"connect() on a {self.state.value} client")
        with connecting(self.socket_path, self.timeout):
            self._connection = await AsyncConnection.open(self.socket_path, self.timeout)
        self.state = State.OPENED
        try:
            hello = await self.request(Hello, version=PROTOCOL_VERSION, client="fleetctl")
            check_version(hello.version)
        except BaseException:
            await self.aclose()
            raise
        self.server = hello
        return hello

    async def aclose(self) -> None:
        self.state = State.CLOSED
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.aclose()

    async def ping(self) -> None:
        await self.request(Ping)

    async def version(self) -> VersionResult:
        return await self.request(Version)

    async def shutdown(self) -> None:
        """Ask fleetd to finish in-flight requests and exit."""
        await self.request(Shutdown)

    async def metrics(self) -> str:
        """fleetd's metrics in the Prometheus text exposition format."""
        return (await self.request(Metrics)).text

    # Claims (protocol.claims): each answers a ClaimResult, or a ClaimList.

    async def claim_acquire(self, kind: str, key: str, owner: str, content: bytes) -> ClaimResult:
        return await self.request(ClaimAcquire, kind=kind, key=key, owner=owner, content=content)

    async def claim_release(self, kind: str, key: str, owner: str) -> ClaimResult:
        return await self.request(ClaimRelease, kind=kind, key=key, owner=owner)

    async def claim_inspect(self, kind: str, key: str) -> ClaimResult:
        return await self.request(ClaimInspect, kind=kind, key=key)

    async def claim_gc(self, *, dry_run: bool = False) -> ClaimGcResult:
        return await self.request(ClaimGc, dry_run=dry_run)

    async def claim_list(self, kind: str = "", owner: str = "") -> ClaimList:
        return await self.request(ClaimListRequest, kind=kind, owner=owner)

    # Leases: each answers a LeaseResult whose `outcome` says what happened (protocol.leases).

    async def lease_acquire(
        self, name: str, owner: str, ttl: float = DEFAULT_TTL, *, pid: int = 0
    ) -> LeaseResult:
        """Acquire `name` for `owner`, bound to this process (or `pid`, an ancestor of it)."""
        return await self.request(LeaseAcquire, name=name, owner=owner, ttl=ttl, pid=pid)

    async def lease_heartbeat(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return await self.request(
            LeaseHeartbeat, timeout=timeout, name=name, owner=owner, token=token
        )

    async def lease_release(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return await self.request(
            LeaseRelease, timeout=timeout, name=name, owner=owner, token=token
        )

    async def lease_inspect(self, name: str) -> LeaseResult:
        return await self.request(LeaseInspect, name=name)

    async def lease_list(self, prefix: str = "") -> LeaseList:
        return await self.request(LeaseListRequest, prefix=prefix)

    async def lease_watch(
        self, prefix: str = "", after: int | None = None, *, epoch: str = "", wait: float = 25.0
    ) -> LeaseEvents:
        """One long poll: events after cursor `after` (None: just the current cursor)."""
        return await self.request(
            LeaseWatch,
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
        """Start `spec` under a detached holder; answers once its member sockets listen. Its
        members run in this process's working directory, or a relative `cwd` in it."""
        spec = in_directory(spec, os.getcwd())
        return await self.request(
            ClusterUp, timeout=self.timeout + 30, spec=spec, idempotent=idempotent
        )

    async def cluster_up_toml(
        self,
        text: str,
        *,
        source: str = "fleet.toml",
        name: str | None = None,
        idempotent: bool = False,
        directory: str = "",
    ) -> ClusterResult:
        """cluster_up of what `text`, a fleet.toml, defines, parsed by fleetd: InvalidRequest
        names `source` (the file), the line and the key of the first problem. Its members run
        in `directory` (the file's, absolute), unless their `cwd` says otherwise."""
        return await self.request(
            ClusterUpToml,
            timeout=self.timeout + 30,
            text=text,
            source=source,
            name=name,
            idempotent=idempotent,
            directory=directory,
        )

    async def cluster_down(self, cluster: str, *, timeout: float = 60.0) -> ClusterResult:
        """Stop every member of `cluster` and wait for its holder to exit."""
        return await self.request(ClusterDown, timeout=timeout, cluster=cluster)

    async def member_status(self, names: Sequence[str] = ()) -> list[MemberStatus]:
        """The named members (absent for unknown ones), else every live member."""
        answer = await self.request(MemberStatusRequest, names=list(names))
        return answer.members

    async def member_wait(self, names: Sequence[str], timeout: float = 30.0) -> list[MemberStatus]:
        """Until every named member runs; raises MemberFailed, Absent or Timeout."""
        answer = await self.request(
            MemberWait,
            timeout=timeout + self.timeout,
            names=list(names),
            wait=timeout,
        )
        return answer.members

    async def member_stop(self, name: str, *, timeout: float = 60.0) -> MemberStatus:
        return await self.request(MemberStop, timeout=timeout, name=name)

    async def member_add(
        self, name: str, sibling: str, spec: MemberSpec | None = None
    ) -> MemberStatus:
        """Boot `name` beside `sibling` (defined by `spec`, else like the sibling)."""
        return await self.request(MemberAdd, name=name, sibling=sibling, spec=spec)

    async def member_logs(self, name: str) -> LogPaths:
        return await self.request(MemberLogs, name=name)

    async def logs_named(self, name: str) -> LogPathsList:
        """The logs of member `name`, or of each member of the cluster `name` when no member is
        called that."""
        return await self.request(LogsNamed, name=name)

    async def member_start(self, name: str, *, timeout: float = 60.0) -> ClusterResult:
        """Start a stopped member again, same port and directory: acquired, or
        already_acquired when it is on its way or running (see `changes`)."""
        return await self.request(MemberStart, timeout=timeout, name=name)

    async def member_restart(self, name: str, *, timeout: float = 60.0) -> ClusterResult:
        """Stop and start a member (or every member of the cluster `name`), same port and
        directory."""
        return await self.request(MemberRestart, timeout=timeout, name=name)

    async def cluster_apply(self, spec: ClusterSpec, *, timeout: float = 90.0) -> ClusterResult:
        """Bring the cluster to `spec`: its `changes` say, by member, what was restarted,
        added, removed, started or left unchanged. Its members run in this process's working
        directory, or a relative `cwd` in it."""
        spec = in_directory(spec, os.getcwd())
        return await self.request(ClusterApply, timeout=timeout, spec=spec)

    async def cluster_apply_toml(
        self,
        text: str,
        *,
        source: str = "fleet.toml",
        name: str | None = None,
        directory: str = "",
        timeout: float = 90.0,
    ) -> ClusterResult:
        """cluster_apply of what `text`, a fleet.toml, defines, parsed by fleetd (as
        cluster_up_toml)."""
        return await self.request(
            ClusterApplyToml,
            timeout=timeout,
            text=text,
            source=source,
            name=name,
            directory=directory,
        )

    async def request(self, op: type[Op[R]], *, timeout: float | None = None, **fields: Any) -> R:
        """Send one request and wait for its answer's result (`op`'s result type); the calls
        above are built on this."""
        if self._connection is None or self.state is not State.OPENED:
            raise ClientClosed(f"the client is {self.state.value}; connect() first")
        limit = self.timeout if timeout is None else timeout
        return await self._connection.request(op, limit, **fields)

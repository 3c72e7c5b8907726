"""The cluster control ops as the daemon's dispatcher calls them: up, down, status, wait,
stop, add and logs, over the index, the launcher and the follower (fleetd.clusters).

A member's op goes to its holder over the holder's watch connection. When fleetd has none
(the holder was re-adopted while still starting, or does not answer), stop and add raise
Unavailable: fleetd says it could not, rather than answer as if it had.
"""

import os

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.clusters.adoption import adopt
from fleetd.clusters.follow import STOP_MARGIN, Follower
from fleetd.clusters.index import ClusterIndex, EncodedMemberList, Held
from fleetd.clusters.journaling import ClusterJournal
from fleetd.clusters.launch import Launcher
from fleetd.clusters.links import REQUEST_TIMEOUT, MemberLink, add_member, stop_member
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.store import Store
from protocol.clusters import (
    ClusterDown,
    ClusterResult,
    ClusterUp,
    LogPaths,
    LogPathsList,
    LogsNamed,
    MemberAdd,
    MemberList,
    MemberLogs,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import Absent, Contested, InvalidRequest, Timeout, Unavailable
from protocol.members import (
    MemberState,
    MemberStatus,
    member_log_path,
    member_socket_path,
    wait_verdict,
)
from protocol.names import check_name
from protocol.outcomes import Outcome

log = structlog.get_logger("fleetd.clusters")

LAUNCHES_AT_ONCE = 8 * (os.cpu_count() or 1)
"""Holders started at once; further `up`s wait their turn. Two hundred holders started together
share the CPU until they are all slow, many past READY_TIMEOUT (so on 2 cores, exec'd); in
turn each starts at full speed, and the first clusters serve first. Forked from the template,
200 clusters came up no faster with more at once (bench section `clusters`)."""


def decide_up(current: ClusterSpec | None, wanted: ClusterSpec, idempotent: bool) -> Outcome:
    """acquired (start it), already_acquired (it runs as asked), or contested."""
    if current is None:
        return Outcome.ACQUIRED
    if idempotent and current == wanted:
        return Outcome.ALREADY_ACQUIRED
    return Outcome.CONTESTED


def up_refusal(name: str, current: ClusterSpec, wanted: ClusterSpec) -> str:
    if current == wanted:
        return f"cluster {name!r} is already up with this definition (use --idempotent)"
    return f"cluster {name!r} is already up with another definition: `fleetctl down {name}` first"


def reachable(held: Held, member: str) -> MemberLink:
    """The holder's watch connection, or Unavailable saying why there is none."""
    if held.link is not None:
        return held.link
    why = "is still starting" if held.record.state == "starting" else "does not answer"
    raise Unavailable(
        f"the holder of cluster {held.name!r} (pid {held.pid}) {why}: "
        f"nothing was done to member {member!r}; try again",
        cluster=held.name,
        member=member,
    )


class HolderRegistry:
    """Serves the cluster control ops over the clusters' index, launcher and follower; its
    `journal` is the clusters' fleetd.journal.JournalProvider."""

    def __init__(
        self, store: Store, state: PrivateDir, template: WarmTemplate | None = None
    ) -> None:
        """Holders are forked from `template` while it runs, else exec'd."""
        self.store = store
        self.state = state
        self.template = template
        self.index = ClusterIndex()
        self.journal = ClusterJournal(store, self.index, state)
        self.follower = Follower(self.index, self.journal)
        self._launcher: Launcher | None = None
        self._launching = anyio.Semaphore(LAUNCHES_AT_ONCE)

    async def serve(
        self, runtime: PrivateDir, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Adopt the journaled holders, report started, follow them until cancelled (which
        leaves every holder running: they are not fleetd's to stop). Runtime directories go
        in `runtime`'s c/ (the control socket's directory)."""
        self.index.runtime_root = runtime.path
        self._launcher = Launcher(self.store, self.state, runtime, self.follower, self.template)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.journal.retry_postponed)
            await tasks.start(self.follower.serve)
            await adopt(self.store, self.follower)
            task_status.started()

    async def up(self, request: ClusterUp, peer: Peer) -> ClusterResult:
        spec = request.spec
        async with self.index.lock(spec.name):
            held = self.index.live.get(spec.name)
            current = held.record.spec if held is not None else None
            outcome = decide_up(current, spec, request.idempotent)
            if outcome is Outcome.CONTESTED:
                assert current is not None
                raise Contested(up_refusal(spec.name, current, spec), cluster=spec.name)
            if held is None:
                assert self._launcher is not None, "HolderRegistry.serve first"
                async with self._launching:
                    held = await self._launcher.launch(spec, self.index.runtime_dir(spec.name))
            return _result(held, outcome)

    async def down(self, request: ClusterDown, peer: Peer) -> ClusterResult:
        check_name(request.cluster, "cluster")
        async with self.index.lock(request.cluster):
            held = self.index.live.get(request.cluster)
            if held is None:
                if request.cluster in self.index.exited:
                    return ClusterResult(outcome=Outcome.ALREADY_RELEASED, cluster=request.cluster)
                raise Absent(f"no cluster {request.cluster!r}", cluster=request.cluster)
            await self.follower.stop_holder(held)
            return _result(held, Outcome.RELEASED)

    def status(self, request: MemberStatusRequest, peer: Peer) -> MemberList | EncodedMemberList:
        if not request.names:
            return self.index.every_status()
        found = [status for name in request.names for status in self.index.statuses_named(name)]
        return MemberList(members=found)

    async def wait(self, request: MemberWait, peer: Peer) -> MemberList:
        """Names are resolved once, as the wait starts; between looks it sleeps until a push
        changes one of its own clusters (another cluster's changes do not wake it)."""
        found = {name: self.index.resolve(name) for name in request.names}
        clusters = {where[0] for where in found.values() if where is not None}
        statuses: dict[str, MemberStatus] = {}
        try:
            with anyio.fail_after(request.wait):
                while True:
                    with self.index.watching(clusters) as changed:
                        statuses = {
                            name: self._status_at(name, where) for name, where in found.items()
                        }
                        if wait_verdict(statuses):
                            return MemberList(members=list(statuses.values()))
                        await changed.wait()
        except TimeoutError:
            states = ", ".join(f"{name}={status.state}" for name, status in statuses.items())
            raise Timeout(f"members not running within {request.wait}s: {states}") from None

    def _status_at(self, name: str, where: tuple[str, str] | None) -> MemberStatus:
        if where is None:
            return MemberStatus(name=name, state=MemberState.ABSENT)
        return self.index.status_in(*where)

    async def stop(self, request: MemberStop, peer: Peer) -> MemberStatus:
        """A member of an exited cluster is stopped already: its status says so."""
        held, member = self.index.find_live(request.name)
        if held is None:
            return self.index.status_or_absent(request.name)
        link = reachable(held, member)
        spec = held.specs.get(member)
        timeout = (spec.stop_timeout if spec else REQUEST_TIMEOUT) + STOP_MARGIN
        status = await stop_member(link, member, timeout)
        return msgspec.structs.replace(status, cluster=held.name)  # pushes keep the memory

    async def add(self, request: MemberAdd, peer: Peer) -> MemberStatus:
        held, sibling = self.index.find_live(request.sibling)
        if held is None:
            raise Absent(f"no live member {request.sibling!r} to add beside")
        spec = _new_member_spec(held, request, sibling)
        link = reachable(held, spec.name)
        # The holder answers with the status it had at admission, possibly after it pushed
        # newer ones: the answer only fills a gap, pushes are the truth.
        held.statuses.pop(spec.name, None)
        status = await add_member(link, spec)
        held.specs[spec.name] = spec
        if spec.name not in held.statuses:
            self.index.update(held, status)
        await self.journal.write(held.name)
        log.info("member_added", cluster=held.name, member=spec.name)
        return held.statuses[spec.name]

    def logs(self, request: MemberLogs, peer: Peer) -> LogPaths:
        found = self.index.resolve(request.name)
        if found is None:
            raise Absent(f"no member {request.name!r}")
        return self._log_paths(*found)

    def logs_named(self, request: LogsNamed, peer: Peer) -> LogPathsList:
        members = self.index.members_if_cluster(request.name)
        if members:
            paths = [self._log_paths(request.name, member) for member in members]
            return LogPathsList(logs=paths, cluster=True)
        found = self.index.resolve(request.name)
        if found is None:
            raise Absent(f"no member or cluster {request.name!r}")
        return LogPathsList(logs=[self._log_paths(*found)])

    def _log_paths(self, cluster: str, member: str) -> LogPaths:
        runtime_dir = self.index.runtime_dir_of(cluster)
        return LogPaths(
            cluster=cluster,
            member=member,
            stdout=member_log_path(runtime_dir, member),
            stderr=member_log_path(runtime_dir, member, stderr=True),
            socket=member_socket_path(runtime_dir, member),
        )


def _new_member_spec(held: Held, request: MemberAdd, sibling: str) -> MemberSpec:
    check_name(request.name)
    if request.name in held.statuses and held.statuses[request.name].state not in (
        MemberState.STOPPED,
        MemberState.ABSENT,
    ):
        raise InvalidRequest(f"member {request.name!r} is already in cluster {held.name!r}")
    template = request.spec or held.specs.get(sibling)
    if template is None:
        raise InvalidRequest(f"no definition of {sibling!r} to reuse: give one with -f")
    return msgspec.structs.replace(template, name=request.name)


def _result(held: Held, outcome: Outcome) -> ClusterResult:
    return ClusterResult(
        outcome=outcome,
        cluster=held.name,
        holder_pid=held.pid,
        runtime_dir=held.record.dir,
        members=list(held.statuses.values()),
    )

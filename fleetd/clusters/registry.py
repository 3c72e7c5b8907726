"""The cluster control ops as the daemon's dispatcher calls them: up, down, status, wait,
stop, add, logs, start, restart and apply, over the index, the launcher and the follower
(fleetd.clusters).

A member's op goes to its holder over the holder's watch connection. When fleetd has none
(the holder was re-adopted while still starting, or does not answer), stop, add, start,
restart and apply raise Unavailable: fleetd says it could not, rather than answer as if it
had. The holder answers start, restart and remove only after it pushed what they did on that
connection (the new process's `starting` first of all), so the index says it already when
the answer comes: the answer's own status, possibly older than a push right behind it, is
not used.

A holder exits when its last member leaves (stops). The cluster stays known, exited, until
gc or `down`: start and restart of its members start a holder for it again, in the same
runtime directory, with the definition it had (members added since included), the members
not named kept stopped, and every member's port as its state file last said.
"""

import functools
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TypeVar

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.clusters.adoption import adopt
from fleetd.clusters.follow import STOP_MARGIN, Follower
from fleetd.clusters.index import ClusterIndex, EncodedMemberList, Held
from fleetd.clusters.journaling import ClusterJournal
from fleetd.clusters.launch import Launcher
from fleetd.clusters.links import (
    REQUEST_TIMEOUT,
    MemberLink,
    add_member,
    remove_member,
    restart_member,
    start_member,
    status_on_disk,
    stop_member,
)
from fleetd.clusters.records import HolderRecord
from fleetd.clusters.rundirs import current_specs
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.store import Store
from protocol.clusters import (
    Change,
    ClusterApply,
    ClusterDown,
    ClusterResult,
    ClusterUp,
    LogPaths,
    LogPathsList,
    LogsNamed,
    MemberAdd,
    MemberList,
    MemberLogs,
    MemberRestart,
    MemberStart,
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


EXIT_WAIT = STOP_MARGIN
"""Seconds a holder on its way out gets to exit before start, restart or apply starts its
cluster again (it ends what is left of its members and its connections first)."""

T = TypeVar("T")


def decide_up(current: ClusterSpec | None, wanted: ClusterSpec, idempotent: bool) -> Outcome:
    """acquired (start it), already_acquired (it runs as asked), or contested."""
    if current is None:
        return Outcome.ACQUIRED
    if idempotent and current == wanted:
        return Outcome.ALREADY_ACQUIRED
    return Outcome.CONTESTED


def plan_apply(
    current: Mapping[str, MemberSpec], states: Mapping[str, MemberState], wanted: ClusterSpec
) -> dict[str, Change]:
    """What apply does to each member: of `wanted`'s, in its order, added (not there),
    restarted (defined otherwise), started (same definition, stopped or in error) or
    unchanged; then each member of `current` that `wanted` does not name, removed. `states`
    are the members' states now."""
    changes: dict[str, Change] = {}
    for spec in wanted.members:
        before = current.get(spec.name)
        if before is None:
            changes[spec.name] = Change.ADDED
        elif before != spec:
            changes[spec.name] = Change.RESTARTED
        elif states.get(spec.name, MemberState.STOPPED) in _STARTABLE:
            changes[spec.name] = Change.STARTED
        else:
            changes[spec.name] = Change.UNCHANGED
    for name in current:
        if name not in changes:
            changes[name] = Change.REMOVED
    return changes


_STARTABLE = (MemberState.STOPPED, MemberState.ERROR, MemberState.ABSENT)
"""States in which start starts a member (and apply starts one it leaves defined as it was):
stopped, failed, or not known to the holder any more."""


def port_of(status: MemberStatus) -> int | None:
    """The loopback port a member had, from its address; None for a unix socket or none."""
    host, _, port = status.address.rpartition(":")
    return int(port) if host == "127.0.0.1" and port.isdigit() else None


def up_refusal(name: str, current: ClusterSpec, wanted: ClusterSpec) -> str:
    if current == wanted:
        return f"cluster {name!r} is already up with this definition (use --idempotent)"
    return (
        f"cluster {name!r} is already up with another definition: `fleetctl apply` brings it "
        f"to this one, restarting only what changed (or `fleetctl down {name}` first)"
    )


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
            tasks.start_soon(self.journal.write_due)
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
        return await self.bring_down(request.cluster)

    async def bring_down(self, cluster: str) -> ClusterResult:
        check_name(cluster, "cluster")
        async with self.index.lock(cluster):
            held = self.index.live.get(cluster)
            if held is None:
                if cluster in self.index.exited:
                    await self._brought_down(cluster)
                    return ClusterResult(outcome=Outcome.ALREADY_RELEASED, cluster=cluster)
                raise Absent(f"no cluster {cluster!r}", cluster=cluster)
            await self.follower.stop_holder(held)
            await self._brought_down(cluster)
            return _result(held, Outcome.RELEASED)

    async def _brought_down(self, cluster: str) -> None:
        """Journal the exited cluster as brought down: its members are not started again
        (start, restart) until it is brought up."""
        record = self.index.exited.get(cluster)
        if record is not None and not record.down:
            self.index.add_exited(msgspec.structs.replace(record, down=True))
            await self.journal.write(cluster)

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
        """A member of an exited cluster is stopped already: its status says so; so is one
        whose holder exits as it is asked (its last member left)."""
        return await self.stop_named(request.name)

    async def stop_named(self, name: str) -> MemberStatus:
        held, member = self.index.find_live(name)
        if held is None:
            return self.index.status_or_absent(name)
        link = reachable(held, member)
        timeout = self._stop_time(held, member)
        status = await _unless_exiting(held, functools.partial(stop_member, link, member, timeout))
        if status is None:
            return self.index.status_or_absent(name)
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

    async def start(self, request: MemberStart, peer: Peer) -> ClusterResult:
        found = self.index.resolve(request.name)
        if found is None:
            raise Absent(f"no member {request.name!r}")
        cluster, name = found
        async with self.index.lock(cluster):
            held = self.index.live.get(cluster)
            if held is not None:
                done = await _unless_exiting(held, functools.partial(self._start_in, held, name))
                if done is not None:
                    return done
            held = await self._start_again(cluster, {name})
            return _changed(held, Outcome.ACQUIRED, {name: Change.STARTED}, self.index)

    async def _start_in(self, held: Held, name: str) -> ClusterResult:
        if self.index.status_in(held.name, name).state not in _STARTABLE:
            return _changed(held, Outcome.ALREADY_ACQUIRED, {name: Change.RUNNING}, self.index)
        link = reachable(held, name)
        await start_member(link, name, self._stop_time(held, name))
        log.info("member_started", cluster=held.name, member=name)
        return _changed(held, Outcome.ACQUIRED, {name: Change.STARTED}, self.index)

    async def restart(self, request: MemberRestart, peer: Peer) -> ClusterResult:
        """Every member named at once (a cluster's: each stops as it would alone)."""
        cluster, members = self.index.targets(request.name)
        async with self.index.lock(cluster):
            held = self.index.live.get(cluster)
            if held is not None:
                restart = functools.partial(self._restart_in, held, members)
                done = await _unless_exiting(held, restart)
                if done is not None:
                    return done
            held = await self._start_again(cluster, members)
            changes = dict.fromkeys(members, Change.STARTED)
            return _changed(held, Outcome.ACQUIRED, changes, self.index)

    async def _restart_in(self, held: Held, members: list[str]) -> ClusterResult:
        link = reachable(held, members[0])
        changes = {
            name: Change.STARTED
            if self.index.status_in(held.name, name).state in _STARTABLE
            else Change.RESTARTED
            for name in members
        }

        async def again(name: str) -> None:
            await restart_member(link, name, self._stop_time(held, name))

        await _all_at_once(again, members)
        log.info("members_restarted", cluster=held.name, members=members)
        return _changed(held, Outcome.ACQUIRED, changes, self.index)

    async def apply(self, request: ClusterApply, peer: Peer) -> ClusterResult:
        """A cluster not up (or whose holder was exiting) is started as `up` would."""
        spec = request.spec
        async with self.index.lock(spec.name):
            held = self.index.live.get(spec.name)
            if held is not None:
                done = await _unless_exiting(held, functools.partial(self._apply_in, held, spec))
                if done is not None:
                    return done
            assert self._launcher is not None, "HolderRegistry.serve first"
            async with self._launching:
                held = await self._launcher.launch(spec, self.index.runtime_dir(spec.name))
            changes = {m.name: Change.ADDED for m in spec.members}
            return _changed(held, Outcome.ACQUIRED, changes, self.index, every=True)

    async def _apply_in(self, held: Held, spec: ClusterSpec) -> ClusterResult:
        """New members first, then the changed and stopped ones, removals last: the holder
        never runs out of members (it would exit). The new definition is journaled (and
        written in the state directory) once the holder did it all."""
        link = reachable(held, spec.name)
        states = {name: self.index.status_in(held.name, name).state for name in held.specs}
        changes = plan_apply(held.specs, states, spec)
        await self._carry_out(held, link, spec, changes)
        held.record = msgspec.structs.replace(held.record, spec=spec)
        held.specs = {m.name: m for m in spec.members}
        await self.journal.write(held.name)
        assert self._launcher is not None
        await anyio.to_thread.run_sync(self._launcher.write_definition, spec)
        unchanged = all(change is Change.UNCHANGED for change in changes.values())
        outcome = Outcome.ALREADY_ACQUIRED if unchanged else Outcome.OK
        log.info("cluster_applied", cluster=held.name, changes=changes)
        return _changed(held, outcome, changes, self.index, every=True)

    async def _carry_out(
        self, held: Held, link: MemberLink, spec: ClusterSpec, changes: Mapping[str, Change]
    ) -> None:
        def named(*kinds: Change) -> list[str]:
            return [name for name, change in changes.items() if change in kinds]

        async def add(name: str) -> None:
            member = spec.member(name)
            assert member is not None
            held.statuses.pop(name, None)  # as in `add`: the answer only fills a gap
            status = await add_member(link, member)
            held.specs[name] = member
            if name not in held.statuses:
                self.index.update(held, status)

        async def again(name: str) -> None:
            timeout = self._stop_time(held, name)
            member = spec.member(name)
            assert member is not None
            if changes[name] is Change.RESTARTED:
                await restart_member(link, name, timeout, member)
                held.specs[name] = member  # an apply that fails later need not redo it
            else:
                await start_member(link, name, timeout)

        async def remove(name: str) -> None:
            await remove_member(link, name, self._stop_time(held, name))
            self.index.forget(held, name)

        await _all_at_once(add, named(Change.ADDED))
        await _all_at_once(again, named(Change.RESTARTED, Change.STARTED))
        await _all_at_once(remove, named(Change.REMOVED))

    async def _start_again(self, cluster: str, members: Collection[str]) -> Held:
        """A holder for an exited cluster, serving `members`; its other members stay stopped
        (see the module's docstring). Absent once gc collected it."""
        record = self.index.exited.get(cluster)
        if record is None:
            raise Absent(f"no cluster {cluster!r}", cluster=cluster)
        if record.down:
            raise Absent(
                f"cluster {cluster!r} was brought down: `fleetctl up` brings it up again",
                cluster=cluster,
            )
        runtime_dir = self.index.runtime_dir(cluster)
        specs, last = await anyio.to_thread.run_sync(_left_behind, record, runtime_dir)
        missing = set(members) - set(specs)
        if missing:
            raise Absent(f"no definition of {', '.join(sorted(missing))} in cluster {cluster!r}")
        ports = {name: port for name, status in last.items() if (port := port_of(status))}
        stopped = set(specs) - set(members)
        assert self._launcher is not None, "HolderRegistry.serve first"
        async with self._launching:
            held = await self._launcher.launch(
                record.spec,
                runtime_dir,
                members=list(specs.values()),
                stopped=stopped,
                ports=ports,
            )
        for name in stopped & set(last):  # listed as before, stopped (the holder pushes none)
            if name not in held.statuses and last[name].state != MemberState.ABSENT:
                self.index.update(held, last[name])
        log.info("cluster_started_again", cluster=cluster, members=sorted(members))
        return held

    async def run_member(self, cluster: str, spec: MemberSpec) -> MemberStatus:
        """Run `spec` in `cluster`, for fleetd's own use (fleetd.tasks: a worker slot given
        its next task): the cluster is brought up with it if it does not run (or its holder
        is on its way out: its last member left), a new member is added, and one it has is
        started again with this definition (its directory and logs kept). The holder's
        answer; pushes say what follows, to the index's observer."""
        held = self.index.live.get(cluster)
        if held is not None:
            status = await _unless_exiting(held, functools.partial(self._run_in, held, spec))
            if status is not None:
                return status
        async with self.index.lock(cluster):
            held = self.index.live.get(cluster)
            if held is None:
                assert self._launcher is not None, "HolderRegistry.serve first"
                wanted = ClusterSpec(name=cluster, members=[spec])
                async with self._launching:
                    held = await self._launcher.launch(wanted, self.index.runtime_dir(cluster))
                return self.index.status_in(cluster, spec.name)
        return await self._run_in(held, spec)

    async def _run_in(self, held: Held, spec: MemberSpec) -> MemberStatus:
        link = reachable(held, spec.name)
        if spec.name in held.specs:
            status = await restart_member(link, spec.name, self._stop_time(held, spec.name), spec)
            held.specs[spec.name] = spec
            return status
        status = await add_member(link, spec)
        held.specs[spec.name] = spec
        self.journal.write_soon(held.name)  # adoption reads the holder's cluster file: this may lag
        return status

    async def remove_named(self, cluster: str, member: str) -> None:
        """Remove `member` from `cluster` if it runs (fleetd.tasks: a worker slot of an ended
        run); stopped first if it runs."""
        held = self.index.live.get(cluster)
        if held is None or member not in held.specs:
            return
        link = reachable(held, member)
        await remove_member(link, member, self._stop_time(held, member))
        self.index.forget(held, member)

    def _stop_time(self, held: Held, member: str) -> float:
        """How long the holder may take to stop the member (and start it)."""
        spec = held.specs.get(member)
        return (spec.stop_timeout if spec else REQUEST_TIMEOUT) + STOP_MARGIN

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


def _left_behind(
    record: HolderRecord, runtime_dir: str
) -> tuple[dict[str, MemberSpec], dict[str, MemberStatus]]:
    """An exited cluster's members' definitions (members added since its start included)
    and their last statuses on disk (blocking: run in a thread)."""
    specs = current_specs(record)
    return specs, {name: status_on_disk(runtime_dir, name) for name in specs}


async def _unless_exiting(held: Held, call: Callable[[], Awaitable[T]]) -> T | None:
    """What `call` returns; None when the holder was on its way out (it answers Unavailable
    once its last member left, or while it stops everything) and is gone within EXIT_WAIT:
    the caller then starts the cluster again."""
    try:
        return await call()
    except Unavailable:
        if held.link is None:  # never reached: not one on its way out
            raise
        with anyio.move_on_after(EXIT_WAIT):
            await held.gone.wait()
        if not held.gone.is_set():
            raise
        return None


async def _all_at_once(call: Callable[[str], Awaitable[None]], names: Collection[str]) -> None:
    """`call` for every name at once; the first exception raised (once all returned) is
    raised as itself, not in a group (the dispatcher would take it for a bug, and answer
    `internal` rather than the member's error)."""
    failures: list[Exception] = []

    async def one(name: str) -> None:
        try:
            await call(name)
        except Exception as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tasks:
        for name in names:
            tasks.start_soon(one, name)
    if failures:
        raise failures[0]


def _changed(
    held: Held,
    outcome: Outcome,
    changes: dict[str, Change],
    index: ClusterIndex,
    *,
    every: bool = False,
) -> ClusterResult:
    """The result of start, restart or apply: the members changed (`every`: all the
    cluster's, the removed ones aside) as they stand."""
    names = list(held.specs) if every else list(changes)
    return ClusterResult(
        outcome=outcome,
        cluster=held.name,
        holder_pid=held.pid,
        runtime_dir=held.record.dir,
        members=[index.status_in(held.name, name) for name in names],
        changes=changes,
    )


def _result(held: Held, outcome: Outcome) -> ClusterResult:
    return ClusterResult(
        outcome=outcome,
        cluster=held.name,
        holder_pid=held.pid,
        runtime_dir=held.record.dir,
        members=list(held.statuses.values()),
    )

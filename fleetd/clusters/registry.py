"""The registry of detached holders: clusters that fleetd starts for `fleetctl up` and that
outlive fleetd itself (as containerd's shims outlive containerd).

    decide_up / resolve / status_on_disk     pure decisions
    HolderRegistry                           the edges: spawning, the journal, watches, pidfds

Lifetime. A detached holder is a session leader with no tie to fleetd: fleetd's SIGTERM, crash
or upgrade leaves it and its members running. On start, fleetd re-adopts every holder its
journal names whose pidfile still names the same process (pid *and* start time): it opens a
pidfd and a `watch` on a member socket, and nothing is restarted. A journaled holder that died
meanwhile is cleaned up (its sockets, its journal entries, and its cgroup: see below); its
members then read `stopped` from their state files.

Cgroups. Where a holder could make one (fleetd.core.cgroups), its members' processes live in its
cgroup, `fleet-CLUSTER.PID-START` beside the holder in fleetd's own cgroup, and outlive it when
it is SIGKILLed: whenever fleetd sees a holder gone (its pidfd, or a dead one at start-up), it
kills everything left in that cgroup (`cgroup.kill`) and removes it once empty. The journal
names it (the holder's pid and start time), and where it is was read while the holder lived
(else, for one found dead at start-up, fleetd's own cgroup: where it started it).

Launch. The record is written (`starting`) before the holder is spawned, and the holder's pid
and start time are journaled before it runs: it is spawned behind a gate that fleetd opens
only then. So a fleetd that dies mid-launch leaves either a record naming the holder, which
the next fleetd adopts (at once if it serves, else as `starting` until it does: its name is
taken and gc leaves it alone meanwhile), or a gate that read EOF and started nothing, whose
record is cleaned up.

Status from memory. Each live holder pushes every member change on the watch connection, so
status and wait are answered from a dict, and wait sleeps on an event, never polls a holder.
A holder's exit is seen on its pidfd, at once.

Journal (the store, only fleetd writes it):

    holders/<cluster>            HolderRecord: definition, runtime dir, log, pid + start time
                                 (from before the holder runs), state starting | live | exited
    members/<cluster>/<member>   MemberRecord: its socket, directory and logs, owner holders/<c>

An exited holder keeps its record (its directory, logs and state files stay on disk, owned by
it) and loses its member records (their sockets are gone), until gc: the registry is a
fleetd.journal.JournalProvider, which lists these records as journal entries and collects an
exited holder's leftovers and record (protocol.claims documents the mapping).

What the journal says of a holder after the fact (live, exited, a member added) is written
from memory by `_write_journal`; a full disk postpones that write, which is retried until it
lands, so fleetd keeps following its holders and answering from memory meanwhile.

Files: runtime directories (c/<cluster>/ beside the control socket) and definitions
(clusters/<cluster>/ in the state directory) are made and read through checked directory
descriptors (fleetd.core.dirs), never through a link.
"""

import contextlib
import functools
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from fleetctl.members_client import (
    MemberLink,
    holder_log,
    holder_ready,
    status_on_disk,
)
from fleetd.core.cgroups import (
    Cgroup,
    cgroup_directory,
    holder_cgroup_name,
    own_directory,
    within_hierarchy,
)
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.core.pidfiles import process_start_time
from fleetd.journal import Owners, fleetd_entry
from fleetd.state import RUNTIME_SUBDIR
from fleetd.store import Compare, Delete, DeleteRange, KeyValue, Put, Store
from protocol.claims import ClaimInfo
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
from protocol.definitions import ClusterSpec, MemberSpec, check_name
from protocol.errors import (
    Absent,
    ConnectionLost,
    Contested,
    FleetError,
    InvalidRequest,
    MemberFailed,
    PermissionDenied,
    StoreFull,
    Timeout,
    UnsafePath,
)
from protocol.members import (
    CLUSTER_FILE,
    HOLDER_LOG,
    HOLDER_PIDFILE,
    NOTIFY_SOCKET,
    PIDFILE,
    STDERR_LOG,
    STDOUT_LOG,
    AddMember,
    MemberState,
    MemberStatus,
    Stop,
    Watch,
    member_dir,
    member_log_path,
    member_socket_path,
    runtime_dir_problem,
)
from protocol.messages import Message
from protocol.outcomes import Outcome

log = structlog.get_logger("fleetd.holders")

HOLDERS = "holders/"
MEMBERS = "members/"
CLUSTERS_DIR = "clusters"
"""Under the state directory: clusters/<name>/cluster.json, the definition as brought up."""

READY_TIMEOUT = 30.0
"""Seconds a new holder gets to open every member socket."""
STOP_MARGIN = 5.0
"""Seconds beyond the longest stop_timeout for a holder to report its members stopped."""
REQUEST_TIMEOUT = 10.0
JOURNAL_RETRY = 1.0
"""Seconds between tries of journal writes a full disk postponed."""
CGROUP_GRACE = 2.0
"""Seconds the processes a dead holder left in its cgroup get to go once killed."""
_ATTACH_FIRST = 0.01
_ATTACH_MAX = 0.2
"""Seconds between tries of a re-adopted starting holder's sockets: first, and at most."""

_GATE = 'read -r go && exec "$@" </dev/null'
"""A holder's first process: a shell that waits for fleetd's line on its stdin, then execs
the holder in its place (same pid, same start time: what the journal already names); at EOF
(fleetd died before it journaled the pid) it exits, and no holder ever runs."""

_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_SCRUBBED_PREFIXES = ("LISTEN_",)

HolderState = Literal["starting", "live", "exited"]


class HolderRecord(msgspec.Struct, frozen=True, kw_only=True):
    spec: ClusterSpec
    dir: str
    log: str
    pid: int = 0
    start_time: int = 0
    state: HolderState = "starting"


class _EncodedMemberList(Message, frozen=True):
    """A MemberList whose members are encoded already."""

    members: msgspec.Raw


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    socket: str
    dir: str
    stdout: str
    stderr: str


_encode = msgspec.json.Encoder().encode
_decode_holder = msgspec.json.Decoder(HolderRecord).decode
_decode_member = msgspec.json.Decoder(MemberRecord).decode


# --- pure decisions ---------------------------------------------------------------------


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


def resolve(name: str, clusters: Mapping[str, Container[str]]) -> tuple[str, str] | None:
    """(cluster, member) for `CLUSTER/NAME`, or for a bare `NAME` found in one cluster only;
    None when no cluster has it. A bare name in several clusters is ambiguous: an error."""
    if "/" in name:
        cluster, _, member = name.partition("/")
        check_name(cluster, "cluster")
        check_name(member)
        return (cluster, member) if member in clusters.get(cluster, ()) else None
    check_name(name)
    found = [cluster for cluster, members in clusters.items() if name in members]
    if len(found) > 1:
        raise InvalidRequest(
            f"member {name!r} is in clusters {', '.join(sorted(found))}: say CLUSTER/{name}"
        )
    return (found[0], name) if found else None


def holder_env(environ: Mapping[str, str]) -> dict[str, str]:
    """fleetd's environment minus what systemd meant for fleetd alone: a holder that inherited
    NOTIFY_SOCKET would speak for fleetd, and LISTEN_FDS would name fds it does not have."""
    return {
        key: value
        for key, value in environ.items()
        if key not in _SCRUBBED_ENV and not key.startswith(_SCRUBBED_PREFIXES)
    }


def wait_verdict(statuses: Mapping[str, MemberStatus]) -> bool:
    """Whether every member runs; raises MemberFailed for one that cannot get there."""
    for key, status in statuses.items():
        if status.state == MemberState.ABSENT:
            raise Absent(f"no member {key!r}")
        if status.state in (MemberState.ERROR, MemberState.STOPPED):
            reason = status.error or f"it is {status.state}"
            raise MemberFailed(f"member {key!r} failed: {reason}", member=key)
    return all(s.state == MemberState.RUNNING for s in statuses.values())


# --- the edges --------------------------------------------------------------------------


@dataclass(eq=False)
class Held:
    """A live holder as fleetd follows it."""

    name: str
    record: HolderRecord
    pidfd: int
    specs: dict[str, MemberSpec]
    statuses: dict[str, MemberStatus] = field(default_factory=dict)
    link: MemberLink | None = None
    process: subprocess.Popen[bytes] | None = None
    gone: anyio.Event = field(default_factory=anyio.Event)
    cgroup_parent: str | None = None
    """The holder's own cgroup directory, read while it lives: its cgroup is made there."""

    @property
    def pid(self) -> int:
        return self.record.pid

    def __contains__(self, member: object) -> bool:
        return member in self.specs or member in self.statuses

    def update(self, status: MemberStatus) -> MemberStatus:
        status = msgspec.structs.replace(status, cluster=self.name)
        self.statuses[status.name] = status
        return status


class HolderRegistry:
    """Starts, follows and re-adopts detached holders; serves the cluster control ops; offers
    its records to the journal and collects exited holders (fleetd.journal.JournalProvider)."""

    journal_kinds: tuple[str, ...] = ("holder", "member", "socket", "log")

    def __init__(self, store: Store, state: PrivateDir) -> None:
        self.store = store
        self.state = state
        self.runtime_root = ""
        self._live: dict[str, Held] = {}
        self._exited: dict[str, HolderRecord] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._changed = anyio.Event()
        self._every_encoded: _EncodedMemberList | None = None
        self._tasks: TaskGroup | None = None
        self._runtime: PrivateDir | None = None
        self._unwritten: set[str] = set()
        """Clusters whose journal records a full disk kept from being written."""
        self._journal_writes: dict[str, int] = {}
        self._retry_due = anyio.Event()

    async def serve(
        self, runtime: PrivateDir, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Re-adopt the journaled holders, report started, follow them until cancelled (which
        leaves every holder running: they are not fleetd's to stop). Runtime directories go
        in `runtime`'s c/ (the control socket's directory)."""
        self._runtime = runtime
        self.runtime_root = runtime.path
        async with anyio.create_task_group() as self._tasks:
            self._tasks.start_soon(self._retry_journal_writes)
            await self._readopt()
            task_status.started()
            await anyio.sleep_forever()

    # -- ops

    async def up(self, request: ClusterUp, peer: Peer) -> ClusterResult:
        spec = request.spec
        async with self._lock(spec.name):
            held = self._live.get(spec.name)
            current = held.record.spec if held is not None else None
            outcome = decide_up(current, spec, request.idempotent)
            if outcome is Outcome.CONTESTED:
                assert current is not None
                raise Contested(up_refusal(spec.name, current, spec), cluster=spec.name)
            if held is None:
                held = await self._launch(spec)
            return self._result(held, outcome)

    async def down(self, request: ClusterDown, peer: Peer) -> ClusterResult:
        check_name(request.cluster, "cluster")
        async with self._lock(request.cluster):
            held = self._live.get(request.cluster)
            if held is None:
                if request.cluster in self._exited:
                    return ClusterResult(outcome=Outcome.ALREADY_RELEASED, cluster=request.cluster)
                raise Absent(f"no cluster {request.cluster!r}", cluster=request.cluster)
            await self._stop_holder(held)
            return self._result(held, Outcome.RELEASED)

    def status(self, request: MemberStatusRequest, peer: Peer) -> MemberList | _EncodedMemberList:
        if not request.names:
            return self._every_status()
        return MemberList(members=[self._status_of(name) for name in request.names])

    def _every_status(self) -> _EncodedMemberList:
        """Every live member's status, encoded once per change (see _changed_now): asking
        for everyone outnumbers changes once clusters run."""
        if self._every_encoded is None:
            every = [s for held in self._live.values() for s in held.statuses.values()]
            self._every_encoded = _EncodedMemberList(members=msgspec.Raw(_encode(every)))
        return self._every_encoded

    async def wait(self, request: MemberWait, peer: Peer) -> MemberList:
        """Sleeps on the change event between looks: pushes from holders wake it."""
        try:
            with anyio.fail_after(request.wait):
                while True:
                    changed = self._changed
                    statuses = {name: self._status_of(name) for name in request.names}
                    if wait_verdict(statuses):
                        return MemberList(members=list(statuses.values()))
                    await changed.wait()
        except TimeoutError:
            states = ", ".join(f"{n}={self._status_of(n).state}" for n in request.names)
            raise Timeout(f"members not running within {request.wait}s: {states}") from None

    async def stop(self, request: MemberStop, peer: Peer) -> MemberStatus:
        held, member = self._find_live(request.name)
        if held is None or held.link is None:
            return self._status_or_absent(request.name)
        spec = held.specs.get(member)
        timeout = (spec.stop_timeout if spec else REQUEST_TIMEOUT) + STOP_MARGIN
        status = await held.link.request(Stop, timeout, name=member)
        return msgspec.structs.replace(status, cluster=held.name)  # pushes keep the memory

    async def add(self, request: MemberAdd, peer: Peer) -> MemberStatus:
        held, sibling = self._find_live(request.sibling)
        if held is None:
            raise Absent(f"no live member {request.sibling!r} to add beside")
        spec = self._new_member_spec(held, request, sibling)
        if held.link is None:
            raise ConnectionLost(f"cluster {held.name!r} does not answer")
        # The holder answers with the status it had at admission, possibly after it pushed
        # newer ones: the answer only fills a gap, pushes are the truth.
        held.statuses.pop(spec.name, None)
        status = await held.link.request(AddMember, REQUEST_TIMEOUT, spec=spec)
        held.specs[spec.name] = spec
        if spec.name not in held.statuses:
            held.update(status)
            self._changed_now()
        await self._write_journal(held.name)
        log.info("member_added", cluster=held.name, member=spec.name)
        return held.statuses[spec.name]

    def logs(self, request: MemberLogs, peer: Peer) -> LogPaths:
        found = resolve(request.name, self._known_members())
        if found is None:
            raise Absent(f"no member {request.name!r}")
        cluster, member = found
        runtime_dir = self._runtime_dir_of(cluster)
        return LogPaths(
            cluster=cluster,
            member=member,
            stdout=member_log_path(runtime_dir, member),
            stderr=member_log_path(runtime_dir, member, stderr=True),
            socket=member_socket_path(runtime_dir, member),
        )

    # -- looking members up

    def _lock(self, cluster: str) -> anyio.Lock:
        return self._locks.setdefault(cluster, anyio.Lock())

    def _known_members(self) -> dict[str, Container[str]]:
        """Every cluster's member names: live ones from memory (the Held itself, not a copy
        of a thousand names per request), exited ones from their definitions (the names whose
        state files may answer)."""
        known: dict[str, Container[str]] = {
            name: [m.name for m in r.spec.members] for name, r in self._exited.items()
        }
        known.update(self._live)
        return known

    def _find_live(self, name: str) -> tuple[Held | None, str]:
        found = resolve(name, self._known_members())
        if found is None:
            raise Absent(f"no member {name!r}")
        cluster, member = found
        return self._live.get(cluster), member

    def _status_of(self, name: str) -> MemberStatus:
        found = resolve(name, self._known_members())
        if found is None:
            return MemberStatus(name=name, state=MemberState.ABSENT)
        cluster, member = found
        held = self._live.get(cluster)
        if held is not None and member in held.statuses:
            return held.statuses[member]
        if held is not None and held.record.state == "starting":  # re-adopted, not serving yet
            return MemberStatus(
                name=member, state=MemberState.STARTING, holder_pid=held.pid, cluster=cluster
            )
        on_disk = status_on_disk(self._runtime_dir_of(cluster), member)
        return msgspec.structs.replace(on_disk, cluster=cluster)

    def _status_or_absent(self, name: str) -> MemberStatus:
        status = self._status_of(name)
        if status.state == MemberState.ABSENT:
            raise Absent(f"no member {name!r}")
        return status

    def _runtime_dir_of(self, cluster: str) -> str:
        held = self._live.get(cluster)
        if held is not None:
            return held.record.dir
        record = self._exited.get(cluster)
        return record.dir if record is not None else self._runtime_dir(cluster)

    def _runtime_dir(self, cluster: str) -> str:
        return os.path.join(self.runtime_root, RUNTIME_SUBDIR, cluster)

    def _new_member_spec(self, held: Held, request: MemberAdd, sibling: str) -> MemberSpec:
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

    def _result(self, held: Held, outcome: Outcome) -> ClusterResult:
        return ClusterResult(
            outcome=outcome,
            cluster=held.name,
            holder_pid=held.pid,
            runtime_dir=held.record.dir,
            members=list(held.statuses.values()),
        )

    def _changed_now(self) -> None:
        """Wake every waiter to look again."""
        self._every_encoded = None
        self._changed.set()
        self._changed = anyio.Event()

    # -- starting a holder

    async def _launch(self, spec: ClusterSpec) -> Held:
        runtime_dir = self._runtime_dir(spec.name)
        problem = runtime_dir_problem(runtime_dir, [m.name for m in spec.members])
        if problem:
            raise InvalidRequest(problem, cluster=spec.name)
        spec_file = self._write_definition(spec)
        record = HolderRecord(spec=spec, dir=runtime_dir, log=os.path.join(runtime_dir, HOLDER_LOG))
        await self.store.put(HOLDERS + spec.name, _encode(record))  # journaled before it exists
        log_fd = self._open_holder_log(spec.name)
        try:
            process, record = await self._spawn(spec_file, record, log_fd)
        finally:
            os.close(log_fd)
        try:
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            process.wait()
            await self._exited_now(record, reason="holder_died_at_start")
            raise FleetError(f"the holder failed to start: {holder_log(record.log)}") from None
        record = msgspec.structs.replace(record, state="live")
        held = Held(spec.name, record, pidfd, {m.name: m for m in spec.members}, process=process)
        await self._follow(held)
        log.info("holder_started", cluster=spec.name, pid=process.pid, dir=runtime_dir)
        return held

    def _write_definition(self, spec: ClusterSpec) -> str:
        """clusters/<name>/cluster.json in the state directory; its path."""
        try:
            with (
                self.state.subdir(CLUSTERS_DIR) as clusters,
                clusters.subdir(spec.name) as directory,
            ):
                directory.write_atomically(CLUSTER_FILE, msgspec.json.encode(spec))
                return directory.join(CLUSTER_FILE)
        except OSError as exc:
            raise FleetError(f"cannot prepare cluster {spec.name!r}: {exc}") from None

    def _open_holder_log(self, cluster: str) -> int:
        """The runtime directory c/<cluster>/ (made 0700, or an existing one of ours, never
        through a link) and the holder's log in it, open for appending."""
        assert self._runtime is not None
        try:
            with (
                self._runtime.subdir(RUNTIME_SUBDIR) as root,
                root.subdir(cluster) as directory,
            ):
                return directory.open_file(HOLDER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise FleetError(f"cannot prepare cluster {cluster!r}: {exc}") from None

    async def _spawn(
        self, spec_file: str, record: HolderRecord, log_fd: int
    ) -> tuple[subprocess.Popen[bytes], HolderRecord]:
        """The holder, detached: its own session, its output to its log; and its record, which
        names it (pid and start time) in the journal before it runs: it is spawned behind a
        gate (_GATE) that fleetd opens only then. A fleetd that dies at any point of a launch
        thus leaves a record naming the holder, or a gate that reads EOF and exits without
        ever starting one: never a holder that nothing names (which start-up gc would take
        for dead, and remove the files of while it starts). subprocess, not
        anyio.open_process: an event loop's process transport kills a child still running
        when it closes, and a detached holder must outlive fleetd."""
        ready_read, ready_write = os.pipe()
        gate_read, gate_write = os.pipe()
        unclosed = {ready_read, ready_write, gate_read, gate_write}

        def close(fd: int) -> None:
            unclosed.discard(fd)
            os.close(fd)

        command = [
            sys.executable,
            "-m",
            "fleetd.holder",
            f"--spec={spec_file}",
            f"--dir={record.dir}",
            f"--ready-fd={ready_write}",
        ]
        try:
            process = await anyio.to_thread.run_sync(
                _popen_detached, command, log_fd, gate_read, ready_write
            )
            close(ready_write)
            close(gate_read)
            try:
                start_time = process_start_time(process.pid) or 0  # exec keeps it: the holder's
                record = msgspec.structs.replace(record, pid=process.pid, start_time=start_time)
                await self.store.put(HOLDERS + record.spec.name, _encode(record))
                os.write(gate_write, b"go\n")
                close(gate_write)
                await holder_ready(ready_read, READY_TIMEOUT, record.dir)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._abandon(process, record)
                raise
        finally:
            for fd in unclosed:
                os.close(fd)
        return process, record

    async def _abandon(self, process: subprocess.Popen[bytes], record: HolderRecord) -> None:
        """A holder that failed to get ready: kill its session, reap it, journal it gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(process.wait)
        await self._exited_now(record, reason="holder_failed_to_start")

    # -- following a holder

    async def _follow(self, held: Held) -> None:
        """Watch its members (snapshot now, pushes after), journal it live, and follow its
        pidfd in the background."""
        if not await self._connect(held):
            log.warning("holder_unreachable", cluster=held.name, pid=held.pid)
        held.record = msgspec.structs.replace(held.record, state="live")
        self._take(held)
        await self._write_journal(held.name)

    def _take(self, held: Held) -> None:
        """Count it live (its name is taken, gc leaves it alone) and see it exit."""
        self._live[held.name] = held
        self._exited.pop(held.name, None)
        held.cgroup_parent = cgroup_directory(held.pid)  # read after the pidfd was opened
        self._changed_now()
        assert self._tasks is not None
        self._tasks.start_soon(self._until_exit, held)

    async def _connect(self, held: Held) -> bool:
        """A watch over the first member socket that answers (any socket serves every member,
        and the connection outlives its member); False when none does. A socket where
        another user's process listens is passed over, unspoken to."""
        for name in sorted(held.specs, key=lambda n: n not in held.statuses):
            try:
                link = await MemberLink.connect(
                    member_socket_path(held.record.dir, name),
                    on_push=functools.partial(self._pushed, held),
                )
            except ConnectionLost:
                continue
            except PermissionDenied as refused:
                log.warning("holder_socket_refused", cluster=held.name, error=refused.message)
                continue
            try:
                snapshot = await link.request(Watch, REQUEST_TIMEOUT, pushes=True)
            except (ConnectionLost, anyio.get_cancelled_exc_class()) as exc:
                with anyio.CancelScope(shield=True):
                    await link.aclose()
                if isinstance(exc, ConnectionLost):
                    continue
                raise
            held.link = link
            for status in snapshot.members:
                # A push that came in the same read as the snapshot was handled before this
                # task resumed: it is newer than the snapshot, which must not undo it.
                if status.name not in held.statuses:
                    held.update(status)
            return True
        return False

    def _pushed(self, held: Held, status: MemberStatus) -> None:
        held.update(status)
        self._changed_now()

    async def _until_exit(self, held: Held) -> None:
        """The pidfd turns readable when the holder exits, whoever's child it is."""
        try:
            await anyio.wait_readable(held.pidfd)
        finally:
            os.close(held.pidfd)
            if held.link is not None:
                with anyio.CancelScope(shield=True):
                    await held.link.aclose()
        if held.process is not None:
            held.process.wait()  # our child: reap it (it has exited: this does not block)
        self._live.pop(held.name, None)
        await self._exited_now(
            held.record, reason="holder_exited", cgroup_parent=held.cgroup_parent
        )
        held.gone.set()

    async def _exited_now(
        self, record: HolderRecord, *, reason: str, cgroup_parent: str | None = None
    ) -> None:
        """Journal a holder gone: its record stays (exited; its files remain), its members'
        socket records go, and so do sockets a killed holder could not remove, and any
        process it left in its cgroup (made in `cgroup_parent`, else beside fleetd)."""
        name = record.spec.name
        with _opened_runtime_dir(record) as directory:
            if directory is not None:
                _remove_sockets(directory, _member_names(record, directory))
        self._exited[name] = msgspec.structs.replace(record, state="exited")
        self._changed_now()  # status answers from memory: it says so now, not after the writes
        await _end_cgroup(record, cgroup_parent)
        await self._write_journal(name)
        log.info("holder_gone", cluster=name, pid=record.pid, reason=reason)

    async def _write_journal(self, name: str) -> None:
        """Make the journal say what memory says of cluster `name`: live (its record and a
        record per member) or exited (its record, no members). Written from memory when it
        is submitted, so a later write always says what is newer. A full disk postpones the
        write (it is retried until it lands), and is not the caller's error."""
        self._journal_writes[name] = attempt = self._journal_writes.get(name, 0) + 1
        try:
            kvs = await self.store.range(f"{MEMBERS}{name}/")
            operations = self._journal_of(name, {kv.key for kv in kvs})
            if operations:
                await self.store.txn((), operations)
        except StoreFull:
            if name not in self._unwritten:
                log.warning("journal_write_postponed", cluster=name, reason="disk full")
            self._unwritten.add(name)
            self._retry_due.set()
            return
        if self._journal_writes.get(name) == attempt and name in self._unwritten:
            self._unwritten.discard(name)
            log.info("journal_written_late", cluster=name)

    def _journal_of(self, name: str, members_stored: set[str]) -> list[Put | Delete]:
        held, exited = self._live.get(name), self._exited.get(name)
        if held is not None:
            record = held.record
            members = sorted({*held.specs, *held.statuses})
            puts = [self._member_put(name, record.dir, member) for member in members]
        elif exited is not None:
            record, puts = exited, []
        else:
            return []  # collected meanwhile
        stale = members_stored - {put.key for put in puts}
        return [Put(HOLDERS + name, _encode(record)), *map(Delete, sorted(stale)), *puts]

    async def _retry_journal_writes(self) -> None:
        while True:
            await self._retry_due.wait()
            await anyio.sleep(JOURNAL_RETRY)
            self._retry_due = anyio.Event()
            for name in sorted(self._unwritten):
                await self._write_journal(name)

    def _member_put(self, cluster: str, runtime_dir: str, name: str) -> Put:
        record = MemberRecord(
            owner=HOLDERS + cluster,
            socket=member_socket_path(runtime_dir, name),
            dir=member_dir(runtime_dir, name),
            stdout=member_log_path(runtime_dir, name),
            stderr=member_log_path(runtime_dir, name, stderr=True),
        )
        return Put(f"{MEMBERS}{cluster}/{name}", _encode(record))

    async def _stop_holder(self, held: Held) -> None:
        """SIGTERM through the pidfd (never a recycled pid): the holder stops every member
        and exits; wait for that."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(held.pidfd, signal.SIGTERM)
        grace = max((s.stop_timeout for s in held.specs.values()), default=0.0) + STOP_MARGIN
        with anyio.move_on_after(grace):
            await held.gone.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(held.pidfd, signal.SIGKILL)
        await held.gone.wait()

    def _remove_leftovers(self, record: HolderRecord) -> None:
        """An exited holder's runtime directory and definition, never through a link."""
        parts = _runtime_dir_parts(record)
        assert parts is not None
        root, cluster = parts
        with contextlib.ExitStack() as stack:
            try:
                top = stack.enter_context(PrivateDir.open(root, create=False))
                runtime = stack.enter_context(top.subdir(RUNTIME_SUBDIR, create=False))
            except FileNotFoundError:
                pass
            else:
                runtime.remove_tree(cluster)
        with (
            contextlib.suppress(FileNotFoundError),
            self.state.subdir(CLUSTERS_DIR, create=False) as clusters,
        ):
            clusters.remove_tree(cluster)

    # -- re-adoption

    async def _readopt(self) -> None:
        for kv in await self.store.range(HOLDERS):
            record = _decode_holder(kv.value)
            if record.state == "exited":
                self._exited[record.spec.name] = record
                continue
            identified = _identified(record)
            pidfd = _pidfd_of(identified) if identified is not None else None
            if identified is None or pidfd is None:
                await self._exited_now(record, reason="holder_died_while_fleetd_was_down")
                continue
            held = Held(record.spec.name, identified, pidfd, _current_specs(identified))
            if record.state == "starting":
                await self._adopt_starting(held)
            else:
                await self._follow(held)
            log.info("holder_adopted", cluster=held.name, pid=held.pid, was=record.state)

    async def _adopt_starting(self, held: Held) -> None:
        """A holder fleetd was starting when it died. Followed as any other if it serves
        already; else taken at once, as starting (its name is taken, its exit is seen, gc
        leaves it alone), and watched once it serves, in the background: start-up must not
        wait for it."""
        if await self._connect(held):
            await self._follow(held)
            return
        self._take(held)
        assert self._tasks is not None
        self._tasks.start_soon(self._attach, held)

    async def _attach(self, held: Held) -> None:
        """Until a member socket of a starting holder answers: then watch it and journal it
        live. It has no ready pipe to this fleetd, so its sockets are tried, backing off
        (only ever after fleetd died mid-launch). One that does not serve within
        READY_TIMEOUT is killed, as a launch would kill it."""
        delay = _ATTACH_FIRST
        with anyio.move_on_after(READY_TIMEOUT):
            while not await self._connect(held):
                with anyio.move_on_after(delay):
                    await held.gone.wait()
                    return
                delay = min(delay * 2, _ATTACH_MAX)
        if self._live.get(held.name) is not held:  # it exited meanwhile: journaled so
            if held.link is not None:
                await held.link.aclose()
            return
        if held.link is None:
            log.warning("holder_not_ready", cluster=held.name, pid=held.pid)
            with contextlib.suppress(ProcessLookupError):  # the pidfd is open while it is live
                signal.pidfd_send_signal(held.pidfd, signal.SIGKILL)
            return
        held.record = msgspec.structs.replace(held.record, state="live")
        await self._write_journal(held.name)
        self._changed_now()
        log.info("holder_attached", cluster=held.name, pid=held.pid)

    # -- the journal (fleetd.journal.JournalProvider)

    def journal_owners(self) -> Owners:
        """Members (as NAME and CLUSTER:NAME) and clusters as claim owners: live while the
        member runs (a cluster while any of its members does), or while its holder, re-adopted
        mid-launch, has not said yet; every member of an exited holder is known, and gone."""
        known: set[str] = set()
        live: set[str] = set()
        for cluster, held in self._live.items():
            starting = held.record.state == "starting"  # its members' fate is not known yet
            for name in {**held.specs, **held.statuses}:
                names = {name, f"{cluster}:{name}", cluster}
                known |= names
                status = held.statuses.get(name)
                if starting or (status is not None and status.running):
                    live |= names
        for cluster, record in self._exited.items():
            for name in _current_specs(record):
                known |= {name, f"{cluster}:{name}", cluster}
        return Owners(live=frozenset(live), known=frozenset(known))

    async def journal_entries(self) -> list[ClaimInfo]:
        """The journal's records (holders/, members/) as entries; an exited holder's members,
        sockets and logs as they remain on disk."""
        members: dict[str, list[KeyValue]] = {}
        for kv in await self.store.range(MEMBERS):
            members.setdefault(kv.key.removeprefix(MEMBERS).partition("/")[0], []).append(kv)
        entries: list[ClaimInfo] = []
        for kv in await self.store.range(HOLDERS):
            name, record = kv.key.removeprefix(HOLDERS), _decode_holder(kv.value)
            if record.state == "exited":
                entries += await anyio.to_thread.run_sync(
                    exited_entries, name, record, kv.mod_revision
                )
                continue
            entries.append(holder_entry(name, record, kv.mod_revision))
            held = self._live.get(name)
            statuses = held.statuses if held is not None else {}
            for member in members.get(name, ()):
                entries += member_entries(name, member, statuses)
        return entries

    async def journal_collect(self, *, dry_run: bool) -> list[ClaimInfo]:
        """Every exited holder's leftovers and record, one cluster at a time under its lock
        (an `up` of the same name waits for it, and gc waits for an `up` under way)."""
        removed: list[ClaimInfo] = []
        for name in sorted(self._exited):
            async with self._lock(name):
                removed += await self._collect_exited(name, dry_run)
        return removed

    async def _collect_exited(self, name: str, dry_run: bool) -> list[ClaimInfo]:
        """Files first, then the record: a crash in between leaves a record whose files are
        gone, which the next gc deletes; never files that no record names."""
        record, key = self._exited.get(name), HOLDERS + name
        kv = await self.store.get(key)
        if record is None or name in self._live or kv is None:
            return []
        if _decode_holder(kv.value) != record or _runtime_dir_parts(record) is None:
            log.warning("holder_not_collected", cluster=name, dir=record.dir)
            return []
        if await anyio.to_thread.run_sync(_still_running, record):
            log.warning("holder_not_collected_still_running", cluster=name, dir=record.dir)
            return []
        found = await anyio.to_thread.run_sync(exited_entries, name, record, kv.mod_revision)
        if dry_run:
            return found
        try:
            await anyio.to_thread.run_sync(self._remove_leftovers, record)
        except (OSError, UnsafePath) as exc:
            log.warning("holder_not_collected", cluster=name, error=str(exc))
            return []
        result = await self.store.txn(
            (Compare(key, "mod", "==", kv.mod_revision),),
            (Delete(key), DeleteRange(f"{MEMBERS}{name}/")),
        )
        if not result.succeeded:
            return []
        del self._exited[name]
        log.info("holder_collected", cluster=name, dir=record.dir, items=len(found))
        return found


# --- the journal's entries ---------------------------------------------------------------


def holder_entry(cluster: str, record: HolderRecord, revision: int) -> ClaimInfo:
    """Owned by the holder process (pid and start time), or by fleetd while it starts one."""
    owner = f"pid:{record.pid}:{record.start_time}" if record.pid else "fleetd"
    return fleetd_entry(
        "holder",
        cluster,
        owner,
        held=record.state != "exited",
        revision=revision,
        path=record.dir,
        detail=record.state,
    )


def member_entries(
    cluster: str, kv: KeyValue, statuses: Mapping[str, MemberStatus]
) -> list[ClaimInfo]:
    """A live holder's member record as its member, socket and log entries."""
    record, name = _decode_member(kv.value), kv.key.rpartition("/")[2]
    key = f"{cluster}:{name}"
    status = statuses.get(name)
    detail = str(status.state) if status is not None else ""
    held = functools.partial(fleetd_entry, held=True, revision=kv.mod_revision)
    return [
        held("member", key, cluster, path=record.dir, detail=detail),
        held("socket", key, key, path=record.socket, detail=detail),
        held("log", f"{key}:stdout", key, path=record.stdout),
        held("log", f"{key}:stderr", key, path=record.stderr),
    ]


def exited_entries(cluster: str, record: HolderRecord, revision: int) -> list[ClaimInfo]:
    """An exited holder and what it left in its runtime directory: member directories with
    their logs, and any socket a killed holder could not remove. Reads the disk."""
    entries = [holder_entry(cluster, record, revision)]
    left = functools.partial(fleetd_entry, held=False, revision=revision)
    with _opened_runtime_dir(record) as directory:
        if directory is None:
            return entries
        for name in directory.names():
            entry, path = directory.entry(name), directory.join(name)
            if name.endswith(".sock"):
                key = f"{cluster}:{name.removesuffix('.sock')}"
                entries.append(left("socket", key, key, path=path))
            elif entry is not None and stat.S_ISDIR(entry.st_mode):
                key = f"{cluster}:{name}"
                entries.append(left("member", key, cluster, path=path))
                for stream, log_name in (("stdout", STDOUT_LOG), ("stderr", STDERR_LOG)):
                    logs = (f"{name}/{log_name}", f"{name}/{log_name}.1")
                    if any(directory.entry(log) is not None for log in logs):
                        log_path = member_log_path(record.dir, name, stderr=stream == "stderr")
                        entries.append(left("log", f"{key}:{stream}", key, path=log_path))
    return entries


def _runtime_dir_parts(record: HolderRecord) -> tuple[str, str] | None:
    """(the directory holding c/, the cluster) of a runtime directory as fleetd makes them:
    <socket dir>/c/<cluster>; None for anything else (a mangled record must not point
    fleetd at another directory)."""
    path = os.path.normpath(record.dir)
    parent = os.path.dirname(path)
    if not os.path.isabs(path) or os.path.basename(parent) != RUNTIME_SUBDIR:
        return None
    if os.path.basename(path) != record.spec.name:
        return None
    return os.path.dirname(parent), record.spec.name


@contextlib.contextmanager
def _opened_runtime_dir(record: HolderRecord) -> Iterator[PrivateDir | None]:
    """A holder's runtime directory, opened without following a link; None when it is gone,
    or is not a directory fleetd made (logged)."""
    parts = _runtime_dir_parts(record)
    directory: PrivateDir | None = None
    if parts is not None:
        root, cluster = parts
        try:
            with (
                PrivateDir.open(root, create=False) as top,
                top.subdir(RUNTIME_SUBDIR, create=False) as runtime,
            ):
                directory = runtime.subdir(cluster, create=False)
        except FileNotFoundError:
            pass
        except (OSError, UnsafePath) as exc:
            log.warning("runtime_dir_refused", cluster=cluster, dir=record.dir, error=str(exc))
    else:
        log.warning("runtime_dir_refused", dir=record.dir, error="not <socket dir>/c/<cluster>")
    if directory is None:
        yield None
        return
    with directory:
        yield directory


def _pidfile_in(directory: PrivateDir, name: str) -> tuple[int, int] | None:
    """(pid, start time) from a pidfile, or None for a missing or mangled one."""
    try:
        pid, start_time = directory.read_file(name, 64).split()
        return int(pid), int(start_time)
    except (OSError, ValueError, UnsafePath):
        return None


def _names_a_running_process(pidfile: tuple[int, int] | None) -> bool:
    """The pid is alive and its start time is the recorded one (not a recycled pid)."""
    return pidfile is not None and process_start_time(pidfile[0]) == pidfile[1]


def _still_running(record: HolderRecord) -> bool:
    """Whether the holder's pidfile, or any member's, names a running process (pid and start
    time): the journal says exited, but a live process's files are never removed."""
    with _opened_runtime_dir(record) as directory:
        if directory is None:
            return False
        if _names_a_running_process(_pidfile_in(directory, HOLDER_PIDFILE)):
            return True
        for name in directory.names():
            with (
                contextlib.suppress(OSError, UnsafePath),
                directory.subdir(name, create=False) as member,
            ):
                if _names_a_running_process(_pidfile_in(member, PIDFILE)):
                    return True
        return False


def _popen_detached(
    command: list[str], log_fd: int, gate: int, ready_fd: int
) -> subprocess.Popen[bytes]:
    """Fork and exec the holder's gate (_GATE) in its own session, reading `gate`; it becomes
    the holder once fleetd writes a line there."""
    return subprocess.Popen(
        ["/bin/sh", "-c", _GATE, "fleetd-holder", *command],
        stdin=gate,
        stdout=log_fd,
        stderr=log_fd,
        pass_fds=(ready_fd,),
        start_new_session=True,
        env=holder_env(os.environ),
        cwd="/",
    )


def _identified(record: HolderRecord) -> HolderRecord | None:
    """The record with the holder's pid and start time, or None when nothing names a process
    (whether it runs, _pidfd_of says). A live record names it, and the pidfile the holder
    wrote must agree. A starting record (fleetd died launching it) names it once the pid was
    journaled, before the holder could run (see _spawn), so even while the holder has written
    nothing yet; one without a pid (fleetd died before that, so its gate never opened; or it
    was written by an older fleetd) has only the holder's pidfile to go by."""
    if record.state == "starting" and record.pid:
        return record
    with _opened_runtime_dir(record) as directory:
        on_disk = _pidfile_in(directory, HOLDER_PIDFILE) if directory is not None else None
    if on_disk is None:
        return None
    if record.state == "starting":
        pid, start_time = on_disk
        return msgspec.structs.replace(record, pid=pid, start_time=start_time)
    return record if on_disk == (record.pid, record.start_time) else None


def _pidfd_of(record: HolderRecord) -> int | None:
    """A pidfd of the journaled holder if it still runs: same pid, same start time. The start
    time is checked after the pidfd is open, so the pid cannot be recycled in between."""
    if record.pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(record.pid)
    except (ProcessLookupError, PermissionError):
        return None
    if process_start_time(record.pid) == record.start_time:
        return pidfd
    os.close(pidfd)
    return None


def _current_specs(record: HolderRecord) -> dict[str, MemberSpec]:
    """The members a holder serves now (it rewrites cluster.json as members join and leave),
    else those it was started with."""
    specs = {m.name: m for m in record.spec.members}
    with _opened_runtime_dir(record) as directory:
        if directory is not None:
            with contextlib.suppress(OSError, msgspec.MsgspecError, FleetError):
                current = msgspec.json.decode(directory.read_file(CLUSTER_FILE), type=ClusterSpec)
                specs |= {m.name: m for m in current.members}
    return specs


def _member_names(record: HolderRecord, directory: PrivateDir) -> set[str]:
    names = {m.name for m in record.spec.members}
    with contextlib.suppress(OSError):
        names |= {e.removesuffix(".sock") for e in directory.names() if e.endswith(".sock")}
    return names


def _remove_sockets(directory: PrivateDir, names: Iterable[str]) -> None:
    for name in names:
        directory.unlink(f"{name}.sock")
    directory.unlink(NOTIFY_SOCKET)


async def _end_cgroup(record: HolderRecord, parent: str | None) -> None:
    """Kill every process left in a gone holder's cgroup, if it left one, and remove it once
    empty (one that will not empty is left, and said so)."""
    cgroup = _left_cgroup(record, parent)
    if cgroup is None:
        return
    left = cgroup.populated()
    if left:
        cgroup.kill()
    if not await cgroup.wait_empty(CGROUP_GRACE):
        log.warning("holder_cgroup_not_empty", cluster=record.spec.name, cgroup=cgroup.path)
        return
    try:
        cgroup.remove()
    except OSError as exc:
        log.warning("holder_cgroup_not_removed", cgroup=cgroup.path, error=str(exc))
        return
    log.info("holder_cgroup_removed", cluster=record.spec.name, cgroup=cgroup.path, killed=left)


def _left_cgroup(record: HolderRecord, parent: str | None) -> Cgroup | None:
    """The cgroup a gone holder left, if any: named by its pid and start time, in `parent`
    (the holder's own cgroup) or beside fleetd, which started it."""
    if not record.pid:
        return None
    name = holder_cgroup_name(record.spec.name, record.pid, record.start_time)
    for directory in dict.fromkeys(d for d in (parent, own_directory()) if d is not None):
        path = os.path.join(directory, name)
        if within_hierarchy(path) and os.path.isdir(path):
            return Cgroup(path)
    return None

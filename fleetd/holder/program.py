"""The holder: one process per cluster, parent and supervisor of its members (as containerd-shim
is of a container), serving one unix socket per member.

    python -m fleetd.holder --spec cluster.json --dir RUNTIME_DIR [--bind-pid PID] [--ready-fd FD]
                            [--stopped NAME]... [--port NAME=PORT]...

It becomes a child subreaper (orphans of members are re-parented to it and reaped) and gives
each member a parent-death signal, so a holder that dies, even by SIGKILL, leaks no member.
A member's other processes end with it (descendants): where cgroup v2 is writable, each
member has a cgroup under the holder's (`fleet-CLUSTER.PID-START/NAME.member`, beside the
holder's own), which outlives a SIGKILLed holder for fleetd to end. It exits when its last
member leaves (stop), or on SIGTERM/SIGINT after stopping them all, and ends whatever process
is left as it goes.

A stopped member leaves, its definition and port kept: `start` brings it back as it was, and
`restart` stops and starts one without the holder exiting meanwhile (with a new definition,
for fleetd's apply). fleetd starting a holder again for a cluster whose last member stopped
names the members to keep stopped (`--stopped`) and the ports members had (`--port`).

Bound mode (`--bind-pid`, the library's lifetime): the holder stops every member and exits as
soon as the client process dies (pidfd) or a connection that completed bind + ack reaches EOF.
A connection that closes before its ack (a dial retry, a probe) tears nothing down.

Runtime directory (0700), see protocol.members for the names:

    holder.pid  cluster.json  notify  <member>.sock  <member>/{stdout.log,stderr.log,pid,state.json}
"""

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import resource
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import anyio
import msgspec
import structlog
from anyio.abc import SocketStream, TaskGroup, TaskStatus, UNIXSocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fleetctl.polling import Poller
from fleetd.core.bounds import LARGE_CONNECTION_IN_FLIGHT, MAX_WAITS, FrameBudget, Limits, Trim
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Dispatcher, Peer
from fleetd.core.log import configure_logging
from fleetd.core.pidfiles import pidfile_text
from fleetd.core.server import (
    ACCEPT_RETRY_DELAY,
    TRANSIENT_ACCEPT_ERRORS,
    Connection,
    admit,
)
from fleetd.core.startup import leaf_errors, name_process, raise_fd_limit, return_free_memory
from fleetd.holder.descendants import Lineage
from fleetd.holder.members import (
    LOG_MAX_BYTES,
    Member,
    NotifySocket,
    Reaper,
    block_sigchld,
    needs_port,
)
from fleetd.holder.readers import Readers
from fleetd.holder.runenv import RunEnvs, member_nofile
from fleetd.holder.spawn import Spawner, become_subreaper
from protocol import PROTOCOL_VERSION
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import (
    Absent,
    FleetError,
    Incompatible,
    InvalidRequest,
    LimitExceeded,
    Unavailable,
)
from protocol.framing import encode_response
from protocol.members import (
    CLUSTER_FILE,
    HOLDER_PIDFILE,
    NOTIFY_SOCKET,
    Ack,
    AddMember,
    Bind,
    BindResult,
    MemberState,
    MemberStatus,
    Remove,
    Restart,
    Start,
    Status,
    StatusAll,
    Stop,
    Watch,
    WatchResult,
    decode_member_request,
    member_dir,
    member_socket_path,
    runtime_dir_problem,
)
from protocol.messages import Empty, Message, Response

log = structlog.get_logger("fleetd.holder")

Push = MemberStatus | anyio.Event
"""What goes down a watch's queue: a change, or a barrier (see _Session.pushed_first)."""
_STARTABLE = (MemberState.STOPPED, MemberState.ERROR)
"""States in which `start` starts a member that is here afresh."""
_EXIT_GRACE = 1.0
"""Seconds connections get to receive their last answers once the last member left."""
_SAVES_AT_ONCE = 16
"""Members whose files are written between two chances for the event loop to answer."""
_SAVES_WAIT_FOR_SPAWNS = 1.0
"""Seconds changed members' files may wait for spawns on their way (see _save_forever)."""


def _listening_socket(path: str) -> socket.socket:
    """A member socket, mode 0600 (made synchronously: anyio's create_unix_listener binds in a
    worker thread, a thread hop per member)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # in a 0700 directory: nobody else can reach it before the chmod
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _Doorway:
    """A member socket that accepts from a callback of the holder's Readers: a thousand
    members' sockets cost no task, cancel scope, frames or event-loop reader while nobody
    connects (the holder runs on asyncio, see `main`). Connections go to `on_connection`."""

    def __init__(
        self, path: str, readers: Readers, on_connection: Callable[[socket.socket], object]
    ) -> None:
        self.path = path
        self._sock = _listening_socket(path)
        self._sock.setblocking(False)
        self._on_connection = on_connection
        self._readers = readers
        self._loop = asyncio.get_running_loop()
        self._readers.add(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        """Running out of descriptors or memory pauses accepting instead of ending it."""
        while True:
            try:
                connection, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                    log.error("accept_failed", socket=self.path, error=str(exc))
                    self.close()
                    return
                log.warning("accept_failed", socket=self.path, error=os.strerror(exc.errno or 0))
                self._readers.remove(self._sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            connection.setblocking(False)
            self._on_connection(connection)

    def _resume(self) -> None:
        if self._sock.fileno() >= 0:
            self._readers.add(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and remove the socket file (connections made through it stay)."""
        if self._sock.fileno() >= 0:
            self._readers.remove(self._sock.fileno())
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _open_runtime_dir(path: str, members: list[str]) -> PrivateDir:
    """The runtime directory, made 0700 if missing; one that exists must be this user's (or
    root's) and not open to others (fleetd made it so, or the library's temporary one)."""
    problem = runtime_dir_problem(path, members)
    if problem:
        raise FleetError(problem)
    try:
        runtime = PrivateDir.open(path)
    except OSError as exc:
        raise FleetError(f"cannot use {path}: {exc.strerror or exc}") from None
    os.fchmod(runtime.fd, 0o700)
    return runtime


def free_port(taken: Collection[int] = ()) -> int:
    """A loopback port nobody listens on now (the member binds it a moment later), and not one
    of `taken`: the kernel may hand a port just probed out again, and a hundred members given
    ports at once would otherwise collide (one in five starts of 100 http.server members)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in taken:
            return port


class Peers:
    """FLEET_PEERS for every member of a cluster: the full list joined once, each member's
    own entry cut out by position (joining N entries per member made starting N members
    quadratic)."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self._joined = ",".join(f"{name}={address}" for name, address in addresses.items())
        self._spans: dict[str, tuple[int, int]] = {}
        start = 0
        for name, address in addresses.items():
            end = start + len(name) + 1 + len(address)
            self._spans[name] = (start, end)
            start = end + 1

    def without(self, name: str) -> str:
        span = self._spans.get(name)
        if span is None:
            return self._joined
        start, end = span
        if start == 0:
            return self._joined[end + 1 :]
        return self._joined[: start - 1] + self._joined[end:]


class Holder:
    """Supervises one cluster's members and serves their sockets until the last one leaves.

    Run it in a process of its own, through `main`: it needs SIGCHLD blocked in every thread
    (see fleetd.holder.members.Reaper) and it becomes the subreaper of everything it starts.
    """

    def __init__(
        self,
        spec: ClusterSpec,
        runtime_dir: str,
        *,
        bind_pid: int | None = None,
        log_max_bytes: int = LOG_MAX_BYTES,
        limits: Limits | None = None,
        member_nofile: int | None = None,
        stopped: Collection[str] = (),
        ports: Mapping[str, int] | None = None,
    ) -> None:
        """`runtime_dir` holds the sockets, logs and state; `bind_pid` is the client whose
        death (or whose acked connection's EOF) stops the cluster, in bound mode; `limits`
        bound what each connection to a member socket may hold (fleetd.core.bounds), with one
        budget of unfinished frames for them all; `member_nofile` is the soft open-file limit
        members get (fleetd.holder.runenv; ours when None). The members named in `stopped` are
        kept, stopped, for `start`; `ports` are the ports members get back. Raises FleetError
        when a member's user or limits cannot be had."""
        self.spec = spec
        self.runenvs = RunEnvs(
            inherit=bind_pid is not None,
            member_nofile=member_nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        for member in spec.members:
            self.runenvs.of(member)
        self.cluster = spec.name
        self.runtime_dir = os.path.abspath(runtime_dir)
        self.runtime = _open_runtime_dir(self.runtime_dir, [m.name for m in spec.members])
        self.notify_path = os.path.join(self.runtime_dir, NOTIFY_SOCKET)
        self.spawner = Spawner()
        self.spawner.settled = self._spawns_settled
        self.reaper = Reaper(spawning=self._spawning)
        self._notify: NotifySocket | None = None
        self._abstract_notify: NotifySocket | None = None
        """For members of other users, who may not enter the runtime directory."""
        self._spawns_done: anyio.Event | None = None
        self.readers = Readers()
        self.lineage = Lineage(self.cluster, self.reaper.watched)
        self._bind_pid = bind_pid
        self._log_max_bytes = log_max_bytes
        self._members: dict[str, Member] = {}
        self._departed: dict[str, MemberStatus] = {}
        self._kept: dict[str, tuple[MemberSpec, int | None]] = {}
        """Stopped members' definitions and ports, for `start`."""
        self._returning: dict[str, int] = {}
        """Members being restarted (how many restarts of each): their leaving does not end
        the holder, nor close their socket."""
        self._stopped = set(stopped)
        self._given_ports = dict(ports or {})
        self._doorways: dict[str, _Doorway] = {}
        self._by_pid: dict[int, Member] = {}
        self._peers: Peers | None = None
        self._ports: set[int] = set()
        """Ports given to members still here."""
        self._encoded_statuses: msgspec.Raw | None = None
        self._watchers: set[MemoryObjectSendStream[Push]] = set()
        self._unsaved: dict[str, Member] = {}
        self._save_soon = anyio.Event()
        self._tearing_down = False
        self._finished = anyio.Event()
        self._open: set[Connection] = set()
        self._poller = Poller()
        self._limits = limits or Limits()
        self._budget = FrameBudget(self._limits.partial_frame_budget)
        self._trim = Trim()
        self._tasks: TaskGroup | None = None
        self._connections: TaskGroup | None = None

    # -- lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every member, report started, serve until the last member left; end every
        process left."""
        self._prepare_directory()
        self.lineage.start()
        try:
            async with anyio.create_task_group() as self._tasks:
                await self._tasks.start(self.reaper.run)
                await self._tasks.start(self._watch_signals)
                self._tasks.start_soon(self._save_forever)
                self._notify = NotifySocket(self.notify_path, self._owner_of, self._spawning)
                self._tasks.start_soon(self._notify.run)
                if self._bind_pid is not None:
                    self._tasks.start_soon(self._watch_client, self._bind_pid)
                async with anyio.create_task_group() as self._connections:
                    starting = self._keep_stopped()
                    for member in [
                        self._admit(spec, self._given_ports.get(spec.name)) for spec in starting
                    ]:
                        self._begin(member)
                    # The member sockets open while the spawning threads spawn; nobody may
                    # connect before every member is spawned and we report started.
                    for spec in starting:
                        self._open_door(spec.name)
                    await self._spawns_settled_wait()
                    log.info(
                        "holder_ready",
                        cluster=self.cluster,
                        members=len(self._members),
                        pid=os.getpid(),
                        bind_pid=self._bind_pid,
                    )
                    task_status.started()
                    await self._finished.wait()
                    await self.lineage.end_all()
                    self._finish_connections()
                self._tasks.cancel_scope.cancel()
        finally:
            self.lineage.close()
            for doorway in self._doorways.values():
                doorway.close()
            self.readers.close()
            self._save_changed()
            for member in self._members.values():
                member.close_directory()
            self.runtime.unlink(HOLDER_PIDFILE)
            self.runtime.close()
        log.info("holder_stopped", cluster=self.cluster)

    def _prepare_directory(self) -> None:
        try:
            self.runtime.write_atomically(HOLDER_PIDFILE, pidfile_text(os.getpid()))
            self._write_cluster_file()
        except OSError as exc:
            raise FleetError(f"cannot use {self.runtime_dir}: {exc.strerror or exc}") from None

    def _finish_connections(self) -> None:
        """Let every connection deliver what it owes (the answer to the stop that made the last
        member leave, the watchers' last changes), then end it; at most _EXIT_GRACE."""
        for watcher in list(self._watchers):
            watcher.close()
        for connection in self._open:
            connection.stop_reading()
        assert self._connections is not None
        self._connections.cancel_scope.deadline = anyio.current_time() + _EXIT_GRACE

    def teardown(self, reason: str) -> None:
        """Stop every member (concurrently); the holder exits once they are all down."""
        if self._tearing_down:
            return
        self._tearing_down = True
        log.info("holder_tearing_down", cluster=self.cluster, reason=reason)
        self.lineage.freeze()
        assert self._tasks is not None
        for member in list(self._members.values()):
            self._tasks.start_soon(member.stop)
        if not self._members:
            self._finished.set()

    async def _watch_signals(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                self.teardown(signal.Signals(signum).name)

    async def _watch_client(self, pid: int) -> None:
        """Bound mode: the client's death, whatever killed it, stops the cluster."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.teardown("client_gone")
            return
        try:
            await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.teardown("client_gone")

    # -- members joining and leaving

    def _keep_stopped(self) -> list[MemberSpec]:
        """Keep the members named stopped (with their ports) for `start`; the others, to
        start now."""
        starting: list[MemberSpec] = []
        for spec in self.spec.members:
            if spec.name not in self._stopped:
                starting.append(spec)
                continue
            port = self._given_ports.get(spec.name) if needs_port(spec) else None
            self._kept[spec.name] = (spec, port)
            if port is not None:
                self._ports.add(port)
            address = f"127.0.0.1:{port}" if port is not None else ""
            self._departed[spec.name] = MemberStatus(
                name=spec.name, state=MemberState.STOPPED, address=address
            )
        if not starting:
            raise FleetError("no member to start: every member is named --stopped")
        return starting

    def _admit(self, spec: MemberSpec, port: int | None = None) -> Member:
        """A member joins, not yet supervised (`begin`; its socket opens with _open_door):
        every member of a start joins before the first spawns, so that each is given all
        its peers. It gets `port` if it needs one and one is given (it had it before), else
        a free one."""
        kept = self._kept.pop(spec.name, None)
        if kept is not None and kept[1] is not None and kept[1] != port:
            self._ports.discard(kept[1])
        if not needs_port(spec):
            port = None
        elif port is None:
            port = free_port(self._ports)
        member = Member(
            spec,
            host=self,
            directory=member_dir(self.runtime_dir, spec.name),
            port=port,
            log_max_bytes=self._log_max_bytes,
        )
        self._members[spec.name] = member
        if member.port is not None:
            self._ports.add(member.port)
        self._departed.pop(spec.name, None)
        self._peers = None
        self._encoded_statuses = None
        return member

    def _begin(self, member: Member) -> None:
        assert self._tasks is not None
        member.begin(self._tasks)

    def _open_door(self, name: str) -> None:
        """Open a member's socket, unless it left already."""
        assert self._connections is not None
        connections = self._connections
        if name in self._members and name not in self._doorways:
            self._doorways[name] = _Doorway(
                member_socket_path(self.runtime_dir, name),
                self.readers,
                lambda sock: connections.start_soon(self._connection, name, sock),
            )

    def member_left(self, member: Member) -> None:
        """A stopped member leaves: its socket closes (connections made through it stay),
        unless it is being restarted; its definition and port are kept for `start`."""
        self._members.pop(member.name, None)
        self._departed[member.name] = member.status()
        self._kept[member.name] = (member.spec, member.port)
        if member.name not in self._returning:
            doorway = self._doorways.pop(member.name, None)
            if doorway is not None:
                doorway.close()
        self._peers = None
        self._encoded_statuses = None
        if not self._tearing_down:
            self._save_cluster()
            self._unsaved.pop(member.name, None)
            member.save()
            member.close_directory()
        log.info("member_left", member=member.name, remaining=len(self._members))
        self._finish_if_empty()

    def _finish_if_empty(self) -> None:
        """The last member left (and none is on its way back, unless everything stops)."""
        if not self._members and (self._tearing_down or not self._returning):
            self._finished.set()

    async def add_member(self, spec: MemberSpec) -> MemberStatus:
        self._refuse_while_exiting()
        if spec.name in self._members:
            raise InvalidRequest(f"member {spec.name!r} is already in cluster {self.cluster!r}")
        problem = runtime_dir_problem(self.runtime_dir, [spec.name])
        if problem:
            raise InvalidRequest(problem)
        self._check_runenv(spec)
        member = self._admit(spec)
        status = member.status()
        self._begin(member)
        await member.spawn_settled()  # the socket and the cluster file wait: see there
        self._open_door(spec.name)
        self._save_cluster()
        log.info("member_added", member=spec.name)
        return status

    def _check_runenv(self, spec: MemberSpec) -> None:
        """Its user and limits can be had, before anything is stopped or started for it."""
        try:
            self.runenvs.of(spec)
        except FleetError as exc:
            raise InvalidRequest(exc.message) from None

    async def start_member(self, name: str) -> MemberStatus:
        """A stopped member back as it was; one in error, or stopped after a clean exit,
        started afresh; one on its way or running, untouched."""
        member = self._members.get(name)
        if member is not None and member.status().state not in _STARTABLE:
            return member.status()
        return await self.restart_member(name)

    async def restart_member(self, name: str, spec: MemberSpec | None = None) -> MemberStatus:
        """Stop the member if it is here, then start it again with its port and directory,
        as it was defined or as `spec`; the holder stays up meanwhile."""
        self._refuse_while_exiting()
        if spec is not None:
            if spec.name != name:  # a replace validates the whole definition again
                spec = msgspec.structs.replace(spec, name=name)
            self._check_runenv(spec)
        member = self._members.get(name)
        if member is not None:
            kept = (member.spec, member.port)
            self._returning[name] = self._returning.get(name, 0) + 1
            coming_back = False
            try:
                await member.stop()
                self._refuse_while_exiting()
                coming_back = True
            finally:
                self._returning[name] -= 1
                if not self._returning[name]:
                    del self._returning[name]
                if not coming_back:
                    self._close_door_of_departed(name)
                    self._finish_if_empty()
        elif name in self._kept:
            kept = self._kept[name]
        else:
            raise Absent(f"no member {name!r} in cluster {self.cluster!r}")
        if name in self._members:  # another start brought it back meanwhile
            return self._members[name].status()
        definition = spec if spec is not None else kept[0]
        member = self._admit(definition, kept[1])
        self._begin(member)
        status = member.status()
        self._announce(status)  # watchers last heard `stopped`; a first start publishes none
        await member.spawn_settled()  # the socket and the cluster file wait: see there
        self._open_door(name)
        self._save_cluster()
        log.info("member_restarted", member=name, changed=spec is not None)
        return status

    def _close_door_of_departed(self, name: str) -> None:
        """A member that was to come back will not (the holder is tearing down, or the restart
        was cancelled): its socket closes, as it would have when it left."""
        if name not in self._members:
            doorway = self._doorways.pop(name, None)
            if doorway is not None:
                doorway.close()

    async def remove_member(self, name: str) -> MemberStatus:
        """Stop the member if it is here, and forget it (`absent` from now on)."""
        self._refuse_while_exiting()
        member = self._members.get(name)
        if member is None and name not in self._kept:
            raise Absent(f"no member {name!r} in cluster {self.cluster!r}")
        if member is not None:
            await member.stop()
        kept = self._kept.pop(name, None)
        if kept is not None and kept[1] is not None:
            self._ports.discard(kept[1])
        self._departed.pop(name, None)
        gone = MemberStatus(name=name, state=MemberState.ABSENT)
        self._announce(gone)
        log.info("member_removed", member=name)
        return gone

    def _refuse_while_exiting(self) -> None:
        """Unavailable once the holder is on its way out (stopping everything, or its last
        member left): fleetd then waits for it to exit, and starts the cluster again."""
        if self._tearing_down:
            raise Unavailable(f"cluster {self.cluster!r} is shutting down")
        if self._finished.is_set():
            raise Unavailable(f"cluster {self.cluster!r} is exiting: its last member left")

    async def stop_member(self, name: str) -> MemberStatus:
        member = self._members.get(name)
        if member is not None:
            return await member.stop()
        if name in self._departed:
            return self._departed[name]
        raise Absent(f"no member {name!r} in cluster {self.cluster!r}")

    def status_of(self, name: str) -> MemberStatus:
        member = self._members.get(name)
        if member is not None:
            return member.status()
        return self._departed.get(name) or MemberStatus(name=name, state=MemberState.ABSENT)

    def _save_cluster(self) -> None:
        """cluster.json: the members this holder serves now, for whoever re-adopts it. A full
        disk keeps the previous file, and the members running."""
        try:
            self._write_cluster_file()
        except OSError as exc:
            log.warning("cluster_file_failed", error=str(exc))

    def _write_cluster_file(self) -> None:
        members = [m.spec for m in self._members.values()] or list(self.spec.members)
        spec = ClusterSpec(name=self.cluster, members=members)
        self.runtime.write_atomically(CLUSTER_FILE, msgspec.json.encode(spec))

    # -- what members ask of their holder (fleetd.holder.members.Host)

    def peers_of(self, name: str) -> str:
        if self._peers is None:
            self._peers = Peers({n: m.address for n, m in self._members.items()})
        return self._peers.without(name)

    def status_stale(self) -> None:
        self._encoded_statuses = None

    def member_changed(self, member: Member) -> None:
        self._unsaved[member.name] = member
        self._save_soon.set()
        status = member.status()
        emit = log.warning if status.state == MemberState.ERROR else log.debug
        emit(
            "member_state",
            member=member.name,
            state=str(status.state),
            pid=status.pid,
            error=status.error or None,
        )
        self._announce(status)

    def _announce(self, status: MemberStatus) -> None:
        """Push a member's status to every watcher."""
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(status)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._watchers.discard(watcher)

    def notify_address(self, other_user: bool) -> str:
        """The notify socket in the runtime directory; for a member of another user, which
        may not enter it, one in the abstract namespace (as systemd's own is open to every
        service's user), opened with the first such member."""
        if not other_user:
            return self.notify_path
        if self._abstract_notify is None:
            assert self._tasks is not None, "spawned before the holder runs"
            address = f"@fleet-notify-{self.lineage.token}"
            self._abstract_notify = NotifySocket(address, self._owner_of, self._spawning)
            self._tasks.start_soon(self._abstract_notify.run)
        return self._abstract_notify.path

    def _notify_sockets(self) -> Iterator[NotifySocket]:
        yield from (s for s in (self._notify, self._abstract_notify) if s is not None)

    def process_started(self, member: Member, pid: int) -> None:
        self._by_pid[pid] = member
        for notify in self._notify_sockets():
            notify.process_started()

    def _spawning(self) -> bool:
        return self.spawner.in_flight > 0

    def _spawns_settled(self) -> None:
        self.reaper.settled()
        for notify in self._notify_sockets():
            notify.settled()
        if self._spawns_done is not None:
            self._spawns_done.set()
            self._spawns_done = None

    async def _spawns_settled_wait(self) -> None:
        """Until no spawn is on its way."""
        if self._spawning():
            if self._spawns_done is None:
                self._spawns_done = anyio.Event()
            await self._spawns_done.wait()

    def process_ended(self, pid: int) -> None:
        self._by_pid.pop(pid, None)

    async def _save_forever(self) -> None:
        """Write changed members' files, each once however often it changed meanwhile, a few
        at a time: a file's creation costs the disk up to a millisecond, and a thousand
        members starting would otherwise hold every answer (their `running` among them) up
        for seconds. Spawns go first (for at most _SAVES_WAIT_FOR_SPAWNS): the files of a
        thousand members starting, three writes and a read of /proc each, were a third of
        the event loop's work before they all ran. Each save writes the member's state as it
        is then, so a later one never loses to an earlier."""
        while True:
            await self._save_soon.wait()
            self._save_soon = anyio.Event()
            with anyio.move_on_after(_SAVES_WAIT_FOR_SPAWNS):
                await self._spawns_settled_wait()
            while self._unsaved:
                self._save_changed(_SAVES_AT_ONCE)
                await anyio.lowlevel.checkpoint()

    def _save_changed(self, most: int | None = None) -> None:
        """Save every changed member, or the `most` that changed first."""
        names = list(itertools.islice(self._unsaved, most))
        for name in names:
            self._unsaved.pop(name).save()

    def _owner_of(self, senders: Iterable[int]) -> Member | None:
        """The member a notify sender belongs to, by the sender's ancestry: itself, its
        group, or an ancestor."""
        for candidate in senders:
            member = self._by_pid.get(candidate)
            if member is not None and member.pid == candidate:
                return member
        return None

    # -- connections

    def statuses(self) -> list[MemberStatus]:
        return [m.status() for m in self._members.values()]

    def encoded_statuses(self) -> msgspec.Raw:
        """statuses() as JSON, kept until a member changes, joins or leaves: all-member
        requests outnumber changes once a cluster runs."""
        if self._encoded_statuses is None:
            self._encoded_statuses = msgspec.Raw(msgspec.json.encode(self.statuses()))
        return self._encoded_statuses

    def watch(
        self,
    ) -> tuple[
        list[MemberStatus],
        MemoryObjectSendStream[Push],
        MemoryObjectReceiveStream[Push],
    ]:
        """Every member's status now, and a stream of every change from now on: its sending
        end, to give to `unwatch` when done, and its receiving end."""
        send, receive = anyio.create_memory_object_stream[Push](math.inf)
        self._watchers.add(send)
        return self.statuses(), send, receive

    def unwatch(self, watcher: MemoryObjectSendStream[Push]) -> None:
        self._watchers.discard(watcher)
        watcher.close()

    async def _connection(self, member: str, sock: socket.socket) -> None:
        try:
            stream: SocketStream = await UNIXSocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise
        try:
            await self._converse(member, stream)
        except Exception:  # a bug in this connection: the others and the members go on
            log.exception("connection_failed", member=member)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, member: str, stream: SocketStream) -> None:
        peer = await admit(stream)
        if peer is None:
            return
        async with anyio.create_task_group() as pushers:
            session = _Session(self, member, pushers)
            connection = session.connection = Connection(
                stream,
                session.dispatcher(),
                peer,
                self._poller,
                limits=self._limits,
                budget=self._budget,
            )
            self._open.add(connection)
            try:
                async with anyio.create_task_group() as in_flight:
                    await connection.read_requests(in_flight)
                    if session.acked:
                        self.teardown("client_disconnected")
            finally:
                self._open.discard(connection)
            if not self._finished.is_set():
                pushers.cancel_scope.cancel()  # the peer left; else pushers drain and end
        if (
            connection.large or session.watches >= LARGE_CONNECTION_IN_FLIGHT
        ) and self._connections:
            self._trim.soon(self._connections)


class _EncodedWatchResult(Message, frozen=True):
    """A WatchResult whose members are encoded already."""

    members: msgspec.Raw


class _Session:
    """One connection's state: whether it is bound (its EOF then stops the cluster), and the
    watches it asked for."""

    def __init__(self, holder: Holder, member: str, pushers: TaskGroup) -> None:
        self.holder = holder
        self.member = member
        self.pushers = pushers
        self.connection: Connection | None = None
        self.bound = False
        self.acked = False
        self.watches = 0
        """Watches this connection asked for: each costs a pusher until the connection ends."""
        self._watchers: list[MemoryObjectSendStream[Push]] = []
        """The sending end of each of this connection's watches (see pushed_first)."""

    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher(decode_member_request)
        dispatcher.register(Status, self.status)
        dispatcher.register(StatusAll, self.status_all)
        dispatcher.register(Stop, self.stop)
        dispatcher.register(AddMember, self.add_member)
        dispatcher.register(Start, self.start)
        dispatcher.register(Restart, self.restart)
        dispatcher.register(Remove, self.remove)
        dispatcher.register(Bind, self.bind)
        dispatcher.register(Ack, self.ack)
        dispatcher.register(Watch, self.watch)
        return dispatcher

    def status(self, request: Status, peer: Peer) -> MemberStatus:
        return self.holder.status_of(request.name or self.member)

    def status_all(self, request: StatusAll, peer: Peer) -> _EncodedWatchResult:
        return _EncodedWatchResult(members=self.holder.encoded_statuses())

    async def stop(self, request: Stop, peer: Peer) -> MemberStatus:
        return await self.holder.stop_member(request.name or self.member)

    async def add_member(self, request: AddMember, peer: Peer) -> MemberStatus:
        return await self.holder.add_member(request.spec)

    async def start(self, request: Start, peer: Peer) -> MemberStatus:
        status = await self.holder.start_member(request.name)
        await self.pushed_first()
        return status

    async def restart(self, request: Restart, peer: Peer) -> MemberStatus:
        status = await self.holder.restart_member(request.name, request.spec)
        await self.pushed_first()
        return status

    async def remove(self, request: Remove, peer: Peer) -> MemberStatus:
        status = await self.holder.remove_member(request.name)
        await self.pushed_first()
        return status

    async def pushed_first(self) -> None:
        """Until this connection's watches have pushed every change made so far, so that the
        answer follows the pushes of what it did (the new process's `starting` among them):
        a client that watches reads the outcome from its pushes, never a stale one after
        the answer. A barrier goes down each watch's queue behind the changes; its pusher
        sets it once it sent them."""
        barriers: list[anyio.Event] = []
        for watcher in self._watchers:
            barrier = anyio.Event()
            try:
                watcher.send_nowait(barrier)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                continue  # the watch ended: nothing more goes out on it
            barriers.append(barrier)
        for barrier in barriers:
            await barrier.wait()

    def bind(self, request: Bind, peer: Peer) -> BindResult:
        if request.version != PROTOCOL_VERSION:
            raise Incompatible(
                f"client speaks protocol {request.version}, this holder speaks {PROTOCOL_VERSION}",
                server_version=PROTOCOL_VERSION,
            )
        self.bound = True
        return BindResult(version=PROTOCOL_VERSION, pid=os.getpid())

    def ack(self, request: Ack, peer: Peer) -> Empty:
        if not self.bound:
            raise InvalidRequest("ack before bind: send bind first")
        self.acked = True
        log.info("client_bound", client_pid=peer.pid)
        return Empty()

    def watch(self, request: Watch, peer: Peer) -> WatchResult:
        """The snapshot answers now; changes follow as pushed responses with this id. They
        cannot overtake the snapshot: it is queued in the connection's outbox before the pusher
        runs, and the outbox goes out in order. At most MAX_WAITS per connection."""
        if self.watches >= MAX_WAITS:
            raise LimitExceeded(
                f"{MAX_WAITS} watches on this connection already: use one of them",
                limit="watches_per_connection",
                value=MAX_WAITS,
            )
        self.watches += 1
        snapshot, watcher, changes = self.holder.watch()
        self._watchers.append(watcher)
        self.pushers.start_soon(self._push, request.id, watcher, changes)
        return WatchResult(members=snapshot)

    async def _push(
        self,
        request_id: int,
        watcher: MemoryObjectSendStream[Push],
        changes: MemoryObjectReceiveStream[Push],
    ) -> None:
        """Until the connection ends (or the holder closes every watcher); then the holder
        forgets the watcher at once, not at the next change. Barriers (pushed_first) are set
        once what was queued before them is sent, or the watch ends."""
        assert self.connection is not None
        barriers: list[anyio.Event] = []
        try:
            async with changes:
                async for first in changes:
                    frames = bytearray()
                    _take(first, request_id, frames, barriers)
                    while True:  # take along every change queued meanwhile: one write
                        try:
                            _take(changes.receive_nowait(), request_id, frames, barriers)
                        except anyio.WouldBlock:
                            break
                    if frames:
                        await self.connection.send(frames)
                    for barrier in barriers:
                        barrier.set()
                    barriers.clear()
        finally:
            for barrier in barriers:
                barrier.set()
            self.holder.unwatch(watcher)
            self._watchers.remove(watcher)


def _take(item: Push, request_id: int, frames: bytearray, barriers: list[anyio.Event]) -> None:
    if isinstance(item, anyio.Event):
        barriers.append(item)
    else:
        encode_response(Response(id=request_id, ok=True, result=item), frames)


# --- the command --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleetd.holder",
        description="Supervise one cluster's members (see fleetd.holder).",
    )
    parser.add_argument("--spec", required=True, help="the cluster, a JSON ClusterSpec file")
    parser.add_argument("--dir", required=True, help="runtime directory (sockets, logs, state)")
    parser.add_argument("--bind-pid", type=int, help="bound mode: the client process")
    parser.add_argument("--ready-fd", type=int, help="write 'ready' here once members are up")
    parser.add_argument(
        "--ephemeral", action="store_true", help="remove the runtime directory on exit"
    )
    parser.add_argument(
        "--stopped",
        action="append",
        default=[],
        metavar="NAME",
        help="a member to keep stopped, for `start` (repeatable)",
    )
    parser.add_argument(
        "--port",
        action="append",
        default=[],
        type=_named_port,
        metavar="NAME=PORT",
        help="the port a member gets back (repeatable)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _named_port(text: str) -> tuple[str, int]:
    name, _, port = text.partition("=")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not NAME=PORT: {text!r}")
    return name, int(port)


def _load_spec(path: str) -> ClusterSpec:
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=ClusterSpec)
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except msgspec.MsgspecError as exc:
        raise FleetError(f"{path} is not a cluster spec: {exc}") from None


async def _serve(holder: Holder, ready_fd: int | None) -> None:
    async with anyio.create_task_group() as tasks:
        await tasks.start(holder.run)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        return_free_memory()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a holder until its last member leaves; 0, or 1 when it cannot start."""
    block_sigchld()  # before any thread exists: see fleetd.holder.members.Reaper
    name_process("fleetd-holder")
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # members must not hold it open
    failures: list[Exception] = []
    try:
        become_subreaper()
        nofile = member_nofile(raise_fd_limit())
        holder = Holder(
            _load_spec(args.spec),
            args.dir,
            bind_pid=args.bind_pid,
            limits=Limits.from_environ(os.environ),
            member_nofile=nofile,
            stopped=args.stopped,
            ports=dict(args.port),
        )
        anyio.run(
            _serve, holder, args.ready_fd, backend="asyncio", backend_options={"use_uvloop": True}
        )
    except* (FleetError, OSError) as failed:
        failures = leaf_errors(failed)
    finally:
        if args.ephemeral and not failures:  # else its log says why: the client reads it,
            shutil.rmtree(args.dir, ignore_errors=True)  # then removes the directory it made
    for error in failures:
        print(f"fleetd holder: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bound clusters: members that live exactly as long as the calling process, no daemon needed.

    async with fleetctl.cluster("fleet.toml", name="it") as c:    # async methods
        await c.wait_running()
        url = "http://" + c.address("web")

    with fleetctl.cluster({"members": {...}}) as c:                # the same, blocking
        c.wait_running()

`cluster()` starts a holder, binds to it over a member socket (bind, then ack) and keeps that
connection open. Leaving the block stops every member and reaps the holder. If the calling
process dies first, SIGKILL included, the holder sees the connection close and the pid go, and
stops every member itself.

The holder is forked from this process's warm template (fleetctl.template): the first cluster
starts the template, a child of this process that exits with it, so that later clusters start
in milliseconds. Without a template to fork from, the holder is exec'd (`python -m
fleetd.holder`, a child process). fleetctl never imports fleetd.

The blocking form runs the same async code on a private event loop thread (an anyio blocking
portal), so both forms behave alike.
"""

import contextlib
import operator
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self, overload

import anyio
import msgspec
from anyio.abc import Process
from anyio.from_thread import BlockingPortal, start_blocking_portal

from fleetctl.blocking import BlockingConnection
from fleetctl.definitions import load_toml
from fleetctl.members_client import (
    MemberLink,
    holder_ready,
    one_request,
    status_on_disk,
)
from fleetctl.template import FORK_TIMEOUT, HOLDER_COMMAND, ForkedHolder, bound_template
from protocol import PROTOCOL_VERSION
from protocol.base import Op, R
from protocol.connection import check_version
from protocol.definitions import (
    ClusterSpec,
    MemberSpec,
    cluster_from_dict,
    member_from_dict,
)
from protocol.errors import (
    Absent,
    ClientClosed,
    ConnectionLost,
    InvalidRequest,
    Timeout,
    Unavailable,
)
from protocol.members import (
    CLUSTER_FILE,
    HOLDER_LOG,
    Ack,
    AddMember,
    Bind,
    MemberState,
    MemberStatus,
    Restart,
    Start,
    Status,
    StatusAll,
    Stop,
    Watch,
    member_log_path,
    member_socket_path,
    runtime_dir_problem,
    wait_verdict,
)
from protocol.template import KEPT_FROM

Definitions = ClusterSpec | Mapping[str, Any] | str | os.PathLike[str]
"""A `fleet.toml` path, a ClusterSpec, or a dict shaped like the TOML file."""

DEFAULT_TIMEOUT = 30.0
_STOP_MARGIN = 5.0
"""Seconds allowed beyond a member's stop_timeout for the holder to report it stopped."""
_PUSH_LAG = 0.005
"""Seconds a blocking wait_running gives pushes to catch up with a fresher status."""


def cluster(
    definitions: Definitions,
    *,
    name: str | None = None,
    runtime_dir: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> "Cluster":
    """A cluster bound to this process, started on entering `async with` or `with`.

    `name` overrides the definitions' cluster name. `runtime_dir` (sockets, logs, state) is a
    fresh directory, removed at exit, unless given (then it is kept, logs included).
    `timeout` bounds starting the holder and each call that does not take its own.
    """
    return Cluster(definitions, name=name, runtime_dir=runtime_dir, timeout=timeout)


def to_cluster_spec(definitions: Definitions, name: str | None = None) -> ClusterSpec:
    if isinstance(definitions, ClusterSpec):
        return definitions if name is None else msgspec.structs.replace(definitions, name=name)
    if isinstance(definitions, Mapping):
        return cluster_from_dict(definitions, name=name)
    return load_toml(os.fspath(definitions), name=name)


class Cluster:
    """A bound cluster. `async with` gives this object (async methods); `with` gives a
    SyncCluster (the same methods, blocking)."""

    def __init__(
        self,
        definitions: Definitions,
        *,
        name: str | None = None,
        runtime_dir: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.spec = to_cluster_spec(definitions, name)
        self.name = self.spec.name
        self.timeout = timeout
        self._given_dir = runtime_dir
        self.runtime_dir = ""
        self.holder_pid: int | None = None
        self._statuses: dict[str, MemberStatus] = {}
        self._changed = anyio.Event()
        self._holder: _Holder | None = None
        self._link: MemberLink | None = None
        self._stack: AsyncExitStack | None = None
        self._blocking: contextlib.ExitStack | None = None

    # -- async lifecycle

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise ClientClosed("a Cluster can be entered once")
        self._stack = AsyncExitStack()
        try:
            self._stack.push_async_callback(self._shut_down)
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        await self._stack.aclose()

    async def _start(self) -> None:
        self.runtime_dir = self._given_dir or tempfile.mkdtemp(prefix="fleet-", dir=runtime_base())
        problem = runtime_dir_problem(self.runtime_dir, [m.name for m in self.spec.members])
        if problem:
            raise InvalidRequest(problem)
        await self._spawn_holder()
        self._link = await MemberLink.connect(
            member_socket_path(self.runtime_dir, self.spec.members[0].name),
            on_push=self._on_push,
            on_failure=self._changed_now,
        )
        await self._bind(self._link)

    async def _spawn_holder(self) -> None:
        """Forked from this process's template (fleetctl.template) when it can be, else
        exec'd; either way a child of ours or of our template, bound to this process."""
        spec_path = os.path.join(self.runtime_dir, CLUSTER_FILE)
        _write_file(spec_path, msgspec.json.encode(self.spec))
        log = os.open(
            os.path.join(self.runtime_dir, HOLDER_LOG),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        ready_read, ready_write = os.pipe()
        args = [f"--spec={spec_path}", f"--dir={self.runtime_dir}", f"--bind-pid={os.getpid()}"]
        if self._given_dir is None:
            args.append("--ephemeral")
        try:
            try:
                forked = await anyio.to_thread.run_sync(
                    _fork_bound,
                    [*args, f"--ready-fd={KEPT_FROM}"],
                    log,
                    ready_write,
                    min(self.timeout, FORK_TIMEOUT),
                )
                if forked is not None:
                    holder = _Holder(forked.pid, pidfd=forked.pidfd)
                else:
                    process = await anyio.open_process(
                        [*HOLDER_COMMAND, *args, f"--ready-fd={ready_write}"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        pass_fds=(ready_write,),
                    )
                    holder = _Holder(process.pid, process=process)
                self._holder = holder  # before any await: reaped whatever comes
            finally:
                os.close(log)
                os.close(ready_write)
            self.holder_pid = holder.pid
            await holder_ready(ready_read, self.timeout, self.runtime_dir)
        finally:
            os.close(ready_read)

    async def _bind(self, link: "MemberLink") -> None:
        bound = await link.request(Bind, self.timeout, version=PROTOCOL_VERSION, pid=os.getpid())
        check_version(bound.version, "the holder")
        await link.request(Ack, self.timeout)
        snapshot = await link.request(Watch, self.timeout, pushes=True)
        for status in snapshot.members:
            # A push read with the snapshot was handled first, and is newer: keep it.
            self._statuses.setdefault(status.name, status)

    async def _shut_down(self) -> None:
        """Closing the bound connection tells the holder to stop everything; then reap it."""
        with anyio.CancelScope(shield=True):
            if self._link is not None:
                await self._link.aclose()
            if self._holder is not None:
                await self._reap_holder(self._holder)
            if self._given_dir is None and self.runtime_dir:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _reap_holder(self, holder: "_Holder") -> None:
        grace = max(m.stop_timeout for m in self.spec.members) + _STOP_MARGIN
        try:
            with anyio.move_on_after(grace):
                await holder.wait()
                return
            holder.kill()  # its members have SIGKILL as their parent-death signal
            await holder.wait()
        finally:
            holder.close()

    # -- blocking lifecycle

    def __enter__(self) -> "SyncCluster":
        if self._blocking is not None:
            raise ClientClosed("a Cluster can be entered once")
        self._blocking = contextlib.ExitStack()
        try:
            portal = self._blocking.enter_context(start_blocking_portal("asyncio"))
            self._blocking.enter_context(portal.wrap_async_context_manager(self))
        except BaseException:
            self._blocking.close()
            raise
        blocking = SyncCluster(self, portal)
        self._blocking.callback(blocking.close)
        return blocking

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._blocking is not None
        self._blocking.__exit__(exc_type, exc, tb)

    # -- the calls

    @property
    def members(self) -> list[str]:
        """Names of the members the holder reported, in order of joining."""
        return list(self._statuses)

    @property
    def known(self) -> Mapping[str, MemberStatus]:
        """The last status the holder reported of each member, in order of joining."""
        return self._statuses

    async def wait_running(
        self, names: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, MemberStatus]:
        """Until every named member (default: all) is running. Raises MemberFailed as soon as
        one will not get there without someone acting (it is `error` or `stopped`: the same
        verdict as fleetd's `member_wait`, protocol.members.wait_verdict), Absent for a name
        not in the cluster, Timeout. A member preparing, starting, or waiting to restart after
        a clean exit is waited for."""
        wanted = list(names) if names is not None else self.members
        try:
            with anyio.fail_after(timeout):
                while not self._all_running(wanted):
                    changed = self._changed
                    await changed.wait()
        except TimeoutError:
            states = ", ".join(f"{n}={self._statuses[n].state}" for n in wanted)
            raise Timeout(f"members not running within {timeout}s: {states}") from None
        return {name: self._statuses[name] for name in wanted}

    def _all_running(self, names: list[str]) -> bool:
        link = self._opened()
        if link.failure is not None:
            raise link.failure
        absent = MemberStatus(name="", state=MemberState.ABSENT)
        return wait_verdict({name: self._statuses.get(name, absent) for name in names})

    @overload
    async def status(self, name: str) -> MemberStatus: ...
    @overload
    async def status(self, name: None = None) -> dict[str, MemberStatus]: ...
    async def status(self, name: str | None = None) -> MemberStatus | dict[str, MemberStatus]:
        """One member's status, or every member's by name. The live holder answers; once it is
        gone, the state files do (`stopped` if the member existed, else `absent`)."""
        if name is not None:
            return await self._status_of(name)
        answer: list[MemberStatus] = []
        link = self._opened()
        if link.failure is None:
            with contextlib.suppress(ConnectionLost):
                answer = (await link.request(StatusAll, self.timeout)).members
        every = answered_all(self._statuses, answer)
        if every is not None:
            return every
        live = {status.name: status for status in answer}
        return {
            member: live[member] if member in live else await self._status_of(member)
            for member in self.members
        }

    async def _status_of(self, name: str) -> MemberStatus:
        link = self._opened()
        if link.failure is None:
            with contextlib.suppress(ConnectionLost):
                return await link.request(Status, self.timeout, name=name)
        return status_on_disk(self.runtime_dir, name)

    async def stop(self, name: str) -> MemberStatus:
        """Stop one member (its siblings keep running); returns its final status."""
        return await self._opened().request(Stop, self._stop_time(name), name=name)

    async def start(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> MemberStatus:
        """Start a stopped member again, with the same port and directory, and wait until it
        runs (one running already is left as it is). The holder exits with its last member:
        once every member is stopped, there is nothing left to start."""
        return await self._again(Start, name, timeout)

    async def restart(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> MemberStatus:
        """Stop a member and start it again, with the same port and directory (to test how
        its clients reconnect), and wait until it runs."""
        return await self._again(Restart, name, timeout)

    async def _again(
        self, op: type[Start] | type[Restart], name: str, timeout: float
    ) -> MemberStatus:
        # The holder pushes what it did (the new process's status) before it answers.
        await self._opened().request(op, self._stop_time(name), name=name)
        return (await self.wait_running([name], timeout))[name]

    def _stop_time(self, name: str) -> float:
        spec = self.spec.member(name)
        return (spec.stop_timeout if spec else self.timeout) + _STOP_MARGIN

    async def add(
        self,
        spec: MemberSpec | Mapping[str, Any],
        sibling: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> MemberStatus:
        """Boot a new member into the live cluster (it gets the same peers) and wait until it
        runs. `spec` may be a MemberSpec or a dict like a [members.NAME] table plus "name".
        `sibling` names the member whose socket carries the request (default: any)."""
        member = _to_member_spec(spec)
        if sibling is None:
            status = await self._opened().request(AddMember, timeout, spec=member)
        else:
            status = await one_request(
                member_socket_path(self.runtime_dir, sibling), AddMember, timeout, spec=member
            )
        self._statuses.setdefault(member.name, status)
        self.spec = ClusterSpec(name=self.name, members=[*self.spec.members, member])
        return (await self.wait_running([member.name], timeout))[member.name]

    def logs(self, name: str, stderr: bool = False) -> str:
        """What the member wrote to stdout (or stderr), the rotated part first."""
        path = member_log_path(self.runtime_dir, name, stderr=stderr)
        text = ""
        for part in (f"{path}.1", path):
            with contextlib.suppress(FileNotFoundError), open(part, errors="replace") as f:
                text += f.read()
        return text

    def address(self, name: str) -> str:
        """host:port of the member's {port}, or its unix:PATH; "" when it has neither."""
        status = self._statuses.get(name)
        if status is None:
            raise Absent(f"no member {name!r} in cluster {self.name!r}")
        return status.address

    def _opened(self) -> "MemberLink":
        if self._link is None:
            raise ClientClosed("the cluster is not started: use `async with` or `with`")
        return self._link

    def _on_push(self, status: MemberStatus) -> None:
        self._statuses[status.name] = status
        self._changed_now()

    def _changed_now(self) -> None:
        """Wake every wait_running caller to look again."""
        self._changed.set()
        self._changed = anyio.Event()


_name = operator.attrgetter("name")


def answered_all(
    known: Mapping[str, MemberStatus], answer: list[MemberStatus]
) -> dict[str, MemberStatus] | None:
    """The holder's `answer` by name, in the order of `known`, when it has every member known
    and no other (as it has unless one left); else None. A copy of `known` updated in place
    (no comprehension over a thousand statuses, nor a dict built twice)."""
    every = dict(known)
    every.update(zip(map(_name, answer), answer, strict=True))
    if len(answer) == len(known) == len(every):
        return every
    return None


class SyncCluster:
    """The blocking face of a Cluster (what `with cluster(...)` gives): the same calls, run on
    the cluster's private event loop thread, except status, which asks the holder over a
    blocking connection of its own: a round trip without two thread hops, several times
    faster. That connection never acks, so closing it tears nothing down."""

    def __init__(self, cluster: Cluster, portal: BlockingPortal) -> None:
        self.cluster = cluster
        self._portal = portal
        self._link: BlockingConnection | None = None
        self._asking = threading.Lock()

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def runtime_dir(self) -> str:
        return self.cluster.runtime_dir

    @property
    def holder_pid(self) -> int | None:
        return self.cluster.holder_pid

    @property
    def members(self) -> list[str]:
        return self.cluster.members

    def wait_running(
        self, names: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, MemberStatus]:
        """As Cluster.wait_running, answered as fresh as `status`: the pushes it waits on come
        over another connection than status's and may lag behind what status already said."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            waited = self._portal.call(self.cluster.wait_running, names, left)
            everyone = self.status()
            fresh = {name: everyone[name] for name in waited}
            if all(status.state == MemberState.RUNNING for status in fresh.values()):
                return fresh
            time.sleep(_PUSH_LAG)  # a change status saw is on its way as a push

    @overload
    def status(self, name: str) -> MemberStatus: ...
    @overload
    def status(self, name: None = None) -> dict[str, MemberStatus]: ...
    def status(self, name: str | None = None) -> MemberStatus | dict[str, MemberStatus]:
        """As Cluster.status: the live holder answers, the state files once it is gone."""
        with self._asking:
            if name is not None:
                return self._status_of(name)
            answer: list[MemberStatus] = []
            with contextlib.suppress(ConnectionLost):
                answer = self._ask(StatusAll).members
            every = answered_all(self.cluster.known, answer)
            if every is not None:
                return every
            live = {status.name: status for status in answer}
            return {m: live.get(m) or self._status_of(m) for m in self.cluster.members}

    def _status_of(self, name: str) -> MemberStatus:
        with contextlib.suppress(ConnectionLost):
            return self._ask(Status, name=name)
        return status_on_disk(self.cluster.runtime_dir, name)

    def _ask(self, op: type[Op[R]], **fields: Any) -> R:
        if self._link is None:
            self._link = self._connect()
        try:
            return self._link.request(op, self.cluster.timeout, **fields)
        except ConnectionLost:
            self.close()
            raise

    def _connect(self) -> BlockingConnection:
        """To any member socket still open (a stopped member's socket is gone). Raises
        PermissionDenied at once if another user's process listens at one."""
        for member in self.cluster.members:
            path = member_socket_path(self.cluster.runtime_dir, member)
            try:
                return BlockingConnection.open(path, self.cluster.timeout, peer="the holder")
            except OSError:
                continue
        raise ConnectionLost(f"no member socket of cluster {self.name!r} is open")

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def stop(self, name: str) -> MemberStatus:
        return self._portal.call(self.cluster.stop, name)

    def start(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> MemberStatus:
        return self._portal.call(lambda: self.cluster.start(name, timeout=timeout))

    def restart(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> MemberStatus:
        return self._portal.call(lambda: self.cluster.restart(name, timeout=timeout))

    def add(
        self,
        spec: MemberSpec | Mapping[str, Any],
        sibling: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> MemberStatus:
        return self._portal.call(lambda: self.cluster.add(spec, sibling, timeout=timeout))

    def logs(self, name: str, stderr: bool = False) -> str:
        return self.cluster.logs(name, stderr)

    def address(self, name: str) -> str:
        return self.cluster.address(name)


class _Holder:
    """A bound holder's process: exec'd, our child (`process`, which we reap); or forked by
    our template, its child (`pidfd`, readable once it exited: the template reaps it)."""

    def __init__(self, pid: int, *, process: Process | None = None, pidfd: int | None = None):
        self.pid = pid
        self.process = process
        self.pidfd = pidfd

    async def wait(self) -> None:
        if self.process is not None:
            await self.process.wait()
        elif self.pidfd is not None:
            await anyio.wait_readable(self.pidfd)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            if self.process is not None:
                self.process.kill()
            elif self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _fork_bound(argv: list[str], log: int, ready: int, timeout: float) -> ForkedHolder | None:
    """A bound holder forked from this process's template (started now if need be), as it
    would be exec'd: stdin and stdout /dev/null, stderr to its log, `ready` kept, in our
    working directory and environment. None when it cannot be: then exec it."""
    env = dict(os.environ)
    try:
        template = bound_template(env)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            return template.fork(
                argv, env, stdio=(null, null, log), keep=(ready,), cwd=os.getcwd(), timeout=timeout
            )
        finally:
            os.close(null)
    except (OSError, Unavailable):
        return None


def _to_member_spec(spec: MemberSpec | Mapping[str, Any]) -> MemberSpec:
    if isinstance(spec, MemberSpec):
        return spec
    table = dict(spec)
    name = table.pop("name", None)
    if not isinstance(name, str):
        raise InvalidRequest('a member needs a "name"')
    return member_from_dict(name, table)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def runtime_base() -> str:
    """Where a fresh runtime directory goes: a short path (socket paths must stay under 107
    bytes, so not a deep $TMPDIR) on tmpfs when possible, since a holder creates a few files
    per member: $XDG_RUNTIME_DIR, else /dev/shm, else /tmp."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR", ""), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return "/tmp"

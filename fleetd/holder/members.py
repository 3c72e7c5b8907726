"""Supervising one member: spawn it, see it become ready, log its output, notice its exit at
once, restart it per policy, stop it.

A holder supervises many members on one event loop, so nothing here costs a thread or a
polling loop per member: a member is one supervising task, and its output pipes are read from
event-loop reader callbacks, all waiting on the kernel (the holder runs on asyncio). Exits
arrive through one `Reaper` per holder (SIGCHLD on a signalfd, then waitpid until nothing is
left, which also reaps orphans a subreaper adopts), and readiness notifications through one
`NotifySocket` per holder (sd_notify, attributed by sender pid).

Members are started by the holder's `fleetd.holder.spawn.Spawner`, with a parent-death signal, in
a cgroup of their own where the holder has one; the processes a member starts are ended with
it (fleetd.holder.descendants), whichever way they went.
"""

import asyncio
import contextlib
import ctypes
import functools
import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import pidfile_text
from fleetd.holder.backoff import Backoff, Exit, plan_restart
from fleetd.holder.descendants import HOLDER_ENV, Descendants, Lineage
from fleetd.holder.spawn import Child, Spawner
from protocol.definitions import MemberSpec
from protocol.errors import FleetError
from protocol.members import (
    PIDFILE,
    STATEFILE,
    STDERR_LOG,
    STDOUT_LOG,
    MemberState,
    MemberStatus,
)

log = structlog.get_logger("fleetd.members")

LOG_MAX_BYTES = 10 << 20
"""A member's stdout.log (and stderr.log) is rotated to .1 past this size."""

_READ_SIZE = 65536
_MAX_LINE = 65536
"""log:REGEX sees at most this much of a line that has no end yet."""
_PROBE_FIRST = 0.005
_PROBE_MAX = 0.2
_DRAIN_GRACE = 0.5
"""Seconds a stopped member's pipes may take to deliver their last output."""

_libc = ctypes.CDLL(None, use_errno=True)
_HOLDER_PID = os.getpid()


# --- files ------------------------------------------------------------------------------------


class LogFile:
    """An append-only log `name` in `directory`, capped at `max_bytes`, rotated once to
    `<name>.1`. The file is created on the first write: a silent member costs no file."""

    def __init__(self, directory: PrivateDir, name: str, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.directory = directory
        self.name = name
        self.path = directory.join(name)
        self.max_bytes = max_bytes
        self._fd = -1
        self._size = 0

    def _open(self) -> int:
        return self.directory.open_file(self.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)

    def _rotate(self) -> None:
        fd = self.directory.fd
        os.replace(self.name, f"{self.name}.1", src_dir_fd=fd, dst_dir_fd=fd)
        os.close(self._fd)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LineMatcher:
    """Whether a complete output line matched `pattern`, across chunk boundaries and across
    the two streams (each keeps its own unfinished line)."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)
        self._tails: dict[int, bytes] = {}

    def feed(self, stream: int, data: bytes) -> bool:
        lines = (self._tails.get(stream, b"") + data).split(b"\n")
        self._tails[stream] = lines.pop()[-_MAX_LINE:]
        return any(self._pattern.search(line.decode(errors="replace")) for line in lines)


# --- processes --------------------------------------------------------------------------------


class Reaper:
    """Reaps every child of the holder as soon as it exits, and tells whoever watches that pid;
    children nobody watches (orphans adopted as subreaper) are just reaped.

    SIGCHLD is read from a signalfd, not through a Python signal handler: a thousand members
    stopping at once raise a thousand SIGCHLDs, which a signalfd coalesces into one readable
    event, where a handler per signal would overflow the event loop's wakeup pipe and lose
    some. SIGCHLD must be blocked in every thread for that, so call `block_sigchld` first
    thing, before any thread exists (threads inherit the mask; members get an empty one).
    """

    def __init__(self) -> None:
        self._watching: dict[int, Callable[[int], None]] = {}

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(exit_code)` (negative: killed by that signal) when `pid` exits. Call it
        right after spawning, before awaiting anything, so the exit cannot be missed."""
        self._watching[pid] = on_exit

    def watched(self) -> Collection[int]:
        """The pids watched now: the holder's children that are not orphans."""
        return self._watching.keys()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        block_sigchld()
        fd = _sigchld_fd()
        try:
            task_status.started()
            while True:
                self.reap()
                await anyio.wait_readable(fd)
                _drain(fd)
        finally:
            os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            on_exit = self._watching.pop(pid, None)
            if on_exit is None:
                log.debug("orphan_reaped", pid=pid)
            else:
                on_exit(os.waitstatus_to_exitcode(status))


def block_sigchld() -> None:
    """Hold SIGCHLD pending for the Reaper's signalfd (see Reaper)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})


_SIGNALFD_SIGINFO_SIZE = 128


def _sigchld_fd() -> int:
    mask = (ctypes.c_uint64 * 16)()  # a sigset_t: 1024 bits
    mask[0] = 1 << (signal.SIGCHLD - 1)
    fd: int = _libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"signalfd: {os.strerror(code)}")
    return fd


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, _SIGNALFD_SIGINFO_SIZE * 64):
            pass


def signal_group(pgid: int, signum: int) -> None:
    """Signal a member's whole process group (a member that forked takes its children along)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exited with code {exit_code}"


# --- sd_notify ------------------------------------------------------------------------------

_CREDENTIALS = struct.Struct("3i")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_CREDENTIALS.size) + socket.CMSG_SPACE(16 * 4)


class NotifySocket:
    """The holder's $NOTIFY_SOCKET: one datagram socket for all members, speaking sd_notify.

    The kernel stamps each datagram with the sender's pid (SO_PASSCRED), which `owner_of`
    maps to a member: the member itself, or a process in its group or below it (systemd-notify
    runs as the member's child). File descriptors that come along (systemd-notify's BARRIER=1)
    are closed, which is how a barrier is answered.
    """

    def __init__(self, path: str, owner_of: Callable[[int], "Member | None"]) -> None:
        self.path = path
        self._owner_of = owner_of
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._socket.bind(path)
        os.chmod(path, 0o600)

    async def run(self) -> None:
        try:
            while True:
                await anyio.wait_readable(self._socket)
                self._drain()
        finally:
            self._socket.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(4096, _ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            pid = _sender_of(ancillary)
            member = self._owner_of(pid) if pid else None
            if member is None:
                log.debug("notify_unattributed", pid=pid)
            else:
                member.notified(_notify_fields(data))


def _sender_of(ancillary: list[tuple[int, int, bytes]]) -> int:
    pid = 0
    for level, kind, data in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS:
            pid = _CREDENTIALS.unpack(data[: _CREDENTIALS.size])[0]
        elif kind == socket.SCM_RIGHTS:
            for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4]):
                os.close(fd)
    return pid


def _notify_fields(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode(errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def ancestry(pid: int, depth: int = 8) -> Iterator[int]:
    """`pid`, then its process group leader and parents, as far as /proc can tell: who may have
    sent a notification on a member's behalf."""
    for _ in range(depth):
        yield pid
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return
        parent, group = int(fields[1]), int(fields[2])
        yield group
        if parent <= 1:
            return
        pid = parent


# --- one member -----------------------------------------------------------------------------


class Host(Protocol):
    """What a member needs from its holder."""

    cluster: str
    reaper: Reaper
    spawner: Spawner
    lineage: Lineage
    notify_path: str
    runtime: PrivateDir
    """The runtime directory: each member's directory is made in it, never through a link."""

    def peers_of(self, name: str) -> str:
        """FLEET_PEERS for `name`: `sibling=address,...`."""
        ...

    def status_stale(self) -> None:
        """A member's status() changed (not yet published: member_changed follows)."""
        ...

    def member_changed(self, member: "Member") -> None:
        """Called after every state change: the holder tells watchers, and calls `save` soon
        (one batch of file writes per event-loop turn, not one per change)."""
        ...


def needs_port(spec: MemberSpec) -> bool:
    texts = [*spec.command, *spec.env.values(), spec.cwd or "", *(spec.prepare or []), spec.ready]
    return spec.ready == "tcp" or any("{port}" in text for text in texts)


@dataclass(slots=True)
class _Run:
    """One spawn of the member's command, until its exit."""

    child: Child
    spawned_at: float
    exited: anyio.Event = field(default_factory=anyio.Event)
    exit_code: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)
    matcher: LineMatcher | None = None
    timed_out: bool = False
    stopping: bool = False
    """Being stopped: its exit leaves the rest of stop_timeout to its other processes."""


class Member:
    """A member and its supervisor: `run` in a task, `stop` from anywhere."""

    def __init__(
        self,
        spec: MemberSpec,
        *,
        host: Host,
        directory: str,
        port: int | None = None,
        backoff: Backoff | None = None,
        log_max_bytes: int = LOG_MAX_BYTES,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.directory = directory
        self.port = port
        self._host = host
        self._backoff = backoff or Backoff()
        self._log_max_bytes = log_max_bytes
        self.address = f"127.0.0.1:{port}" if port is not None else self._unix_ready_path()
        self.state = MemberState.STARTING
        self.pid: int | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self.error = ""
        self.lingering = 0
        """Processes of the member alive after its last exit or stop ended them (see
        MemberStatus.lingering)."""
        self._descendants: Descendants | None = None
        self._status: MemberStatus | None = None
        """status(), kept until a field of it changes: all-member answers reuse it."""
        self._run: _Run | None = None
        self._supervising = anyio.CancelScope()
        self._done = anyio.Event()
        self._logs: tuple[LogFile, LogFile] | None = None
        self._pumps: set[_Pump] = set()
        self._drained: anyio.Event | None = None
        self._directory: PrivateDir | None = None
        self._saved_pid: int | None = None

    def expand(self, text: str) -> str:
        """Fill in the placeholders {port}, {name} and {dir} (other braces are left alone)."""
        if "{" not in text:
            return text
        port = "" if self.port is None else str(self.port)
        return (
            text.replace("{port}", port)
            .replace("{name}", self.name)
            .replace("{dir}", self.directory)
        )

    def _unix_ready_path(self) -> str:
        """The socket of a unix:PATH readiness check (relative to the member's cwd), or ""."""
        if not self.spec.ready.startswith("unix:"):
            return ""
        path = self.expand(self.spec.ready[len("unix:") :])
        return os.path.join(self.expand(self.spec.cwd), path) if self.spec.cwd else path

    def _stale(self) -> None:
        self._status = None
        self._host.status_stale()

    def status(self) -> MemberStatus:
        if self._status is None:
            self._status = MemberStatus(
                name=self.name,
                state=self.state,
                pid=self.pid,
                running=self.pid is not None,
                address=self.address,
                holder_pid=_HOLDER_PID,
                restarts=self.restarts,
                exit_code=self.exit_code,
                started_at=self.started_at,
                error=self.error,
                lingering=self.lingering,
            )
        return self._status

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise until `stop`: prepare once, then spawn, await readiness, restart per
        policy. Returns once the member is stopped, every process of it ended, and its output
        drained. Whatever goes wrong in the supervision itself (its directory refused, a bug)
        puts the member in `error` with the reason, and it stays there until stopped: a
        member is never reported starting or stopped while nobody supervises it."""
        descendants = self._descendants = self._host.lineage.of(self.name)
        try:
            task_status.started()
            with self._supervising:
                try:
                    self._open_directory()
                    if await self._prepare():
                        await self._supervise()
                except Exception as exc:
                    await self._supervision_failed(exc)
                await self._until_none_lingers()
                await anyio.sleep_forever()
            if self._run is not None:
                await self._terminate(self._run)
            await self._end_descendants()
            await self._drain()
        finally:
            for pump in list(self._pumps):
                pump.close()
            for log_file in self._logs or ():
                log_file.close()
            descendants.close()
            self._publish(MemberState.STOPPED)
            self._done.set()

    def _open_directory(self) -> None:
        """The member's directory ({dir}) in the runtime directory, made 0700 (or one of
        ours already there), never through a link; its logs are opened in it."""
        directory = self._directory = self._host.runtime.subdir(self.name)
        self._logs = (
            LogFile(directory, STDOUT_LOG, self._log_max_bytes),
            LogFile(directory, STDERR_LOG, self._log_max_bytes),
        )

    async def _supervision_failed(self, exc: Exception) -> None:
        while isinstance(exc, ExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        log.error("member_supervision_failed", member=self.name, exc_info=exc)
        if self._run is not None:
            with anyio.CancelScope(shield=True):
                await self._terminate(self._run)
        reason = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
        self._publish(MemberState.ERROR, error=f"supervision failed: {reason}")

    async def stop(self) -> MemberStatus:
        """Stop the member: stop_signal to every process of it, SIGKILL to those left after
        stop_timeout; no restart. Returns once it is down. Cancelling the caller does not
        cancel the stop."""
        self._supervising.cancel()
        await self._done.wait()
        return self.status()

    def notified(self, fields: dict[str, str]) -> None:
        """An sd_notify message from this member or one of its children."""
        if fields.get("READY") == "1" and self._run is not None:
            self._run.ready.set()

    # -- the supervision loop

    async def _prepare(self) -> bool:
        """Run `prepare` once; False (and state error) when it failed."""
        if self.spec.prepare is None:
            return True
        self._publish(MemberState.PREPARING)
        try:
            run = self._spawn([self.expand(arg) for arg in self.spec.prepare])
        except OSError as exc:
            self._publish(MemberState.ERROR, error=f"cannot run prepare: {_os_error(exc)}")
            return False
        await run.exited.wait()
        self._run = None
        await self._end_descendants()
        if run.exit_code != 0:
            self._publish(MemberState.ERROR, error=f"prepare {describe_exit(run.exit_code)}")
            return False
        return True

    async def _supervise(self) -> None:
        streak = 0
        while True:
            exit, why = await self._run_once()
            plan = plan_restart(self.spec.restart, exit, streak, self._backoff, random.random)
            if plan is None:
                final = MemberState.ERROR if exit.failed else MemberState.STOPPED
                self._publish(final, error=why if exit.failed else "")
                return
            streak = plan.streak
            if plan.delay > 0:
                state = MemberState.ERROR if exit.failed else MemberState.STARTING
                self._publish(state, error=f"{why}; restarting in {plan.delay:.2g}s")
                await anyio.sleep(plan.delay)
            self.restarts += 1
            self._stale()
            log.info("member_restarting", member=self.name, restarts=self.restarts, after=why)

    async def _run_once(self) -> tuple[Exit, str]:
        """Spawn, watch for readiness and exit; how it ended and why, in words."""
        try:
            run = self._spawn([self.expand(arg) for arg in self.spec.command])
        except OSError as exc:
            return Exit(failed=True, ran_for=0.0), f"cannot start: {_os_error(exc)}"
        self._publish(MemberState.STARTING)
        if self.spec.ready == "none":
            run.ready.set()
            self._publish(MemberState.RUNNING)
            await run.exited.wait()
        else:
            async with anyio.create_task_group() as watching:
                watching.start_soon(self._become_ready, run)
                await run.exited.wait()
                watching.cancel_scope.cancel()
        self._run = None
        await self._end_descendants()
        ran_for = time.monotonic() - run.spawned_at
        if run.timed_out:
            return Exit(failed=True, ran_for=ran_for), self.error
        failed = run.exit_code != 0 or not run.ready.is_set()
        why = describe_exit(run.exit_code)
        if not run.ready.is_set():
            why += " before it was ready"
        return Exit(failed=failed, ran_for=ran_for), why

    def _spawn(self, argv: list[str]) -> _Run:
        assert self._logs is not None, "spawned outside run()"
        env = self._environment()
        cwd = self.expand(self.spec.cwd) if self.spec.cwd else None
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        cgroup = self._descendants.cgroup if self._descendants is not None else ""
        try:
            child = self._host.spawner.spawn(
                argv, env, cwd, out_write, err_write, cgroup=cgroup or None
            )
        except OSError:
            for fd in (out_read, err_read):
                os.close(fd)
            raise
        finally:
            for fd in (out_write, err_write):
                os.close(fd)
        run = _Run(child, time.monotonic())
        if self.spec.ready.startswith("log:"):
            run.matcher = LineMatcher(self.spec.ready[len("log:") :])
        self._host.reaper.watch(child.pid, lambda code: self._exited(run, code))
        self._run = run
        self.pid, self.started_at, self.error = child.pid, time.time(), ""
        self.lingering = 0  # counted while the member is not running (see MemberStatus)
        self._stale()
        self._pumps.add(_Pump(out_read, self._logs[0], run, 1, self._pump_closed))
        self._pumps.add(_Pump(err_read, self._logs[1], run, 2, self._pump_closed))
        return run

    def _environment(self) -> dict[str, str]:
        env = {**_inherited_environment(), **{k: self.expand(v) for k, v in self.spec.env.items()}}
        env["FLEET_MEMBER"] = self.name
        env["FLEET_CLUSTER"] = self._host.cluster
        env[HOLDER_ENV] = self._host.lineage.token
        env["FLEET_PEERS"] = self._host.peers_of(self.name)
        env["NOTIFY_SOCKET"] = self._host.notify_path
        return env

    def _exited(self, run: _Run, exit_code: int) -> None:
        """From the reaper: the member's process is gone; take its group along at once (its
        pid is still the group's id: nothing recycled it yet), unless a stop is under way,
        which gives the group the rest of its stop_timeout."""
        if not run.stopping:
            signal_group(run.child.pid, signal.SIGKILL)
        run.child.reaped(exit_code)
        run.exit_code = exit_code
        self.pid, self.exit_code = None, exit_code
        self._stale()
        run.exited.set()

    async def _become_ready(self, run: _Run) -> None:
        with anyio.move_on_after(self.spec.start_timeout):
            await self._readiness(run)
            run.ready.set()
            self._publish(MemberState.RUNNING)
            return
        run.timed_out = True
        self._publish(MemberState.ERROR, error=f"not ready within {self.spec.start_timeout:g}s")
        await self._terminate(run)

    async def _readiness(self, run: _Run) -> None:
        ready = self.spec.ready
        if ready == "tcp":
            port = self.port or 0
            await _until_connectable(lambda: anyio.connect_tcp("127.0.0.1", port))
        elif ready.startswith("unix:"):
            path = self._unix_ready_path()
            await _until_connectable(lambda: anyio.connect_unix(path))
        else:  # notify, log:REGEX
            await run.ready.wait()

    async def _terminate(self, run: _Run) -> None:
        """stop_signal to the group and to every other process of the member, then SIGKILL to
        the group if the main process is still there after stop_timeout (the others get theirs
        from _end_descendants, which follows)."""
        if run.exited.is_set():
            return
        assert self._descendants is not None
        run.stopping = True
        signum = getattr(signal, f"SIG{self.spec.stop_signal}")
        signal_group(run.child.pid, signum)
        self._descendants.signal(signum, run.child.pid)
        with anyio.move_on_after(self.spec.stop_timeout):
            await run.exited.wait()
            await self._descendants.wait_ended()
            return
        if run.exited.is_set():
            log.warning("member_processes_killed", member=self.name)
            return
        log.warning("member_killed", member=self.name, stop_timeout=self.spec.stop_timeout)
        signal_group(run.child.pid, signal.SIGKILL)  # not reaped: the group id is still its pid
        await run.exited.wait()

    async def _end_descendants(self) -> None:
        """The main process has exited: SIGKILL whatever of the member is left (before any
        restart: a new run must not find the last one's processes on its port), and report
        what would not go as lingering."""
        assert self._descendants is not None
        lingering = await self._descendants.end()
        if lingering:
            log.warning("member_processes_lingering", member=self.name, count=lingering)
        self._set_lingering(lingering)

    async def _until_none_lingers(self) -> None:
        """A member that will not run again: see its lingering processes go, if ever."""
        if self.lingering:
            assert self._descendants is not None
            await self._descendants.wait_gone()
            self._set_lingering(0)

    def _set_lingering(self, count: int) -> None:
        if count != self.lingering:
            self.lingering = count
            self._stale()
            self._host.member_changed(self)

    async def _drain(self) -> None:
        """Give the output pipes of a stopped member _DRAIN_GRACE to deliver their last words
        (a grandchild holding a pipe open does not hold the stop up longer)."""
        if not self._pumps:
            return
        self._drained = anyio.Event()
        with anyio.move_on_after(_DRAIN_GRACE):
            await self._drained.wait()

    def _pump_closed(self, pump: "_Pump") -> None:
        self._pumps.discard(pump)
        if not self._pumps and self._drained is not None:
            self._drained.set()

    def _publish(self, state: MemberState, *, error: str = "") -> None:
        self.state = state
        self.error = error
        self._stale()
        self._host.member_changed(self)

    def save(self) -> None:
        """Write the state file, and the pidfile when the pid changed (removed when there is
        no process). Deferred by the holder: reading a new child's start time waits for its
        exec to finish, which the spawn path must not."""
        directory = self._directory
        if directory is None:
            return
        try:
            directory.write_atomically(STATEFILE, msgspec.json.encode(self.status()))
            if self.pid != self._saved_pid:
                if self.pid is None:
                    directory.unlink(PIDFILE)
                else:
                    directory.write_atomically(PIDFILE, pidfile_text(self.pid))
                self._saved_pid = self.pid
        except OSError as exc:
            log.warning("state_file_failed", member=self.name, error=str(exc))

    def close_directory(self) -> None:
        """After its last save: the member's directory is no longer written."""
        if self._directory is not None:
            self._directory.close()
            self._directory = None


class _Pump:
    """Copies one output pipe into its log until every writer closed it, from an event-loop
    reader callback (two tasks per member cost more than all else a sleeping member does);
    also feeds the log:REGEX readiness check of its run."""

    __slots__ = ("_closed", "_failing", "_fd", "_log_file", "_loop", "_run", "_stream")

    def __init__(
        self,
        fd: int,
        log_file: LogFile,
        run: _Run,
        stream: int,
        closed: Callable[["_Pump"], None],
    ) -> None:
        self._fd, self._log_file, self._run, self._stream = fd, log_file, run, stream
        self._closed = closed
        self._failing = False
        """The log cannot be written (a full disk): said once, until a write succeeds."""
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("output_pipe_failed", error=str(exc))
            data = b""
        if not data:
            self.close()
            return
        try:
            self._log_file.write(data)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.warning("log_write_failed", path=self._log_file.path, error=str(exc))
            self._failing = True
        run = self._run
        if run.matcher is not None and run.matcher.feed(self._stream, data):
            run.matcher = None
            run.ready.set()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._closed(self)


async def _until_connectable(connect: Callable[[], Awaitable[anyio.abc.SocketStream]]) -> None:
    """Until a connection succeeds: polls, but only while a member starts, backing off."""
    delay = _PROBE_FIRST
    while True:
        try:
            stream = await connect()
        except OSError:
            await anyio.sleep(delay)
            delay = min(delay * 2, _PROBE_MAX)
        else:
            await stream.aclose()
            return


@functools.cache
def _inherited_environment() -> dict[str, str]:
    """The holder's environment, read once: it does not change, and decoding os.environ per
    spawn was a tenth of the cost of starting a member."""
    return dict(os.environ)


def _os_error(exc: OSError) -> str:
    subject = f": {exc.filename!r}" if exc.filename else ""
    return f"[Errno {exc.errno}] {exc.strerror}{subject}"

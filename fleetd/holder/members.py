"""Supervising one member: spawn it, see it become ready, log its output, notice its exit at
once, restart it per policy, stop it. What to do when is fleetd.holder.lifecycle's to decide;
`Member` carries it out.

A holder supervises many members on one event loop, so nothing here costs a thread or a
polling loop per member: a member is one task (and a second one while it probes readiness or
waits for its processes to end), its timers are event-loop timer handles, and its output
pipes are read from event-loop reader callbacks, all waiting on the kernel (the holder runs on
asyncio). Exits
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
import errno
import functools
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import pidfile_text
from fleetd.holder.backoff import Backoff
from fleetd.holder.descendants import HOLDER_ENV, Descendants, Lineage
from fleetd.holder.lifecycle import (
    Action,
    BackoffElapsed,
    Begin,
    Event,
    Exited,
    LeftoversEnded,
    Lifecycle,
    OthersExited,
    Phase,
    Ready,
    Rules,
    Spawned,
    SpawnFailed,
    StartTimedOut,
    StopRequested,
    StopTimedOut,
    SupervisionFailed,
    step,
)
from fleetd.holder.logtimes import TimesFile
from fleetd.holder.readers import Readers
from fleetd.holder.runenv import RunEnv, RunEnvs
from fleetd.holder.spawn import Child, Spawner
from protocol.definitions import MemberSpec, parse_env_file
from protocol.errors import FleetError
from protocol.members import (
    PIDFILE,
    STATEFILE,
    STDERR_LOG,
    STDOUT_LOG,
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


# --- files ------------------------------------------------------------------------------------


class LogFile:
    """An append-only log `name` in `directory`, capped at `max_bytes`, rotated once to
    `<name>.1`. The file is created on the first write: a silent member costs no file (and
    its two LogFiles are slots, their path joined only when it is said)."""

    __slots__ = ("_fd", "_run_start", "_size", "_times", "directory", "max_bytes", "name")

    def __init__(self, directory: PrivateDir, name: str, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.directory = directory
        self.name = name
        self.max_bytes = max_bytes
        self._fd = -1
        self._size = 0
        self._run_start = -1
        """Where the current run's output starts in the file (-1: where it stands once open)."""
        self._times = TimesFile(directory, name)
        """When each chunk was read (protocol.logtimes), for `fleetctl logs --timestamps`."""

    @property
    def path(self) -> str:
        return self.directory.join(self.name)

    def _open(self) -> None:
        self._fd = self.directory.open_file(self.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        status = os.fstat(self._fd)
        self._size = status.st_size
        if self._run_start < 0:
            self._run_start = status.st_size
        self._times.open(status)

    def write(self, data: bytes) -> None:
        """Append `data`, its time recorded first (a holder killed between the two leaves a
        time and no bytes, which dates nothing)."""
        if self._fd < 0:
            self._open()
        if self._size and (
            self._size + len(data) > self.max_bytes or self._times.over(self.max_bytes)
        ):
            self._rotate()
        self._times.record(self._size)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)

    def _rotate(self) -> None:
        fd = self.directory.fd
        os.replace(self.name, f"{self.name}.1", src_dir_fd=fd, dst_dir_fd=fd)
        self._times.rotate()
        os.close(self._fd)
        self._run_start = 0
        self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._times.close()

    def begin_run(self) -> None:
        """What is written from now on is a new run's (`tail` reads only that)."""
        self._run_start = self._size if self._fd >= 0 else -1

    def tail(self, size: int) -> bytes:
        """The last `size` bytes the current run wrote to the current file (a rotation
        starts it empty)."""
        if self._fd < 0:
            return b""  # nothing written since this holder began the run
        fd = self.directory.open_file(self.name, os.O_RDONLY)
        try:
            start = max(self._run_start, self._size - size)
            return os.pread(fd, self._size - start, start)
        finally:
            os.close(fd)


LAST_LINES = 3
"""Lines of each stream a failed member's error ends with."""
LAST_CHARACTERS = 300


def last_words(stdout: LogFile, stderr: LogFile) -> str:
    """`stderr: ... | ...; stdout: ...`: the last lines each stream holds, on one line, for
    the error of a member that exited unasked (the reason is usually there)."""
    said = []
    for stream, log_file in (("stderr", stderr), ("stdout", stdout)):
        try:
            data = log_file.tail(LAST_CHARACTERS * 4)
        except OSError:
            continue
        lines = [line.strip() for line in data.decode(errors="replace").splitlines()]
        text = " | ".join([line for line in lines if line][-LAST_LINES:])
        if text:
            if len(text) > LAST_CHARACTERS:
                text = "…" + text[-LAST_CHARACTERS:]
            said.append(f"{stream}: {text}")
    return "; ".join(said)


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

    def __init__(self, spawning: Callable[[], bool] = lambda: False) -> None:
        """`spawning()`: whether a spawn is on its way, whose child may exit (and be reaped
        here) before it is watched."""
        self._watching: dict[int, Callable[[int], None]] = {}
        self._spawning = spawning
        self._unclaimed: dict[int, int] = {}
        """Exit codes of children reaped unwatched while spawns were on their way."""

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(exit_code)` (negative: killed by that signal) when `pid` exits. Call it
        as soon as the spawn's outcome is known, before awaiting anything; an exit reaped
        before is handed over on the next turn of the event loop."""
        code = self._unclaimed.pop(pid, None)
        if code is not None and _still_ours(pid):
            code = None  # that exit was an orphan's whose pid the new child was given
        if code is None:
            self._watching[pid] = on_exit
        else:
            asyncio.get_running_loop().call_soon(on_exit, code)

    def settled(self) -> None:
        """No spawn is on its way: every unwatched exit reaped so far was an orphan's."""
        self._unclaimed.clear()

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
            if on_exit is not None:
                on_exit(os.waitstatus_to_exitcode(status))
            elif self._spawning():
                self._unclaimed[pid] = os.waitstatus_to_exitcode(status)
            else:
                log.debug("orphan_reaped", pid=pid)


def _still_ours(pid: int) -> bool:
    """Whether `pid` is a child of ours not reaped yet (alive, or exited unnoticed)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


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

    def __init__(
        self,
        path: str,
        owner_of: Callable[[Iterable[int]], "Member | None"],
        spawning: Callable[[], bool] = lambda: False,
    ) -> None:
        """`owner_of(pids)`: the member the first of `pids` that is one's process belongs to;
        `spawning()`: whether a spawn is on its way, whose child may speak before it is
        known to be the member's."""
        self.path = path
        self._owner_of = owner_of
        self._spawning = spawning
        self._early: list[tuple[list[int], dict[str, str]]] = []
        """Messages nobody owned while spawns were on their way: the sender's ancestry (read
        when it spoke: it may be gone since), and the fields."""
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if self._abstract:
            self._socket.bind("\0" + path[1:])
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._socket.bind(path)
        os.chmod(path, 0o600)

    @property
    def _abstract(self) -> bool:
        """An address in the abstract namespace ("@NAME", as sd_notify writes it): no file,
        and any process may send to it (the sender's pid still says whose message it is)."""
        return self.path.startswith("@")

    async def run(self) -> None:
        try:
            while True:
                await anyio.wait_readable(self._socket)
                self._drain()
        finally:
            self._socket.close()
            if not self._abstract:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(4096, _ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            pid = _sender_of(ancillary)
            member = self._owner_of(ancestry(pid)) if pid else None
            if member is not None:
                member.notified(_notify_fields(data))
            elif pid and self._spawning():
                self._early.append((list(ancestry(pid)), _notify_fields(data)))
            else:
                log.debug("notify_unattributed", pid=pid)

    def process_started(self) -> None:
        """A new child is known: the messages that came before from it, or from below it,
        are its member's now."""
        early, self._early = self._early, []
        for senders, fields in early:
            member = self._owner_of(senders)
            if member is None:
                self._early.append((senders, fields))
            else:
                member.notified(fields)

    def settled(self) -> None:
        """No spawn is on its way: a message nobody owns now was nobody's."""
        for senders, _ in self._early:
            log.debug("notify_unattributed", pid=senders[0])
        self._early.clear()


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
    runtime: PrivateDir
    """The runtime directory: each member's directory is made in it, never through a link."""
    readers: Readers
    """Where the member's output pipes are watched."""
    runenvs: RunEnvs
    """What each member inherits, its limits and its user."""

    def peers_of(self, name: str) -> str:
        """FLEET_PEERS for `name`: `sibling=address,...`."""
        ...

    def notify_address(self, other_user: bool) -> str:
        """NOTIFY_SOCKET for a member; `other_user`: of a user other than the holder's."""
        ...

    def status_stale(self) -> None:
        """A member's status() changed (not yet published: member_changed follows)."""
        ...

    def member_changed(self, member: "Member") -> None:
        """Called after every state change: the holder tells watchers, and calls `save` soon
        (one batch of file writes per event-loop turn, not one per change)."""
        ...

    def process_started(self, member: "Member", pid: int) -> None:
        """`pid` is the member's (its sd_notify messages are the member's) until it ends."""
        ...

    def process_ended(self, pid: int) -> None:
        """`pid` was reaped."""
        ...

    def member_left(self, member: "Member") -> None:
        """The member is stopped, every process of it ended and its output drained."""
        ...


def needs_port(spec: MemberSpec) -> bool:
    texts = [*spec.command, *spec.env.values(), spec.cwd or "", *(spec.prepare or []), spec.ready]
    return spec.ready == "tcp" or any("{port}" in text for text in texts)


@dataclass(slots=True)
class _Run:
    """One spawn of the member's prepare or command, until its exit."""

    child: Child
    matcher: LineMatcher | None = None


def _rules(spec: MemberSpec, backoff: Backoff) -> Rules:
    return Rules(
        restart=spec.restart,
        start_timeout=spec.start_timeout,
        stop_timeout=spec.stop_timeout,
        prepare=spec.prepare is not None,
        ready_at_spawn=spec.ready == "none",
        backoff=backoff,
    )


class Member:
    """A member and its supervisor: `begin` once, `stop` from anywhere.

    The decisions are `fleetd.holder.lifecycle`'s; this is its I/O shell. Events (an exit
    from the reaper, a readiness signal, a timer, a stop) are fed to `step` as they happen,
    one at a time, and the actions it returns are carried out at once. The one timer a
    member may have armed is an event-loop timer handle, and its one side job (a readiness
    probe, a wait on its other processes) a task: a running member costs no task at all
    (a task, its cancel scope and events, and a task group to run side jobs in were a third
    of what each of a thousand sleeping members cost), and its attributes are slots (a dict
    of them was twice as large)."""

    __slots__ = (
        "_descendants",
        "_directory",
        "_done",
        "_drained",
        "_ended",
        "_events",
        "_feeding",
        "_host",
        "_jobs",
        "_last_words",
        "_lifecycle",
        "_log_max_bytes",
        "_logs",
        "_loop",
        "_no_side_jobs",
        "_pumps",
        "_restart_at",
        "_run",
        "_saved_pid",
        "_side_jobs",
        "_spawn_settled",
        "_spawning",
        "_status",
        "_timer",
        "_watch",
        "address",
        "directory",
        "exit_code",
        "lingering",
        "name",
        "pid",
        "port",
        "spec",
        "started_at",
    )

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
        self._lifecycle = Lifecycle(_rules(spec, backoff or Backoff()))
        self._log_max_bytes = log_max_bytes
        self.address = f"127.0.0.1:{port}" if port is not None else self._unix_ready_path()
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self.lingering = 0
        """Processes of the member alive after its last exit or stop ended them (see
        MemberStatus.lingering)."""
        self._descendants: Descendants | None = None
        self._status: MemberStatus | None = None
        """status(), kept until a field of it changes: all-member answers reuse it."""
        self._run: _Run | None = None
        self._events: list[Event] = []
        """Events waiting their turn: a list, a tenth of an empty deque's size."""
        self._feeding = False
        self._spawning = False
        """A spawn is on its way: events wait for its outcome, which comes first (as if the
        spawn had taken no time, which is what the lifecycle assumes)."""
        self._spawn_settled: anyio.Event | None = None
        """Made by `spawn_settled` while a spawn is on its way; set with its outcome."""
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._watch: anyio.CancelScope | None = None
        self._jobs: TaskGroup | None = None
        self._side_jobs = 0
        """Side jobs not yet returned, a cancelled one unwinding included."""
        self._no_side_jobs: anyio.Event | None = None
        self._ended = False
        self._done: anyio.Event | None = None
        """Made by the first `stop` that waits for the end."""
        self._logs: tuple[LogFile, LogFile] | None = None
        self._pumps: list[_Pump] = []
        self._drained: anyio.Event | None = None
        self._directory: PrivateDir | None = None
        self._saved_pid: int | None = None
        self._last_words = ""
        """The end of what its last run printed, when it exited unasked (see last_words)."""
        self._restart_at = 0.0
        """When it restarts (wall clock), while it waits to."""

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
            lifecycle = self._lifecycle
            self._status = MemberStatus(
                name=self.name,
                state=lifecycle.state,
                pid=self.pid,
                running=self.pid is not None,
                address=self.address,
                holder_pid=os.getpid(),  # not read at import: the template forks holders
                restarts=lifecycle.restarts,
                exit_code=self.exit_code,
                started_at=self.started_at,
                error=self._error(),
                lingering=self.lingering,
            )
        return self._status

    def _error(self) -> str:
        """The lifecycle's error, with what the member printed last and, while it waits to
        restart, when it will: a time, not a countdown that a status read later would show
        frozen."""
        error = self._lifecycle.error
        if not error:
            return ""
        if self._last_words:
            error = f"{error}; {self._last_words}"
        if self._lifecycle.phase is Phase.BACKOFF:
            error += (
                f"; restarting at {time.strftime('%H:%M:%S', time.localtime(self._restart_at))}"
            )
        return error

    def begin(self, jobs: TaskGroup) -> None:
        """Supervise until `stop`: prepare once, then spawn, await readiness, restart per
        policy; side jobs run in `jobs`. Once the member is stopped, every process of it
        ended and its output drained, the host hears `member_left`. Whatever goes wrong in
        the supervision itself (its directory refused, a bug) puts the member in `error` with
        the reason, and it stays there until stopped: a member is never reported starting or
        stopped while nobody supervises it."""
        self._descendants = self._host.lineage.of(self.name)
        self._jobs = jobs
        try:
            self._open_directory()
        except Exception as exc:
            self._supervision_failed(exc)
        else:
            self._feed(Begin())

    async def spawn_settled(self) -> None:
        """Returns once no spawn of the member is on its way. The holder waits for this before
        opening an added member's socket and writing its cluster file: the spawning thread
        needs the GIL for its part (the child's argv and environment, clone3's arguments), and
        that work done meanwhile put off the child's exec by about a quarter of a millisecond
        (a task's dispatch takes about 4). Shielded: the outcome always comes."""
        if self._spawning:
            if self._spawn_settled is None:
                self._spawn_settled = anyio.Event()
            with anyio.CancelScope(shield=True):
                await self._spawn_settled.wait()

    async def _end(self) -> None:
        """Stopped: wait for the side jobs to return (a cancelled one may still be unwinding)
        and the output to drain, then let go of everything the member held and leave."""
        try:
            if self._side_jobs:
                self._no_side_jobs = anyio.Event()
                await self._no_side_jobs.wait()
            await self._drain()
        except Exception:
            log.exception("member_supervision_crashed", member=self.name)
        finally:
            self._cancel_timer()
            for pump in list(self._pumps):
                pump.close()
            for log_file in self._logs or ():
                log_file.close()
            if self._descendants is not None:
                self._descendants.close()
            self._stale()
            self._host.member_changed(self)
            self._ended = True
            if self._done is not None:
                self._done.set()
            self._host.member_left(self)

    def _open_directory(self) -> None:
        """The member's directory ({dir}) in the runtime directory, made 0700 (or one of
        ours already there), never through a link; its logs are opened in it."""
        directory = self._directory = self._host.runtime.subdir(self.name)
        self._logs = (
            LogFile(directory, STDOUT_LOG, self._log_max_bytes),
            LogFile(directory, STDERR_LOG, self._log_max_bytes),
        )

    async def stop(self) -> MemberStatus:
        """Stop the member: stop_signal to every process of it, SIGKILL to those left after
        stop_timeout; no restart. Returns once it is down. Cancelling the caller does not
        cancel the stop."""
        self._feed(StopRequested())
        if not self._ended:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()
        return self.status()

    def notified(self, fields: dict[str, str]) -> None:
        """An sd_notify message from this member or one of its children: READY=1 is its
        readiness where that is not a probe's to say."""
        if fields.get("READY") == "1" and self._run is not None and not self._probed():
            self._feed(Ready())

    def _probed(self) -> bool:
        ready = self.spec.ready
        return ready == "tcp" or ready.startswith("unix:")

    # -- events in, actions out

    def _feed(self, event: Event) -> None:
        """Step the lifecycle with `event` and carry out its actions; an event that an action
        produces (a spawn's outcome) waits for the rest of them to be done, and every event
        waits while a spawn is on its way. An exception is a supervision failure, itself an
        event: it never reaches the reaper, the notify socket or a timer that delivered the
        event."""
        self._events.append(event)
        self._work()

    def _work(self) -> None:
        if self._feeding or self._spawning:
            return
        self._feeding = True
        try:
            while self._events and not self._spawning:
                event = self._events.pop(0)
                try:
                    self._lifecycle, actions = step(self._lifecycle, event)
                    for action in actions:
                        _PERFORM[action](self)
                except Exception as exc:
                    if isinstance(event, SupervisionFailed):
                        log.exception("member_supervision_failed_twice", member=self.name)
                    else:
                        self._supervision_failed(exc)
        finally:
            self._feeding = False

    def _supervision_failed(self, exc: Exception) -> None:
        log.error("member_supervision_failed", member=self.name, exc_info=exc)
        reason = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
        self._events.insert(0, SupervisionFailed(reason))
        self._work()

    def _publish(self) -> None:
        self._stale()
        self._host.member_changed(self)

    def _note_restart(self) -> None:
        self._stale()
        log.info(
            "member_restarting",
            member=self.name,
            restarts=self._lifecycle.restarts,
            after=self._lifecycle.why,
        )

    def _spawn_prepare(self) -> None:
        assert self.spec.prepare is not None
        self._spawn([self.expand(arg) for arg in self.spec.prepare])

    def _spawn_command(self) -> None:
        self._spawn([self.expand(arg) for arg in self.spec.command])

    def _spawn(self, argv: list[str]) -> None:
        """Hand the spawn to the holder's spawner; its outcome comes back through `_spawned`,
        before any other event (see `_spawning`)."""
        assert self._logs is not None, "spawned outside run()"
        for log_file in self._logs:
            log_file.begin_run()
        cwd = self.expand(self.spec.cwd) if self.spec.cwd else None
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        cgroup = self._descendants.cgroup if self._descendants is not None else None
        self._spawning = True
        try:
            runenv = self._host.runenvs.of(self.spec)  # known since the member was admitted
            env = self._environment(runenv)  # an env_file that cannot be read fails the start
            self._host.spawner.spawn_soon(
                argv,
                env,
                cwd,
                out_write,
                err_write,
                done=functools.partial(self._spawned, out_read, err_read),
                cgroup=cgroup,
                setup=runenv.setup,
            )
        except OSError as exc:  # not even handed over
            self._spawned(out_read, err_read, exc)
        except BaseException:
            self._spawning = False
            for fd in (out_read, err_read):
                os.close(fd)
            raise
        finally:
            for fd in (out_write, err_write):
                os.close(fd)

    def _spawned(self, out_read: int, err_read: int, outcome: Child | Exception) -> None:
        """The spawn's outcome, on the event loop: the child is watched before anything is
        awaited (an exit or a notification that came first is handed over), then the events
        that waited go on, this outcome first."""
        event: Event = SupervisionFailed("")
        failure: Exception | None = None
        if isinstance(outcome, Child):
            try:
                self._started(outcome, out_read, err_read)
                event = Spawned(time.monotonic())
            except Exception as exc:
                failure = exc
        else:
            for fd in (out_read, err_read):
                os.close(fd)
            if isinstance(outcome, OSError):
                event = SpawnFailed(_os_error(outcome))
            else:
                failure = outcome
        self._spawning = False
        if self._spawn_settled is not None:
            self._spawn_settled.set()
            self._spawn_settled = None
        if failure is not None:
            self._supervision_failed(failure)
        else:
            self._events.insert(0, event)
            self._work()

    def _started(self, child: Child, out_read: int, err_read: int) -> None:
        assert self._logs is not None
        run = _Run(child)
        if self.spec.ready.startswith("log:"):
            run.matcher = LineMatcher(self.spec.ready[len("log:") :])
        self._host.reaper.watch(child.pid, lambda code: self._exited(run, code))
        self._run = run
        # to the millisecond, as every time fleet records: shorter to encode and decode in
        # each status (4 % of decoding a 1,000-member answer)
        self.pid, self.started_at = child.pid, round(time.time(), 3)
        self._host.process_started(self, child.pid)  # once self.pid says whose it is
        self.lingering = 0  # counted while the member is not running (see MemberStatus)
        self._last_words = ""
        self._stale()
        self._pumps += (
            _Pump(out_read, self._logs[0], run, 1, self),
            _Pump(err_read, self._logs[1], run, 2, self),
        )

    def _environment(self, runenv: RunEnv) -> dict[str, str]:
        env = {
            **runenv.environment,
            **self._env_file(),
            **{k: self.expand(v) for k, v in self.spec.env.items()},
        }
        env["FLEET_MEMBER"] = self.name
        env["FLEET_CLUSTER"] = self._host.cluster
        env[HOLDER_ENV] = self._host.lineage.token
        env["FLEET_PEERS"] = self._host.peers_of(self.name)
        env["NOTIFY_SOCKET"] = self._host.notify_address(runenv.setup.credentials is not None)
        return env

    def _env_file(self) -> dict[str, str]:
        """The env_file's variables, read at every start (an edit shows at the next restart);
        OSError when it cannot be read or parsed, which fails the start."""
        if self.spec.env_file is None:
            return {}
        path = self.expand(self.spec.env_file)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:  # else it reads as the program's error
            raise OSError(exc.errno, f"env_file: {exc.strerror}", path) from None
        try:
            return parse_env_file(text)
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"env_file {exc}", path) from None

    def _exited(self, run: _Run, exit_code: int) -> None:
        """From the reaper: the member's process is gone. Its pid is still its group's id
        (nothing recycled it yet) while the lifecycle decides what to signal."""
        self.pid, self.exit_code = None, exit_code
        self._stale()
        if not self._asked_to_stop():
            self._note_last_words()
        self._feed(Exited(exit_code, time.monotonic()))
        run.child.reaped(exit_code)
        self._host.process_ended(run.child.pid)
        if self._run is run:
            self._run = None

    def _note_last_words(self) -> None:
        for pump in list(self._pumps):  # one that reads its end leaves the list
            pump.read_available()  # its last words, if the pipe holds them still
        assert self._logs is not None
        self._last_words = last_words(*self._logs)
        self._stale()

    def _asked_to_stop(self) -> bool:
        lifecycle = self._lifecycle
        return lifecycle.phase in (Phase.TERMINATING, Phase.KILLING) and not lifecycle.failed

    def log_matched(self, run: _Run) -> None:
        """A log line matched the log:REGEX readiness of `run` (maybe a run before this one)."""
        if run is self._run:
            self._feed(Ready())

    def _signal_stop(self) -> None:
        """stop_signal to the group and to every other process of the member."""
        assert self._run is not None and self._descendants is not None
        signum = getattr(signal, f"SIG{self.spec.stop_signal}")
        signal_group(self._run.child.pid, signum)
        self._descendants.signal(signum, self._run.child.pid)

    def _kill_group(self) -> None:
        """Take the group of the main process along at once when it exits by itself."""
        assert self._run is not None
        signal_group(self._run.child.pid, signal.SIGKILL)

    def _kill(self) -> None:
        log.warning("member_killed", member=self.name, stop_timeout=self.spec.stop_timeout)
        self._kill_group()  # not reaped: the group id is still its pid

    # -- the one timer

    def _arm(self, delay: float, event: Event) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, self._feed, event)

    def _arm_start_timer(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self.spec.start_timeout, self._start_timed_out)

    def _start_timed_out(self) -> None:
        """The member failed while it runs: what it printed so far says why, as an exit's."""
        self._note_last_words()
        self._feed(StartTimedOut())

    def _arm_stop_timer(self) -> None:
        self._arm(self.spec.stop_timeout, StopTimedOut())

    def _arm_backoff_timer(self) -> None:
        self._restart_at = time.time() + self._lifecycle.delay
        self._arm(self._lifecycle.delay, BackoffElapsed())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the one side job

    def _start_watch(self, job: Callable[[], Awaitable[None]]) -> None:
        assert self._jobs is not None
        scope = self._watch = anyio.CancelScope()
        self._side_jobs += 1
        self._jobs.start_soon(self._watching, scope, job)

    async def _watching(self, scope: anyio.CancelScope, job: Callable[[], Awaitable[None]]) -> None:
        try:
            with scope:
                try:
                    await job()
                except Exception as exc:
                    self._supervision_failed(exc)
        finally:
            self._side_jobs -= 1
            if not self._side_jobs and self._no_side_jobs is not None:
                self._no_side_jobs.set()

    def _cancel_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _watch_readiness(self) -> None:
        if self._probed():
            self._start_watch(self._probe)

    async def _probe(self) -> None:
        if self.spec.ready == "tcp":
            port = self.port or 0
            await _until_connectable(lambda: anyio.connect_tcp("127.0.0.1", port))
        else:
            path = self._unix_ready_path()
            await _until_connectable(lambda: anyio.connect_unix(path))
        self._feed(Ready())

    def _await_others(self) -> None:
        self._start_watch(self._others_exited)

    async def _others_exited(self) -> None:
        assert self._descendants is not None
        await self._descendants.wait_ended()
        self._feed(OthersExited())

    def _end_leftovers(self) -> None:
        self._start_watch(self._leftovers_ended)

    def _end_stragglers(self) -> None:
        log.warning("member_processes_killed", member=self.name)
        self._start_watch(self._leftovers_ended)

    async def _leftovers_ended(self) -> None:
        """SIGKILL whatever of the member is left (before any restart: a new run must not
        find the last one's processes on its port), and report what would not go as
        lingering."""
        assert self._descendants is not None
        lingering = await self._descendants.end()
        if lingering:
            log.warning("member_processes_lingering", member=self.name, count=lingering)
        self._set_lingering(lingering)
        self._feed(LeftoversEnded())

    def _watch_lingering(self) -> None:
        """A member that will not run again: see its lingering processes go, if ever."""
        if self.lingering:
            self._start_watch(self._until_none_lingers)

    async def _until_none_lingers(self) -> None:
        assert self._descendants is not None
        await self._descendants.wait_gone()
        self._set_lingering(0)

    def _set_lingering(self, count: int) -> None:
        if count != self.lingering:
            self.lingering = count
            self._stale()
            self._host.member_changed(self)

    def _finish(self) -> None:
        assert self._jobs is not None
        self._cancel_watch()
        self._jobs.start_soon(self._end)

    async def _drain(self) -> None:
        """Give the output pipes of a stopped member _DRAIN_GRACE to deliver their last words
        (a grandchild holding a pipe open does not hold the stop up longer)."""
        if not self._pumps:
            return
        self._drained = anyio.Event()
        with anyio.move_on_after(_DRAIN_GRACE):
            await self._drained.wait()

    def pump_closed(self, pump: "_Pump") -> None:
        if pump in self._pumps:
            self._pumps.remove(pump)
        if not self._pumps and self._drained is not None:
            self._drained.set()

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


_PERFORM: dict[Action, Callable[[Member], None]] = {
    Action.PUBLISH: Member._publish,
    Action.NOTE_RESTART: Member._note_restart,
    Action.SPAWN_PREPARE: Member._spawn_prepare,
    Action.SPAWN: Member._spawn_command,
    Action.WATCH_READINESS: Member._watch_readiness,
    Action.ARM_START_TIMER: Member._arm_start_timer,
    Action.ARM_STOP_TIMER: Member._arm_stop_timer,
    Action.ARM_BACKOFF_TIMER: Member._arm_backoff_timer,
    Action.CANCEL_TIMER: Member._cancel_timer,
    Action.CANCEL_WATCH: Member._cancel_watch,
    Action.SIGNAL_STOP: Member._signal_stop,
    Action.KILL_GROUP: Member._kill_group,
    Action.KILL: Member._kill,
    Action.AWAIT_OTHERS: Member._await_others,
    Action.END_LEFTOVERS: Member._end_leftovers,
    Action.END_STRAGGLERS: Member._end_stragglers,
    Action.WATCH_LINGERING: Member._watch_lingering,
    Action.FINISH: Member._finish,
}
"""How the shell carries out each action of the lifecycle."""


class _Pump:
    """Copies one output pipe into its log until every writer closed it, from a callback of the
    holder's Readers (two tasks per member cost more than all else a sleeping member does,
    and two event-loop readers more than all else but its task); also feeds the log:REGEX
    readiness check of its run."""

    __slots__ = ("_failing", "_fd", "_log_file", "_member", "_readers", "_run", "_stream")

    def __init__(
        self,
        fd: int,
        log_file: LogFile,
        run: _Run,
        stream: int,
        member: Member,
    ) -> None:
        self._fd, self._log_file, self._run, self._stream = fd, log_file, run, stream
        self._member = member
        self._failing = False
        """The log cannot be written (a full disk): said once, until a write succeeds."""
        os.set_blocking(fd, False)
        self._readers = member._host.readers
        self._readers.add(fd, self._readable)

    def read_available(self) -> None:
        """Everything the pipe holds now (the member exited: its last words may still be
        there while a grandchild keeps the pipe open)."""
        while self._fd >= 0 and self._readable():
            pass

    def _readable(self) -> bool:
        """Whether something was read."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("output_pipe_failed", error=str(exc))
            data = b""
        if not data:
            self.close()
            return False
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
            self._member.log_matched(run)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self._readers.remove(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._member.pump_closed(self)


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


def _os_error(exc: OSError) -> str:
    subject = f": {exc.filename!r}" if exc.filename else ""
    return f"[Errno {exc.errno}] {exc.strerror}{subject}"

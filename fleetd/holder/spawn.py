"""Starting a member's process so that it dies with its holder, in its cgroup when it has one.

A member gets SIGKILL as its parent-death signal, so a holder that dies (SIGKILL included)
takes its members along. posix_spawn cannot set it, and forking the interpreter to run a
preexec hook costs milliseconds per member, so the child first executes a trampoline that sets
the signal and then executes the member's program:

- on x86-64, `TRAMPOLINE`, a 703-byte static executable held in a memfd: no dynamic loader, no
  libraries, so its exec costs little more than a direct spawn;
- elsewhere (or where memfds may not be executed), `setpriv --pdeathsig KILL`, which costs a
  second full exec per member (starting 1,000 members took twice as long through it) and,
  unlike the trampoline, does not check that its parent is still there after the prctl: a
  holder killed in the microseconds before it leaves that member behind;
- without setpriv, a fork with a preexec hook.

A member's `Setup` (its resource limits, and its user when it has one) is applied in the same
place, before the exec: the trampoline calls prlimit64 per limit, then setgroups, setresgid and
setresuid, and only then sets the parent-death signal, which a change of user clears. setpriv
loses the signal that way (it sets it before it changes user), so a member with a user is
spawned through the preexec hook where there is no trampoline; setpriv's members get their
limits from the holder right after the spawn (prlimit), which races the program's first
instructions as the cgroup move does.

A member with a cgroup (fleetd.core.cgroups) must be in it before its program runs its first
instruction, or a child it forks at once would start outside. The trampoline, and the preexec
hook, move the process there themselves, writing "0" to the cgroup's `cgroup.procs` before
the exec (the move, which takes the kernel's cgroup locks, is then the child's cost, not the
holder's event loop's): a program never runs outside its cgroup. setpriv cannot, so the
holder moves that child right after posix_spawn returns, then anything it forked meanwhile.
That path races: a move may wait for an RCU grace period (milliseconds), and a child the
program forks and that exits within it ran outside (one that lives on is moved).

Spawns run on two spawning threads (`Spawner.spawn_soon`), so that two members start at once
on two cores while the event loop goes on with the rest (posix_spawn releases the GIL while
the kernel copies the process and the child gets to its exec, most of a spawn). The
parent-death signal fires when the *thread* that spawned the child exits, so these threads
live as long as the holder. Each has a descriptor table and a working directory of its own
(unshare CLONE_FILES | CLONE_FS): a child copies the table it is spawned from and closes
every close-on-exec descriptor of it at exec, which from the holder's table (three
descriptors per member) grew with every member started (a thousand members cost each child
about 0.3 ms more); a thread holds only the output pipes it is handed, one member at a time,
and can step into a member's `cwd` without moving the rest of the holder. Where unshare is
refused (a seccomp filter), members are spawned on the event loop's thread.
"""

import array
import asyncio
import contextlib
import ctypes
import errno
import os
import queue
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from fleetd.core.cgroups import PROCS_FILE, Cgroup
from fleetd.core.identity import children

log = structlog.get_logger("fleetd.spawn")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_SETPRIV = shutil.which("setpriv")
_MFD_EXEC = 0x10
"""Asks for an executable memfd where vm.memfd_noexec would otherwise seal it (Linux 6.3+)."""
_CLONE_FS = 0x200
_CLONE_FILES = 0x400
SPAWNING_THREADS = 2
"""One per core of the 2-core machines fleet is measured on; more only queue on the kernel."""

# `trampoline PARENT_PID CGROUP_PROCS [STEP...] PROGRAM ARG...`, PROGRAM an absolute path:
# unless CGROUP_PROCS is "", write "0" (this process) to that file, which must be on cgroup2 (a
# stray path never gets written), or say so on stderr and exit 127; then each STEP in order:
# `lRESOURCE:SOFT:HARD` prlimit64(0, RESOURCE, {SOFT, HARD}) (RLIM_INFINITY in decimal, 2**64-1);
# `uUID:GID:GROUP[:GROUP...]` (one group at least) setgroups(GROUPS), setresgid(GID x3),
# setresuid(UID x3); a step that fails says so on stderr and exits 127. Then, after any change
# of user (which clears it), prctl(PR_SET_PDEATHSIG, SIGKILL); exit 127 unless getppid() ==
# PARENT_PID (the parent died before the prctl: no signal would ever come);
# execve(PROGRAM, [PROGRAM, ARG...], envp); exit 127 if that failed.
# (Assembled with GNU as from the listing in the comments, then objdump -d.)
_TRAMPOLINE_CODE = bytes.fromhex(
    "4889e3"  # 00  mov rbx, rsp                 rbx -> argc, argv[0], argv[1]...
    "488b7310"  # 03  mov rsi, [rbx+16]            argv[1]: the parent's pid in decimal
    "e888010000"  # 07  call number
    "4989c4"  # 0c  mov r12, rax
    "488b7b18"  # 0f  mov rdi, [rbx+24]            argv[2]: a cgroup.procs, or ""
    "803f00"  # 13  cmp byte [rdi], 0
    "745a"  # 16  je steps
    "b802000000"  # 18  mov eax, 2 (open)
    "be01000800"  # 1d  mov esi, 0x80001 (O_WRONLY | O_CLOEXEC)
    "0f05"  # 22  syscall
    "4885c0"  # 24  test rax, rax
    "0f8889010000"  # 27  js cgroup_fail
    "89c7"  # 2d  mov edi, eax
    "4881ec80000000"  # 2f  sub rsp, 128                 a struct statfs
    "4889e6"  # 36  mov rsi, rsp
    "b88a000000"  # 39  mov eax, 138 (fstatfs)
    "0f05"  # 3e  syscall
    "4885c0"  # 40  test rax, rax
    "0f856d010000"  # 43  jnz cgroup_fail
    "48813c2470726763"  # 49  cmp qword [rsp], 0x63677270  f_type: CGROUP2_SUPER_MAGIC, or no write
    "0f855f010000"  # 51  jne cgroup_fail
    "6a30"  # 57  push '0'                     "0": the writer itself
    "4889e6"  # 59  mov rsi, rsp
    "ba01000000"  # 5c  mov edx, 1
    "b801000000"  # 61  mov eax, 1 (write)
    "0f05"  # 66  syscall
    "4883f801"  # 68  cmp rax, 1
    "0f8544010000"  # 6c  jne cgroup_fail
    "4c8d6b18"  # 72  steps: lea r13, [rbx+24]   r13 -> argv[2]
    "4983c508"  # 76  next: add r13, 8           the next argument: a step, or the program
    "498b7500"  # 7a  mov rsi, [r13]
    "0fb606"  # 7e  movzx eax, byte [rsi]
    "48ffc6"  # 81  inc rsi
    "3c6c"  # 84  cmp al, 'l'
    "744c"  # 86  je limit
    "3c75"  # 88  cmp al, 'u'
    "0f848c000000"  # 8a  je user
    "b89d000000"  # 90  mov eax, 157 (prctl)
    "bf01000000"  # 95  mov edi, 1 (PR_SET_PDEATHSIG)
    "be09000000"  # 9a  mov esi, 9 (SIGKILL)
    "0f05"  # 9f  syscall
    "4885c0"  # a1  test rax, rax
    "7522"  # a4  jnz fail
    "b86e000000"  # a6  mov eax, 110 (getppid)
    "0f05"  # ab  syscall
    "4c39e0"  # ad  cmp rax, r12
    "7516"  # b0  jne fail
    "498b7d00"  # b2  mov rdi, [r13]               the program
    "4c89ee"  # b6  mov rsi, r13                 its argv
    "488b03"  # b9  mov rax, [rbx]               argc
    "488d54c310"  # bc  lea rdx, [rbx+rax*8+16]      envp
    "b83b000000"  # c1  mov eax, 59 (execve)
    "0f05"  # c6  syscall
    "bf7f000000"  # c8  fail: mov edi, 127
    "b8e7000000"  # cd  mov eax, 231 (exit_group)
    "0f05"  # d2  syscall
    "e8bb000000"  # d4  limit: call number        RESOURCE
    "4989c6"  # d9  mov r14, rax
    "e8b3000000"  # dc  call number               SOFT
    "4989c7"  # e1  mov r15, rax
    "e8ab000000"  # e4  call number               HARD
    "50"  # e9  push rax                     struct rlimit64 {SOFT, HARD}
    "4157"  # ea  push r15
    "31ff"  # ec  xor edi, edi                 pid 0: this process
    "4c89f6"  # ee  mov rsi, r14
    "4889e2"  # f1  mov rdx, rsp
    "4531d2"  # f4  xor r10d, r10d               no old limits
    "b82e010000"  # f7  mov eax, 302 (prlimit64)
    "0f05"  # fc  syscall
    "4883c410"  # fe  add rsp, 16
    "4885c0"  # 102 test rax, rax
    "0f846bffffff"  # 105 jz next
    "488d35e8000000"  # 10b lea rsi, [rip+232]          limits_message
    "ba26000000"  # 112 mov edx, 38
    "e9a6000000"  # 117 jmp say
    "e873000000"  # 11c user: call number         UID
    "4989c6"  # 121 mov r14, rax
    "e86b000000"  # 124 call number                GID
    "4989c7"  # 129 mov r15, rax
    "4889e5"  # 12c mov rbp, rsp
    "31c9"  # 12f xor ecx, ecx
    "e85e000000"  # 131 group: call number        the groups, as gid_t below rsp
    "4883ec04"  # 136 sub rsp, 4
    "890424"  # 13a mov [rsp], eax
    "ffc1"  # 13d inc ecx
    "803e00"  # 13f cmp byte [rsi], 0
    "75ed"  # 142 jne group
    "89cf"  # 144 mov edi, ecx
    "4889e6"  # 146 mov rsi, rsp
    "b874000000"  # 149 mov eax, 116 (setgroups)
    "0f05"  # 14e syscall
    "4889ec"  # 150 mov rsp, rbp
    "4885c0"  # 153 test rax, rax
    "752e"  # 156 jnz user_fail
    "4c89ff"  # 158 mov rdi, r15
    "4c89fe"  # 15b mov rsi, r15
    "4c89fa"  # 15e mov rdx, r15
    "b877000000"  # 161 mov eax, 119 (setresgid)
    "0f05"  # 166 syscall
    "4885c0"  # 168 test rax, rax
    "7519"  # 16b jnz user_fail
    "4c89f7"  # 16d mov rdi, r14
    "4c89f6"  # 170 mov rsi, r14
    "4c89f2"  # 173 mov rdx, r14
    "b875000000"  # 176 mov eax, 117 (setresuid)
    "0f05"  # 17b syscall
    "4885c0"  # 17d test rax, rax
    "0f84f0feffff"  # 180 jz next
    "488d3593000000"  # 186 user_fail: lea rsi, [rip+147]  user_message
    "ba27000000"  # 18d mov edx, 39
    "eb2e"  # 192 jmp say
    "31c0"  # 194 number: xor eax, eax       rax = the decimal at rsi; rsi past it and a ':'
    "0fb616"  # 196 digit: movzx edx, byte [rsi]
    "83ea30"  # 199 sub edx, '0'
    "83fa09"  # 19c cmp edx, 9
    "770c"  # 19f ja separator
    "486bc00a"  # 1a1 imul rax, rax, 10
    "4801d0"  # 1a5 add rax, rdx
    "48ffc6"  # 1a8 inc rsi
    "ebe9"  # 1ab jmp digit
    "803e3a"  # 1ad separator: cmp byte [rsi], ':'
    "7503"  # 1b0 jne done
    "48ffc6"  # 1b2 inc rsi
    "c3"  # 1b5 done: ret
    "488d3516000000"  # 1b6 cgroup_fail: lea rsi, [rip+22]  cgroup_message
    "ba27000000"  # 1bd mov edx, 39
    "b801000000"  # 1c2 say: mov eax, 1 (write)
    "bf02000000"  # 1c7 mov edi, 2 (stderr)
    "0f05"  # 1cc syscall
    "e9f5feffff"  # 1ce jmp fail
)
_TRAMPOLINE_CODE += b"fleet: cannot join the member's cgroup\n"  # 1d3 cgroup_message
_TRAMPOLINE_CODE += b"fleet: cannot set the member's limits\n"  # 1fa limits_message
_TRAMPOLINE_CODE += b"fleet: cannot run as the member's user\n"  # 220 user_message


def _static_executable(code: bytes, base: int = 0x400000) -> bytes:
    """An x86-64 ELF executable of one read+execute segment: `code`, entered at its start."""
    header_size, segment_size = 64, 56
    size = header_size + segment_size + len(code)
    header = struct.pack(
        "<4sBBBB8xHHIQQQIHHHHHH",
        b"\x7fELF",
        2,  # 64-bit
        1,  # little endian
        1,  # ELF version
        0,  # System V ABI
        2,  # ET_EXEC
        0x3E,  # x86-64
        1,
        base + header_size + segment_size,  # entry
        header_size,  # program headers follow
        0,  # no section headers
        0,
        header_size,
        segment_size,
        1,
        0,
        0,
        0,
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return header + segment + code


TRAMPOLINE = _static_executable(_TRAMPOLINE_CODE)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def become_subreaper() -> None:
    """Orphaned descendants of our members are re-parented to us, so we can reap them."""
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


@dataclass(slots=True)
class Child:
    """A spawned process; `popen` only on the fallback path (it must learn its exit code, or
    the subprocess module would reap the pid behind our back)."""

    pid: int
    popen: "subprocess.Popen[bytes] | None" = None

    def reaped(self, exit_code: int) -> None:
        if self.popen is not None:
            self.popen.returncode = exit_code


Outcome = Child | Exception
"""What a spawn came to: the child, an OSError (no such program, ...), or a bug."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a member runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    """Its supplementary groups: at least one (the user's own group is among them)."""


@dataclass(frozen=True, slots=True)
class Setup:
    """What a member's process is given before its program runs: resource limits (resource,
    soft, hard; -1 for infinity, as the resource module has it), and a user to run as."""

    limits: tuple[tuple[int, int, int], ...] = ()
    credentials: Credentials | None = None
    steps: tuple[str, ...] = field(init=False, default=())
    """The trampoline's arguments for it (see _TRAMPOLINE_CODE)."""

    def __post_init__(self) -> None:
        steps = [f"l{r}:{soft % 2**64}:{hard % 2**64}" for r, soft, hard in self.limits]
        if self.credentials is not None:
            c = self.credentials
            steps.append(f"u{c.uid}:{c.gid}:{':'.join(map(str, c.groups))}")
        object.__setattr__(self, "steps", tuple(steps))

    def apply(self) -> None:
        """In the child, before its exec (the preexec hook): the trampoline's steps."""
        for r, soft, hard in self.limits:
            resource.setrlimit(r, (soft, hard))
        if self.credentials is not None:
            os.setgroups(list(self.credentials.groups))
            os.setresgid(*[self.credentials.gid] * 3)
            os.setresuid(*[self.credentials.uid] * 3)


NO_SETUP = Setup()


class Spawner:
    """Spawns members through the cheapest trampoline this machine allows (see the module),
    from its spawning threads."""

    def __init__(self, threads: int = SPAWNING_THREADS) -> None:
        self._trampoline = _trampoline_path()
        self._wanted = threads
        self._threads: list[_SpawningThread] | None = None
        self._turn = 0
        self.in_flight = 0
        """Spawns handed to a thread whose outcome the event loop has not been given yet."""
        self.settled: Callable[[], None] = lambda: None
        """Called on the event loop once no spawn is in flight (after the outcome's `done`)."""

    def spawn_soon(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        stdout: int,
        stderr: int,
        *,
        done: Callable[[Outcome], None],
        cgroup: str | None = None,
        setup: Setup = NO_SETUP,
    ) -> None:
        """`spawn` on a spawning thread; `done(outcome)` is called on the running event loop's
        thread once it is known (at once where there is no spawning thread). The caller may
        close `stdout` and `stderr` when this returns: the thread holds copies."""
        threads = self._spawning_threads()
        if not threads:
            outcome: Outcome
            try:
                outcome = self.spawn(argv, env, cwd, stdout, stderr, cgroup=cgroup, setup=setup)
            except Exception as exc:
                outcome = exc
            done(outcome)
            return
        thread = threads[self._turn % len(threads)]
        self._turn += 1
        job = _Job(argv, env, cwd, cgroup, setup, done)
        thread.submit(job, stdout, stderr)
        self.in_flight += 1

    def _finished(self, job: "_Job", outcome: Outcome) -> None:
        self.in_flight -= 1
        try:
            job.done(outcome)
        finally:
            if not self.in_flight:
                self.settled()

    def _spawning_threads(self) -> "list[_SpawningThread]":
        if self._threads is None:
            self._threads = []
            for _ in range(self._wanted):
                try:
                    self._threads.append(_SpawningThread(self, self._trampoline_fd()))
                except OSError as exc:
                    log.info("spawning_threads_unused", error=str(exc))
                    break
        return self._threads

    def _trampoline_fd(self) -> int | None:
        if self._trampoline is None:
            return None
        return int(os.path.basename(self._trampoline))

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        stdout: int,
        stderr: int,
        *,
        cgroup: str | None = None,
        setup: Setup = NO_SETUP,
    ) -> Child:
        """Start `argv` in its own process group with stdin from /dev/null, the given output
        descriptors, SIGKILL as its parent-death signal, in the `cgroup` directory when given,
        with `setup` applied (see the module). Raises OSError (no such program, no such
        directory, not executable) with the OS error. The child dies when the calling thread
        exits."""
        procs = os.path.join(cgroup, PROCS_FILE) if cgroup else ""
        if setup.credentials is not None:
            _give_output(setup.credentials, stdout, stderr)
        with _working_directory(cwd):
            program = _resolve_program(argv[0], env.get("PATH", os.defpath))
            trampoline = self._trampoline
            if trampoline is not None:
                try:
                    command = [
                        trampoline, str(os.getpid()), procs, *setup.steps, program, *argv[1:]
                    ]  # fmt: skip
                    return Child(_posix_spawn(command, env, stdout, stderr))
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOEXEC):
                        raise
                    self._trampoline = None  # memfds may not be executed here
            if _SETPRIV is not None and setup.credentials is None:
                command = [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]]
                child = Child(_posix_spawn(command, env, stdout, stderr))
                _set_limits(child.pid, setup)
                if cgroup:
                    _move_tree(child.pid, Cgroup(cgroup))
                return child
            return _spawn_with_preexec(
                [program, *argv[1:]], env, stdout, stderr, procs, setup=setup
            )


@dataclass(slots=True)
class _Job:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    cgroup: str | None
    setup: Setup
    done: Callable[[Outcome], None]


_OUTPUT_FDS_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


class _SpawningThread:
    """A thread that spawns the jobs it is handed, in order, for the holder's whole life (its
    children's parent-death signal is its exit), from a descriptor table and a working
    directory of its own (see the module). A job's output descriptors come over a socket
    (SCM_RIGHTS), the rest of it through a queue, in the same order; outcomes go back
    through a queue, with a byte each down a pipe that the event loop reads (the thread
    cannot wake the loop by call_soon_threadsafe: the loop's own wake-up descriptor is not
    in the thread's table)."""

    def __init__(self, spawner: Spawner, trampoline_fd: int | None) -> None:
        self._spawner = spawner
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue[tuple[_Job, Outcome]] = queue.SimpleQueue()
        self._sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        jobs_read = receiver.detach()
        self._done_read, done_write = os.pipe()
        self._started = threading.Event()
        self._refused: OSError | None = None
        keep = {jobs_read, done_write}
        if trampoline_fd is not None:
            keep.add(trampoline_fd)
        try:
            threading.Thread(
                target=self._run,
                args=(jobs_read, done_write, keep),
                name="fleet-spawn",
                daemon=True,
            ).start()
            self._started.wait()
        finally:
            os.close(jobs_read)  # from our table: the thread's holds its own
            os.close(done_write)
        if self._refused is not None:
            self._sender.close()
            os.close(self._done_read)
            raise self._refused
        os.set_blocking(self._done_read, False)
        asyncio.get_running_loop().add_reader(self._done_read, self._collect)

    def submit(self, job: _Job, stdout: int, stderr: int) -> None:
        """Blocks while the thread has many jobs queued already (the socket's queue is
        full): the event loop then waits for its spawns rather than piling up pipes."""
        fds = array.array("i", [stdout, stderr])
        self._sender.sendmsg([b"j"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        self._jobs.put(job)

    def _collect(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._done_read, 4096)
        while True:
            try:
                job, outcome = self._outcomes.get_nowait()
            except queue.Empty:
                return
            try:
                self._spawner._finished(job, outcome)
            except Exception:  # a bug in one member's supervision: the others' outcomes go on
                log.exception("spawn_outcome_failed", argv=job.argv)

    def _run(self, jobs_read: int, done_write: int, keep: set[int]) -> None:
        try:
            _unshare(_CLONE_FILES | _CLONE_FS)
        except OSError as exc:
            self._refused = exc
            self._started.set()
            return
        _close_all_but(keep)  # in this thread's copy of the table only
        self._started.set()
        receiver = socket.socket(fileno=jobs_read)
        while True:  # never returns: its children would get their parent-death signal
            try:
                self._spawn_next(receiver, done_write)
            except Exception:
                log.exception("spawning_thread_failed")

    def _spawn_next(self, receiver: socket.socket, done_write: int) -> None:
        _, ancillary, _, _ = receiver.recvmsg(1, _OUTPUT_FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = _received_fds(ancillary)
        job = self._jobs.get()
        outcome: Outcome
        try:
            outcome = self._spawner.spawn(
                job.argv, job.env, job.cwd, fds[0], fds[-1], cgroup=job.cgroup, setup=job.setup
            )
        except Exception as exc:
            outcome = exc
        finally:
            for fd in fds:
                os.close(fd)
        self._outcomes.put((job, outcome))
        os.write(done_write, b"\0")


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare: {os.strerror(code)}")


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/thread-self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed already
                os.close(fd)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _trampoline_path() -> str | None:
    """The trampoline in a memfd of ours, as an executable path; None where it cannot run."""
    if os.uname().machine != "x86_64":
        return None
    try:
        fd = os.memfd_create("fleet-trampoline", os.MFD_CLOEXEC | _MFD_EXEC)
    except OSError:
        try:
            fd = os.memfd_create("fleet-trampoline", os.MFD_CLOEXEC)
        except OSError:
            return None
    os.write(fd, TRAMPOLINE)
    return f"/proc/self/fd/{fd}"


def _posix_spawn(command: list[str], env: dict[str, str], stdout: int, stderr: int) -> int:
    return os.posix_spawn(
        command[0],
        command,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ],
        setpgroup=0,
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


@contextlib.contextmanager
def _working_directory(cwd: str | None) -> Iterator[None]:
    """posix_spawn cannot chdir (before Python 3.13): step into `cwd` around the spawn. Safe
    on a spawning thread (its working directory is its own) and on the event loop's thread
    (which awaits nothing meanwhile, and is the only one to spawn where no thread does)."""
    if cwd is None:
        yield
        return
    previous = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError as exc:  # else it reads as the program's error
        raise OSError(exc.errno, f"cwd: {exc.strerror}", cwd) from None
    try:
        yield
    finally:
        os.chdir(previous)


_found_on_path: dict[tuple[str, str], str] = {}
"""Programs found by PATH lookup; only hits are kept, so a program that appears later is
found on the next restart."""


def _resolve_program(program: str, path: str) -> str:
    """The file exec would run, or the OSError exec would fail with (the trampoline execs it,
    too late to report the error as ours)."""
    if "/" not in program:
        found = _found_on_path.get((program, path)) or shutil.which(program, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        found = _found_on_path[program, path] = os.path.abspath(found)
        return found
    if not os.path.exists(program):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return os.path.abspath(program)


def _move_tree(pid: int, cgroup: Cgroup) -> None:
    """Move a process just spawned, then what it forked already, into `cgroup`; a process
    that cannot be moved is killed, so that none runs outside it (see the module)."""
    stack = [pid]
    while stack:
        process = stack.pop()
        try:
            cgroup.move(process)
        except ProcessLookupError:
            continue
        except OSError as exc:
            log.warning("cgroup_move_failed", pid=process, error=str(exc))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        stack += children(process)


def _give_output(credentials: Credentials, *fds: int) -> None:
    """The member's output pipes become its user's, so that it may open them again by name
    (/dev/stdout, /proc/self/fd/1), as a program writing a log "file" there does."""
    for fd in fds:
        with contextlib.suppress(OSError):  # not a pipe of ours: leave it
            os.fchown(fd, credentials.uid, credentials.gid)


def _set_limits(pid: int, setup: Setup) -> None:
    """The limits of a process spawned through setpriv (see the module); one that cannot take
    them is killed, as the trampoline would have exited."""
    try:
        for r, soft, hard in setup.limits:
            resource.prlimit(pid, r, (soft, hard))
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning("member_limits_failed", pid=pid, error=str(exc))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _spawn_with_preexec(
    argv: list[str], env: dict[str, str], stdout: int, stderr: int, procs: str, *, setup: Setup
) -> Child:
    holder = os.getpid()

    def die_with_holder() -> None:
        """The trampoline's steps, in its order (see _TRAMPOLINE_CODE)."""
        signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the holder blocks SIGCHLD
        if procs:
            try:
                with open(procs, "w") as f:
                    f.write("0")
            except OSError:
                os.write(2, b"fleet: cannot join the member's cgroup\n")
                os._exit(127)
        try:
            setup.apply()
        except OSError:
            os.write(2, b"fleet: cannot set the member's limits or user\n")
            os._exit(127)
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != holder:  # the holder died before the prctl: nobody would signal us
            os._exit(1)

    popen = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        process_group=0,
        preexec_fn=die_with_holder,  # noqa: PLW1509 (only the event loop thread spawns)
    )
    return Child(popen.pid, popen)

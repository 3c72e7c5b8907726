"""Starting a member's process so that it dies with its holder, in its cgroup when it has one.

A member gets SIGKILL as its parent-death signal, so a holder that dies (SIGKILL included)
takes its members along. posix_spawn cannot set it, and forking the interpreter to run a
preexec hook costs milliseconds per member, so, cheapest first:

- on x86-64, `_CLONE_SPAWN_CODE`: posix_spawn's own way (clone3 with CLONE_VM | CLONE_VFORK:
  no copy of the holder's memory, the caller waits until the child executed its program),
  with the child's few steps (the prctl, the cgroup, descriptors, signals) as machine code in
  this process, called through ctypes. Where clone3 or executable memory is refused:
- `TRAMPOLINE`, a 373-byte static executable held in a memfd, that sets the signal and then
  executes the member's program: no dynamic loader, no libraries, but a second exec per
  member (with its cgroup write, about a fifth of the CPU a `sleep` member cost to start);
- elsewhere (or where memfds may not be executed), `setpriv --pdeathsig KILL`, which costs a
  second full exec per member (starting 1,000 members took twice as long through it) and,
  unlike the trampoline, does not check that its parent is still there after the prctl: a
  holder killed in the microseconds before it leaves that member behind;
- without setpriv, a fork with a preexec hook.

A member with a cgroup (fleetd.core.cgroups) must be in it before its program runs its first
instruction, or a child it forks at once would start outside. The clone3 child, the
trampoline and the preexec hook move the process there themselves, writing "0" to the
cgroup's `cgroup.procs` before the exec (the move, which takes the kernel's cgroup locks, is
then the child's cost, not the holder's event loop's): a program never runs outside its
cgroup. (clone3's CLONE_INTO_CGROUP would spare the write, but Linux 6.18 SIGKILLs at birth
every child it puts in a cgroup that cgroup.kill emptied before: a restarted member's.)
setpriv cannot, so the holder moves that child right after posix_spawn returns, then
anything it forked meanwhile. That path races: a move may wait for an RCU grace period
(milliseconds), and a child the program forks and that exits within it ran outside (one that
lives on is moved).

Spawns run on two spawning threads (`Spawner.spawn_soon`), so that two members start at once
on two cores while the event loop goes on with the rest (a spawn releases the GIL while the
kernel copies the process and the child gets to its exec, most of a spawn). The
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
import functools
import mmap
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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

# `trampoline PARENT_PID CGROUP_PROCS PROGRAM ARG...`: prctl(PR_SET_PDEATHSIG, SIGKILL); exit
# 127 unless getppid() == PARENT_PID (the parent died before the prctl: no signal would ever
# come); unless CGROUP_PROCS is "", write "0" (this process) to that file, which must be on
# cgroup2 (a stray path never gets written), or say so on stderr and exit 127;
# execve(PROGRAM, [PROGRAM, ARG...], envp); exit 127 if that failed.
# (Assembled with GNU as from the listing in the comments, then objdump -d.)
_TRAMPOLINE_CODE = bytes.fromhex(
    "4889e3"  # 00  mov rbx, rsp                 rbx -> argc, argv[0], argv[1]...
    "b89d000000"  # 03  mov eax, 157 (prctl)
    "bf01000000"  # 08  mov edi, 1 (PR_SET_PDEATHSIG)
    "be09000000"  # 0d  mov esi, 9 (SIGKILL)
    "0f05"  # 12  syscall
    "4885c0"  # 14  test rax, rax
    "0f8593000000"  # 17  jnz fail
    "488b7310"  # 1d  mov rsi, [rbx+16]            argv[1]: the parent's pid in decimal
    "4531e4"  # 21  xor r12d, r12d
    "0fb616"  # 24  digit: movzx edx, byte [rsi]
    "85d2"  # 27  test edx, edx
    "740f"  # 29  jz parsed
    "83ea30"  # 2b  sub edx, '0'
    "4d6be40a"  # 2e  imul r12, r12, 10
    "4901d4"  # 32  add r12, rdx
    "48ffc6"  # 35  inc rsi
    "ebea"  # 38  jmp digit
    "b86e000000"  # 3a  parsed: mov eax, 110 (getppid)
    "0f05"  # 3f  syscall
    "4c39e0"  # 41  cmp rax, r12
    "756a"  # 44  jne fail
    "488b7b18"  # 46  mov rdi, [rbx+24]            argv[2]: a cgroup.procs, or ""
    "803f00"  # 4a  cmp byte [rdi], 0
    "744a"  # 4d  je run
    "b802000000"  # 4f  mov eax, 2 (open)
    "be01000800"  # 54  mov esi, 0x80001 (O_WRONLY | O_CLOEXEC)
    "0f05"  # 59  syscall
    "4885c0"  # 5b  test rax, rax
    "785c"  # 5e  js cgroup_fail
    "89c7"  # 60  mov edi, eax
    "4881ec80000000"  # 62  sub rsp, 128                 a struct statfs
    "4889e6"  # 69  mov rsi, rsp
    "b88a000000"  # 6c  mov eax, 138 (fstatfs)
    "0f05"  # 71  syscall
    "4885c0"  # 73  test rax, rax
    "7544"  # 76  jnz cgroup_fail
    "48813c2470726763"  # 78  cmp qword [rsp], 0x63677270  f_type: CGROUP2_SUPER_MAGIC, or no write
    "753a"  # 80  jne cgroup_fail
    "6a30"  # 82  push '0'                     "0": the writer itself
    "4889e6"  # 84  mov rsi, rsp
    "ba01000000"  # 87  mov edx, 1
    "b801000000"  # 8c  mov eax, 1 (write)
    "0f05"  # 91  syscall
    "4883f801"  # 93  cmp rax, 1
    "7523"  # 97  jne cgroup_fail
    "488b7b20"  # 99  run: mov rdi, [rbx+32]       argv[3]: the program
    "488d7320"  # 9d  lea rsi, [rbx+32]            &argv[3]
    "488b03"  # a1  mov rax, [rbx]               argc
    "488d54c310"  # a4  lea rdx, [rbx+rax*8+16]      envp
    "b83b000000"  # a9  mov eax, 59 (execve)
    "0f05"  # ae  syscall
    "bf7f000000"  # b0  fail: mov edi, 127
    "b8e7000000"  # b5  mov eax, 231 (exit_group)
    "0f05"  # ba  syscall
    "b801000000"  # bc  cgroup_fail: mov eax, 1 (write)
    "bf02000000"  # c1  mov edi, 2 (stderr)
    "488d3509000000"  # c6  lea rsi, [rip+9]             message
    "ba27000000"  # cd  mov edx, 39
    "0f05"  # d2  syscall
    "ebda"  # d4  jmp fail
)
_TRAMPOLINE_CODE += b"fleet: cannot join the member's cgroup\n"  # d6  the message


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

# `fleet_spawn(args)`, called through ctypes (which releases the GIL) with a `_CloneArgs`:
# blocks every signal, clone3(CLONE_VM | CLONE_VFORK) onto `args.stack`, restores the mask
# and returns the pid or -errno; clone3 returns once the child has executed its program or
# exited. The child, in the parent's memory, on that stack and without libc:
# prctl(PR_SET_PDEATHSIG, SIGKILL); gives up (ESRCH) unless getppid() is the parent's pid;
# unless `args.procs` is NULL, opens that cgroup.procs and writes "0" to it (and says so in
# `args.cgroup_failed` when that fails); resets to SIG_DFL every signal with a handler (none
# may run in it: it shares the parent's memory) and SIGPIPE and SIGXFSZ (which Python
# ignores); dup2 stdin, stdout, stderr onto 0, 1, 2; setpgid(0, 0); empties its signal mask;
# execve. A step that fails leaves its errno in `args.error` and exits 127.
# (Assembled with GNU as from the listing in the comments, then objdump -d.)
_CLONE_SPAWN_CODE = bytes.fromhex(
    "53"  #   0  push rbx
    "4889fb"  #   1  mov rbx, rdi                 rbx -> the _CloneArgs, kept by the child
    "6aff"  #   4  push -1                      a full signal mask
    "b80e000000"  #   6  mov eax, 14 (rt_sigprocmask)
    "31ff"  #   b  xor edi, edi                 SIG_BLOCK
    "4889e6"  #   d  mov rsi, rsp
    "488d9390000000"  #  10  lea rdx, [rbx+144]           the mask to restore
    "41ba08000000"  #  17  mov r10d, 8
    "0f05"  #  1d  syscall
    "4889df"  #  1f  mov rdi, rbx                 struct clone_args
    "be58000000"  #  22  mov esi, 88
    "b8b3010000"  #  27  mov eax, 435 (clone3)
    "0f05"  #  2c  syscall
    "4885c0"  #  2e  test rax, rax
    "7424"  #  31  je child
    "4989c0"  #  33  mov r8, rax                  the parent: the pid, or -errno
    "b80e000000"  #  36  mov eax, 14 (rt_sigprocmask)
    "bf02000000"  #  3b  mov edi, 2                   SIG_SETMASK
    "488db390000000"  #  40  lea rsi, [rbx+144]
    "31d2"  #  47  xor edx, edx
    "41ba08000000"  #  49  mov r10d, 8
    "0f05"  #  4f  syscall
    "4c89c0"  #  51  mov rax, r8
    "59"  #  54  pop rcx
    "5b"  #  55  pop rbx
    "c3"  #  56  ret
    "b89d000000"  #  57  child: mov eax, 157 (prctl)  in the parent's memory, on its own stack
    "bf01000000"  #  5c  mov edi, 1                   PR_SET_PDEATHSIG
    "be09000000"  #  61  mov esi, 9                   SIGKILL
    "0f05"  #  66  syscall
    "4885c0"  #  68  test rax, rax
    "0f8536010000"  #  6b  jne fail
    "b86e000000"  #  71  mov eax, 110 (getppid)
    "0f05"  #  76  syscall
    "483b8388000000"  #  78  cmp rax, qword [rbx+136]     the parent's pid
    "48c7c0fdffffff"  #  7f  mov rax, -3                  ESRCH: the parent died before the prctl
    "0f851b010000"  #  86  jne fail
    "488bbba0000000"  #  8c  mov rdi, qword [rbx+160]     a cgroup.procs path, or NULL
    "4885ff"  #  93  test rdi, rdi
    "7446"  #  96  je joined
    "be01000800"  #  98  mov esi, 0x80001             O_WRONLY | O_CLOEXEC
    "b802000000"  #  9d  mov eax, 2 (open)
    "0f05"  #  a2  syscall
    "4885c0"  #  a4  test rax, rax
    "7825"  #  a7  js cgroup_failed
    "89c7"  #  a9  mov edi, eax
    "6a30"  #  ab  push 48                      "0": the writer itself
    "4889e6"  #  ad  mov rsi, rsp
    "ba01000000"  #  b0  mov edx, 1
    "b801000000"  #  b5  mov eax, 1 (write)
    "0f05"  #  ba  syscall
    "4883f801"  #  bc  cmp rax, 1
    "741c"  #  c0  je joined
    "4885c0"  #  c2  test rax, rax
    "7807"  #  c5  js cgroup_failed
    "48c7c0fbffffff"  #  c7  mov rax, -5                  EIO
    "48c783a800000001000000"  #  ce  cgroup_failed: mov qword [rbx+168], 1  the cgroup's fault
    "e9c9000000"  #  d9  jmp fail
    "4883ec40"  #  de  joined: sub rsp, 64          a sigaction read, and a SIG_DFL one
    "31c0"  #  e2  xor eax, eax
    "4889442420"  #  e4  mov qword [rsp+32], rax
    "4889442428"  #  e9  mov qword [rsp+40], rax
    "4889442430"  #  ee  mov qword [rsp+48], rax
    "4889442438"  #  f3  mov qword [rsp+56], rax
    "41bc01000000"  #  f8  mov r12d, 1
    "b80d000000"  #  fe  query: mov eax, 13 (rt_sigaction)
    "4489e7"  # 103  mov edi, r12d
    "31f6"  # 106  xor esi, esi
    "4889e2"  # 108  mov rdx, rsp
    "41ba08000000"  # 10b  mov r10d, 8
    "0f05"  # 111  syscall
    "4885c0"  # 113  test rax, rax
    "752a"  # 116  jne next
    "48833c2401"  # 118  cmp qword [rsp], 1           a handler (neither SIG_DFL nor SIG_IGN)
    "770c"  # 11d  ja reset
    "4183fc0d"  # 11f  cmp r12d, 13                 SIGPIPE, ignored by Python
    "7406"  # 123  je reset
    "4183fc19"  # 125  cmp r12d, 25                 SIGXFSZ, ignored by Python
    "7517"  # 129  jne next
    "b80d000000"  # 12b  reset: mov eax, 13 (rt_sigaction)
    "4489e7"  # 130  mov edi, r12d
    "488d742420"  # 133  lea rsi, [rsp+32]
    "31d2"  # 138  xor edx, edx
    "41ba08000000"  # 13a  mov r10d, 8
    "0f05"  # 140  syscall
    "41ffc4"  # 142  next: inc r12d
    "4183fc40"  # 145  cmp r12d, 64
    "76b3"  # 149  jbe query
    "4531e4"  # 14b  xor r12d, r12d
    "b821000000"  # 14e  dup: mov eax, 33 (dup2)      stdin, stdout, stderr onto 0, 1, 2
    "4a8b7ce370"  # 153  mov rdi, qword [rbx+r12*8+112]
    "4489e6"  # 158  mov esi, r12d
    "0f05"  # 15b  syscall
    "4885c0"  # 15d  test rax, rax
    "7845"  # 160  js fail
    "41ffc4"  # 162  inc r12d
    "4183fc03"  # 165  cmp r12d, 3
    "72e3"  # 169  jb dup
    "b86d000000"  # 16b  mov eax, 109 (setpgid)       (0, 0): a group of its own
    "31ff"  # 170  xor edi, edi
    "31f6"  # 172  xor esi, esi
    "0f05"  # 174  syscall
    "4885c0"  # 176  test rax, rax
    "752c"  # 179  jne fail
    "b80e000000"  # 17b  mov eax, 14 (rt_sigprocmask)
    "bf02000000"  # 180  mov edi, 2                   SIG_SETMASK: nothing blocked
    "488d742420"  # 185  lea rsi, [rsp+32]
    "31d2"  # 18a  xor edx, edx
    "41ba08000000"  # 18c  mov r10d, 8
    "0f05"  # 192  syscall
    "488b7b58"  # 194  mov rdi, qword [rbx+88]      the program
    "488b7360"  # 198  mov rsi, qword [rbx+96]      argv
    "488b5368"  # 19c  mov rdx, qword [rbx+104]     envp
    "b83b000000"  # 1a0  mov eax, 59 (execve)
    "0f05"  # 1a5  syscall
    "48f7d8"  # 1a7  fail: neg rax
    "48898398000000"  # 1aa  mov qword [rbx+152], rax     the errno, for the parent
    "bf7f000000"  # 1b1  mov edi, 127
    "b83c000000"  # 1b6  mov eax, 60 (exit)
    "0f05"  # 1bb  syscall
)
_CLONE_VM = 0x100
_CLONE_VFORK = 0x4000
_CHILD_STACK = 4096
"""The child pushes 72 bytes on it."""
_CLONE3_MISSING = (errno.ENOSYS, errno.E2BIG, errno.EPERM)
"""clone3 errors that say it cannot be used here (Linux before 5.7, a seccomp filter)."""


class _CloneArgs(ctypes.Structure):
    """struct clone_args (CLONE_ARGS_SIZE_VER2, 88 bytes), then what the child needs."""

    _fields_ = (
        *(
            (field, ctypes.c_uint64)
            for field in (
                "flags",
                "pidfd",
                "child_tid",
                "parent_tid",
                "exit_signal",
                "stack",
                "stack_size",
                "tls",
                "set_tid",
                "set_tid_size",
                "cgroup",
            )
        ),
        ("program", ctypes.c_char_p),
        ("argv", ctypes.c_void_p),
        ("envp", ctypes.c_void_p),
        ("stdin", ctypes.c_int64),
        ("stdout", ctypes.c_int64),
        ("stderr", ctypes.c_int64),
        ("parent", ctypes.c_int64),
        ("mask", ctypes.c_uint64),
        ("error", ctypes.c_int64),
        ("procs", ctypes.c_char_p),
        ("cgroup_failed", ctypes.c_int64),
    )


class _CloneUnavailable(Exception):
    """clone3 refused as such: spawn another way from now on."""


class _CloneSpawn:
    """Spawns as posix_spawn does, through `_CLONE_SPAWN_CODE` (see the module): the
    parent-death signal and the cgroup cost the child no second exec."""

    def __init__(self) -> None:
        """Raises OSError where executable memory cannot be had."""
        self._memory = mmap.mmap(-1, mmap.PAGESIZE)
        self._memory.write(_CLONE_SPAWN_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        if _libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC):
            code = ctypes.get_errno()
            raise OSError(code, f"mprotect: {os.strerror(code)}")
        self._call = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(address)

    def spawn(
        self,
        program: str,
        argv: list[str],
        env: dict[str, str],
        stdout: int,
        stderr: int,
        *,
        cgroup: str | None,
    ) -> int:
        """The child's pid; OSError as posix_spawn raises it (the program's exec failed, no
        such cgroup, ...); _CloneUnavailable when clone3 cannot be used here."""
        args = _CloneArgs()
        stack = ctypes.create_string_buffer(_CHILD_STACK)
        args.flags = _CLONE_VM | _CLONE_VFORK
        args.exit_signal = signal.SIGCHLD
        args.stack, args.stack_size = ctypes.addressof(stack), _CHILD_STACK
        args.program = os.fsencode(program)
        argv_array = _c_strings([_c_string(arg) for arg in argv])
        envp_array = _c_strings([_environment_entry(key, value) for key, value in env.items()])
        args.argv, args.envp = ctypes.addressof(argv_array), ctypes.addressof(envp_array)
        args.stdout, args.stderr, args.parent = stdout, stderr, os.getpid()
        args.stdin = _devnull()
        if cgroup:
            args.procs = os.fsencode(os.path.join(cgroup, PROCS_FILE))
        pid: int = self._call(ctypes.addressof(args))
        if pid < 0:
            if -pid in _CLONE3_MISSING:
                raise _CloneUnavailable(os.strerror(-pid))
            raise OSError(-pid, os.strerror(-pid))
        if args.error:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # as posix_spawn does (or the reaper, if it was first)
            if args.cgroup_failed:
                raise _cannot_join(args.error, cgroup)
            raise OSError(args.error, os.strerror(args.error), program)
        return pid


_per_thread = threading.local()


def _devnull() -> int:
    """/dev/null, opened once per thread, in its descriptor table (a spawning thread has one
    of its own): an open per spawn was a tenth of the spawning thread's CPU."""
    fd: int | None = getattr(_per_thread, "devnull", None)
    if fd is None:
        fd = _per_thread.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return fd


def _cannot_join(code: int, cgroup: str | None) -> OSError:
    return OSError(code, f"cannot join the member's cgroup: {os.strerror(code)}", cgroup)


def _c_string(text: str) -> bytes:
    """As os.fsencode, refusing what a C string cannot hold."""
    if "\0" in text:
        raise ValueError("embedded null byte")
    return text.encode(_FS_ENCODING, _FS_ERRORS)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


@functools.lru_cache(maxsize=128)
def _environment_entry(key: str, value: str) -> bytes:
    """`key=value`, checked as posix_spawn checks it; remembered, since most of every
    member's environment is the holder's own (encoding it was most of a spawn's Python)."""
    if not key or "=" in key:
        raise ValueError("illegal environment variable name")
    return _c_string(f"{key}={value}")


def _c_strings(items: list[bytes]) -> "ctypes.Array[ctypes.c_char_p]":
    """A NULL-terminated array of C strings (they stay alive as long as `items`)."""
    return (ctypes.c_char_p * (len(items) + 1))(*items)


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


class Spawner:
    """Spawns members through the cheapest trampoline this machine allows (see the module),
    from its spawning threads."""

    def __init__(self, threads: int = SPAWNING_THREADS) -> None:
        self._clone = _clone_spawn()
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
    ) -> None:
        """`spawn` on a spawning thread; `done(outcome)` is called on the running event loop's
        thread once it is known (at once where there is no spawning thread). The caller may
        close `stdout` and `stderr` when this returns: the thread holds copies."""
        threads = self._spawning_threads()
        if not threads:
            outcome: Outcome
            try:
                outcome = self.spawn(argv, env, cwd, stdout, stderr, cgroup=cgroup)
            except Exception as exc:
                outcome = exc
            done(outcome)
            return
        thread = threads[self._turn % len(threads)]
        self._turn += 1
        job = _Job(argv, env, cwd, cgroup, done)
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
    ) -> Child:
        """Start `argv` in its own process group with stdin from /dev/null, the given output
        descriptors, SIGKILL as its parent-death signal, and in the `cgroup` directory when
        given (see the module). Raises OSError (no such program, no such directory, not
        executable) with the OS error. The child dies when the calling thread exits."""
        procs = os.path.join(cgroup, PROCS_FILE) if cgroup else ""
        with _working_directory(cwd):
            program = _resolve_program(argv[0], env.get("PATH", os.defpath))
            if self._clone is not None:
                try:
                    return Child(
                        self._clone.spawn(program, argv, env, stdout, stderr, cgroup=cgroup)
                    )
                except _CloneUnavailable as exc:
                    log.info("clone3_unused", reason=str(exc))
                    self._clone = None
            trampoline = self._trampoline
            if trampoline is not None:
                try:
                    command = [trampoline, str(os.getpid()), procs, program, *argv[1:]]
                    return Child(_posix_spawn(command, env, stdout, stderr))
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOEXEC):
                        raise
                    self._trampoline = None  # memfds may not be executed here
            if _SETPRIV is not None:
                command = [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]]
                child = Child(_posix_spawn(command, env, stdout, stderr))
                if cgroup:
                    _move_tree(child.pid, Cgroup(cgroup))
                return child
            return _spawn_with_preexec([program, *argv[1:]], env, stdout, stderr, procs)


@dataclass(slots=True)
class _Job:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    cgroup: str | None
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
                job.argv, job.env, job.cwd, fds[0], fds[-1], cgroup=job.cgroup
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


def _clone_spawn() -> "_CloneSpawn | None":
    """The in-process spawn, where this machine can run it (see the module)."""
    if os.uname().machine != "x86_64":
        return None
    try:
        return _CloneSpawn()
    except OSError as exc:
        log.info("clone3_unused", reason=str(exc))
        return None


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
    os.chdir(cwd)
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


def _spawn_with_preexec(
    argv: list[str], env: dict[str, str], stdout: int, stderr: int, procs: str
) -> Child:
    holder = os.getpid()

    def die_with_holder() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the holder blocks SIGCHLD
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != holder:  # the holder died before the prctl: nobody would signal us
            os._exit(1)
        if procs:
            try:
                with open(procs, "w") as f:
                    f.write("0")
            except OSError:
                os.write(2, b"fleet: cannot join the member's cgroup\n")
                os._exit(127)

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

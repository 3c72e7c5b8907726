"""Starting a member's process so that it dies with its holder, in its cgroup when it has one.

A member gets SIGKILL as its parent-death signal, so a holder that dies (SIGKILL included)
takes its members along. posix_spawn cannot set it, and forking the interpreter to run a
preexec hook costs milliseconds per member, so, cheapest first:

- on x86-64, `_CLONE_SPAWN_CODE`: posix_spawn's own way (clone3 with CLONE_VM | CLONE_VFORK:
  no copy of the holder's memory, the caller waits until the child executed its program),
  with the child's steps (its cgroup, its `Setup`, the prctl, descriptors, signals) as
  machine code in this process, called through ctypes: no second exec. Where clone3 or
  executable memory is refused, the child executes a trampoline that takes those steps and
  then executes the member's program:
- `TRAMPOLINE`, a 703-byte static executable held in a memfd: no dynamic loader, no
  libraries, but a second exec per member (with its cgroup write, about a fifth of the CPU a
  `sleep` member cost to start);
- elsewhere (or where memfds may not be executed), `setpriv --pdeathsig KILL`, which costs a
  second full exec per member (starting 1,000 members took twice as long through it) and,
  unlike the trampoline, does not check that its parent is still there after the prctl: a
  holder killed in the microseconds before it leaves that member behind;
- without setpriv, a fork with a preexec hook.

A member's `Setup` (its resource limits, and its user when it has one) is applied in the same
place, before the exec: the clone3 child and the trampoline call prlimit64 per limit, then
setgroups, setresgid and setresuid, and only then set the parent-death signal, which a change
of user clears. setpriv loses the signal that way (it sets it before it changes user), so a
member with a user is spawned through the preexec hook where there is no trampoline; setpriv's
members get their limits from the holder right after the spawn (prlimit), which races the
program's first instructions as the cgroup move does.

A member with a cgroup (fleetd.core.cgroups) must be in it before its program runs its first
instruction, or a child it forks at once would start outside. The clone3 child is born in it
(CLONE_INTO_CGROUP) while it is one the holder made and never killed (`Cgroup.born_into`: a
member's first start, and restarts until its processes outlived it once); otherwise it, the
trampoline and the preexec hook move the process there themselves, writing "0" to the cgroup's
`cgroup.procs` before the exec (the move, which takes the kernel's cgroup locks, is then the
child's cost, not the holder's event loop's): a program never runs outside its cgroup. That
write waits for an RCU grace period (6-9 ms here), which a CLONE_VFORK parent thread waits
through too; a birth costs nothing of the kind, but Linux 6.18 SIGKILLs at birth a child born
into a cgroup that cgroup.kill emptied, so such a cgroup is joined by the write; a child killed
at birth all the same (the kernel compares the cgroup's kills with the spawner's own cgroup's:
a holder in a cgroup that was killed once, or a kill of the cgroup above the member's) is
spawned again that way, and births stop for good. setpriv cannot, so the holder moves that
child right after posix_spawn returns, then anything it forked meanwhile. That path races: a
move may wait for an RCU grace period (milliseconds), and a child the program forks and that
exits within it ran outside (one that lives on is moved).

Spawns run on two spawning threads (`Spawner.spawn_soon`), so that two members start at once
on two cores while the event loop goes on with the rest (a spawn releases the GIL while
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
import functools
import mmap
import os
import queue
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from fleetd.core.cgroups import Cgroup
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


# `fleet_spawn(args)`, called through ctypes (which releases the GIL) with a `_CloneArgs`:
# blocks every signal, clone3 onto `args.stack` (CLONE_VM | CLONE_VFORK, and CLONE_INTO_CGROUP
# when the child is born into its cgroup), restores the mask and returns the pid or -errno;
# clone3 returns once the child has executed its program or exited. The child, in the
# parent's memory, on that stack and without libc: says it was born (`args.born`: one that
# CLONE_INTO_CGROUP SIGKILLs at birth never runs); unless `args.procs` is NULL, opens that
# cgroup.procs and writes "0" to it; then the trampoline's steps in its order: prlimit64 per
# `args.limits` entry, setgroups, setresgid and setresuid when `args.group_count` is not 0,
# prctl(PR_SET_PDEATHSIG, SIGKILL); gives up (ESRCH) unless getppid() is the parent's pid;
# resets to SIG_DFL every signal with a handler (none may run in it: it shares the parent's
# memory) and SIGPIPE and SIGXFSZ (which Python ignores); dup2 stdin, stdout, stderr onto 0,
# 1, 2; setpgid(0, 0); empties its signal mask; execve. A step that fails leaves its errno in
# `args.error` (and which step, when the cgroup, a limit or the user, in `args.failed`) and
# exits 127.
# (Assembled with GNU as from the listing in the comments, then objdump -d.)
_CLONE_SPAWN_CODE = bytes.fromhex(
    "53"  #   0  spawn: push rbx
    "4889fb"  #   1  mov rbx, rdi                  rbx -> the _CloneArgs
    "6aff"  #   4  push -1                       a full signal mask
    "b80e000000"  #   6  mov eax, 14                   rt_sigprocmask
    "31ff"  #   b  xor edi, edi                  SIG_BLOCK
    "4889e6"  #   d  mov rsi, rsp
    "488d9390000000"  #  10  lea rdx, [rbx+144]            the mask to restore
    "41ba08000000"  #  17  mov r10d, 8
    "0f05"  #  1d  syscall
    "4889df"  #  1f  mov rdi, rbx                  struct clone_args
    "be58000000"  #  22  mov esi, 88
    "b8b3010000"  #  27  mov eax, 435                  clone3
    "0f05"  #  2c  syscall
    "4885c0"  #  2e  test rax, rax
    "7424"  #  31  je child
    "4989c0"  #  33  mov r8, rax                   the parent: the pid, or -errno
    "b80e000000"  #  36  mov eax, 14                   rt_sigprocmask
    "bf02000000"  #  3b  mov edi, 2                    SIG_SETMASK
    "488db390000000"  #  40  lea rsi, [rbx+144]
    "31d2"  #  47  xor edx, edx
    "41ba08000000"  #  49  mov r10d, 8
    "0f05"  #  4f  syscall
    "4c89c0"  #  51  mov rax, r8
    "59"  #  54  pop rcx
    "5b"  #  55  pop rbx
    "c3"  #  56  ret
    "48c783e000000001000000"  #  57  child: mov qword [rbx+224], 1  born (unless killed at birth)
    "488bbba0000000"  #  62  mov rdi, qword [rbx+160]      a cgroup.procs path, or NULL
    "4885ff"  #  69  test rdi, rdi
    "7446"  #  6c  je limits
    "be01000800"  #  6e  mov esi, 0x80001              O_WRONLY | O_CLOEXEC
    "b802000000"  #  73  mov eax, 2                    open
    "0f05"  #  78  syscall
    "4885c0"  #  7a  test rax, rax
    "7825"  #  7d  js cgroup_failed
    "89c7"  #  7f  mov edi, eax
    "6a30"  #  81  push 48                       "0": the writer itself
    "4889e6"  #  83  mov rsi, rsp
    "ba01000000"  #  86  mov edx, 1
    "b801000000"  #  8b  mov eax, 1                    write
    "0f05"  #  90  syscall
    "4883f801"  #  92  cmp rax, 1
    "741c"  #  96  je limits
    "4885c0"  #  98  test rax, rax
    "7807"  #  9b  js cgroup_failed
    "48c7c0fbffffff"  #  9d  mov rax, -5                   EIO
    "48c783a800000001000000"  #  a4  cgroup_failed: mov qword [rbx+168], 1  failed: the cgroup
    "e9a5010000"  #  af  jmp fail
    "4c8ba3b0000000"  #  b4  limits: mov r12, qword [rbx+176]  -> {resource, soft, hard}...
    "4c8babb8000000"  #  bb  mov r13, qword [rbx+184]      how many
    "4d85ed"  #  c2  limit: test r13, r13
    "7433"  #  c5  je user
    "b82e010000"  #  c7  mov eax, 302                  prlimit64
    "31ff"  #  cc  xor edi, edi                  pid 0: this process
    "498b3424"  #  ce  mov rsi, qword [r12]
    "498d542408"  #  d2  lea rdx, [r12+8]              struct rlimit64 {soft, hard}
    "4531d2"  #  d7  xor r10d, r10d                no old limits
    "0f05"  #  da  syscall
    "4885c0"  #  dc  test rax, rax
    "7509"  #  df  jne limits_failed
    "4983c418"  #  e1  add r12, 24
    "49ffcd"  #  e5  dec r13
    "ebd8"  #  e8  jmp limit
    "48c783a800000002000000"  #  ea  limits_failed: mov qword [rbx+168], 2  failed: a limit
    "e95f010000"  #  f5  jmp fail
    "488bbbc8000000"  #  fa  user: mov rdi, qword [rbx+200]  groups; 0: the same user
    "4885ff"  # 101  test rdi, rdi
    "7455"  # 104  je pdeathsig
    "488bb3c0000000"  # 106  mov rsi, qword [rbx+192]      the groups, as gid_t
    "b874000000"  # 10d  mov eax, 116                  setgroups
    "0f05"  # 112  syscall
    "4885c0"  # 114  test rax, rax
    "7532"  # 117  jne user_failed
    "488bbbd8000000"  # 119  mov rdi, qword [rbx+216]      the gid
    "4889fe"  # 120  mov rsi, rdi
    "4889fa"  # 123  mov rdx, rdi
    "b877000000"  # 126  mov eax, 119                  setresgid
    "0f05"  # 12b  syscall
    "4885c0"  # 12d  test rax, rax
    "7519"  # 130  jne user_failed
    "488bbbd0000000"  # 132  mov rdi, qword [rbx+208]      the uid
    "4889fe"  # 139  mov rsi, rdi
    "4889fa"  # 13c  mov rdx, rdi
    "b875000000"  # 13f  mov eax, 117                  setresuid
    "0f05"  # 144  syscall
    "4885c0"  # 146  test rax, rax
    "7410"  # 149  je pdeathsig
    "48c783a800000003000000"  # 14b  user_failed: mov qword [rbx+168], 3  failed: the user
    "e9fe000000"  # 156  jmp fail
    "b89d000000"  # 15b  pdeathsig: mov eax, 157       prctl (a change of user clears it)
    "bf01000000"  # 160  mov edi, 1                    PR_SET_PDEATHSIG
    "be09000000"  # 165  mov esi, 9                    SIGKILL
    "0f05"  # 16a  syscall
    "4885c0"  # 16c  test rax, rax
    "0f85e4000000"  # 16f  jne fail
    "b86e000000"  # 175  mov eax, 110                  getppid
    "0f05"  # 17a  syscall
    "483b8388000000"  # 17c  cmp rax, qword [rbx+136]      the parent's pid
    "48c7c0fdffffff"  # 183  mov rax, -3                   ESRCH: the parent died before
    "0f85c9000000"  # 18a  jne fail
    "4883ec40"  # 190  sub rsp, 64                   a sigaction read, a SIG_DFL one
    "31c0"  # 194  xor eax, eax
    "4889442420"  # 196  mov qword [rsp+32], rax
    "4889442428"  # 19b  mov qword [rsp+40], rax
    "4889442430"  # 1a0  mov qword [rsp+48], rax
    "4889442438"  # 1a5  mov qword [rsp+56], rax
    "41bc01000000"  # 1aa  mov r12d, 1
    "b80d000000"  # 1b0  query: mov eax, 13            rt_sigaction
    "4489e7"  # 1b5  mov edi, r12d
    "31f6"  # 1b8  xor esi, esi
    "4889e2"  # 1ba  mov rdx, rsp
    "41ba08000000"  # 1bd  mov r10d, 8
    "0f05"  # 1c3  syscall
    "4885c0"  # 1c5  test rax, rax
    "752a"  # 1c8  jne next
    "48833c2401"  # 1ca  cmp qword [rsp], 1            a handler (not DFL/IGN)
    "770c"  # 1cf  ja reset
    "4183fc0d"  # 1d1  cmp r12d, 13                  SIGPIPE, ignored by Python
    "7406"  # 1d5  je reset
    "4183fc19"  # 1d7  cmp r12d, 25                  SIGXFSZ, ignored by Python
    "7517"  # 1db  jne next
    "b80d000000"  # 1dd  reset: mov eax, 13            rt_sigaction
    "4489e7"  # 1e2  mov edi, r12d
    "488d742420"  # 1e5  lea rsi, [rsp+32]
    "31d2"  # 1ea  xor edx, edx
    "41ba08000000"  # 1ec  mov r10d, 8
    "0f05"  # 1f2  syscall
    "41ffc4"  # 1f4  next: inc r12d
    "4183fc40"  # 1f7  cmp r12d, 64
    "76b3"  # 1fb  jbe query
    "4531e4"  # 1fd  xor r12d, r12d
    "b821000000"  # 200  dup: mov eax, 33              dup2: stdin, stdout, stderr -> 0, 1, 2
    "4a8b7ce370"  # 205  mov rdi, qword [rbx+r12*8+112]
    "4489e6"  # 20a  mov esi, r12d
    "0f05"  # 20d  syscall
    "4885c0"  # 20f  test rax, rax
    "7845"  # 212  js fail
    "41ffc4"  # 214  inc r12d
    "4183fc03"  # 217  cmp r12d, 3
    "72e3"  # 21b  jb dup
    "b86d000000"  # 21d  mov eax, 109                  setpgid (0, 0): a group of its own
    "31ff"  # 222  xor edi, edi
    "31f6"  # 224  xor esi, esi
    "0f05"  # 226  syscall
    "4885c0"  # 228  test rax, rax
    "752c"  # 22b  jne fail
    "b80e000000"  # 22d  mov eax, 14                   rt_sigprocmask
    "bf02000000"  # 232  mov edi, 2                    SIG_SETMASK: nothing blocked
    "488d742420"  # 237  lea rsi, [rsp+32]
    "31d2"  # 23c  xor edx, edx
    "41ba08000000"  # 23e  mov r10d, 8
    "0f05"  # 244  syscall
    "488b7b58"  # 246  mov rdi, qword [rbx+88]       the program
    "488b7360"  # 24a  mov rsi, qword [rbx+96]       argv
    "488b5368"  # 24e  mov rdx, qword [rbx+104]      envp
    "b83b000000"  # 252  mov eax, 59                   execve
    "0f05"  # 257  syscall
    "48f7d8"  # 259  fail: neg rax
    "48898398000000"  # 25c  mov qword [rbx+152], rax      the errno, for the parent
    "bf7f000000"  # 263  mov edi, 127
    "b83c000000"  # 268  mov eax, 60                   exit
    "0f05"  # 26d  syscall
)
_CLONE_VM = 0x100
_CLONE_VFORK = 0x4000
_CLONE_INTO_CGROUP = 0x200000000
_CHILD_STACK = 4096
"""The child pushes 72 bytes on it."""
_CLONE3_MISSING = (errno.ENOSYS, errno.E2BIG, errno.EPERM)
"""clone3 errors that say it cannot be used here (Linux before 5.7, a seccomp filter)."""
_CGROUP_STEP, _LIMITS_STEP, _USER_STEP = 1, 2, 3
"""`_CloneArgs.failed`: the step of the child that failed."""


class _CloneArgs(ctypes.Structure):
    """struct clone_args (CLONE_ARGS_SIZE_VER2, 88 bytes), then what the child needs (the
    offsets in _CLONE_SPAWN_CODE)."""

    _fields_ = (
        *(
            (name, ctypes.c_uint64)
            for name in (
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
        ("program", ctypes.c_char_p),  # 88
        ("argv", ctypes.c_void_p),
        ("envp", ctypes.c_void_p),
        ("stdin", ctypes.c_int64),  # 112
        ("stdout", ctypes.c_int64),
        ("stderr", ctypes.c_int64),
        ("parent", ctypes.c_int64),  # 136
        ("mask", ctypes.c_uint64),
        ("error", ctypes.c_int64),  # 152
        ("procs", ctypes.c_char_p),
        ("failed", ctypes.c_int64),  # 168
        ("limits", ctypes.c_void_p),
        ("limit_count", ctypes.c_uint64),
        ("groups", ctypes.c_void_p),  # 192
        ("group_count", ctypes.c_uint64),
        ("uid", ctypes.c_uint64),
        ("gid", ctypes.c_uint64),  # 216
        ("born", ctypes.c_int64),
    )


class _CloneUnavailable(Exception):
    """clone3 refused as such: spawn another way from now on."""


class _CloneSpawn:
    """Spawns as posix_spawn does, through `_CLONE_SPAWN_CODE` (see the module): the
    parent-death signal, the cgroup and the member's setup cost the child no second exec."""

    def __init__(self) -> None:
        """Raises OSError where executable memory cannot be had."""
        self._memory = mmap.mmap(-1, mmap.PAGESIZE)
        self._memory.write(_CLONE_SPAWN_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        if _libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC):
            code = ctypes.get_errno()
            raise OSError(code, f"mprotect: {os.strerror(code)}")
        self._call = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(address)
        self._births = True
        """Whether children may be born into their cgroups at all: Linux 6.18 compares the
        target's count of cgroup.kill writes with that of the *spawner's* cgroup, so where a
        holder lives in a cgroup that was killed once, every birth into a fresh one is killed
        too. The first refused birth turns them off."""

    def spawn(
        self,
        program: str,
        argv: list[str],
        env: dict[str, str],
        stdout: int,
        stderr: int,
        *,
        cgroup: Cgroup | None,
        setup: Setup,
    ) -> int:
        """The child's pid; OSError as posix_spawn raises it (the program's exec failed, no
        such cgroup, a limit or user refused); _CloneUnavailable when clone3 cannot be used
        here. A child is born into its cgroup while `cgroup.born_into` allows; one killed at
        birth there says the kernel would not have it so (see `Cgroup.born_into` and
        `_births`): the cgroup is joined by a write, beginning with this spawn's second try."""
        argv_array = _c_strings([_c_string(arg) for arg in argv])
        envp_array = _c_strings([_environment_entry(key, value) for key, value in env.items()])
        limits, groups = _setup_arrays(setup)
        while True:
            args = _CloneArgs()
            stack = ctypes.create_string_buffer(_CHILD_STACK)
            args.flags = _CLONE_VM | _CLONE_VFORK
            args.exit_signal = signal.SIGCHLD
            args.stack, args.stack_size = ctypes.addressof(stack), _CHILD_STACK
            args.program = os.fsencode(program)
            args.argv, args.envp = ctypes.addressof(argv_array), ctypes.addressof(envp_array)
            args.stdout, args.stderr, args.parent = stdout, stderr, os.getpid()
            args.stdin = _devnull()
            args.limits, args.limit_count = ctypes.addressof(limits), len(setup.limits)
            if setup.credentials is not None:
                args.groups, args.group_count = ctypes.addressof(groups), len(groups)
                args.uid, args.gid = setup.credentials.uid, setup.credentials.gid
            born_into = self._births and cgroup is not None and cgroup.born_into
            if cgroup is not None and born_into:
                try:
                    args.cgroup = os.open(cgroup.path, _CGROUP_DIRECTORY)
                except OSError as exc:
                    raise _cannot_join(exc.errno, cgroup.path) from None
                args.flags |= _CLONE_INTO_CGROUP
            elif cgroup is not None:
                args.procs = os.fsencode(cgroup.procs_file)
            try:
                pid: int = self._call(ctypes.addressof(args))
            finally:
                if born_into:
                    os.close(args.cgroup)
            if born_into and (pid < 0 or not args.born):
                assert cgroup is not None
                self._refused_birth(cgroup, pid)
                continue
            return self._outcome(pid, args, program, cgroup)

    def _refused_birth(self, cgroup: Cgroup, pid: int) -> None:
        """clone3 would not give `cgroup` a child: an error (this cgroup is joined by a write
        from now on), or the child killed at birth (every cgroup is: see `_births`)."""
        cgroup.born_into = False
        if pid < 0:
            log.info("cgroup_birth_refused", cgroup=cgroup.path, error=os.strerror(-pid))
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # (or the reaper, if it was first)
        self._births = False
        log.warning("cgroup_births_killed", cgroup=cgroup.path)

    def _outcome(self, pid: int, args: _CloneArgs, program: str, cgroup: Cgroup | None) -> int:
        if pid < 0:
            if -pid in _CLONE3_MISSING:
                raise _CloneUnavailable(os.strerror(-pid))
            raise OSError(-pid, os.strerror(-pid))
        if args.error:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # as posix_spawn does (or the reaper, if it was first)
            if args.failed == _CGROUP_STEP:
                raise _cannot_join(args.error, cgroup.path if cgroup else None)
            why = os.strerror(args.error)
            if args.failed == _LIMITS_STEP:
                raise OSError(args.error, f"cannot set the member's limits: {why}")
            if args.failed == _USER_STEP:
                raise OSError(args.error, f"cannot run as the member's user: {why}")
            raise OSError(args.error, os.strerror(args.error), program)
        return pid


_CGROUP_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


_per_thread = threading.local()


def _devnull() -> int:
    """/dev/null, opened once per thread, in its descriptor table (a spawning thread has one
    of its own): an open per spawn was a tenth of the spawning thread's CPU."""
    fd: int | None = getattr(_per_thread, "devnull", None)
    if fd is None:
        fd = _per_thread.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return fd


def _cannot_join(code: int | None, cgroup: str | None) -> OSError:
    code = code or errno.EIO
    return OSError(code, f"cannot join the member's cgroup: {os.strerror(code)}", cgroup)


@functools.lru_cache(maxsize=64)
def _setup_arrays(
    setup: Setup,
) -> "tuple[ctypes.Array[ctypes.c_uint64], ctypes.Array[ctypes.c_uint32]]":
    """The child's limits ({resource, soft, hard} each) and groups as C arrays, made once per
    Setup (every member has one, an open-file limit at least; most share it)."""
    limits = [value % 2**64 for limit in setup.limits for value in limit]
    groups = setup.credentials.groups if setup.credentials is not None else ()
    return (ctypes.c_uint64 * len(limits))(*limits), (ctypes.c_uint32 * len(groups))(*groups)


def _c_string(text: str) -> bytes:
    """As os.fsencode, refusing what a C string cannot hold."""
    if "\0" in text:
        raise ValueError("embedded null byte")
    return text.encode(_FS_ENCODING, _FS_ERRORS)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


REMEMBERED_VALUE = 256
"""Characters of the longest environment value whose entry is remembered: a longer one is
most likely a member's own (FLEET_PEERS lists every other member: 6 KB each in a cluster of
1,000), which a cache would keep 128 copies of, never to be used again."""


def _environment_entry(key: str, value: str) -> bytes:
    """`key=value`, checked as posix_spawn checks it; remembered when short, since most of
    every member's environment is the holder's own (encoding it was most of a spawn's Python)."""
    if len(value) > REMEMBERED_VALUE:
        return _checked_entry(key, value)
    return _remembered_entry(key, value)


def _checked_entry(key: str, value: str) -> bytes:
    if not key or "=" in key:
        raise ValueError("illegal environment variable name")
    return _c_string(f"{key}={value}")


_remembered_entry = functools.lru_cache(maxsize=128)(_checked_entry)


def _c_strings(items: list[bytes]) -> "ctypes.Array[ctypes.c_char_p]":
    """A NULL-terminated array of C strings (they stay alive as long as `items`)."""
    return (ctypes.c_char_p * (len(items) + 1))(*items)


def _clone_spawn() -> "_CloneSpawn | None":
    """The in-process spawn, where this machine can run it (see the module)."""
    if os.uname().machine != "x86_64":
        return None
    try:
        return _CloneSpawn()
    except OSError as exc:
        log.info("clone3_unused", reason=str(exc))
        return None


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
        cgroup: Cgroup | None = None,
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
        cgroup: Cgroup | None = None,
        setup: Setup = NO_SETUP,
    ) -> Child:
        """Start `argv` in its own process group with stdin from /dev/null, the given output
        descriptors, SIGKILL as its parent-death signal, in `cgroup` when given, with `setup`
        applied (see the module). Raises OSError (no such program, no such directory, not
        executable) with the OS error. The child dies when the calling thread exits."""
        procs = cgroup.procs_file if cgroup else ""
        if setup.credentials is not None:
            _give_output(setup.credentials, stdout, stderr)
        with _working_directory(cwd):
            program = _resolve_program(argv[0], env.get("PATH", os.defpath))
            if self._clone is not None:
                try:
                    return Child(
                        self._clone.spawn(
                            program, argv, env, stdout, stderr, cgroup=cgroup, setup=setup
                        )
                    )
                except _CloneUnavailable as exc:
                    log.info("clone3_unused", reason=str(exc))
                    self._clone = None
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
                    _move_tree(child.pid, cgroup)
                return child
            return _spawn_with_preexec(
                [program, *argv[1:]], env, stdout, stderr, procs, setup=setup
            )


@dataclass(slots=True)
class _Job:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    cgroup: Cgroup | None
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

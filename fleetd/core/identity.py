"""Who a process is, from the kernel's word: /proc and pidfds, never what a client claims.

A PID alone names a process only while it lives; the kernel reuses it afterwards. The pair
(PID, start time) within one boot does name one process for good, so that is what a lease
records and what is checked again before anything is signalled. Signals go through a pidfd
opened *before* the start time is re-read, so the process checked is the process signalled.
"""

import os
import signal
import socket
from dataclasses import dataclass
from functools import cache

import anyio

from protocol.leases import Identity

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class ProcessGone(Exception):
    """The process does not exist (or is a zombie, which is the same for our purposes)."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat fleet needs."""

    state: str
    ppid: int
    group: int
    start_time: int


@cache
def boot_id() -> str:
    with open(BOOT_ID_PATH) as f:
        return f.read().strip()


@cache
def host() -> str:
    return socket.gethostname()


def proc_stat(pid: int) -> ProcStat:
    """Raises ProcessGone when there is no such live process. The command name (field 2) may
    hold spaces and parentheses, so fields are counted from its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    fields = data.rsplit(b")", 1)[1].split()
    state = fields[0].decode()
    if state in ("Z", "X"):
        raise ProcessGone(pid)
    return ProcStat(
        state=state, ppid=int(fields[1]), group=int(fields[2]), start_time=int(fields[19])
    )


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot."""
    return proc_stat(pid).start_time


def uids(pid: int) -> tuple[int, int]:
    """The real and saved user ids of a process: whom kill(2) checks a sender against."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, _effective, saved, _fs = line.split()[1:5]
                    return int(real), int(saved)
    except (FileNotFoundError, ProcessLookupError):
        pass
    raise ProcessGone(pid)


def identify(pid: int, uid: int | None = None) -> Identity:
    """The identity of a live local process; raises ProcessGone. `uid`, when the caller has it
    from the kernel already (SO_PEERCRED), saves reading /proc/PID/status."""
    started = start_time(pid)
    return Identity(
        host=host(),
        boot_id=boot_id(),
        pid=pid,
        start_time=started,
        uid=uids(pid)[0] if uid is None else uid,
    )


def is_ancestor_or_self(candidate: int, pid: int) -> bool:
    """Whether `candidate` is `pid` or one of its ancestors, walking parent links in /proc."""
    seen = 0
    while pid > 0 and seen < 4096:
        if pid == candidate:
            return True
        try:
            pid = proc_stat(pid).ppid
        except ProcessGone:
            return False
        seen += 1
    return False


def children(pid: int) -> list[int]:
    """The children of `pid` (of every thread of it) as /proc lists them now; none once it is
    gone. Only a parent's own children keep their pids until it reaps them: check any other
    before signalling it (a pidfd first, then its parent)."""
    if not _PROC_CHILDREN:
        return _children_by_scan(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found += map(int, f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
    return found


_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")
"""Kernels built without CONFIG_PROC_CHILDREN list no children: then every process is read."""


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if proc_stat(int(entry)).ppid == pid:
                    found.append(int(entry))
            except (ProcessGone, OSError):
                continue
    return found


def is_local(identity: Identity) -> bool:
    return identity.host == host() and identity.boot_id == boot_id()


def is_alive(identity: Identity) -> bool:
    """Whether the process `identity` names still runs. A process on another host cannot be
    checked from here and counts as alive: its lease's TTL decides for it."""
    if identity.host != host():
        return True
    if identity.boot_id != boot_id():
        return False
    try:
        return start_time(identity.pid) == identity.start_time
    except ProcessGone:
        return False


def may_signal(sender_uid: int, target_pid: int) -> bool:
    """kill(2)'s rule for an unprivileged sender: its uid is the target's real or saved uid."""
    if sender_uid == 0:
        return True
    try:
        return sender_uid in uids(target_pid)
    except ProcessGone:
        return False


async def fence(identity: Identity, caller_uid: int, grace: float) -> str:
    """STONITH: end the process `identity` names, if it is still that process and the caller
    (and fleetd) may signal it: SIGTERM (with SIGCONT, so that a stopped process can act on it),
    then SIGKILL after `grace` seconds. Returns what happened, as LeaseResult.fence reports it.
    """
    if not is_local(identity):
        return "other_host" if identity.host != host() else "gone"
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return "gone"
    try:
        try:
            if start_time(identity.pid) != identity.start_time:
                return "pid_reused"
        except ProcessGone:
            return "gone"
        if not (may_signal(caller_uid, identity.pid) and may_signal(os.geteuid(), identity.pid)):
            return "not_permitted"
        return await _terminate(pidfd, grace)
    finally:
        os.close(pidfd)


async def _terminate(pidfd: int, grace: float) -> str:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        signal.pidfd_send_signal(pidfd, signal.SIGCONT)
    except ProcessLookupError:
        return "gone"
    if await _exited(pidfd, grace):
        return "terminated"
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return "terminated"
    return "killed" if await _exited(pidfd, grace) else "survived"


async def _exited(pidfd: int, timeout: float) -> bool:
    """A pidfd polls readable once its process has exited: no polling loop, no PID race."""
    with anyio.move_on_after(timeout):
        await anyio.wait_readable(pidfd)
        return True
    return False

"""A member's descendants: every process its program started, wherever it went, ended with it.

A stop signals the member's process group, and the member's exit kills that group; a process
that left the group (setsid, a daemon's double fork) escapes both, and once its parent exits it
is re-parented to the holder (a child subreaper). The holder finds a member's processes one of
two ways:

- its own cgroup (fleetd.core.cgroups), where cgroup v2 is writable: the member starts in it
  (fleetd.holder.spawn) and everything it starts stays in it, whatever it does; `cgroup.kill` ends
  them all at once and `cgroup.events` says when none is left. The cgroups outlive a holder
  killed by SIGKILL, and fleetd ends what is in them (fleetd.clusters.follow).
- elsewhere, /proc: the descendants of the member's main process by their children links, and
  the orphans the holder adopted, attributed by the environment every process of a member
  inherits (FLEET_HOLDER, this holder's token, and FLEET_MEMBER). An orphan that cleared or
  replaced that environment cannot be attributed: it is ended when the holder exits. And a
  holder killed by SIGKILL takes only its members' main processes along (their parent-death
  signal): what they started, in another session, outlives it.

When a member is stopped, its stop signal (then SIGCONT, so that a stopped process can act on
it) goes to every process of the member at once, as systemd's KillMode=control-group sends
it: the group, and the others directly. Everything left after stop_timeout gets SIGKILL. When
the main process exits by itself (a crash, the end of a run), whatever it leaves is killed at
once, before any restart: a member's main process is the member, as for a systemd service of
Type=simple. A member must therefore not daemonize.

Signals go through pidfds, each checked once it is open (still the child of the process it was
found under, or still in the member's cgroup): a recycled pid is never signalled. /proc is read
once per stop or exit, never per request; a holder tearing down reads its orphans once for all
its members (`Lineage.freeze`), and ends every process left when its last member is gone
(`Lineage.end_all`).
"""

import os
import select
import signal
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import anyio
import structlog

from fleetd.core import identity
from fleetd.core.cgroups import MEMBER_SUFFIX, Cgroup, holder_cgroup_name, holder_of, own_directory

log = structlog.get_logger("fleetd.descendants")

HOLDER_ENV = "FLEET_HOLDER"
"""In every member's environment: its holder's token, `PID-START` (unique per process)."""
CGROUPS_ENV = "FLEET_CGROUPS"
"""`off` keeps a holder from making cgroups (it then goes by /proc alone)."""
END_GRACE = 2.0
"""Seconds that processes sent SIGKILL get to be gone before they count as lingering."""


# --- processes, by pidfd ----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Process:
    """A process held by a pidfd, checked to be the one it was found as."""

    pid: int
    start_time: int
    group: int
    pidfd: int

    @classmethod
    def open(
        cls, pid: int, *, parent: int | None = None, cgroup: Cgroup | None = None
    ) -> "Process | None":
        """A pidfd of `pid` if, once it is open, the process lives and is still the child of
        `parent` (whose pid the caller knows to be its own: alive, or a child of ours) or still
        in `cgroup`; else None."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            stat = identity.proc_stat(pid)
            if (parent is None or stat.ppid == parent) and (cgroup is None or cgroup.holds(pid)):
                return cls(pid, stat.start_time, stat.group, pidfd)
        except (identity.ProcessGone, OSError):
            pass
        os.close(pidfd)
        return None

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start_time

    def send(self, signum: int) -> bool:
        """False when we may not signal it (another user's: it cannot be ended)."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
        return True

    def exited(self) -> bool:
        poller = select.poll()  # not select(): a holder's descriptors pass 1024
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self.pidfd)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def member_of(environ: bytes, token: str) -> str | None:
    """The member a process belongs to, from its environment (/proc/PID/environ): None unless
    this holder's token is there too (a nested holder's orphan, or a cleared environment)."""
    holder = member = None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"FLEET_HOLDER="):
            holder = entry[len(b"FLEET_HOLDER=") :]
        elif entry.startswith(b"FLEET_MEMBER="):
            member = entry[len(b"FLEET_MEMBER=") :]
    if holder != token.encode() or not member:
        return None
    return member.decode(errors="replace")


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read (it changed user)
        return b""


Known = dict[tuple[int, int], Process]


def gather(root: Process, known: Known) -> None:
    """Add `root` and its living descendants to `known` (kept pidfds, by pid and start time).
    A child counts once its pidfd is open, its parent is what the walk found, and that parent
    has not exited meanwhile (so its pid was not recycled)."""
    if root.key in known:
        if known[root.key] is not root:
            root.close()
            root = known[root.key]
    else:
        known[root.key] = root
    stack = [root]
    while stack:
        parent = stack.pop()
        for pid in identity.children(parent.pid):
            child = Process.open(pid, parent=parent.pid)
            if child is None:
                continue
            if parent.exited():
                child.close()
                continue
            if child.key in known:
                child.close()
                child = known[child.key]
            else:
                known[child.key] = child
            stack.append(child)


def forget_exited(known: Known) -> None:
    for key, process in list(known.items()):
        if process.exited():
            process.close()
            del known[key]


def count_lingering(known: Known) -> int:
    """How many of `known` are still alive: after they were all sent SIGKILL and given
    END_GRACE, what a member's status reports as `lingering`."""
    forget_exited(known)
    return len(known)


async def _all_exited(processes: Iterable[Process]) -> None:
    for process in list(processes):
        if process.pidfd >= 0:
            await process.wait_exited()


def _close_all(known: Known) -> None:
    for process in known.values():
        process.close()
    known.clear()


# --- the holder's side ------------------------------------------------------------------------


class Lineage:
    """A holder's side of its members' descendants: its token, its cgroup when it has one,
    the orphans it adopted, and a `Descendants` per member (see the module)."""

    def __init__(self, cluster: str, watched: Callable[[], Collection[int]]) -> None:
        """`watched`: the pids of the holder's children that are members' main processes (or
        prepare commands): every other child is an orphan it adopted."""
        self.cluster = cluster
        self.pid = os.getpid()
        self.start_time = identity.start_time(self.pid)
        self.token = f"{self.pid}-{self.start_time}"
        self.cgroup: Cgroup | None = None
        self._watched = watched
        self._frozen: dict[str, list[tuple[int, int]]] | None = None

    def start(self) -> None:
        """Make the holder's cgroup where cgroup v2 is writable (see fleetd.core.cgroups)."""
        self.cgroup, why = _holder_cgroup(self.cluster, self.pid, self.start_time)
        if self.cgroup is None:
            log.info("cgroups_unused", reason=why)
        else:
            log.info("cgroups_used", cgroup=self.cgroup.path)
            self.remove_dead()

    def remove_dead(self) -> None:
        """Remove the empty cgroups of holders that died by SIGKILL beside this holder's (a
        bound holder has no fleetd to collect them). One that still holds processes is left
        alone: its name says a holder's pid in *its* pid namespace, which need not be ours."""
        if self.cgroup is None:
            return
        parent = os.path.dirname(self.cgroup.path)
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            holder = holder_of(name)
            if holder is None or holder == (self.pid, self.start_time) or _alive(*holder):
                continue
            dead = Cgroup(os.path.join(parent, name))
            if not dead.populated() and _removed(dead):
                log.info("dead_holder_cgroup_removed", cgroup=dead.path)

    def of(self, member: str) -> "Descendants":
        """A member's descendants, in a cgroup of its own when the holder has one (and it
        can be made)."""
        if self.cgroup is not None:
            cgroup = Cgroup(os.path.join(self.cgroup.path, member + MEMBER_SUFFIX))
            try:
                cgroup.create()
                return CgroupDescendants(cgroup)
            except OSError as exc:
                log.warning("member_cgroup_failed", member=member, error=str(exc))
        return TreeDescendants(self, member)

    def orphans(self) -> dict[str, list[tuple[int, int]]]:
        """The holder's children that no supervisor watches, (pid, start time) by the member
        they belong to ("": unattributable). Its children's pids stay theirs until it reaps
        them, which it does on this thread: nothing is recycled while this runs."""
        if self._frozen is not None:
            return self._frozen
        watched = self._watched()
        found: dict[str, list[tuple[int, int]]] = {}
        for pid in identity.children(self.pid):
            if pid in watched:
                continue
            try:
                started = identity.start_time(pid)
            except identity.ProcessGone:
                continue  # exited: the reaper's
            member = member_of(_environ(pid), self.token) or ""
            found.setdefault(member, []).append((pid, started))
        return found

    def orphans_of(self, member: str) -> list[Process]:
        opened = []
        for pid, started in self.orphans().get(member, ()):
            process = Process.open(pid, parent=self.pid)
            if process is not None and process.start_time != started:
                process.close()
            elif process is not None:
                opened.append(process)
        return opened

    def freeze(self) -> None:
        """Every member is about to stop: read the orphans once for all of them, where each
        would read them (a thousand members, a thousand children each time). Whatever
        appears later is the business of `end_all`."""
        self._frozen = None
        self._frozen = self.orphans()

    async def end_all(self) -> int:
        """Once the last member is gone: SIGKILL everything left (every member's cgroup at
        once, then each child of the holder and what it started, attributable or not), and
        give it END_GRACE to go. Returns how many processes would not go."""
        self._frozen = None
        if self.cgroup is not None:
            self.cgroup.kill()
            await self.cgroup.wait_empty(END_GRACE)
        known: Known = {}
        with anyio.move_on_after(END_GRACE):
            while self._gather_leftovers(known):
                log.info("leftovers_killed", pids=sorted(p.pid for p in known.values()))
                for process in known.values():
                    process.send(signal.SIGKILL)
                await _all_exited(known.values())
        left = count_lingering(known)
        _close_all(known)
        if left:
            log.warning("leftovers_lingering", count=left)
        self._remove_cgroup()
        return left

    def _gather_leftovers(self, known: Known) -> bool:
        """Add every child no supervisor watches, and its descendants; whether any lives."""
        watched = self._watched()
        for pid in identity.children(self.pid):
            if pid not in watched and (process := Process.open(pid, parent=self.pid)):
                gather(process, known)
        forget_exited(known)
        return bool(known)

    def close(self) -> None:
        """At exit, whatever happened: SIGKILL the holder's remaining children (no waiting),
        and remove its cgroup if it is empty."""
        for pid in identity.children(self.pid):
            process = Process.open(pid, parent=self.pid)
            if process is not None:
                process.send(signal.SIGKILL)
                process.close()
        if self.cgroup is not None:
            self.cgroup.kill()
        self._remove_cgroup()

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None and not _removed(self.cgroup):
            log.warning("holder_cgroup_busy", cgroup=self.cgroup.path)


def _alive(pid: int, start_time: int) -> bool:
    try:
        return identity.start_time(pid) == start_time
    except identity.ProcessGone:
        return False


def _removed(cgroup: Cgroup) -> bool:
    try:
        return cgroup.remove()
    except OSError as exc:
        log.warning("cgroup_not_removed", cgroup=cgroup.path, error=str(exc))
        return False


def _group(pid: int) -> int | None:
    try:
        return identity.proc_stat(pid).group
    except identity.ProcessGone:
        return None


def _holder_cgroup(cluster: str, pid: int, start_time: int) -> tuple[Cgroup | None, str]:
    """The holder's cgroup, made; or None and why not."""
    if os.environ.get(CGROUPS_ENV, "").lower() in ("off", "0", "no"):
        return None, f"{CGROUPS_ENV}={os.environ[CGROUPS_ENV]}"
    own = own_directory()
    if own is None:
        return None, "no cgroup2 hierarchy is mounted"
    if not os.access(os.path.join(own, "cgroup.procs"), os.W_OK):
        return None, f"{own} is not delegated to this user"
    cgroup = Cgroup(os.path.join(own, holder_cgroup_name(cluster, pid, start_time)))
    try:
        cgroup.create()
    except OSError as exc:
        return None, f"cannot make {cgroup.path}: {exc.strerror}"
    if not os.path.exists(os.path.join(cgroup.path, "cgroup.kill")):
        cgroup.remove()
        return None, "no cgroup.kill (Linux before 5.14)"
    return cgroup, ""


# --- one member's -------------------------------------------------------------------------------


class Descendants:
    """A member's processes, its main process's group included, through their ends (see the
    module). One member's supervisor uses it, one call at a time."""

    __slots__ = ()

    cgroup: Cgroup | None = None
    """The member's cgroup, when it has one."""

    def signal(self, signum: int, main: int) -> None:
        """A stop begins: send `signum`, then SIGCONT, to every process of the member outside
        its main process's group (which its stop signals itself)."""
        raise NotImplementedError

    async def wait_ended(self) -> None:
        """Until every process of the member is gone; cancel it to give up. Processes that
        appear meanwhile get no signal (a shell's trap may be cleaning up): only the SIGKILL
        that follows stop_timeout."""
        raise NotImplementedError

    async def end(self) -> int:
        """The main process has exited: SIGKILL whatever of the member is left, and give it
        END_GRACE to go. Returns how many processes remain (lingering)."""
        raise NotImplementedError

    async def wait_gone(self) -> None:
        """Until no lingering process is left (cancel it to give up)."""
        raise NotImplementedError

    def close(self) -> None:
        """The member leaves: let go of its processes and of its cgroup once empty."""
        raise NotImplementedError


class TreeDescendants(Descendants):
    """By /proc: the main process's descendants, and the holder's orphans whose environment
    names the member."""

    def __init__(self, lineage: Lineage, member: str) -> None:
        self._lineage = lineage
        self._member = member
        self._known: Known = {}

    def _scan(self, main: int | None = None) -> list[Process]:
        """Look again; the processes found that were not known."""
        before = set(self._known)
        if main is not None:
            root = Process.open(main, parent=self._lineage.pid)
            if root is not None:
                gather(root, self._known)
                self._known.pop(root.key, None)  # the supervisor waits for it itself
                root.close()
        for orphan in self._lineage.orphans_of(self._member):
            gather(orphan, self._known)
        forget_exited(self._known)
        return [p for key, p in self._known.items() if key not in before]

    def signal(self, signum: int, main: int) -> None:
        self._scan(main)
        for process in self._known.values():
            if process.group != main:
                process.send(signum)
                process.send(signal.SIGCONT)

    async def wait_ended(self) -> None:
        while True:
            await _all_exited(self._known.values())
            self._scan()
            if not self._known:
                return

    async def end(self) -> int:
        refused: set[tuple[int, int]] = set()
        with anyio.move_on_after(END_GRACE):
            while True:
                self._scan()
                killable = [p for p in self._known.values() if p.key not in refused]
                if not killable:
                    break
                refused |= {p.key for p in killable if not p.send(signal.SIGKILL)}
                await _all_exited(p for p in killable if p.key not in refused)
        return count_lingering(self._known)

    async def wait_gone(self) -> None:
        await _all_exited(self._known.values())
        forget_exited(self._known)

    def close(self) -> None:
        _close_all(self._known)


class CgroupDescendants(Descendants):
    """By the member's cgroup."""

    __slots__ = ("_cgroup", "cgroup")  # one per member

    def __init__(self, cgroup: Cgroup) -> None:
        self._cgroup = cgroup
        self.cgroup = cgroup

    def signal(self, signum: int, main: int) -> None:
        for pid in self._cgroup.processes():
            if pid == main or _group(pid) in (main, None):
                continue  # the group (the usual all): its signal is the stop's own
            process = Process.open(pid, cgroup=self._cgroup)
            if process is not None:
                if process.group != main:
                    process.send(signum)
                    process.send(signal.SIGCONT)
                process.close()

    async def wait_ended(self) -> None:
        await self._cgroup.wait_empty(float("inf"))

    async def end(self) -> int:
        if not self._cgroup.populated():
            return 0
        self._cgroup.kill()
        if await self._cgroup.wait_empty(END_GRACE):
            return 0
        return len(self._cgroup.processes())

    async def wait_gone(self) -> None:
        await self._cgroup.wait_empty(float("inf"))

    def close(self) -> None:
        if not _removed(self._cgroup):
            log.warning("member_cgroup_busy", cgroup=self._cgroup.path)

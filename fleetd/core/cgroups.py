"""cgroup v2, where this process may write it: a cgroup per member, so that every process a
member starts, whatever it does (setsid, a double fork, a cleared environment), is found and
ended at once, even by fleetd after the member's holder was SIGKILLed.

    hierarchy()          the cgroup2 mount, from /proc/self/mountinfo (never assumed)
    cgroup_directory()   a process's cgroup, as a directory under that mount
    holder_cgroup_name   what a holder calls its cgroup: fleetd computes it too
    holder_of            the holder process a cgroup of that name belongs to
    Cgroup               one cgroup: create, processes, kill, wait until empty, remove

A holder makes its cgroup beside itself, one leaf per member under it:

    <the holder's cgroup>/fleet-CLUSTER.PID-START/             no process of its own
    <the holder's cgroup>/fleet-CLUSTER.PID-START/NAME.member  one member's processes

The holder itself stays where it was started (fleetd's cgroup, or the test's). No controller
is enabled anywhere: `cgroup.procs`, `cgroup.kill` and `cgroup.events` need none, so cgroup
v2's no-internal-processes rule never applies. Writable means root, or a delegated subtree
(systemd's `Delegate=yes`).
"""

import contextlib
import errno
import functools
import os
import select

import anyio

KILL_FILE = "cgroup.kill"
PROCS_FILE = "cgroup.procs"
EVENTS_FILE = "cgroup.events"
HOLDER_PREFIX = "fleet-"
MEMBER_SUFFIX = ".member"
"""Member names may hold dots: a suffix keeps one from naming an interface file (cpu.stat)."""


@functools.cache
def hierarchy() -> str | None:
    """Where the cgroup2 hierarchy is mounted (its root, not a bind of a part of it): on a
    pure-v2 machine /sys/fs/cgroup, on a hybrid one /sys/fs/cgroup/unified; None without."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode(errors="surrogateescape").splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, after = line.partition(" - ")
        parts = fields.split()
        if after.split(" ", 1)[0] == "cgroup2" and len(parts) > 4 and parts[3] == "/":
            return _unescape(parts[4])
    return None


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, plain)
    return path


def cgroup_of(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of a process (its `0::` line, relative to the hierarchy's root), or
    None when it is gone or has none."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            lines = f.read().decode(errors="surrogateescape").splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_directory(pid: int | str) -> str | None:
    """A process's cgroup as a directory, or None (gone, or no cgroup2 hierarchy)."""
    root, path = hierarchy(), cgroup_of(pid)
    if root is None or path is None:
        return None
    return os.path.normpath(root + path)


def own_directory() -> str | None:
    """This process's cgroup as a directory, or None without a cgroup2 hierarchy."""
    return cgroup_directory("self")


def holder_cgroup_name(cluster: str, pid: int, start_time: int) -> str:
    """A holder's cgroup, named by the holder process (pid and start time): two holders of
    one cluster name never share one, and fleetd, which journals both, finds a dead holder's."""
    return f"{HOLDER_PREFIX}{cluster}.{pid}-{start_time}"


def holder_of(name: str) -> tuple[int, int] | None:
    """The holder process (pid, start time) a cgroup named by `holder_cgroup_name` belongs
    to; None for any other name."""
    if not name.startswith(HOLDER_PREFIX) or "." not in name:
        return None
    pid, _, start_time = name.rpartition(".")[2].partition("-")
    if not (pid.isdigit() and start_time.isdigit()):
        return None
    return int(pid), int(start_time)


def within_hierarchy(path: str) -> bool:
    """Whether `path` is a cgroup below the hierarchy's root, plainly written (a path read
    from a file must not point fleetd at anything else)."""
    root = hierarchy()
    return root is not None and os.path.normpath(path) == path and path.startswith(root + os.sep)


class Cgroup:
    """One cgroup directory. Reads and writes are single syscalls on kernfs: none blocks."""

    __slots__ = ("born_into", "name", "path")  # one per member of a holder

    def __init__(self, path: str) -> None:
        self.path = path
        self.born_into = False
        """Whether a child may be born into it (clone3's CLONE_INTO_CGROUP) rather than join
        it by a write to cgroup.procs, which waits for an RCU grace period (milliseconds):
        only while it is one `create` made and `kill` never emptied. Linux 6.18 SIGKILLs at
        birth a child born into a cgroup that cgroup.kill emptied (see fleetd.holder.spawn)."""
        root = hierarchy() or ""
        self.name = path[len(root) :] or "/"
        """As /proc/PID/cgroup names it."""

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r})"

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, PROCS_FILE)

    def create(self) -> None:
        """Make it; one that exists already is taken as it is (whatever was done to it, a
        child joins it by a write). Raises OSError."""
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            return
        self.born_into = True

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def processes(self) -> list[int]:
        """The pids in it now (none once it is gone)."""
        try:
            with open(self.procs_file, "rb") as f:
                return [int(pid) for pid in f.read().split()]
        except FileNotFoundError:
            return []

    def holds(self, pid: int) -> bool:
        """Whether the process `pid` names now is in this cgroup (not in one below it)."""
        return cgroup_of(pid) == self.name

    def populated(self) -> bool:
        """Whether any process is in it or below it."""
        try:
            fd = os.open(os.path.join(self.path, EVENTS_FILE), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return _populated(os.read(fd, 256))
        finally:
            os.close(fd)

    def move(self, pid: int) -> None:
        """Move a process here (its threads along). Raises OSError."""
        with open(self.procs_file, "w") as f:
            f.write(str(pid))

    def kill(self) -> None:
        """SIGKILL every process in it and below it, and any it forks meanwhile (Linux 5.14+)."""
        self.born_into = False
        with (
            contextlib.suppress(FileNotFoundError),
            open(os.path.join(self.path, KILL_FILE), "w") as f,
        ):
            f.write("1")

    async def wait_empty(self, timeout: float) -> bool:
        """Whether it is empty (or gone) within `timeout` seconds. `cgroup.events` raises
        POLLPRI when it changes, which only an epoll set asked for EPOLLPRI alone reports
        (the file itself always polls readable): the event loop waits on that set."""
        try:
            fd = os.open(os.path.join(self.path, EVENTS_FILE), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            if not _populated(os.pread(fd, 256, 0)):
                return True
            with select.epoll() as poller, anyio.move_on_after(timeout):
                poller.register(fd, select.EPOLLPRI)
                while _populated(os.pread(fd, 256, 0)):  # a read re-arms the notification
                    await anyio.wait_readable(poller.fileno())
                    poller.poll(0)
                return True
            return False
        finally:
            os.close(fd)

    def remove(self) -> bool:
        """Remove it, and any cgroup below it (a member may make its own), once empty; True
        when it is gone, False when a process keeps it. Those below are looked for only when
        it cannot go: a cgroup lists some forty files."""
        if self._removed():
            return True
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return True
        below = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
        if not below:
            return False
        for path in below:
            Cgroup(path).remove()
        return self._removed()

    def _removed(self) -> bool:
        """rmdir: whether it is gone now (False when it is busy: processes, or cgroups below)."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True


def _populated(events: bytes) -> bool:
    for line in events.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"populated":
            return value.strip() != b"0"
    return False

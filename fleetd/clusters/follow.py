"""Following a live holder: its watch connection, which pushes every member change into the
index, and its pidfd, which turns readable the moment it exits, whoever's child it is.

A holder fleetd cannot reach (re-adopted while still starting, or one that does not answer)
is followed all the same, its sockets tried again in the background until one answers: its
name stays taken and its exit is seen meanwhile, but nothing can be asked of it (stop and add
say so: fleetd.clusters.registry). One still starting that never serves is killed after
READY_TIMEOUT, as a launch would kill it; one that served once is never killed for being slow.

A holder gone: its record is journaled exited (its files stay, owned by it, until gc), its
members' records and any socket it could not remove go, and so does every process it left in
its cgroup. Where a holder could make one (fleetd.core.cgroups), its members live in
`fleet-CLUSTER.PID-START` beside the holder and outlive it when it is SIGKILLed: fleetd kills
what is left there (`cgroup.kill`) and removes the cgroup once empty. Where it is was read
while the holder lived (else, for one found dead at start-up, fleetd's own cgroup: where it
started it).
"""

import contextlib
import functools
import os
import signal

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from fleetd.clusters.index import ClusterIndex, Held
from fleetd.clusters.journaling import ClusterJournal
from fleetd.clusters.links import open_watch
from fleetd.clusters.records import HolderRecord
from fleetd.clusters.rundirs import remove_sockets
from fleetd.core.cgroups import (
    Cgroup,
    cgroup_directory,
    holder_cgroup_name,
    own_directory,
    within_hierarchy,
)
from protocol.errors import ConnectionLost, PermissionDenied, Timeout
from protocol.members import MemberStatus, member_socket_path

log = structlog.get_logger("fleetd.clusters")

READY_TIMEOUT = 30.0
"""Seconds a new holder gets to open every member socket."""
STOP_MARGIN = 5.0
"""Seconds beyond the longest stop_timeout for a holder to report its members stopped."""
CGROUP_GRACE = 2.0
"""Seconds the processes a dead holder left in its cgroup get to go once killed."""
_ATTACH_FIRST = 0.01
_ATTACH_MAX = 0.2
"""Seconds between tries of an unreached holder's sockets: first, and at most."""


class Follower:
    """Follows live holders: keeps the index current from their pushes, and journals them
    live, then gone."""

    def __init__(self, index: ClusterIndex, journal: ClusterJournal) -> None:
        self.index = index
        self.journal = journal
        self._tasks: TaskGroup | None = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the holders' exit watches and attach attempts until cancelled (which leaves
        every holder running: they are not fleetd's to stop)."""
        async with anyio.create_task_group() as self._tasks:
            task_status.started()
            await anyio.sleep_forever()

    @property
    def _task_group(self) -> TaskGroup:
        assert self._tasks is not None, "Follower.serve first"
        return self._tasks

    async def follow(self, held: Held) -> None:
        """A holder that serves (launched and ready, or adopted live): watch its members
        (snapshot now, pushes after), journal it live, see it exit."""
        connected = await self._connect(held)
        held.record = msgspec.structs.replace(held.record, state="live")
        self.take(held)
        await self.journal.write(held.name)
        if not connected:
            log.warning("holder_unreachable", cluster=held.name, pid=held.pid)
            self._task_group.start_soon(self._attach, held)

    async def follow_starting(self, held: Held) -> None:
        """A holder fleetd was starting when it died. Followed as any other if it serves
        already; else taken at once, as starting (its name is taken, its exit is seen, gc
        leaves it alone), and watched once it serves, in the background: start-up must not
        wait for it."""
        if await self._connect(held):
            await self.follow(held)
            return
        self.take(held)
        self._task_group.start_soon(self._attach, held)

    def take(self, held: Held) -> None:
        """Count it live (its name is taken, gc leaves it alone) and see it exit."""
        held.cgroup_parent = cgroup_directory(held.pid)  # read after the pidfd was opened
        self.index.add_live(held)
        self._task_group.start_soon(self._until_exit, held)

    async def _connect(self, held: Held) -> bool:
        """A watch over the first member socket that answers (any socket serves every member,
        and the connection outlives its member); False when none does, or the holder does not
        answer (every socket is its own: no other would). A socket where another user's
        process listens is passed over, unspoken to."""
        for name in sorted(held.specs, key=lambda n: n not in held.statuses):
            path = member_socket_path(held.record.dir, name)
            try:
                link, snapshot = await open_watch(path, functools.partial(self._pushed, held))
            except ConnectionLost:
                continue
            except PermissionDenied as refused:
                log.warning("holder_socket_refused", cluster=held.name, error=refused.message)
                continue
            except Timeout:
                return False
            held.link = link
            for status in snapshot:
                # A push that came in the same read as the snapshot was handled before this
                # task resumed: it is newer than the snapshot, which must not undo it.
                if status.name not in held.statuses:
                    self.index.update(held, status)
            return True
        return False

    def _pushed(self, held: Held, status: MemberStatus) -> None:
        self.index.update(held, status)

    async def _attach(self, held: Held) -> None:
        """Until a member socket of an unreached holder answers: then watch it and journal
        it live. It has no ready pipe to this fleetd, so its sockets are tried, backing off.
        One still starting that does not serve within READY_TIMEOUT is killed."""
        starting = held.record.state == "starting"
        delay = _ATTACH_FIRST
        with anyio.move_on_after(READY_TIMEOUT if starting else None):
            while not await self._connect(held):
                with anyio.move_on_after(delay):
                    await held.gone.wait()
                    return
                delay = min(delay * 2, _ATTACH_MAX)
        if self.index.live.get(held.name) is not held:  # it exited meanwhile: journaled so
            if held.link is not None:
                await held.link.aclose()
            return
        if held.link is None:
            log.warning("holder_not_ready", cluster=held.name, pid=held.pid)
            with contextlib.suppress(ProcessLookupError):  # it exited: its watch sees to it
                signal.pidfd_send_signal(held.pidfd, signal.SIGKILL)
            return
        held.record = msgspec.structs.replace(held.record, state="live")
        await self.journal.write(held.name)
        self.index.changed_now(held.name)
        log.info("holder_attached", cluster=held.name, pid=held.pid)

    async def _until_exit(self, held: Held) -> None:
        try:
            await anyio.wait_readable(held.pidfd)
        finally:
            os.close(held.pidfd)
            if held.link is not None:
                with anyio.CancelScope(shield=True):
                    await held.link.aclose()
        if held.process is not None:
            held.process.wait()  # our child: reap it (it has exited: this does not block)
        self.index.remove_live(held)
        try:
            await self.gone(held.record, reason="holder_exited", cgroup_parent=held.cgroup_parent)
        except Exception:  # one holder's clean-up failing must not stop fleetd: say so
            log.exception("holder_cleanup_failed", cluster=held.name, pid=held.pid)
        finally:
            held.gone.set()

    async def gone(
        self, record: HolderRecord, *, reason: str, cgroup_parent: str | None = None
    ) -> None:
        """Journal a holder gone: its record stays (exited; its files remain), its members'
        records go, and so do sockets a killed holder could not remove, and any process it
        left in its cgroup (made in `cgroup_parent`, else beside fleetd)."""
        name = record.spec.name
        remove_sockets(record)
        self.index.add_exited(msgspec.structs.replace(record, state="exited"))
        # status answers from memory: it says so now, not after the writes
        await end_cgroup(record, cgroup_parent)
        await self.journal.write(name)
        log.info("holder_gone", cluster=name, pid=record.pid, reason=reason)

    async def stop_holder(self, held: Held) -> None:
        """SIGTERM through the pidfd (never a recycled pid): the holder stops every member
        and exits; wait for that, and SIGKILL it if it takes too long."""
        with contextlib.suppress(ProcessLookupError):  # it exited: its watch sees to it
            signal.pidfd_send_signal(held.pidfd, signal.SIGTERM)
        grace = max((s.stop_timeout for s in held.specs.values()), default=0.0) + STOP_MARGIN
        with anyio.move_on_after(grace):
            await held.gone.wait()
            return
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            signal.pidfd_send_signal(held.pidfd, signal.SIGKILL)
        await held.gone.wait()


async def end_cgroup(record: HolderRecord, parent: str | None) -> None:
    """Kill every process left in a gone holder's cgroup, if it left one, and remove it once
    empty (one that will not empty is left, and said so)."""
    cgroup = _left_cgroup(record, parent)
    if cgroup is None:
        return
    left = cgroup.populated()
    if left:
        cgroup.kill()
    if not await cgroup.wait_empty(CGROUP_GRACE):
        log.warning("holder_cgroup_not_empty", cluster=record.spec.name, cgroup=cgroup.path)
        return
    try:
        cgroup.remove()
    except OSError as exc:
        log.warning("holder_cgroup_not_removed", cgroup=cgroup.path, error=str(exc))
        return
    log.info("holder_cgroup_removed", cluster=record.spec.name, cgroup=cgroup.path, killed=left)


def _left_cgroup(record: HolderRecord, parent: str | None) -> Cgroup | None:
    """The cgroup a gone holder left, if any: named by its pid and start time, in `parent`
    (the holder's own cgroup) or beside fleetd, which started it."""
    if not record.pid:
        return None
    name = holder_cgroup_name(record.spec.name, record.pid, record.start_time)
    for directory in dict.fromkeys(d for d in (parent, own_directory()) if d is not None):
        path = os.path.join(directory, name)
        if within_hierarchy(path) and os.path.isdir(path):
            return Cgroup(path)
    return None

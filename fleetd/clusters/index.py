"""Which clusters fleetd knows, and what their members' status is: the registry's memory.

Each live holder pushes every member change on its watch connection (fleetd.clusters.follow),
so status and wait are answered from here, and a wait sleeps until its own clusters change,
never polls a holder. A member no live holder serves answers from the state file its holder
left (`stopped`), or `absent`. Nothing here does I/O but that one read of a state file.

A request costs what it names, however many clusters run: a name resolves by two lookups
(MemberNames), a change wakes only the waits on its own cluster, and the status of every
member joins each cluster's statuses as encoded at its last change.

    MemberNames               pure: a member's name to (cluster, member), both ways indexed
    Held                      a live holder as fleetd follows it
    ClusterIndex              live and exited clusters, per-cluster locks, status lookups
"""

import contextlib
import os
import subprocess
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec

from fleetd.clusters.links import MemberLink, status_on_disk
from fleetd.clusters.records import HolderRecord
from fleetd.core.locks import NameLock, NameLocks
from fleetd.core.metrics import MEMBER_EXITS, MEMBER_RESTARTS, Family, gauge
from fleetd.state import RUNTIME_SUBDIR
from protocol.definitions import MemberSpec
from protocol.errors import Absent, InvalidRequest
from protocol.members import MemberState, MemberStatus
from protocol.messages import Message
from protocol.names import check_name

_encode = msgspec.json.Encoder().encode


class MemberNames:
    """Each cluster's member names, and each name's clusters: `CLUSTER/NAME` and a bare `NAME`
    both resolve by lookups (a scan of every cluster per name made each status, wait and stop
    cost as much as there were clusters)."""

    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}
        self._clusters: dict[str, set[str]] = {}

    def add(self, cluster: str, name: str) -> None:
        self._members.setdefault(cluster, set()).add(name)
        self._clusters.setdefault(name, set()).add(cluster)

    def replace(self, cluster: str, names: Iterable[str]) -> None:
        """`cluster` has exactly these members now."""
        self.drop(cluster)
        for name in names:
            self.add(cluster, name)

    def remove(self, cluster: str, name: str) -> None:
        """`cluster` has no member `name` any more."""
        self._members.get(cluster, set()).discard(name)
        clusters = self._clusters.get(name)
        if clusters is not None:
            clusters.discard(cluster)
            if not clusters:
                del self._clusters[name]

    def drop(self, cluster: str) -> None:
        for name in self._members.pop(cluster, ()):
            clusters = self._clusters[name]
            clusters.discard(cluster)
            if not clusters:
                del self._clusters[name]

    def members_of(self, cluster: str) -> list[str]:
        """The members of a cluster this knows (none for one it does not)."""
        return sorted(self._members.get(cluster, ()))

    def resolve(self, name: str) -> tuple[str, str] | None:
        """(cluster, member) for `CLUSTER/NAME`, or for a bare `NAME` found in one cluster only;
        None when no cluster has it. A bare name in several clusters is ambiguous: an error."""
        if "/" in name:
            cluster, _, member = name.partition("/")
            check_name(cluster, "cluster")
            check_name(member)
            return (cluster, member) if member in self._members.get(cluster, ()) else None
        check_name(name)
        found = self._clusters.get(name, ())
        if len(found) > 1:
            raise InvalidRequest(
                f"member {name!r} is in clusters {', '.join(sorted(found))}: say CLUSTER/{name}"
            )
        return (next(iter(found)), name) if found else None


@dataclass(eq=False)
class Held:
    """A live holder as fleetd follows it. `link` is its watch connection: None while fleetd
    cannot reach it (re-adopted mid-launch and not serving yet, or not answering)."""

    name: str
    record: HolderRecord
    pidfd: int
    specs: dict[str, MemberSpec]
    statuses: dict[str, MemberStatus] = field(default_factory=dict)
    link: MemberLink | None = None
    process: subprocess.Popen[bytes] | None = None
    gone: anyio.Event = field(default_factory=anyio.Event)
    cgroup_parent: str | None = None
    """The holder's own cgroup directory, read while it lives: its cgroup is made there."""

    @property
    def pid(self) -> int:
        return self.record.pid

    def __contains__(self, member: object) -> bool:
        return member in self.specs or member in self.statuses

    def update(self, status: MemberStatus) -> MemberStatus:
        status = msgspec.structs.replace(status, cluster=self.name)
        self.statuses[status.name] = status
        return status


class EncodedMemberList(Message, frozen=True):
    """A MemberList whose members are encoded already."""

    members: msgspec.Raw


class Observer(Protocol):
    """Who is told of one cluster's changes as they are known (fleetd.tasks follows the
    clusters its workers run in): called on the event loop, it must not block."""

    def member_changed(self, status: MemberStatus) -> None: ...

    def holder_gone(self) -> None: ...


class ClusterIndex:
    """Live clusters (their Held) and exited ones (their record, until gc collects it), each
    name under one lock for whatever changes it (up, down, gc)."""

    def __init__(self, runtime_root: str = "") -> None:
        self.runtime_root = runtime_root
        """The directory holding c/: where fleetd makes runtime directories."""
        self.live: dict[str, Held] = {}
        self.exited: dict[str, HolderRecord] = {}
        self._names = MemberNames()
        self._locks = NameLocks()
        self._waiting: dict[str, set[anyio.Event]] = {}
        """Per cluster, the events of the waits on it: set at its next change."""
        self._encoded: dict[str, bytes] = {}
        """Per live cluster, its members' statuses encoded as list items, since its last change."""
        self._every_encoded: EncodedMemberList | None = None
        self._observers: dict[str, Observer] = {}

    def observe(self, cluster: str, observer: Observer | None) -> None:
        """Tell `observer` of every change of `cluster` from now on (None: nobody)."""
        if observer is None:
            self._observers.pop(cluster, None)
        else:
            self._observers[cluster] = observer

    def lock(self, cluster: str) -> NameLock:
        return self._locks.hold(cluster)

    @contextlib.contextmanager
    def watching(self, clusters: Collection[str]) -> Iterator[anyio.Event]:
        """An event set at the next change of any of `clusters`, and of no other."""
        event = anyio.Event()
        for cluster in clusters:
            self._waiting.setdefault(cluster, set()).add(event)
        try:
            yield event
        finally:
            for cluster in clusters:
                waiting = self._waiting.get(cluster)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiting[cluster]

    def changed_now(self, cluster: str) -> None:
        """Wake the waits on `cluster` to look again; its encoded statuses are stale."""
        self._encoded.pop(cluster, None)
        self._every_encoded = None
        for event in self._waiting.pop(cluster, ()):
            event.set()

    def update(self, held: Held, status: MemberStatus) -> MemberStatus:
        """A member's new status (a push, or a holder's answer), known from now on; `absent`
        is a member its holder removed (cluster_apply), forgotten."""
        if status.state == MemberState.ABSENT:
            self.forget(held, status.name)
            return status
        _count_exits(held.statuses.get(status.name), status)
        status = held.update(status)
        if self.live.get(held.name) is held:
            self._names.add(held.name, status.name)
            self.changed_now(held.name)
        observer = self._observers.get(held.name)
        if observer is not None:
            observer.member_changed(status)
        return status

    def forget(self, held: Held, member: str) -> None:
        """A live cluster's member removed: its name resolves no more."""
        held.statuses.pop(member, None)
        held.specs.pop(member, None)
        if self.live.get(held.name) is held:
            self._names.remove(held.name, member)
            self.changed_now(held.name)

    def targets(self, name: str) -> tuple[str, list[str]]:
        """(cluster, [member]) for a member's name; for the name of a cluster no member is
        called, (cluster, every member of it), as statuses_named reads names. Absent for
        neither."""
        found = self._names.resolve(name)
        if found is not None:
            return found[0], [found[1]]
        members = self._names.members_of(name) if "/" not in name else []
        if not members:
            raise Absent(f"no member or cluster {name!r}")
        return name, members

    def add_live(self, held: Held) -> None:
        self.live[held.name] = held
        self.exited.pop(held.name, None)
        self._names.replace(held.name, [*held.specs, *held.statuses])
        self.changed_now(held.name)

    def remove_live(self, held: Held) -> None:
        if self.live.get(held.name) is held:
            del self.live[held.name]
            self._names.drop(held.name)
            self.changed_now(held.name)
            observer = self._observers.get(held.name)
            if observer is not None:
                observer.holder_gone()

    def add_exited(self, record: HolderRecord) -> None:
        """`record` (state exited) stands for its cluster until gc collects it."""
        name = record.spec.name
        self.exited[name] = record
        if name not in self.live:
            self._names.replace(name, [m.name for m in record.spec.members])
        self.changed_now(name)

    def remove_exited(self, cluster: str) -> None:
        """gc collected it: its name is free."""
        del self.exited[cluster]
        if cluster not in self.live:
            self._names.drop(cluster)
        self.changed_now(cluster)

    async def metrics(self) -> list[Family]:
        reached = sum(held.link is not None for held in self.live.values())
        states: dict[str, int] = {}
        for held in self.live.values():
            for status in held.statuses.values():
                states[status.state] = states.get(status.state, 0) + 1
        return [
            gauge(
                "fleet_members",
                "Members of live clusters by state.",
                (({"state": state}, n) for state, n in states.items()),
            ),
            gauge(
                "fleet_clusters",
                "Clusters by state: live (a holder runs it), exited (until gc).",
                [({"state": "live"}, len(self.live)), ({"state": "exited"}, len(self.exited))],
            ),
            gauge(
                "fleet_holders",
                "Holder processes fleetd follows, by whether it reaches them (unreached: "
                "still starting, or not answering).",
                [({"reached": "yes"}, reached), ({"reached": "no"}, len(self.live) - reached)],
            ),
        ]

    def every_status(self) -> EncodedMemberList:
        """Every live member's status: each cluster's encoded once per change of its own, all
        joined once per change of any (asking for everyone outnumbers changes once clusters
        run)."""
        if self._every_encoded is None:
            parts = [part for held in self.live.values() if (part := self._encoded_items(held))]
            joined = b"[" + b",".join(parts) + b"]"
            self._every_encoded = EncodedMemberList(members=msgspec.Raw(joined))
        return self._every_encoded

    def _encoded_items(self, held: Held) -> bytes:
        items = self._encoded.get(held.name)
        if items is None:
            items = self._encoded[held.name] = _encode(list(held.statuses.values()))[1:-1]
        return items

    def resolve(self, name: str) -> tuple[str, str] | None:
        """(cluster, member) of a live or exited cluster's member; see MemberNames.resolve."""
        return self._names.resolve(name)

    def find_live(self, name: str) -> tuple[Held | None, str]:
        """The live holder serving member `name` (None if its cluster exited), and the
        member's bare name; Absent when no cluster has it."""
        found = self._names.resolve(name)
        if found is None:
            raise Absent(f"no member {name!r}")
        cluster, member = found
        return self.live.get(cluster), member

    def status_of(self, name: str) -> MemberStatus:
        found = self._names.resolve(name)
        if found is None:
            return MemberStatus(name=name, state=MemberState.ABSENT)
        return self.status_in(*found)

    def status_in(self, cluster: str, member: str) -> MemberStatus:
        """The status of a member `resolve` found (`absent` once its cluster is gone)."""
        held = self.live.get(cluster)
        if held is not None and member in held.statuses:
            return held.statuses[member]
        if held is not None and held.record.state == "starting":  # re-adopted, not serving yet
            return MemberStatus(
                name=member, state=MemberState.STARTING, holder_pid=held.pid, cluster=cluster
            )
        if held is None and cluster not in self.exited:  # gc collected it since
            return MemberStatus(name=member, state=MemberState.ABSENT)
        on_disk = status_on_disk(self.runtime_dir_of(cluster), member)
        return msgspec.structs.replace(on_disk, cluster=cluster)

    def statuses_named(self, name: str) -> list[MemberStatus]:
        """A member's status; for the name of a cluster no member is called, each of its
        members' (`fleetctl status web`); `absent` for neither."""
        members = self.members_if_cluster(name)
        if members:
            return [self.status_in(name, member) for member in members]
        return [self.status_of(name)]

    def members_if_cluster(self, name: str) -> list[str]:
        """The members of the cluster `name` when no member is called that (a member's name
        means the member: `fleetctl status web`, `fleetctl logs web`); none otherwise."""
        if "/" in name or self._names.resolve(name) is not None:
            return []
        held = self.live.get(name)
        return list(held.statuses) if held is not None else self._names.members_of(name)

    def status_or_absent(self, name: str) -> MemberStatus:
        status = self.status_of(name)
        if status.state == MemberState.ABSENT:
            raise Absent(f"no member {name!r}")
        return status

    def runtime_dir_of(self, cluster: str) -> str:
        held = self.live.get(cluster)
        if held is not None:
            return held.record.dir
        record = self.exited.get(cluster)
        return record.dir if record is not None else self.runtime_dir(cluster)

    def runtime_dir(self, cluster: str) -> str:
        """Where a new holder of `cluster` runs: c/<cluster>/ beside the control socket."""
        return os.path.join(self.runtime_root, RUNTIME_SUBDIR, cluster)


def _count_exits(before: MemberStatus | None, after: MemberStatus) -> None:
    """An exit shows as a process gone (its pid replaced or cleared) with an exit code; pushes
    coalesce, so a member that crashed twice between two of them counts one exit (its
    restarts count both)."""
    if before is None:
        return
    if before.pid is not None and after.pid != before.pid and after.exit_code is not None:
        MEMBER_EXITS.inc(str(after.exit_code))
    if after.restarts > before.restarts:
        MEMBER_RESTARTS.inc(amount=after.restarts - before.restarts)

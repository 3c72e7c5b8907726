"""Which clusters fleetd knows, and what their members' status is: the registry's memory.

Each live holder pushes every member change on its watch connection (fleetd.clusters.follow),
so status and wait are answered from here, and wait sleeps on `changed`, never polls a holder.
A member no live holder serves answers from the state file its holder left (`stopped`), or
`absent`. Nothing here does I/O but that one read of a state file.

    resolve                   pure: a member's name to (cluster, member)
    Held                      a live holder as fleetd follows it
    ClusterIndex              live and exited clusters, per-cluster locks, status lookups
"""

import os
import subprocess
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

import anyio
import msgspec

from fleetd.clusters.links import MemberLink, status_on_disk
from fleetd.clusters.records import HolderRecord
from fleetd.state import RUNTIME_SUBDIR
from protocol.definitions import MemberSpec
from protocol.errors import Absent, InvalidRequest
from protocol.members import MemberState, MemberStatus
from protocol.messages import Message
from protocol.names import check_name

_encode = msgspec.json.Encoder().encode


def resolve(name: str, clusters: Mapping[str, Container[str]]) -> tuple[str, str] | None:
    """(cluster, member) for `CLUSTER/NAME`, or for a bare `NAME` found in one cluster only;
    None when no cluster has it. A bare name in several clusters is ambiguous: an error."""
    if "/" in name:
        cluster, _, member = name.partition("/")
        check_name(cluster, "cluster")
        check_name(member)
        return (cluster, member) if member in clusters.get(cluster, ()) else None
    check_name(name)
    found = [cluster for cluster, members in clusters.items() if name in members]
    if len(found) > 1:
        raise InvalidRequest(
            f"member {name!r} is in clusters {', '.join(sorted(found))}: say CLUSTER/{name}"
        )
    return (found[0], name) if found else None


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


class ClusterIndex:
    """Live clusters (their Held) and exited ones (their record, until gc collects it), each
    name under one lock for whatever changes it (up, down, gc)."""

    def __init__(self, runtime_root: str = "") -> None:
        self.runtime_root = runtime_root
        """The directory holding c/: where fleetd makes runtime directories."""
        self.live: dict[str, Held] = {}
        self.exited: dict[str, HolderRecord] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._changed = anyio.Event()
        self._every_encoded: EncodedMemberList | None = None

    def lock(self, cluster: str) -> anyio.Lock:
        return self._locks.setdefault(cluster, anyio.Lock())

    @property
    def changed(self) -> anyio.Event:
        """Set at the next change of anything here."""
        return self._changed

    def changed_now(self) -> None:
        """Wake every waiter to look again."""
        self._every_encoded = None
        self._changed.set()
        self._changed = anyio.Event()

    def add_live(self, held: Held) -> None:
        self.live[held.name] = held
        self.exited.pop(held.name, None)
        self.changed_now()

    def remove_live(self, held: Held) -> None:
        if self.live.get(held.name) is held:
            del self.live[held.name]

    def add_exited(self, record: HolderRecord) -> None:
        """`record` (state exited) stands for its cluster until gc collects it."""
        self.exited[record.spec.name] = record
        self.changed_now()

    def every_status(self) -> EncodedMemberList:
        """Every live member's status, encoded once per change: asking for everyone
        outnumbers changes once clusters run."""
        if self._every_encoded is None:
            every = [s for held in self.live.values() for s in held.statuses.values()]
            self._every_encoded = EncodedMemberList(members=msgspec.Raw(_encode(every)))
        return self._every_encoded

    def known_members(self) -> dict[str, Container[str]]:
        """Every cluster's member names: live ones from memory (the Held itself, not a copy
        of a thousand names per request), exited ones from their definitions (the names whose
        state files may answer)."""
        known: dict[str, Container[str]] = {
            name: [m.name for m in r.spec.members] for name, r in self.exited.items()
        }
        known.update(self.live)
        return known

    def find_live(self, name: str) -> tuple[Held | None, str]:
        """The live holder serving member `name` (None if its cluster exited), and the
        member's bare name; Absent when no cluster has it."""
        found = resolve(name, self.known_members())
        if found is None:
            raise Absent(f"no member {name!r}")
        cluster, member = found
        return self.live.get(cluster), member

    def status_of(self, name: str) -> MemberStatus:
        found = resolve(name, self.known_members())
        if found is None:
            return MemberStatus(name=name, state=MemberState.ABSENT)
        cluster, member = found
        held = self.live.get(cluster)
        if held is not None and member in held.statuses:
            return held.statuses[member]
        if held is not None and held.record.state == "starting":  # re-adopted, not serving yet
            return MemberStatus(
                name=member, state=MemberState.STARTING, holder_pid=held.pid, cluster=cluster
            )
        on_disk = status_on_disk(self.runtime_dir_of(cluster), member)
        return msgspec.structs.replace(on_disk, cluster=cluster)

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

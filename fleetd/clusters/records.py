"""What the store keeps of detached clusters, and how it reads as claims-journal entries. Pure:
every write a cluster makes is built here, so one place says what a crash can leave behind.

    holders/<cluster>            HolderRecord: definition, runtime dir, log, pid + start time
                                 (from before the holder runs), state starting | live | exited,
                                 and whether `down` ended it
    members/<cluster>/<member>   MemberRecord: its socket, directory and logs, owner holders/<c>

`cluster_writes` is what the journal should say of a cluster, as one transaction: a live
holder's record together with a record per member (a crash between two writes would leave a
live holder whose members the journal does not name), or an exited holder's record alone
(its members' sockets are gone; its directory and logs stay, owned by it, until gc). Of the
member records, only those the store does not hold as they should be are written: a cluster
that gains a member costs one record, not one per member it has (fleetd.tasks keeps dozens
of worker slots in one cluster, and adds one per task).
protocol.claims documents the entries.
"""

import functools
from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from fleetd.journal import fleetd_entry
from fleetd.store import Delete, KeyValue, Put
from protocol.claims import ClaimInfo
from protocol.definitions import ClusterSpec
from protocol.members import MemberStatus, member_dir, member_log_path, member_socket_path

HOLDERS = "holders/"
MEMBERS = "members/"
MEMBER_PUTS = 4096
"""Member records kept built (each a few path joins and an encoding)."""

HolderState = Literal["starting", "live", "exited"]


class HolderRecord(msgspec.Struct, frozen=True, kw_only=True):
    spec: ClusterSpec
    dir: str
    log: str
    pid: int = 0
    start_time: int = 0
    state: HolderState = "starting"
    down: bool = False
    """Exited because the cluster was brought down (not because its last member stopped):
    its members are not started again."""


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    socket: str
    dir: str
    stdout: str
    stderr: str


encode = msgspec.json.Encoder().encode
decode_holder = msgspec.json.Decoder(HolderRecord).decode
decode_member = msgspec.json.Decoder(MemberRecord).decode


def holder_key(cluster: str) -> str:
    return HOLDERS + cluster


def members_prefix(cluster: str) -> str:
    return f"{MEMBERS}{cluster}/"


def cluster_of(member_key: str) -> str:
    """The cluster a members/<cluster>/<member> key belongs to."""
    return member_key.removeprefix(MEMBERS).partition("/")[0]


@functools.lru_cache(maxsize=MEMBER_PUTS)
def member_put(cluster: str, runtime_dir: str, name: str) -> Put:
    record = MemberRecord(
        owner=holder_key(cluster),
        socket=member_socket_path(runtime_dir, name),
        dir=member_dir(runtime_dir, name),
        stdout=member_log_path(runtime_dir, name),
        stderr=member_log_path(runtime_dir, name, stderr=True),
    )
    return Put(members_prefix(cluster) + name, encode(record))


def cluster_writes(
    record: HolderRecord, members: Iterable[str], stored: Mapping[str, bytes]
) -> list[Put | Delete]:
    """The holder's record, a record per member (none once it exited) that `stored` (the
    cluster's member records: key → value) does not hold as it should be, and the deletion
    of every other member record `stored` has: one transaction's operations."""
    cluster = record.spec.name
    names = sorted(members) if record.state != "exited" else []
    puts = [member_put(cluster, record.dir, name) for name in names]
    stale = stored.keys() - {put.key for put in puts}
    changed = [put for put in puts if stored.get(put.key) != put.value]
    return [Put(holder_key(cluster), encode(record)), *map(Delete, sorted(stale)), *changed]


# --- as claims-journal entries ------------------------------------------------------------


def holder_entry(cluster: str, record: HolderRecord, revision: int) -> ClaimInfo:
    """Owned by the holder process (pid and start time), or by fleetd while it starts one."""
    owner = f"pid:{record.pid}:{record.start_time}" if record.pid else "fleetd"
    return fleetd_entry(
        "holder",
        cluster,
        owner,
        held=record.state != "exited",
        revision=revision,
        path=record.dir,
        detail=record.state,
    )


def member_entries(
    cluster: str, kv: KeyValue, statuses: Mapping[str, MemberStatus]
) -> list[ClaimInfo]:
    """A live holder's member record as its member, socket and log entries."""
    record, name = decode_member(kv.value), kv.key.rpartition("/")[2]
    key = f"{cluster}:{name}"
    status = statuses.get(name)
    detail = str(status.state) if status is not None else ""
    held = functools.partial(fleetd_entry, held=True, revision=kv.mod_revision)
    return [
        held("member", key, cluster, path=record.dir, detail=detail),
        held("socket", key, key, path=record.socket, detail=detail),
        held("log", f"{key}:stdout", key, path=record.stdout),
        held("log", f"{key}:stderr", key, path=record.stderr),
    ]

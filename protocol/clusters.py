"""Control-socket ops for detached clusters: holders that fleetd starts, journals and re-adopts.

    cluster_up     -> ClusterResult   start a holder for a cluster (acquired | already_acquired,
                                      or contested when another definition holds the name)
    cluster_up_toml -> ClusterResult  the same, for the text of a fleet.toml, which fleetd parses
    cluster_down   -> ClusterResult   stop every member; released | already_released | absent
    member_status  -> MemberList      answered from fleetd's memory (holders push changes)
    member_wait    -> MemberList      until every named member runs; error as soon as one fails
    member_stop    -> MemberStatus    stop one member; its siblings keep running
    member_add     -> MemberStatus    boot a new member into a sibling's live cluster
    member_logs    -> LogPaths        where a member's stdout and stderr are (same host)
    logs_named     -> LogPathsList    the same for a member, or for each member of a cluster

A member is named `NAME` when that name is unique among the clusters fleetd knows, else
`CLUSTER/NAME`. Statuses carry their `cluster`.
"""

import msgspec

from protocol.base import Message, Op, Request
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.outcomes import Outcome
from protocol.status import MemberStatus


class ClusterResult(Message, frozen=True):
    """What up and down did (`outcome`), and the cluster as it stands."""

    outcome: Outcome
    cluster: str
    holder_pid: int | None = None
    runtime_dir: str = ""
    members: list[MemberStatus] = msgspec.field(default_factory=list)
    message: str = ""


class MemberList(Message, frozen=True):
    members: list[MemberStatus] = msgspec.field(default_factory=list)


class LogPaths(Message, frozen=True):
    """Where a member's logs are, and the member socket of its holder (where a follower asks
    whether the member is still there; "" from a fleetd that did not say)."""

    cluster: str
    member: str
    stdout: str
    stderr: str
    socket: str = ""


class LogPathsList(Message, frozen=True):
    """The logs of the member a name stands for, or of each member of the cluster it names
    (`cluster` True)."""

    logs: list[LogPaths] = msgspec.field(default_factory=list)
    cluster: bool = False


class ClusterUp(Op[ClusterResult], tag="cluster_up", frozen=True):
    """Start `spec` under a detached holder. Answers once every member socket listens (members
    may still be starting: wait with member_wait). With `idempotent`, a cluster already up with
    the same definition is `already_acquired`; without it, or with another definition, the
    answer is a `contested` error."""

    spec: ClusterSpec
    idempotent: bool = False


class ClusterUpToml(Op[ClusterResult], tag="cluster_up_toml", frozen=True):
    """cluster_up of the cluster that `text`, a fleet.toml, defines: fleetd parses it with
    protocol.definitions.parse_toml, so that a client need not import the parser (fleetctl's
    start-up fast path sends the file, and so does `fleetctl up`, so that both report the same
    errors). `source` names the file in those errors (the path as the user wrote it), `name`
    overrides the file's `name`, `directory` is the file's absolute directory, where its
    members run (protocol.definitions.in_directory; "" leaves their `cwd` as it is)."""

    text: str
    source: str = "fleet.toml"
    name: str | None = None
    idempotent: bool = False
    directory: str = ""


class ClusterDown(Op[ClusterResult], tag="cluster_down", frozen=True):
    cluster: str


class MemberStatusRequest(Op[MemberList], tag="member_status", frozen=True):
    """The named members (`absent` entries for unknown names), or every live member."""

    names: list[str] = msgspec.field(default_factory=list)


class MemberWait(Op[MemberList], tag="member_wait", frozen=True):
    """Until every named member is running: fails with member_failed as soon as one is in
    `error` or `stopped`, with absent for an unknown name, with timeout after `wait` seconds."""

    names: list[str]
    wait: float = 30.0


class MemberStop(Op[MemberStatus], tag="member_stop", frozen=True):
    name: str


class MemberAdd(Op[MemberStatus], tag="member_add", frozen=True):
    """Boot member `name` into the cluster of `sibling`, defined by `spec` (renamed `name`),
    else by the sibling's own definition (a new port, the same command)."""

    name: str
    sibling: str
    spec: MemberSpec | None = None


class MemberLogs(Op[LogPaths], tag="member_logs", frozen=True):
    name: str


class LogsNamed(Op[LogPathsList], tag="logs_named", frozen=True):
    """member_logs of the member `name`; for the name of a cluster that no member is called,
    of each of its members (as `fleetctl status CLUSTER`); absent for neither."""

    name: str


CLUSTER_REQUEST_TYPES: tuple[type[Request], ...] = (
    ClusterUp,
    ClusterUpToml,
    ClusterDown,
    MemberStatusRequest,
    MemberWait,
    MemberStop,
    MemberAdd,
    MemberLogs,
    LogsNamed,
)

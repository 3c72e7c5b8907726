"""Wire messages: frozen msgspec structs, requests a tagged union on ``op``.

Evolution rules: new fields get defaults; a field's type never changes; an op name is never
reused. Unknown fields are ignored, so an older peer can read a newer peer's frames.
"""

from typing import Any

import msgspec

from protocol.base import Empty as Empty  # noqa: PLC0414 (re-exported)
from protocol.base import Message as Message  # noqa: PLC0414 (re-exported)
from protocol.base import Op as Op  # noqa: PLC0414 (re-exported)
from protocol.base import Request as Request  # noqa: PLC0414 (re-exported)
from protocol.claims import (
    CLAIM_REQUEST_TYPES,
    ClaimAcquire,
    ClaimGc,
    ClaimInspect,
    ClaimListRequest,
    ClaimRelease,
)
from protocol.clusters import (
    CLUSTER_REQUEST_TYPES,
    ClusterApply,
    ClusterApplyToml,
    ClusterDown,
    ClusterUp,
    ClusterUpToml,
    LogsNamed,
    MemberAdd,
    MemberLogs,
    MemberRestart,
    MemberStart,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.leases import DEFAULT_TTL, MAX_WAIT, LeaseEvent, LeaseInfo
from protocol.outcomes import Outcome
from protocol.runs import (
    RUN_REQUEST_TYPES,
    Drain,
    EventEmit,
    EventList,
    ReceiptListRequest,
    ReceiptScore,
    RunCancel,
    RunListRequest,
    RunShow,
    RunSubmit,
    TaskListRequest,
)


class HelloResult(Message, frozen=True):
    version: int
    server: str
    pid: int


class VersionResult(Message, frozen=True):
    version: str
    protocol: int


class Hello(Op[HelloResult], tag="hello", frozen=True):
    """Exchanges protocol versions; the daemon refuses a mismatch, and so does the client."""

    version: int
    client: str = ""


class Ping(Op[Empty], tag="ping", frozen=True):
    pass


class Version(Op[VersionResult], tag="version", frozen=True):
    pass


class Shutdown(Op[Empty], tag="shutdown", frozen=True):
    """Asks the daemon to finish in-flight requests and exit 0."""


class MetricsText(Message, frozen=True):
    """fleetd's metrics in the Prometheus text exposition format (version 0.0.4)."""

    text: str


class Metrics(Op[MetricsText], tag="metrics", frozen=True):
    pass


class LeaseResult(Message, frozen=True):
    """The answer to a lease op (see protocol.leases): an outcome and the lease as it stands.

    ``message`` is one line for a human; on a takeover ``previous`` is the stale holder's record
    and ``fence`` says what STONITH did to its process: ``terminated`` (it exited after
    SIGTERM), ``killed`` (it needed SIGKILL), ``gone``, ``pid_reused`` (the PID now belongs to
    another process, which was left alone), ``not_permitted``, ``other_host`` or ``survived``."""

    outcome: Outcome
    lease: LeaseInfo | None = None
    message: str = ""
    previous: LeaseInfo | None = None
    fence: str = ""


class LeaseList(Message, frozen=True):
    leases: list[LeaseInfo] = msgspec.field(default_factory=list)


class LeaseEvents(Message, frozen=True):
    """Events after the cursor asked for, oldest first, and the cursor to ask with next."""

    cursor: int
    epoch: str
    events: list[LeaseEvent] = msgspec.field(default_factory=list)


class LeaseAcquire(Op[LeaseResult], tag="lease_acquire", frozen=True):
    """Acquire `name` for `owner`; `pid` binds the lease to the peer (0) or an ancestor of it."""

    name: str
    owner: str
    ttl: float = DEFAULT_TTL
    pid: int = 0


class LeaseHeartbeat(Op[LeaseResult], tag="lease_heartbeat", frozen=True):
    """Renew `owner`'s lease on `name` to its full TTL; with `token`, only that grant of it."""

    name: str
    owner: str
    token: int = 0


class LeaseRelease(Op[LeaseResult], tag="lease_release", frozen=True):
    name: str
    owner: str
    token: int = 0


class LeaseInspect(Op[LeaseResult], tag="lease_inspect", frozen=True):
    name: str


class LeaseListRequest(Op[LeaseList], tag="lease_list", frozen=True):
    prefix: str = ""


class LeaseWatch(Op[LeaseEvents], tag="lease_watch", frozen=True):
    """A long poll for lease events under `prefix` after cursor `after` (None: from now)."""

    prefix: str = ""
    after: int | None = None
    epoch: str = ""
    wait: float = MAX_WAIT / 2


AnyRequest = (
    Hello
    | Ping
    | Version
    | Shutdown
    | Metrics
    | LeaseAcquire
    | LeaseHeartbeat
    | LeaseRelease
    | LeaseInspect
    | LeaseListRequest
    | LeaseWatch
    | ClusterUp
    | ClusterUpToml
    | ClusterDown
    | MemberStatusRequest
    | MemberWait
    | MemberStop
    | MemberAdd
    | MemberLogs
    | LogsNamed
    | MemberStart
    | MemberRestart
    | ClusterApply
    | ClusterApplyToml
    | ClaimAcquire
    | ClaimRelease
    | ClaimInspect
    | ClaimListRequest
    | ClaimGc
    | RunSubmit
    | RunListRequest
    | RunShow
    | RunCancel
    | TaskListRequest
    | EventList
    | EventEmit
    | ReceiptListRequest
    | ReceiptScore
    | Drain
)
REQUEST_TYPES: tuple[type[Request], ...] = (
    Hello,
    Ping,
    Version,
    Shutdown,
    Metrics,
    LeaseAcquire,
    LeaseHeartbeat,
    LeaseRelease,
    LeaseInspect,
    LeaseListRequest,
    LeaseWatch,
    *CLUSTER_REQUEST_TYPES,
    *CLAIM_REQUEST_TYPES,
    *RUN_REQUEST_TYPES,
)
OPS: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in REQUEST_TYPES)


class ErrorBody(Message, frozen=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class Response(Message, frozen=True):
    """What the daemon sends: `result` when ok, `error` otherwise. `id` is null only when the
    request was too broken to carry one."""

    id: int | None
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


class RawResponse(Message, frozen=True):
    """What the client decodes: the result stays raw until the caller's type is known."""

    id: int | None
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorBody | None = None

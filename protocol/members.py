"""The member-socket protocol: what a holder answers on each of its per-member unix sockets.

Same framing and response envelope as the control socket (protocol.framing), its own ops:

    status     -> MemberStatus   a member's status (default: the socket's own member)
    stop       -> MemberStatus   stop one member; the holder keeps serving its siblings
    addmember  -> MemberStatus   boot a new member into the live cluster, same peers
    start      -> MemberStatus   start again a member stopped in this holder: same port, same
                                 directory (one already running answers as it is)
    restart    -> MemberStatus   stop a member and start it again, same port and directory,
                                 with its definition or a new one
    remove     -> MemberStatus   stop a member and forget it: its status is `absent` from now on
    bind       -> BindResult     exchange versions and pids (bound mode, step 1)
    ack        -> Empty          the client accepted the holder's version (step 2): only now
                                 does the holder treat this connection's EOF as the client dying
    watch      -> WatchResult    every member's status now; then, on the same connection, one
                                 pushed response with the watch's id and a MemberStatus result
                                 each time any member changes state, until the connection closes

Evolution follows protocol.messages: new fields get defaults, ops are never reused, and
PROTOCOL_VERSION (exchanged on bind) is bumped only for an incompatible change.
"""

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from protocol.definitions import MemberSpec
from protocol.errors import Absent, MemberFailed
from protocol.framing import decode_request_with
from protocol.messages import Empty, Message, Op, Request
from protocol.paths import socket_path_problem
from protocol.status import MemberState as MemberState  # noqa: PLC0414 (re-exported)
from protocol.status import MemberStatus as MemberStatus  # noqa: PLC0414 (re-exported)


class BindResult(Message, frozen=True):
    version: int
    pid: int


class WatchResult(Message, frozen=True):
    """Every member's status: the answer to `status_all`, and the snapshot a watch starts with."""

    members: list[MemberStatus]


class Status(Op[MemberStatus], tag="status", frozen=True):
    """The status of `name`, else of the socket's own member; `absent` for an unknown name."""

    name: str | None = None


class StatusAll(Op[WatchResult], tag="status_all", frozen=True):
    """Every member's status in one answer, in the cluster's order: one request, however many
    members, where asking for each would cost a round trip per member."""


class Stop(Op[MemberStatus], tag="stop", frozen=True):
    """Stop `name` (else the socket's member): stop_signal to its process group, SIGKILL after
    stop_timeout. Answers once it is stopped. It leaves (its socket closes), its definition and
    port kept for `start`. The holder exits when its last member leaves."""

    name: str | None = None


class AddMember(Op[MemberStatus], tag="addmember", frozen=True):
    """Boot a new member into the cluster. Answers at once (state starting or preparing):
    watch or poll status to see it become ready."""

    spec: MemberSpec


class Start(Op[MemberStatus], tag="start", frozen=True):
    """Start `name` again: a member this holder stopped (or was started with as stopped, see
    fleetd.holder's --stopped) comes back with the definition, port and directory it had;
    one in `error`, or stopped after a clean exit, is started afresh. Answers at once (state
    starting or preparing). A member preparing, starting or running answers its status
    untouched; an unknown name is `absent`."""

    name: str


class Restart(Op[MemberStatus], tag="restart", frozen=True):
    """Stop `name` (as `stop` does) if it runs, then start it again with the same port and
    directory: as it was defined, or as `spec` (its new definition, named `name`). The holder
    stays up meanwhile, even for its only member. Answers once it is starting again."""

    name: str
    spec: MemberSpec | None = None


class Remove(Op[MemberStatus], tag="remove", frozen=True):
    """Stop `name` if it runs, and forget it: it cannot be started again, watchers get a last
    push with state `absent`, and so does this answer. The holder exits if it was the last."""

    name: str


class Bind(Op[BindResult], tag="bind", frozen=True):
    """Bound mode, step 1: the client's protocol version and pid. A version the holder does
    not speak is refused with `incompatible`."""

    version: int
    pid: int


class Ack(Op[Empty], tag="ack", frozen=True):
    """Bound mode, step 2, sent only after the client accepted the holder's version: from now
    on, this connection closing means the client is gone, and the holder stops everything."""


class Watch(Op[WatchResult], tag="watch", frozen=True):
    """Every member's status now (a WatchResult), then a push per change (see above)."""


AnyMemberRequest = (
    Status | StatusAll | Stop | AddMember | Start | Restart | Remove | Bind | Ack | Watch
)
MEMBER_REQUEST_TYPES: tuple[type[Request], ...] = (
    Status,
    StatusAll,
    Stop,
    AddMember,
    Start,
    Restart,
    Remove,
    Bind,
    Ack,
    Watch,
)
MEMBER_OPS: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in MEMBER_REQUEST_TYPES)

_member_request_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyMemberRequest)


def decode_member_request(frame: bytes) -> Request:
    """Decode one member-socket frame, raising the error its response should carry."""
    return decode_request_with(_member_request_decoder, MEMBER_OPS, frame)


def wait_verdict(statuses: Mapping[str, MemberStatus]) -> bool:
    """What waiting for members to run says of their statuses (by the name waited for):
    True when every one runs, False while one may still get there (starting, preparing,
    waiting to restart after a clean exit); raises Absent for one that does not exist and
    MemberFailed for one that will not run without someone acting: `stopped`, or `error`
    (it failed; its error says why). fleetd's member_wait and a bound cluster's wait_running
    both mean this."""
    for key, status in statuses.items():
        if status.state == MemberState.ABSENT:
            raise Absent(f"no member {key!r}")
        if status.state in (MemberState.ERROR, MemberState.STOPPED):
            reason = status.error or f"it is {status.state}"
            raise MemberFailed(f"member {key!r} failed: {reason}", member=key)
    return all(status.state == MemberState.RUNNING for status in statuses.values())


# --- where a holder's files live (both sides compute them the same way) ----------------------

HOLDER_PIDFILE = "holder.pid"
HOLDER_LOG = "holder.log"
CLUSTER_FILE = "cluster.json"
NOTIFY_SOCKET = "notify"
PIDFILE = "pid"
"""In a member's directory: "PID START_TIME" of its live process (see fleetd.core.pidfiles)."""
STATEFILE = "state.json"
"""In a member's directory: its last MemberStatus, as JSON."""
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"


def member_socket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, f"{name}.sock")


def member_dir(runtime_dir: str, name: str) -> str:
    """The member's own directory ({dir}): its logs, pidfile and state file."""
    return os.path.join(runtime_dir, name)


def member_log_path(runtime_dir: str, name: str, *, stderr: bool = False) -> str:
    return os.path.join(member_dir(runtime_dir, name), STDERR_LOG if stderr else STDOUT_LOG)


def member_pidfile(runtime_dir: str, name: str) -> str:
    return os.path.join(member_dir(runtime_dir, name), PIDFILE)


def member_statefile(runtime_dir: str, name: str) -> str:
    return os.path.join(member_dir(runtime_dir, name), STATEFILE)


def runtime_dir_problem(runtime_dir: str, names: list[str]) -> str | None:
    """Why the sockets of these members cannot live in `runtime_dir`, or None."""
    candidates = [os.path.join(runtime_dir, NOTIFY_SOCKET)]
    candidates += [member_socket_path(runtime_dir, name) for name in names]
    longest = max(candidates, key=lambda path: len(path.encode()))
    return socket_path_problem(longest)

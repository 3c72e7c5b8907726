"""One exception tree for both sides of the wire.

    FleetError                     error, exit 1
    ├── BadFrame                   bad_frame: not JSON, not UTF-8, not an object
    │   └── FrameTooLarge          frame_too_large: over the frame limit
    ├── UnknownOp                  unknown_op: an op this side does not know
    ├── InvalidRequest             invalid_request: missing field, wrong type, bad value
    ├── Unsupported                unsupported: understood but not implemented here
    ├── Internal                   internal: a bug; the daemon logged the traceback
    ├── StoreFull                  no_space: the disk is full; nothing was written
    ├── Compacted                  compacted: that revision is no longer in the store's history
    ├── AlreadyRunning             already_running: another fleetd holds the lock
    ├── StartupError               startup_failed: fleetd cannot start as configured
    │   ├── StateLost              state_lost: the store was lost, rolled back or replaced
    │   └── StoreCorrupt           store_corrupt: the store's files cannot be read
    ├── UnsafePath                 unsafe_path: a symbolic link, or a path another user may change
    ├── ClientClosed               closed: your code closed the client, then used it
    ├── PermissionDenied           permission_denied: another user's process, refused
    ├── MemberFailed               member_failed: an awaited member will not run
    ├── LimitExceeded              limit_exceeded: past one of a daemon's bounds per client
    ├── NotOwned                   not_owned, exit 10
    ├── NotEnabled                 not_enabled, exit 10
    ├── Absent                     absent, exit 11
    ├── Contested                  contested, exit 12
    ├── Timeout                    timeout, exit 13
    ├── Unavailable                unavailable, exit 14: no daemon answers at the socket
    │   ├── ConnectionLost         connection_lost: the daemon went away mid-conversation
    │   └── StoreUnavailable       store_unavailable: fleetd's store (etcd) does not answer
    └── Incompatible               incompatible, exit 15: protocol versions differ

The daemon turns an exception into an error frame with ``code``; the client turns the code
back into the same class with ``error_for_code``. Codes are stable: never reuse one.
"""

from typing import Any, ClassVar

from protocol.outcomes import Outcome


class FleetError(Exception):
    """Base of every error fleet reports; `code` travels on the wire, `outcome` maps to exit."""

    code: ClassVar[str] = "error"
    outcome: ClassVar[Outcome] = Outcome.ERROR

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadFrame(FleetError):
    """The bytes are not a JSON object; the connection is closed after the error frame."""

    code = "bad_frame"


class FrameTooLarge(BadFrame):
    """A line exceeded the frame limit; the stream cannot be resynchronised, so it is closed."""

    code = "frame_too_large"


class UnknownOp(FleetError):
    """The request's op is not one this peer knows (perhaps a newer client)."""

    code = "unknown_op"


class InvalidRequest(FleetError):
    """A field is missing, has the wrong type or a value out of range; fix the request."""

    code = "invalid_request"


class Unsupported(FleetError):
    """Well-formed, understood, and not implemented here (say, a remote worker host)."""

    code = "unsupported"


class Internal(FleetError):
    """An unexpected failure inside fleetd: a bug. The daemon logged the traceback."""

    code = "internal"


class StoreFull(FleetError):
    """The store could not write because the disk is full; nothing was changed."""

    code = "no_space"


class Compacted(FleetError):
    """A watch asked for changes older than the store's history keeps: read the current state,
    then watch from the revision of that read plus one."""

    code = "compacted"


class AlreadyRunning(FleetError):
    """Another fleetd holds the lock on this socket or state directory."""

    code = "already_running"


class StartupError(FleetError):
    """fleetd cannot start as configured (path too long, directory not writable...)."""

    code = "startup_failed"


class StateLost(StartupError):
    """The state directory says a store existed that is not there as it was: deleted, emptied,
    rolled back to an older copy, or another store put in its place. Restore it, or archive
    what is there with `fleetd reset-state` (fencing tokens keep growing either way)."""

    code = "state_lost"


class StoreCorrupt(StartupError):
    """The store's files exist but cannot be read as a store (a garbled header, a file cut
    short, a directory where the file should be): restore them, or `fleetd reset-state`."""

    code = "store_corrupt"


class UnsafePath(FleetError):
    """A path fleetd would use is a symbolic link, not a file or directory of fleetd's own
    user, or writable by other users: fleetd never follows it; remove it or fix its owner."""

    code = "unsafe_path"


class ClientClosed(FleetError):
    """The client was used after your code closed it."""

    code = "closed"


class PermissionDenied(FleetError):
    """The peer runs as another user. fleetd serves only its own user and root; a client
    speaks only to a fleetd (or holder) of its own user or root, and refuses any other before
    sending it anything."""

    code = "permission_denied"


class MemberFailed(FleetError):
    """A member the caller waited for will not run without someone acting: it is `error` (the
    message carries its own error: its exit, its OS error, its start timeout) or `stopped`
    (protocol.members.wait_verdict)."""

    code = "member_failed"


class LimitExceeded(FleetError):
    """The peer went past one of the bounds a daemon sets per client (README, "Bounds").
    Past the cap on waits per connection only that request fails: wait for an earlier one to
    be answered, or open another connection. A partial frame over the budget for unfinished
    frames, or stalled mid-frame for too long, ends the connection after this error frame.
    Its details name the bound (`limit`) and give its `value`."""

    code = "limit_exceeded"


class NotOwned(FleetError):
    """The caller does not own the resource (any more): stop acting on it."""

    code = "not_owned"
    outcome = Outcome.NOT_OWNED


class NotEnabled(FleetError):
    """The feature is switched off in this daemon's configuration."""

    code = "not_enabled"
    outcome = Outcome.NOT_ENABLED


class Absent(FleetError):
    """No such resource."""

    code = "absent"
    outcome = Outcome.ABSENT


class Contested(FleetError):
    """Another live owner holds the resource."""

    code = "contested"
    outcome = Outcome.CONTESTED


class Timeout(FleetError):
    """The deadline passed before the operation completed."""

    code = "timeout"
    outcome = Outcome.TIMEOUT


class Unavailable(FleetError):
    """Nobody answers: no fleetd at the socket (start it, or point --socket/FLEET_SOCKET at
    it), or, for a member of a detached cluster, a holder fleetd cannot reach (still starting,
    or not answering): try again, or see the holder's log."""

    code = "unavailable"
    outcome = Outcome.UNAVAILABLE


class ConnectionLost(Unavailable):
    """The daemon closed the connection or died with requests in flight."""

    code = "connection_lost"


class StoreUnavailable(Unavailable):
    """fleetd's store does not answer (etcd down, unreachable, or without a quorum): the
    request did not happen, or may have if it was a write. fleetd goes on; try again."""

    code = "store_unavailable"


class Incompatible(FleetError):
    """The peers speak different protocol versions; upgrade the older side."""

    code = "incompatible"
    outcome = Outcome.INCOMPATIBLE


def _all_subclasses(cls: type[FleetError]) -> list[type[FleetError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


ERRORS_BY_CODE: dict[str, type[FleetError]] = {c.code: c for c in _all_subclasses(FleetError)}


def error_for_code(code: str, message: str, details: dict[str, Any] | None = None) -> FleetError:
    """Rebuild the exception a peer reported; an unknown code becomes a plain FleetError."""
    cls = ERRORS_BY_CODE.get(code, FleetError)
    error = cls(message)
    error.details = dict(details or {})  # not as keywords: a peer may send any key, "message" too
    if cls is FleetError and code != FleetError.code:
        error.details["code"] = code
    return error

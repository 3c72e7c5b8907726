"""Leases on the wire: the records fleetd reports, and the rules both sides check.

The ops themselves (requests and their results) live in ``protocol.messages`` with every other
control-socket op, so that the request union has one home and no import cycle:

    lease_acquire    -> LeaseResult      acquired | already_acquired | contested
    lease_heartbeat  -> LeaseResult      renewed | not_owned
    lease_release    -> LeaseResult      released | already_released | not_owned | absent
    lease_inspect    -> LeaseResult      ok | absent
    lease_list       -> LeaseList        every lease record under a prefix
    lease_watch      -> LeaseEvents      a long poll: events after a cursor (see below)

Those outcomes are answers, not errors: the response is ``ok`` and the result carries the
``outcome`` with the lease as it now stands. Errors (``invalid_request`` for a bad name, owner
or TTL; ``internal``; ``no_space``) are error frames as for any op.

Identity. The holder's ``identity`` is never taken from the request: fleetd reads the peer's
pid from SO_PEERCRED and the host, boot id and process start time from /proc. A request may
name ``pid``, the process to bind the lease to, only if it is the peer or one of its ancestors
(so ``fleetctl lease acquire`` in a script binds the lease to the script, not to itself).

Fencing. ``token`` is the store revision of the write that granted the lease: strictly
increasing per name (and globally), across fleetd restarts, never reused. A holder passes it
to whatever it writes, and may pass it back on heartbeat and release so that a lease it lost
and re-acquired (a newer token) is not mistaken for the one it held.

Watching is a long poll rather than a stream, so that it fits the control socket's one
response per request unchanged, survives reconnects without losing events, and works from the
blocking client: ``lease_watch`` with no ``after`` answers at once with the current cursor;
with ``after=N`` it answers as soon as there are events past N (or when ``wait`` runs out,
with none). Each answer carries the next cursor. A cursor from before fleetd restarted (the
``epoch`` differs) or older than the event buffer holds gets ``compacted``: list, then watch
from the cursor that answer gives.
"""

import re
from typing import Literal

import msgspec

from protocol.errors import InvalidRequest

MIN_TTL = 0.1
"""Seconds. Shorter leases could not be heartbeated reliably at ttl/3 over a busy host."""

MAX_TTL = 86_400.0
"""Seconds (a day). A lease is a liveness claim: a longer one would only hide a dead holder."""

DEFAULT_TTL = 15.0

MAX_WAIT = 60.0
"""Longest a lease_watch long poll may be held open, in seconds."""

_OWNER = re.compile(r"[\x21-\x7e]{1,256}")

LeaseState = Literal["held", "released", "expired"]
EventType = Literal["acquired", "released", "expired"]


class Identity(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which process holds a lease, as fleetd saw it. ``start_time`` is field 22 of
    /proc/PID/stat (clock ticks after boot): with ``boot_id`` it tells a PID reused by another
    process from the holder itself."""

    host: str
    boot_id: str
    pid: int
    start_time: int
    uid: int = -1


class LeaseInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A lease record. ``remaining`` (seconds) and ``expires_at`` (unix time, for humans) are
    0 unless the lease is held; fleetd decides expiry on its own monotonic clock."""

    name: str
    owner: str
    token: int
    ttl: float
    state: LeaseState
    identity: Identity
    remaining: float = 0.0
    expires_at: float = 0.0


class LeaseEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened to a lease. ``deadline`` is set on ``expired`` events: the
    moment the lease ran out, on fleetd's CLOCK_MONOTONIC (comparable on the same host only)."""

    seq: int
    type: EventType
    lease: LeaseInfo
    deadline: float = 0.0


def check_owner(owner: str) -> None:
    if not _OWNER.fullmatch(owner):
        raise InvalidRequest(
            f"invalid owner {owner[:80]!r}: use 1 to 256 printable ASCII characters, no spaces",
            owner=owner[:80],
        )


def check_ttl(ttl: float) -> None:
    if not MIN_TTL <= ttl <= MAX_TTL:  # also refuses NaN
        raise InvalidRequest(
            f"invalid ttl {ttl:g}s: a lease lasts from {MIN_TTL:g}s to {MAX_TTL:g}s",
            ttl=ttl,
        )

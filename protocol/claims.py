"""The claims journal on the wire: every resource fleet creates is a journal entry with an owner.

    claim_acquire   -> ClaimResult   acquired | already_acquired | contested
    claim_release   -> ClaimResult   released | already_released | not_owned | absent
    claim_inspect   -> ClaimResult   ok | absent
    claim_list      -> ClaimList     every journal entry (optionally of one kind / owner)
    claim_gc        -> ClaimGcResult ok: what no live owner holds, removed (or, with dry_run,
                                     only listed), each item reported; ``kept`` counts the
                                     entries left in place

A journal entry is a ``ClaimInfo`` named by its ``kind`` and ``key``. Two kinds are claims that
scripts acquire and release (their content is delivered as a file):

- ``prompt_inbox``: the content is delivered as the file ``KEY`` in the owner's inbox
  directory (``$FLEET_STATE_DIR/inbox/OWNER/``), atomically: written and fsynced in a staging
  directory on the same filesystem, renamed into the inbox, and the inbox directory fsynced.
  A reader of the inbox never sees a partial file.
- ``file``: the same delivery into ``$FLEET_STATE_DIR/files/``.

Acquiring a claim held by another owner is ``contested``; by the same owner with the same
content it is ``already_acquired`` (nothing is rewritten), with other content ``contested``
(release it first). Releasing removes the delivered file; the record stays as ``released`` so
that a second release answers ``already_released`` rather than ``absent``.

The other kinds are fleetd's own resources, journalled by the module that creates them (the
records ``holders/``, ``members/`` and ``leases/`` in the store, written in its transactions):
list and inspect show them, acquire and release refuse them (``invalid_request``: use the
command that manages them). They carry no content (``sha256`` empty, ``size`` 0,
``acquired_at`` 0); ``detail`` gives the owning module's own state where it says more than
held/released. An owner that is itself a journal entry is named by that entry's key.

- ``holder`` KEY ``CLUSTER``: a detached holder; owner ``pid:PID:START`` (the holder process,
  by pid and start time; ``fleetd`` while it is being started); path its runtime directory;
  ``held`` while the holder runs, ``released`` once it exited (``detail`` starting | live |
  exited). An exited holder keeps its record and its files (logs, state files) until gc.
- ``member`` KEY ``CLUSTER:NAME``: a member of a holder; owner ``CLUSTER``; path its directory;
  ``detail`` its state (running, stopped, ...) while its holder runs.
- ``socket`` KEY ``CLUSTER:NAME`` and ``log`` KEY ``CLUSTER:NAME:stdout`` or ``:stderr``: a
  member's socket and logs; owner ``CLUSTER:NAME``; path the file.
  Members, sockets and logs are ``held`` while their holder runs; after it exited, those left
  on disk are ``released`` (an exited holder's socket records are gone, and so are its
  sockets, normally).
- ``lease`` KEY the lease's name (lease names may contain ``/``); owner the lease's owner;
  ``revision`` its fencing token; ``held`` while live (held, within its TTL), else
  ``released`` (``detail`` released or expired).

The revision of a holder, member, socket or log entry is that of its record's last write.

Owners, and gc. A claim's owner is live while it holds a live lease (within its TTL, its
process alive) or is a running member (as ``NAME`` or ``CLUSTER:NAME``) or a cluster with a
running member; it is known and gone when fleetd knows it otherwise (a lease expired or
released, a stopped member, any member of an exited holder). gc removes:

- a held claim whose owner is known and gone: its record and its delivered file;
- an exited holder's leftovers: its runtime directory (sockets, member directories with their
  logs and state files), its definition under ``$FLEET_STATE_DIR/clusters/``, and its
  ``holders/CLUSTER`` record (reported as holder, member, socket and log items). After that
  ``fleetctl status``, ``logs`` and ``down`` of the cluster answer ``absent``, not ``stopped``;
- a released or expired lease record whose process is gone (fencing tokens are store
  revisions, which only grow, deletions included: a later grant never reuses one).

It never touches a live holder (followed by its pidfd; nor one whose pidfile names a running
process, pid and start time), a live member's anything, a held lease, or the claims of an owner
fleetd knows nothing of (an agent whose inbox waits for it). Claims are collected before the
holders and leases whose members and owners made their owners known. gc is idempotent, and
fleetd runs it at start-up.

Content is UTF-8 text without NUL bytes, 1 byte to the daemon's configured maximum
(``FLEET_CLAIM_MAX_BYTES``, at most ``MAX_CONTENT``). Keys and owners of claims are path
components: 1 to 128 of ``A-Z a-z 0-9 . _ : @ -``, starting with a letter or digit, never
containing ``..``, ``/`` or NUL. Errors (``invalid_request``, ``no_space``, ``internal``) are
error frames; the journal and the inbox are unchanged after any of them.
"""

import re
from typing import Literal

import msgspec

from protocol import MAX_CLAIM_CONTENT
from protocol.base import Message, Op, Request
from protocol.errors import InvalidRequest
from protocol.names import check_name
from protocol.outcomes import Outcome

KINDS: tuple[str, ...] = ("file", "prompt_inbox")
"""The claims scripts acquire and release."""

FLEETD_KINDS: dict[str, str] = {
    "holder": "fleetctl up / down",
    "member": "fleetctl up / add / stop / down",
    "socket": "fleetctl up / down",
    "log": "fleetctl up / down / logs",
    "lease": "fleetctl lease …",
}
"""fleetd's own resources, read-only in the journal, and the commands that manage each."""

ALL_KINDS: tuple[str, ...] = KINDS + tuple(FLEETD_KINDS)

MAX_CONTENT = MAX_CLAIM_CONTENT
"""Bytes. The hard cap: base64 on the wire must fit a 1 MiB frame."""

ClaimState = Literal["held", "released"]

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class ClaimInfo(Message, frozen=True):
    """A journal entry. For a claim, ``revision`` is the store revision that granted it (a
    fencing token: strictly increasing, never reused) and ``path`` is where its content was
    delivered; for fleetd's own kinds see the module docstring. ``detail`` is the owning
    module's own state, where it says more than ``state`` (an expired lease, an exited
    holder, a stopped member); empty for claims."""

    kind: str
    key: str
    owner: str
    state: ClaimState
    revision: int
    path: str
    sha256: str
    size: int
    acquired_at: float
    released_at: float = 0.0
    detail: str = ""


class ClaimResult(Message, frozen=True):
    outcome: Outcome
    claim: ClaimInfo | None = None
    message: str = ""


class ClaimList(Message, frozen=True):
    claims: list[ClaimInfo] = msgspec.field(default_factory=list)


class ClaimAcquire(Op[ClaimResult], tag="claim_acquire", frozen=True):
    kind: str
    key: str
    owner: str
    content: bytes


class ClaimRelease(Op[ClaimResult], tag="claim_release", frozen=True):
    kind: str
    key: str
    owner: str


class ClaimInspect(Op[ClaimResult], tag="claim_inspect", frozen=True):
    kind: str
    key: str


class ClaimListRequest(Op[ClaimList], tag="claim_list", frozen=True):
    kind: str = ""
    owner: str = ""


class ClaimGcResult(Message, frozen=True):
    outcome: Outcome
    dry_run: bool
    removed: list[ClaimInfo] = msgspec.field(default_factory=list)
    kept: int = 0


class ClaimGc(Op[ClaimGcResult], tag="claim_gc", frozen=True):
    dry_run: bool = False


CLAIM_REQUEST_TYPES: tuple[type[Request], ...] = (
    ClaimAcquire,
    ClaimRelease,
    ClaimInspect,
    ClaimListRequest,
    ClaimGc,
)


def check_kind(kind: str, *, writable: bool = False) -> None:
    """A kind the journal knows; with `writable`, one that scripts acquire and release (a
    kind of fleetd's own names the command that manages it)."""
    if writable and kind in FLEETD_KINDS:
        raise InvalidRequest(f"kind {kind!r} is fleetd's own: use {FLEETD_KINDS[kind]}", kind=kind)
    if kind not in (KINDS if writable else ALL_KINDS):
        known = KINDS if writable else ALL_KINDS
        raise InvalidRequest(
            f"unknown claim kind {kind[:80]!r}: use one of {', '.join(known)}", kind=kind[:80]
        )


def check_key(kind: str, key: str) -> None:
    """A key of `kind`: a lease's key is its name (lease names may hold '/'); every other
    key is one safe path component."""
    if kind == "lease":
        check_name(key, "lease")
    else:
        check_component("key", key)


def check_component(what: str, value: str) -> None:
    """A key or owner: one safe path component."""
    if "\0" in value:
        raise InvalidRequest(f"invalid {what}: it contains a NUL byte")
    if "/" in value or ".." in value:
        raise InvalidRequest(f"invalid {what} {value[:80]!r}: '/' and '..' are refused")
    if not _COMPONENT.fullmatch(value):
        raise InvalidRequest(
            f"invalid {what} {value[:80]!r}: use 1 to 128 characters from A-Z a-z 0-9 "
            "and . _ : @ -, starting with a letter or digit"
        )


def check_content(content: bytes, maximum: int) -> None:
    if not content:
        raise InvalidRequest("empty content: a claim delivers 1 byte or more (from stdin)")
    if len(content) > maximum:
        raise InvalidRequest(
            f"content is {len(content)} bytes, over the maximum of {maximum}",
            size=len(content),
            maximum=maximum,
        )
    if b"\0" in content:
        raise InvalidRequest("binary content refused: it contains a NUL byte")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"binary content refused: not UTF-8 text (byte {exc.start})") from None

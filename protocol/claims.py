"""The claims journal on the wire: every resource fleet creates is a claim with an owner.

    claim_acquire   -> ClaimResult   acquired | already_acquired | contested
    claim_release   -> ClaimResult   released | already_released | not_owned | absent
    claim_inspect   -> ClaimResult   ok | absent
    claim_list      -> ClaimList     every claim record (optionally of one kind / owner)
    claim_gc        -> ClaimGcResult ok: the held claims whose owner is gone, removed (or, with
                                     dry_run, only listed)

An owner is live while it holds a live lease (within its TTL, its process alive) or is a
running member (by NAME or CLUSTER/NAME) or a cluster with a running member. gc removes a held
claim of any other owner: its record and its delivered file. fleetd runs gc at start-up.

A claim is named by its ``kind`` and ``key``. Kinds:

- ``prompt_inbox``: the content is delivered as the file ``KEY`` in the owner's inbox
  directory (``$FLEET_STATE_DIR/inbox/OWNER/``), atomically: written and fsynced in a staging
  directory on the same filesystem, renamed into the inbox, and the inbox directory fsynced.
  A reader of the inbox never sees a partial file.
- ``file``: the same delivery into ``$FLEET_STATE_DIR/files/``.

Acquiring a claim held by another owner is ``contested``; by the same owner with the same
content it is ``already_acquired`` (nothing is rewritten), with other content ``contested``
(release it first). Releasing removes the delivered file; the record stays as ``released`` so
that a second release answers ``already_released`` rather than ``absent``.

Content is UTF-8 text without NUL bytes, 1 byte to the daemon's configured maximum
(``FLEET_CLAIM_MAX_BYTES``, at most ``MAX_CONTENT``). Keys and owners are path components:
1 to 128 of ``A-Z a-z 0-9 . _ : @ -``, starting with a letter or digit, never containing
``..``, ``/`` or NUL. Errors (``invalid_request``, ``no_space``, ``internal``) are error
frames; the journal and the inbox are unchanged after any of them.
"""

import re
from typing import Literal

import msgspec

from protocol.base import Message, Request
from protocol.errors import InvalidRequest
from protocol.outcomes import Outcome

KINDS: tuple[str, ...] = ("file", "prompt_inbox")

MAX_CONTENT = 512 * 1024
"""Bytes. The hard cap: base64 on the wire must fit a 1 MiB frame."""

ClaimState = Literal["held", "released"]

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class ClaimInfo(Message, frozen=True):
    """A claim record. ``revision`` is the store revision that granted it (a fencing token:
    strictly increasing, never reused); ``path`` is where its content was delivered."""

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


class ClaimResult(Message, frozen=True):
    outcome: Outcome
    claim: ClaimInfo | None = None
    message: str = ""


class ClaimList(Message, frozen=True):
    claims: list[ClaimInfo] = msgspec.field(default_factory=list)


class ClaimAcquire(Request, tag="claim_acquire", frozen=True):
    kind: str
    key: str
    owner: str
    content: bytes
    result_type = ClaimResult


class ClaimRelease(Request, tag="claim_release", frozen=True):
    kind: str
    key: str
    owner: str
    result_type = ClaimResult


class ClaimInspect(Request, tag="claim_inspect", frozen=True):
    kind: str
    key: str
    result_type = ClaimResult


class ClaimListRequest(Request, tag="claim_list", frozen=True):
    kind: str = ""
    owner: str = ""
    result_type = ClaimList


class ClaimGcResult(Message, frozen=True):
    outcome: Outcome
    dry_run: bool
    removed: list[ClaimInfo] = msgspec.field(default_factory=list)
    kept: int = 0


class ClaimGc(Request, tag="claim_gc", frozen=True):
    dry_run: bool = False
    result_type = ClaimGcResult


CLAIM_REQUEST_TYPES: tuple[type[Request], ...] = (
    ClaimAcquire,
    ClaimRelease,
    ClaimInspect,
    ClaimListRequest,
    ClaimGc,
)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidRequest(
            f"unknown claim kind {kind[:80]!r}: use one of {', '.join(KINDS)}", kind=kind[:80]
        )


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

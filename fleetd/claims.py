"""The claims journal: who owns which delivered resource, and the files themselves.

    decide_acquire / decide_release   pure verdicts on a stored record
    ClaimService                      the edges: the store, the files (fleetd.delivery), the
                                      per-claim locks, and the journal's providers
                                      (fleetd.journal), whose entries it lists and whose
                                      collection gc runs

Durability: an answer is given only once everything it promises is durable; the order in
which the pieces become durable is free, and start-up repairs what a crash leaves between them.

- ACQUIRED means the record and the content are durable, and the file is visible now and
  after any crash once fleetd has started again. Acquire writes the content to a staging
  file (a new one, or a withdrawn one reused: fleetd.delivery), then in one round,
  concurrently, writes it out (no flush) and commits the record, which names its staging
  file (``staged``) and the content's size and digest, and the content itself (Delivered:
  the release's record leaves it out). So the store's commit is the one flush an acquire
  waits for. A content over RECORDED stays out of its record, and its file is flushed
  instead (its data, and its name) alongside the commit. When both have succeeded the
  staging file is renamed into place and the answer is given; the fsync of the inbox
  directory is not awaited (a file batch does it). If the commit fails, the staging file
  goes back to the pool (or is removed) and nothing has changed. If the write-out fails (a
  full disk can show there) after the record committed, the previous record is written back
  (or the new one deleted), the staging file removed and the write-out's error answered;
  should that write fail too, it is logged, and start-up delivers the claim (below).
- RELEASED means the ``released`` record is durable and the file gone, now and after any
  restart: release commits the record (without the content), moves the file out of its
  directory (a rename into the staging directory, where it waits to be reused:
  fleetd.delivery) and answers; the directory's fsync is not awaited, since start-up
  removes released claims' files (and clears staging).
- ALREADY_ACQUIRED means the file is in place: an idempotent retry whose file is missing
  delivers it again (one stat per such request).
- The inbox never shows a partial file, even after a power loss: a file is renamed in only
  once it is written out, and the journal commit that makes the rename durable flushes the
  disk's cache first. This relies on rename being atomic across a crash, as on a journaling
  file system (ext4, XFS, btrfs), where the state directory must live.
- Each request fails or succeeds alone; a full disk answers StoreFull and loses nothing.

Start-up (``reconcile``, before fleetd serves): a held record whose staging file is still
there, with the record's size and digest, is rolled forward (the file renamed into place and
fsynced); a held record whose file is in neither place (a power loss took its rename or its
staging, or its compensation failed) is delivered again from its content in the store; one
that does not hold its content (over RECORDED, or a record of a fleetd before contents were
kept) had its file flushed before any answer, so it was never answered (unless a hand removed
the file since), and is dropped with a warning (a retry by its caller delivers again).
Staging files no held record names are removed, released claims' files too, and files no
record explains are moved to ``quarantine/`` (logged, never deleted: it may be somebody's
only copy).

Concurrent requests share their disk work: the staging of many acquires is written out
together (fleetd.delivery), and their records committed together (the store's group
commit). Each claim's steps happen in order under its own lock (NameLocks). The records of
the claims used lately are kept in memory (``_Recent``), so that a request waits for no
store read before its write.

Every file operation goes through the state directory's descriptor (fleetd.core.dirs): a link
planted in the inbox is moved aside as a link, never followed.
"""

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.core.locks import NameLocks
from fleetd.core.metrics import Family, gauge
from fleetd.delivery import STAGING, FileBatches, Where, place, present, sync, withdraw
from fleetd.journal import JournalProvider, Owners
from fleetd.presence import home_of
from fleetd.store import Compare, Delete, KeyValue, Put, Store, TxnResult
from protocol.claims import (
    KINDS,
    MAX_CONTENT,
    ClaimAcquire,
    ClaimGc,
    ClaimGcResult,
    ClaimInfo,
    ClaimInspect,
    ClaimList,
    ClaimListRequest,
    ClaimRelease,
    ClaimResult,
    ClaimState,
    check_component,
    check_content,
    check_key,
    check_kind,
)
from protocol.errors import (
    FleetError,
    Internal,
    InvalidRequest,
    StoreFull,
    StoreUnavailable,
    UnsafePath,
)
from protocol.outcomes import Outcome

log = structlog.get_logger("fleetd.claims")

PREFIX = "claims/"
"""Where claim records live in the store: ``claims/KIND/KEY``."""

INBOX = "inbox"
FILES = "files"
QUARANTINE = "quarantine"
GC_CONCURRENCY = 32
"""Claims gc collects at once: enough for the store to batch their deletions."""
MAX_BYTES_ENV = "FLEET_CLAIM_MAX_BYTES"
MOVED_RETRIES = 3
"""Tries of a request whose record other fleetds keep writing (a shared store)."""
RECORDED = 16 * 1024
"""Bytes: the largest content its record holds (Delivered), so that its file needs no flush
of its own. A larger one's file is flushed: in the record it would cost the store more than
the flush (it is written to the store's history twice, with the acquire and the release)."""
RECENT = 4096
"""Claim records kept in memory, the most recently used: a request for one of them needs no
store read before its write."""


class StoredClaim(msgspec.Struct, frozen=True, kw_only=True):
    """A claim as journalled. ``revision`` 0 means "the revision of this write"."""

    owner: str
    state: ClaimState
    path: str
    sha256: str
    size: int
    acquired_at: float
    released_at: float = 0.0
    revision: int = 0
    staged: str = ""
    """The staging file its content was flushed to before the rename into place: start-up
    rolls a held claim forward from it (fleetd.delivery)."""
    home: str = ""
    """On a shared store, the fleetd whose state directory holds the file (`home_of`): only it
    can withdraw, deliver again, collect or reconcile it. Empty: this fleetd's."""


class Delivered(StoredClaim, frozen=True, kw_only=True):
    """A held claim's record as its acquire writes it: with the content, so that the content
    is durable in the store's commit (the one flush an acquire waits for), and start-up can
    deliver the file again. Read as a StoredClaim, the content is skipped: listings and the
    records kept in memory never hold it. The release's record leaves it out."""

    content: bytes = b""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StoredClaim).decode
_decode_delivered = msgspec.json.Decoder(Delivered).decode


Entries = list[ClaimInfo]
"""(An alias: ClaimService.list shadows the builtin in the class's annotations.)"""


def record_key(kind: str, key: str) -> str:
    return f"{PREFIX}{kind}/{key}"


class _Moved(Exception):
    """The record was written by another fleetd since we read it (a shared store)."""


# Decisions ---------------------------------------------------------------------------------


def decide_acquire(record: StoredClaim | None, owner: str, sha256: str) -> Outcome:
    """ACQUIRED means: deliver and record."""
    if record is None or record.state == "released":
        return Outcome.ACQUIRED
    if record.owner != owner or record.sha256 != sha256:
        return Outcome.CONTESTED
    return Outcome.ALREADY_ACQUIRED


def decide_release(record: StoredClaim | None, owner: str) -> Outcome:
    """RELEASED means: record the release and withdraw the file."""
    if record is None:
        return Outcome.ABSENT
    if record.owner != owner:
        return Outcome.NOT_OWNED
    return Outcome.RELEASED if record.state == "held" else Outcome.ALREADY_RELEASED


# Files -------------------------------------------------------------------------------------


def relative_path(kind: str, key: str, owner: str) -> tuple[str, ...]:
    """Where a claim's file lives under the state directory."""
    return (INBOX, owner, key) if kind == "prompt_inbox" else (FILES, key)


@contextmanager
def _parent_of(state: PrivateDir, parts: tuple[str, ...], *, create: bool) -> Iterator[PrivateDir]:
    """The directory holding the file at `parts` (all but its last), opened link-free."""
    opened: list[PrivateDir] = []
    try:
        directory = state
        for part in parts[:-1]:
            directory = directory.subdir(part, create=create)
            opened.append(directory)
        yield directory
    finally:
        for directory in reversed(opened):
            directory.close()


# The service -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Found:
    record: StoredClaim | None
    mod_revision: int


class _Recent:
    """Claim records as the store has them, for the keys used lately, least recent first.

    Exact, not a guess: only this fleetd writes claims, each write under its key's lock, and
    ClaimService remembers what it wrote (or read) there under that lock, and forgets a key
    while a write to it is in flight (one that fails or is cancelled may still have happened).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._found: dict[str, _Found] = {}

    def get(self, key: str) -> _Found | None:
        found = self._found.pop(key, None)
        if found is not None:
            self._found[key] = found
        return found

    def put(self, key: str, found: _Found) -> None:
        self._found.pop(key, None)
        self._found[key] = found
        if len(self._found) > self._size:
            del self._found[next(iter(self._found))]

    def forget(self, key: str) -> None:
        self._found.pop(key, None)


class ClaimService:
    """Claims over the control socket; start it with ``await tg.start(service.serve)`` once
    the store and the `providers` serve. `max_bytes` caps a claim's content (default:
    $FLEET_CLAIM_MAX_BYTES, else MAX_CONTENT). `providers` offer fleetd's own resources as
    journal entries, and the owners that gc asks about."""

    def __init__(
        self,
        store: Store,
        state: PrivateDir,
        *,
        max_bytes: int | None = None,
        providers: Sequence[JournalProvider] = (),
    ) -> None:
        self._store = store
        self._providers = tuple(providers)
        self._by_kind = {kind: p for p in self._providers for kind in p.journal_kinds}
        self.state = state
        self.max_bytes = min(max_bytes or _configured_max(), MAX_CONTENT)
        self._locks = NameLocks()
        self._files = FileBatches(state)
        self._shared = store.shared
        self._home = home_of(state) if store.shared else ""
        self._recent = _Recent(0 if store.shared else RECENT)  # others write a shared store

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile the files with the journal, then gc; a full disk postpones the gc (it
        runs again with the next `fleetctl gc`), it does not stop fleetd from starting. Then
        serve the file batches until cancelled."""
        async with anyio.create_task_group() as files:
            await files.start(self._files.serve)
            await self.reconcile()
            try:
                await self.gc(ClaimGc(id=0), Peer(os.getpid(), os.getuid(), os.getgid()))
            except StoreFull as exc:
                log.warning("startup_gc_postponed", error=exc.message)
            task_status.started()

    async def reconcile(self) -> None:
        """After a crash: roll held claims forward from their staging files, drop held
        records whose file is in neither place, clear staging, withdraw released claims'
        files, and quarantine files that no record explains."""
        decoded = [(kv, _decode(kv.value)) for kv in await self._store.range(PREFIX)]
        records = {kv.key: (kv, record) for kv, record in decoded if self._ours(record)}
        explained: dict[Where, ClaimState] = {}
        staged: dict[Where, StoredClaim] = {}
        for key, (_, record) in records.items():
            parts = _parts_of(key, record.owner)
            explained[parts] = record.state
            if record.state == "held" and record.staged:
                staged[parts] = record
        swept = await anyio.to_thread.run_sync(_sweep, self.state, explained, staged)
        for path in swept.rolled_forward:
            log.info("claim_rolled_forward", path=path)
        for path, moved_to in swept.quarantined:
            log.warning("claim_file_quarantined", path=path, moved_to=moved_to)
        delivered = dropped = 0
        for key, (kv, record) in records.items():
            parts = _parts_of(key, record.owner)
            if parts not in swept.missing:
                continue
            content = _decode_delivered(kv.value).content
            if hashlib.sha256(content).hexdigest() != record.sha256:
                dropped += await self._drop(key, kv.mod_revision, record)
            else:
                delivered += await self._deliver_again(parts, record, content)
        log.info(
            "claims_loaded",
            records=len(records) - dropped,
            held=sum(state == "held" for state in explained.values()) - dropped,
            rolled_forward=len(swept.rolled_forward),
            delivered_again=delivered,
            dropped=dropped,
            removed=swept.removed,
            quarantined=len(swept.quarantined),
        )

    async def _deliver_again(self, parts: Where, record: StoredClaim, content: bytes) -> bool:
        """A held claim whose file a crash took (a power loss can take its rename, or its
        staging: neither is flushed when the acquire is answered), delivered from its content
        in the store. One that cannot be (a full disk) keeps its record: the next start-up,
        or a retried acquire, delivers it."""
        try:
            await self._files.deliver(parts, content)
        except FleetError as exc:
            log.error("claim_not_delivered", path=record.path, error=exc.message)
            return False
        log.warning("claim_delivered_again", path=record.path)
        return True

    async def _drop(self, key: str, mod_revision: int, record: StoredClaim) -> bool:
        """A held record whose file is nowhere, and which does not hold its content (one over
        RECORDED, or written by a fleetd that kept none): its file was flushed before any
        answer, so the acquire was never answered (or its compensation failed), unless a hand
        removed the file since."""
        result = await self._store.txn((Compare(key, "mod", "==", mod_revision),), (Delete(key),))
        if result.succeeded:
            log.warning(
                "claim_dropped",
                claim=key.removeprefix(PREFIX),
                owner=record.owner,
                path=record.path,
                reason="its file is neither in place nor staged, and its record holds no"
                " content: the acquire was never answered, or the file was removed by hand",
            )
        return result.succeeded

    async def metrics(self) -> list[Family]:
        """Claims by kind and state: read from the store when scraped (one range)."""
        counts: dict[tuple[str, str], int] = {}
        for kv in await self._store.range(PREFIX):
            kind = kv.key.removeprefix(PREFIX).partition("/")[0]
            key = (kind, _stored(kv).state)
            counts[key] = counts.get(key, 0) + 1
        return [
            gauge(
                "fleet_claims",
                "Claims by kind and state.",
                (({"kind": kind, "state": state}, n) for (kind, state), n in counts.items()),
            )
        ]

    # Handlers --------------------------------------------------------------------------------

    def _ours(self, record: StoredClaim | None) -> bool:
        """Whether the claim's file is in our state directory."""
        return record is not None and record.home == self._home

    async def _retried(self, request: Callable[[], Awaitable[ClaimResult]]) -> ClaimResult:
        """`request` again, on what the store holds now, while other fleetds wrote its record
        between our read and our write (a shared store)."""
        for _ in range(MOVED_RETRIES):
            try:
                return await request()
            except _Moved:
                continue
        raise StoreUnavailable("the claim kept changing under other fleetds: try again")

    async def acquire(self, request: ClaimAcquire, peer: Peer) -> ClaimResult:
        check_kind(request.kind, writable=True)
        check_component("key", request.key)
        check_component("owner", request.owner)
        check_content(request.content, self.max_bytes)
        return await self._retried(lambda: self._acquire(request))

    async def _acquire(self, request: ClaimAcquire) -> ClaimResult:
        digest = hashlib.sha256(request.content).hexdigest()
        key = record_key(request.kind, request.key)
        parts = relative_path(request.kind, request.key, request.owner)
        async with self._locks.hold(key):
            found = await self._current(key)
            outcome = decide_acquire(found.record, request.owner, digest)
            if outcome is Outcome.ALREADY_ACQUIRED and self._ours(found.record):
                await self._redeliver_if_missing(parts, request.content)
            if outcome is not Outcome.ACQUIRED:
                assert found.record is not None
                return self._refused(request.kind, request.key, found, outcome, request.owner)
            with anyio.CancelScope(
                shield=True
            ):  # it ends with both steps known, one way or the other
                record = await self._deliver(key, found, parts, request, digest)
            return ClaimResult(
                outcome=Outcome.ACQUIRED,
                claim=_info(request.kind, request.key, record),
                message=f"{request.owner} acquired {request.kind} {request.key!r}",
            )

    async def _deliver(
        self, key: str, found: _Found, parts: Where, request: ClaimAcquire, digest: str
    ) -> StoredClaim:
        """The staging file written out (or flushed: `_durably`) and the record committed in one
        round, then the rename."""
        job = self._files.stage(parts, request.content, durable=_durably(request.content))
        record = StoredClaim(
            owner=request.owner,
            state="held",
            path=os.path.join(self.state.path, *parts),
            sha256=digest,
            size=len(request.content),
            acquired_at=round(time.time(), 3),
            staged=job.staged,
            home=self._home,
        )
        try:
            recorded = b"" if job.durable else request.content
            record = await self._write(key, found, record, recorded)
        except BaseException:
            with contextlib.suppress(FleetError):
                await self._files.staged(job)
            self._files.discard(job)
            raise
        try:
            await self._files.staged(job)
            self._files.place(job)
        except FleetError:
            self._files.discard(job)
            await self._compensate(key, found, record)
            raise
        return record

    async def _compensate(self, key: str, found: _Found, written: StoredClaim) -> None:
        """Undo a committed record whose file could not be delivered: the previous record
        back, or none. A failure is logged: start-up drops a held record with no file."""
        guard = Compare(key, "mod", "==", written.revision)
        undo: Put | Delete = (
            Delete(key) if found.record is None else Put(key, _encode(found.record))
        )
        try:
            result = await self._txn(key, guard, undo)
        except Exception as exc:
            log.error("claim_not_withdrawn", claim=key.removeprefix(PREFIX), error=repr(exc))
            return
        if result.succeeded:
            self._recent.put(key, _Found(found.record, result.revision if found.record else 0))

    async def _redeliver_if_missing(self, parts: Where, content: bytes) -> None:
        """A retry of an acquire answers ALREADY_ACQUIRED with the file in place: one removed
        meanwhile (by hand, or a crash's lost rename) is delivered again."""
        if not present(self.state, parts):
            log.warning("claim_file_redelivered", path=os.path.join(self.state.path, *parts))
            with anyio.CancelScope(shield=True):
                await self._files.deliver(parts, content, durable=_durably(content))

    async def release(self, request: ClaimRelease, peer: Peer) -> ClaimResult:
        check_kind(request.kind, writable=True)
        check_component("key", request.key)
        check_component("owner", request.owner)
        return await self._retried(lambda: self._release(request))

    async def _release(self, request: ClaimRelease) -> ClaimResult:
        key = record_key(request.kind, request.key)
        async with self._locks.hold(key):
            found = await self._current(key)
            outcome = decide_release(found.record, request.owner)
            if outcome is not Outcome.RELEASED:
                return self._refused(request.kind, request.key, found, outcome, request.owner)
            assert found.record is not None
            if not self._ours(found.record):
                raise InvalidRequest(
                    f"{request.kind} {request.key!r} was delivered through the fleetd at "
                    f"{found.record.home or 'a store of its own'}, which holds its file: "
                    "release it there",
                    home=found.record.home,
                )
            record = msgspec.structs.replace(
                found.record, state="released", released_at=round(time.time(), 3)
            )
            await self._write(key, found, record)
            self._files.withdraw(relative_path(request.kind, request.key, record.owner))
            return ClaimResult(
                outcome=Outcome.RELEASED,
                claim=_info(request.kind, request.key, record),
                message=f"{request.owner} released {request.kind} {request.key!r}",
            )

    async def inspect(self, request: ClaimInspect, peer: Peer) -> ClaimResult:
        check_kind(request.kind)
        check_key(request.kind, request.key)
        provider = self._by_kind.get(request.kind)
        if provider is not None:
            entry = await provider.journal_entry(request.kind, request.key)
            if entry is not None:
                return ClaimResult(outcome=Outcome.OK, claim=entry)
            return ClaimResult(outcome=Outcome.ABSENT, message=_absent(request.kind, request.key))
        found_claim = await self._read(record_key(request.kind, request.key))
        if found_claim.record is None:
            return ClaimResult(outcome=Outcome.ABSENT, message=_absent(request.kind, request.key))
        return ClaimResult(
            outcome=Outcome.OK, claim=_info(request.kind, request.key, found_claim.record)
        )

    async def list(self, request: ClaimListRequest, peer: Peer) -> ClaimList:
        """Claims first (in key order), then each provider's entries."""
        if request.kind:
            check_kind(request.kind)
        entries = await self._claims(request.kind)
        for provider in self._providers:
            if not request.kind or request.kind in provider.journal_kinds:
                entries += await provider.journal_entries()
        return ClaimList(
            claims=[
                entry
                for entry in entries
                if (not request.kind or entry.kind == request.kind)
                and (not request.owner or entry.owner == request.owner)
            ]
        )

    async def gc(self, request: ClaimGc, peer: Peer) -> ClaimGcResult:
        """Remove what no live owner holds, reporting each item; idempotent. Claims go first,
        judged by the owners known before anything is collected: collecting an exited holder
        or a dead lease record forgets the owners it made known."""
        owners = Owners.union(p.journal_owners() for p in self._providers)
        every = len((await self.list(ClaimListRequest(id=0), peer)).claims)
        removed = await self._collect_claims(owners, request.dry_run)
        for provider in self._providers:
            removed += await provider.journal_collect(dry_run=request.dry_run)
        if removed and not request.dry_run:
            log.info("journal_collected", items=[f"{c.kind}/{c.key}" for c in removed])
        return ClaimGcResult(
            outcome=Outcome.OK,
            dry_run=request.dry_run,
            removed=removed,
            kept=max(0, every - len(removed)),
        )

    async def _claims(self, kind: str) -> Entries:
        if kind and kind not in KINDS:
            return []
        prefix = PREFIX + (f"{kind}/" if kind else "")
        claims = []
        for kv in await self._store.range(prefix):
            kind_, _, name = kv.key.removeprefix(PREFIX).partition("/")
            claims.append(_info(kind_, name, _stored(kv)))
        return claims

    async def _collect_claims(self, owners: Owners, dry_run: bool) -> Entries:
        """Every held claim whose owner is known and gone: record, then file."""
        found = [
            (kv.key, record)
            for kv in await self._store.range(PREFIX)
            if (record := _stored(kv)).state == "held"
            and self._ours(record)
            and owners.gone(record.owner)
        ]
        done = [True] * len(found) if dry_run else await _concurrently(self._collect, found)
        removed: Entries = []
        for (key, record), collected in zip(found, done, strict=True):
            if collected:
                kind, _, name = key.removeprefix(PREFIX).partition("/")
                removed.append(_info(kind, name, record))
        return removed

    async def _collect(self, key: str, seen: StoredClaim) -> bool:
        """Delete the record, then the file; False if the claim moved on meanwhile."""
        async with self._locks.hold(key):
            found = await self._current(key)
            if found.record != seen:
                return False
            guard = Compare(key, "mod", "==", found.mod_revision)
            result = await self._txn(key, guard, Delete(key))
            if not result.succeeded:
                return False
            self._recent.put(key, _Found(None, 0))
            kind, _, name = key.removeprefix(PREFIX).partition("/")
            self._files.withdraw(relative_path(kind, name, seen.owner))
            return True

    # Edges -----------------------------------------------------------------------------------

    async def _read(self, key: str) -> _Found:
        """The record as the store has it now."""
        kv = await self._store.get(key)
        if kv is None:
            return _Found(None, 0)
        return _Found(_stored(kv), kv.mod_revision)

    async def _current(self, key: str) -> _Found:
        """The record, from memory when this fleetd wrote or read it lately. Only under the
        key's lock: a read outside it could remember a record older than a write made since."""
        found = self._recent.get(key)
        if found is None:
            found = await self._read(key)
            self._recent.put(key, found)
        return found

    async def _write(
        self, key: str, found: _Found, record: StoredClaim, content: bytes = b""
    ) -> StoredClaim:
        """Put `record` guarded on `found` (under the key's lock), with the `content` it
        delivers, if any (Delivered); returns it (without) with its revision."""
        guard = (
            Compare(key, "mod", "==", found.mod_revision)
            if found.record is not None
            else Compare(key, "create", "==", 0)
        )
        written = record
        if content:
            written = Delivered(**msgspec.structs.asdict(record), content=content)
        result = await self._txn(key, guard, Put(key, _encode(written)))
        if not result.succeeded:
            if self._shared:
                raise _Moved
            raise Internal(f"claim record {key!r} changed behind the claims journal")
        if not record.revision:
            record = msgspec.structs.replace(record, revision=result.revision)
        self._recent.put(key, _Found(record, result.revision))
        return record

    async def _txn(self, key: str, guard: Compare, write: Put | Delete) -> TxnResult:
        """One guarded write of `key`; what is remembered of it is forgotten unless it succeeds
        (a failed or cancelled write may or may not have happened)."""
        self._recent.forget(key)
        return await self._store.txn((guard,), (write,))

    def _refused(
        self, kind: str, key: str, found: _Found, outcome: Outcome, owner: str
    ) -> ClaimResult:
        record = found.record
        if record is None:
            return ClaimResult(outcome=outcome, message=_absent(kind, key))
        claim = _info(kind, key, record)
        match outcome:
            case Outcome.CONTESTED if record.owner == owner:
                text = f"{owner} holds {kind} {key!r} with other content: release it first"
            case Outcome.CONTESTED:
                text = f"{kind} {key!r} is held by {record.owner}"
            case Outcome.NOT_OWNED:
                text = f"{kind} {key!r} is {record.owner}'s, not {owner}'s"
            case Outcome.ALREADY_ACQUIRED:
                text = f"{owner} already holds {kind} {key!r} with this content"
            case _:
                text = f"{kind} {key!r} is already released"
        return ClaimResult(outcome=outcome, claim=claim, message=text)


async def _concurrently(
    collect: Callable[[str, StoredClaim], Awaitable[bool]],
    found: Sequence[tuple[str, StoredClaim]],
) -> list[bool]:
    """Collect concurrently (each claim under its own lock), so that the store commits many
    deletions together where one at a time each waits for its own fsync. No collection is
    cut short by another's error: the first error is raised once all have finished."""
    done = [False] * len(found)
    errors: list[Exception] = []
    limiter = anyio.CapacityLimiter(GC_CONCURRENCY)

    async def one(index: int, key: str, record: StoredClaim) -> None:
        async with limiter:
            try:
                done[index] = await collect(key, record)
            except Exception as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tasks:
        for index, (key, record) in enumerate(found):
            tasks.start_soon(one, index, key, record)
    if errors:
        raise errors[0]
    return done


def _stored(kv: KeyValue) -> StoredClaim:
    """Revision 0 is "this write's": a held record's one write is its acquire (a release
    rewrites it with the revision it had), so the key's mod_revision, never its
    create_revision, which is the first grant's once a key is released and acquired again."""
    record = _decode(kv.value)
    if not record.revision:
        record = msgspec.structs.replace(record, revision=kv.mod_revision)
    return record


def _info(kind: str, key: str, record: StoredClaim) -> ClaimInfo:
    return ClaimInfo(
        kind=kind,
        key=key,
        owner=record.owner,
        state=record.state,
        revision=record.revision,
        path=record.path,
        sha256=record.sha256,
        size=record.size,
        acquired_at=record.acquired_at,
        released_at=record.released_at,
    )


def _absent(kind: str, key: str) -> str:
    return f"no {kind} claim {key!r}"


def _durably(content: bytes) -> bool:
    """Whether its file must be flushed: its record does not hold it (RECORDED)."""
    return len(content) > RECORDED


def _configured_max() -> int:
    text = os.environ.get(MAX_BYTES_ENV, "")
    try:
        value = int(text) if text else MAX_CONTENT
    except ValueError:
        log.warning("claim_max_bytes_ignored", value=text)
        value = MAX_CONTENT
    return value if value > 0 else MAX_CONTENT


def _parts_of(key: str, owner: str) -> Where:
    kind, _, name = key.removeprefix(PREFIX).partition("/")
    return relative_path(kind, name, owner)


@dataclass
class _Swept:
    removed: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    """(where it was, where it is now)"""
    rolled_forward: list[str] = field(default_factory=list)
    missing: set[Where] = field(default_factory=set)
    """Held claims whose file is in neither place."""


def _sweep(
    state: PrivateDir, explained: dict[Where, ClaimState], staged: dict[Where, StoredClaim]
) -> _Swept:
    """Roll forward the held claims still staged (`staged`: their records), then remove
    staging leftovers (never answered) and released claims' files; move what no record
    explains to quarantine/<UTC time>/, keeping its place (files/KEY, inbox/OWNER/KEY). A
    link, or anything but a file, is moved as it is, never followed. Held claims whose file is
    then nowhere are `missing`."""
    swept = _Swept()
    quarantine = _Quarantine(state)
    try:
        with _existing(state, (STAGING,), quarantine) as staging:
            if staging is not None:
                _roll_forward(state, staging, staged, swept)
                for name in staging.names():
                    staging.remove_tree(name)
                    swept.removed.append(staging.join(name))
        _sweep_files(state, (FILES,), explained, swept, quarantine)
        with _existing(state, (INBOX,), quarantine) as inbox:
            owners = inbox.names() if inbox is not None else []
        for owner in owners:
            _sweep_files(state, (INBOX, owner), explained, swept, quarantine)
    finally:
        quarantine.close()
    swept.missing = {
        parts for parts, held in explained.items() if held == "held" and not _in_place(state, parts)
    }
    return swept


def _roll_forward(
    state: PrivateDir, staging: PrivateDir, staged: dict[Where, StoredClaim], swept: _Swept
) -> None:
    """Rename each held claim's staging file still there into place (replacing what is
    there: a released claim's file the crash kept), then fsync the directories changed. Only
    a file of the record's size and digest: the crash may have come before its flush (the
    acquire was never answered), and a reused staging file may then hold old content."""
    dirty: set[Where] = set()
    for parts, record in staged.items():
        name = record.staged
        entry = staging.entry(name)
        if entry is None or not stat.S_ISREG(entry.st_mode) or entry.st_size != record.size:
            continue
        if hashlib.sha256(staging.read_file(name, record.size)).hexdigest() != record.sha256:
            continue
        try:
            place(state, name, parts, dirty)
        except (OSError, FleetError) as exc:  # a link planted on its way: quarantined below
            log.warning("claim_not_rolled_forward", path=staging.join(name), error=str(exc))
            continue
        swept.rolled_forward.append(os.path.join(state.path, *parts))
    sync(state, dirty)


def _in_place(state: PrivateDir, parts: Where) -> bool:
    try:
        with _parent_of(state, parts, create=False) as parent:
            entry = parent.entry(parts[-1])
    except (FileNotFoundError, UnsafePath):
        return False
    return entry is not None and stat.S_ISREG(entry.st_mode)


def _sweep_files(
    state: PrivateDir,
    where: tuple[str, ...],
    explained: dict[Where, ClaimState],
    swept: _Swept,
    quarantine: "_Quarantine",
) -> None:
    with _existing(state, where, quarantine) as directory:
        if directory is None:
            return
        for name in directory.names():
            parts = (*where, name)
            state_of = explained.get(parts)
            entry = directory.entry(name)
            plain = entry is not None and stat.S_ISREG(entry.st_mode)
            if state_of == "held" and plain:
                continue
            if state_of == "released" and plain:
                withdraw(state, parts)
                swept.removed.append(directory.join(name))
                continue
            swept.quarantined.append((directory.join(name), quarantine.take(directory, parts)))


@contextmanager
def _existing(
    state: PrivateDir, where: tuple[str, ...], quarantine: "_Quarantine"
) -> Iterator[PrivateDir | None]:
    """The directory at `where`, or None when there is none; an entry there that is not a
    directory of ours (a link) is moved to the quarantine, and None is returned."""
    with _parent_of(state, where, create=False) as parent:
        try:
            directory = parent.subdir(where[-1], create=False)
        except FileNotFoundError:
            directory = None
        except UnsafePath as exc:
            log.warning("claims_directory_refused", reason=exc.message)
            quarantine.take(parent, where)
            directory = None
        if directory is None:
            yield None
            return
        with directory:
            yield directory


class _Quarantine:
    """quarantine/<UTC time>/, made on first use."""

    def __init__(self, state: PrivateDir) -> None:
        self._state = state
        self._root: PrivateDir | None = None

    def take(self, directory: PrivateDir, parts: tuple[str, ...]) -> str:
        """Move the entry `parts[-1]` of `directory` to its place in the quarantine."""
        if self._root is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            with self._state.subdir(QUARANTINE) as quarantine:
                self._root = quarantine.subdir(f"{stamp}-{os.getpid()}")
        with _parent_of(self._root, parts, create=True) as target:
            directory.move(parts[-1], target, parts[-1])
            return target.join(parts[-1])

    def close(self) -> None:
        if self._root is not None:
            self._root.close()

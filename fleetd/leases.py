"""The lease manager: who holds which name, until when, and what happens to stale holders.

    decide_acquire / decide_heartbeat / decide_release   pure verdicts, given `now`
    LeaseTable        the records in memory and one heap of deadlines; pure, given `now`
    EventLog          what happened, numbered, for long-polling watchers
    LeaseManager      the edges: the store, /proc identities, STONITH, the timer task

Durability. Every grant, release and expiry is a record under ``leases/NAME`` in the store,
written in a transaction guarded on the record's mod_revision, so the record on disk always
says who last held the name and with which token. The token is the revision of the granting
write: global and strictly increasing, so never reused, across restarts too.

Heartbeats write nothing, as etcd's keepalives: a deadline lives on fleetd's monotonic clock,
which means nothing after a restart, and a restarted fleetd gives every held lease its full TTL
again anyway. Writing heartbeats (even batched) would buy no safety and cost the disk 10,000
writes a second for 10,000 leases at 1 Hz.

Expiry. One timer task sleeps until the earliest deadline (fleetd.core.timers: a DeadlineHeap
and an Alarm). A heartbeat only moves the entry's deadline; a heap item found early when it
comes up goes back at the lease's current deadline, so the timer wakes about once per TTL per
lease, never once per heartbeat, and never polls.

Writes to one name are serialised by a lock of that name (a grant may have to wait for STONITH
to finish); reads and heartbeats never wait for it.
"""

import contextlib
import itertools
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.core import identity as proc
from fleetd.core.dispatch import Peer
from fleetd.core.locks import NameLock, NameLocks
from fleetd.core.metrics import LEASES_EXPIRED, Family, gauge
from fleetd.core.timers import Alarm, DeadlineHeap
from fleetd.presence import Presence
from fleetd.store import Compare, Delete, Event, KeyValue, Put, Range, RangeResult, Store, TxnResult
from protocol.errors import (
    Absent,
    Compacted,
    FleetError,
    Internal,
    InvalidRequest,
    StoreFull,
    StoreUnavailable,
)
from protocol.leases import (
    MAX_WAIT,
    EventType,
    Identity,
    LeaseEvent,
    LeaseInfo,
    LeaseState,
    check_owner,
    check_ttl,
)
from protocol.messages import (
    LeaseAcquire,
    LeaseEvents,
    LeaseHeartbeat,
    LeaseInspect,
    LeaseList,
    LeaseListRequest,
    LeaseRelease,
    LeaseResult,
    LeaseWatch,
)
from protocol.names import check_name
from protocol.outcomes import Outcome

log = structlog.get_logger("fleetd.leases")

PREFIX = "leases/"
"""Where lease records live in the store."""

STONITH_GRACE = 5.0
"""Seconds a stale holder gets between SIGTERM and SIGKILL."""

EVENT_BUFFER = 100_000
"""Events kept for watchers that fall behind; an older cursor gets `compacted`."""

EVENTS_PER_ANSWER = 1_000

EXPIRY_RETRY = 1.0
"""Seconds between tries of an expiry record a full disk kept from being written."""

MOVED_RETRIES = 3
"""Tries of an acquire whose record another fleetd keeps writing (a shared store)."""
FOLLOW_RETRY = 1.0
"""Seconds between tries to watch a shared store's lease records again."""


class _Moved(Exception):
    """The record was written by another fleetd since we read it (a shared store)."""


_EVENT_OF: dict[LeaseState, EventType] = {
    "held": "acquired",
    "released": "released",
    "expired": "expired",
}


class StoredLease(msgspec.Struct, frozen=True, kw_only=True):
    """A lease record as stored. The granting write cannot know its own revision, so it stores
    ``token`` 0, meaning "the revision of this write" (the key's mod_revision); every later
    write of the record carries the token explicitly."""

    owner: str
    identity: Identity
    ttl: float
    state: LeaseState
    token: int = 0
    keeper: int = 0
    """On a shared store, the presence (fleetd.presence) of the fleetd that keeps this held
    lease's deadline; 0 on SQLite, where there is one fleetd."""


_encode = msgspec.json.Encoder().encode
_decode_stored = msgspec.json.Decoder(StoredLease).decode


@dataclass(slots=True, eq=False)
class Entry:
    """A name's record in memory; `deadline` (monotonic) matters only while held. `dirty`
    marks an expiry decided but not yet written."""

    name: str
    record: StoredLease
    mod_revision: int
    deadline: float = 0.0
    dirty: bool = False
    foreign: bool = False
    """Held through another fleetd on a shared store, which keeps its deadline (here: inf)."""

    @property
    def token(self) -> int:
        return self.record.token

    def live(self, now: float) -> bool:
        return self.record.state == "held" and self.deadline > now


# Decisions ---------------------------------------------------------------------------------


class Verdict(Enum):
    GRANT = "grant"
    RENEW = "renew"
    CONTEST = "contest"


@dataclass(frozen=True, slots=True)
class AcquireDecision:
    """`stale` is the holder a grant takes over from (its lease expired, or its process is
    gone): the one STONITH may have to end."""

    verdict: Verdict
    stale: Entry | None = None
    reason: str = ""


_FREE = AcquireDecision(Verdict.GRANT, reason="free")
_RENEW = AcquireDecision(Verdict.RENEW)
_CONTEST = AcquireDecision(Verdict.CONTEST)
"""The decisions with no stale holder, made once: every grant of a free name takes one."""


def decide_acquire(
    entry: Entry | None, owner: str, now: float, alive: Callable[[Identity], bool]
) -> AcquireDecision:
    """Who gets the name. `alive` is asked only about a holder within its deadline. A holder
    whose lease expired stays stale (a STONITH candidate) until the name is granted again;
    one that released it does not."""
    if entry is None or entry.record.state == "released":
        return _FREE
    if entry.foreign and entry.record.state == "held":
        return _CONTEST  # its fleetd keeps its deadline; never STONITH across fleetds
    if entry.record.state == "expired" or entry.deadline <= now:
        return AcquireDecision(Verdict.GRANT, entry, "expired")
    if not alive(entry.record.identity):
        return AcquireDecision(Verdict.GRANT, entry, "holder_gone")
    if entry.record.owner == owner:
        return _RENEW
    return _CONTEST


def owns(entry: Entry, owner: str, token: int) -> bool:
    """Whether `owner` (and, if given, its grant `token`) is the record's."""
    return entry.record.owner == owner and token in (0, entry.record.token)


def decide_heartbeat(entry: Entry | None, owner: str, token: int, now: float) -> bool:
    """Renew only a lease still live: one past its deadline is lost even if not yet taken;
    and only where its deadline is kept (not a lease held through another fleetd)."""
    return entry is not None and not entry.foreign and entry.live(now) and owns(entry, owner, token)


def decide_release(entry: Entry | None, owner: str, token: int, now: float) -> Outcome:
    if entry is None:
        return Outcome.ABSENT
    if not owns(entry, owner, token) or entry.foreign:
        return Outcome.NOT_OWNED
    return Outcome.RELEASED if entry.live(now) else Outcome.ALREADY_RELEASED


# The table ---------------------------------------------------------------------------------


class LeaseTable:
    """Every record by name, and their deadlines in a DeadlineHeap: one item per held entry,
    read through the entry (a renewal moves `entry.deadline` only). Replacing a name's entry
    forgets the old one, which the heap drops when it comes up."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._deadlines = DeadlineHeap(self._deadline_of)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def entries(self, prefix: str = "") -> list[Entry]:
        return [e for name, e in sorted(self._entries.items()) if name.startswith(prefix)]

    def install(self, entry: Entry) -> bool:
        """Make `entry` its name's record; whether its deadline is now the earliest."""
        self._entries[entry.name] = entry
        if entry.record.state != "held" or entry.foreign:
            return False
        return self._deadlines.push(entry, entry.deadline)

    def remove(self, name: str) -> None:
        """Forget a name (its heap item, if any, is dropped when it comes up)."""
        self._entries.pop(name, None)

    def renew(self, entry: Entry, now: float) -> None:
        entry.deadline = now + entry.record.ttl

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline()

    def pop_expired(self, now: float) -> list[tuple[Entry, float]]:
        """Mark every lease past its deadline expired (dirty: to be written); returns each
        new entry with the deadline it missed."""
        return self._expire(self._deadlines.pop_due(now))

    def expire_all(self) -> list[tuple[Entry, float]]:
        """Mark every held lease of ours expired at once (this fleetd lost its presence)."""
        held = [e for e in self._entries.values() if e.record.state == "held" and not e.foreign]
        return self._expire(held)

    def _expire(self, due: Iterable[Entry]) -> list[tuple[Entry, float]]:
        expired = []
        for entry in list(due):
            gone = Entry(
                entry.name,
                msgspec.structs.replace(entry.record, state="expired"),
                entry.mod_revision,
                dirty=True,
            )
            self._entries[entry.name] = gone
            expired.append((gone, entry.deadline))
        return expired

    def _deadline_of(self, entry: Entry) -> float | None:
        """The deadline of `entry` while it is its name's record and held, else None."""
        if self._entries.get(entry.name) is not entry or entry.record.state != "held":
            return None
        return entry.deadline


def info(entry: Entry, now: float, wall: float) -> LeaseInfo:
    """A foreign lease shows its TTL as what remains: the most it can have."""
    record = entry.record
    remaining = max(0.0, entry.deadline - now) if record.state == "held" else 0.0
    remaining = min(remaining, record.ttl)
    return LeaseInfo(
        name=entry.name,
        owner=record.owner,
        token=record.token,
        ttl=record.ttl,
        state=record.state,
        identity=record.identity,
        remaining=round(remaining, 3),
        expires_at=round(wall + remaining, 3) if remaining else 0.0,
    )


# Events ------------------------------------------------------------------------------------


class EventLog:
    """Numbered events in a bounded buffer, and one broadcast wake-up for long polls."""

    def __init__(self, capacity: int = EVENT_BUFFER) -> None:
        self.epoch = uuid.uuid4().hex[:16]
        self.seq = 0
        self._events: deque[LeaseEvent] = deque(maxlen=capacity)
        self._arrived = anyio.Event()
        self._waiting = 0
        self._closed = False

    def append(self, type_: EventType, lease: LeaseInfo, deadline: float = 0.0) -> None:
        self.seq += 1
        self._events.append(LeaseEvent(seq=self.seq, type=type_, lease=lease, deadline=deadline))
        if self._waiting:
            self._waiting = 0
            self._arrived.set()
            self._arrived = anyio.Event()

    def close(self) -> None:
        """Answer every waiting long poll now (fleetd is stopping)."""
        self._closed = True
        self._arrived.set()

    def since(self, after: int, prefix: str) -> tuple[list[LeaseEvent], int]:
        """Events after `after` under `prefix`, and the cursor to continue from."""
        oldest = self._events[0].seq if self._events else self.seq + 1
        if after + 1 < oldest:
            raise Compacted(
                f"lease events after {after} are no longer kept (oldest is {oldest}): "
                "list the leases, then watch from the cursor that answer gives",
                cursor=self.seq,
                epoch=self.epoch,
            )
        start = max(0, len(self._events) - (self.seq - after))
        found, cursor = [], self.seq
        for event in itertools.islice(self._events, start, None):
            if event.lease.name.startswith(prefix):
                found.append(event)
                if len(found) == EVENTS_PER_ANSWER:
                    cursor = event.seq
                    break
        return found, cursor

    async def wait(self, after: int, prefix: str, timeout: float) -> tuple[list[LeaseEvent], int]:
        with anyio.move_on_after(timeout):
            while not self._closed:
                events, cursor = self.since(after, prefix)
                if events:
                    return events, cursor
                after = cursor
                self._waiting += 1
                await self._arrived.wait()
        return self.since(after, prefix)


# The manager -------------------------------------------------------------------------------


class LeaseManager:
    """Leases over the control socket; start it with ``await tg.start(manager.serve)`` once
    the store serves.

    Args:
        store: where records live.
        presence: this fleetd's presence when the store is shared with other fleetd
            processes (etcd): its held records are attached to it, theirs are watched.
        clock: the monotonic clock deadlines are measured on.
        grace: seconds between SIGTERM and SIGKILL when fencing a stale holder.
    """

    def __init__(
        self,
        store: Store,
        *,
        presence: Presence | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace: float = STONITH_GRACE,
    ) -> None:
        self._store = store
        self._presence = presence
        self._clock = clock
        self._grace = grace
        self.table = LeaseTable()
        self.events = EventLog()
        self._locks = NameLocks()
        self._fencing: set[str] = set()
        self._alarm = Alarm(clock)
        self._writers: anyio.abc.TaskGroup | None = None
        self._pid = os.getpid()
        """fleetd's own pid, which no lease may bind to (read once: a syscall per acquire)."""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load every record (held ones get their full TTL again), then expire until cancelled;
        on a shared store, follow the other fleetds' writes too."""
        loaded_at = await self._load()
        async with anyio.create_task_group() as writers:
            self._writers = writers
            writers.start_soon(self._expire_forever)
            if self._presence is not None:
                self._presence.on_lost = self._presence_lost
                writers.start_soon(self._follow, loaded_at)
            task_status.started()

    def close_watches(self) -> None:
        self.events.close()

    async def metrics(self) -> list[Family]:
        """Records by state, and how long ago the least recently renewed held lease was
        renewed (its TTL less what remains of it): a holder falling behind shows here before
        its lease expires."""
        now = self._clock()
        states: dict[str, int] = {}
        oldest = 0.0
        for entry in self.table.entries():
            state = entry.record.state
            states[state] = states.get(state, 0) + 1
            if state == "held":
                oldest = max(oldest, entry.record.ttl - max(0.0, entry.deadline - now))
        return [
            gauge(
                "fleet_leases",
                "Lease records by state.",
                (({"state": s}, n) for s, n in states.items()),
            ),
            gauge(
                "fleet_lease_heartbeat_age_max_seconds",
                "Seconds since the least recently renewed held lease was acquired or renewed.",
                [({}, oldest)],
            ),
        ]

    async def _load(self) -> int:
        """Every record, read at one revision, which it returns."""
        revision, stored = await self._read_all()
        for kv in stored:
            self.table.install(self._entry_of(kv))
        held = sum(entry.record.state == "held" for entry in self.table.entries())
        log.info("leases_loaded", records=len(self.table), held=held)
        return revision

    async def _reload(self) -> int:
        """The table made the store's again, once the watch lost its place (the store's
        history was compacted past it): a record still at the revision we have keeps its
        entry (and deadline); one gone is forgotten."""
        revision, stored = await self._read_all()
        by_name = {kv.key.removeprefix(PREFIX): kv for kv in stored}
        for entry in self.table.entries():
            if entry.name not in by_name:
                self.table.remove(entry.name)
        for name, kv in by_name.items():
            current = self.table.get(name)
            if current is None or current.mod_revision != kv.mod_revision:
                self._install(self._entry_of(kv))
        log.info("leases_reloaded", records=len(self.table), revision=revision)
        return revision

    async def _read_all(self) -> tuple[int, tuple[KeyValue, ...]]:
        read = await self._store.txn((), (Range(PREFIX),))
        (listed,) = read.responses
        assert isinstance(listed, RangeResult)
        return read.revision, listed.kvs

    def _entry_of(self, kv: KeyValue) -> Entry:
        """A stored record as an entry: ours gets its full TTL again (as at a restart)."""
        record = _decode_stored(kv.value)
        if not record.token:
            record = msgspec.structs.replace(record, token=kv.mod_revision)
        name = kv.key.removeprefix(PREFIX)
        if record.state != "held":
            return Entry(name, record, kv.mod_revision)
        if self._presence is not None and record.keeper != self._presence.id:
            return Entry(name, record, kv.mod_revision, math.inf, foreign=True)
        return Entry(name, record, kv.mod_revision, self._clock() + record.ttl)

    # Handlers --------------------------------------------------------------------------------

    async def acquire(self, request: LeaseAcquire, peer: Peer) -> LeaseResult:
        check_name(request.name, "lease")
        check_owner(request.owner)
        check_ttl(request.ttl)
        holder = _identify(request.pid, peer, self._pid)
        fast = self._contested(request.name, request.owner)
        if fast is not None:
            return fast
        await self._locks.acquire(request.name)  # not `async with`: a NameLock, two coroutines
        try:
            return await self._acquire_locked(request, holder, peer)
        finally:
            self._locks.release(request.name)

    def heartbeat(self, request: LeaseHeartbeat, peer: Peer) -> LeaseResult:
        check_name(request.name, "lease")
        now = self._clock()
        entry = self.table.get(request.name)
        if not (decide_heartbeat(entry, request.owner, request.token, now) and self._present(now)):
            return self._not_owned(entry, request.owner, now)
        assert entry is not None
        self.table.renew(entry, now)
        return LeaseResult(outcome=Outcome.RENEWED, lease=self._info(entry))

    async def release(self, request: LeaseRelease, peer: Peer) -> LeaseResult:
        """A release waits for the name's lock, so that it takes effect after an acquire sent
        before it; except while a successor's acquire is fencing the stale holder: that holder
        releasing must get its answer (already_released), not wait for its own death."""
        name = check_name(request.name, "lease")
        if name not in self._locks or name in self._fencing:
            refused = self._release_refused(request, self.table.get(name))
            if refused is not None:
                return refused
        await self._locks.acquire(name)
        try:
            entry = self.table.get(name)
            refused = self._release_refused(request, entry)
            if refused is not None:
                return refused
            assert entry is not None
            try:
                released = self._info(await self._write(entry, state="released"))
            except _Moved:  # another fleetd wrote it: answered as the record is now
                await self._refresh(name)
                refused = self._release_refused(request, self.table.get(name))
                if refused is None:
                    raise StoreUnavailable(f"lease {name!r} changed under another fleetd") from None
                return refused
            self.events.append("released", released)
        finally:
            self._locks.release(name)
        return LeaseResult(outcome=Outcome.RELEASED, lease=released)

    def _release_refused(self, request: LeaseRelease, entry: Entry | None) -> LeaseResult | None:
        """The answer to a release of `entry` (its name's record) that changes nothing; None
        when it would release."""
        now = self._clock()
        outcome = decide_release(entry, request.owner, request.token, now)
        if outcome is Outcome.RELEASED:
            return None
        if entry is None:
            return LeaseResult(outcome=outcome, message=f"no lease named {request.name!r}")
        if outcome is Outcome.NOT_OWNED:
            return self._not_owned(entry, request.owner, now)
        return LeaseResult(outcome=outcome, lease=self._info(entry))

    def inspect(self, request: LeaseInspect, peer: Peer) -> LeaseResult:
        check_name(request.name, "lease")
        entry = self.table.get(request.name)
        if entry is None:
            return LeaseResult(outcome=Outcome.ABSENT, message=f"no lease named {request.name!r}")
        return LeaseResult(outcome=Outcome.OK, lease=self._info(entry))

    def list(self, request: LeaseListRequest, peer: Peer) -> LeaseList:
        now, wall = self._clock(), time.time()
        return LeaseList(leases=[info(e, now, wall) for e in self.table.entries(request.prefix)])

    def records(self) -> Sequence[tuple[Entry, bool]]:
        """Every record, and whether it is live now: for the journal (fleetd.journal)."""
        now = self._clock()
        return [(entry, entry.live(now)) for entry in self.table.entries()]

    async def remove_dead(self, *, dry_run: bool = False) -> Sequence[Entry]:
        """Delete the records no process can still use: released or expired, and their
        process gone (one alive may still be fenced by the next grant, or answer its own
        release). The next grant of a deleted name creates the record afresh, at a new store
        revision: tokens keep growing, as the store's revision never goes back."""
        removed = []
        for entry in self.table.entries():
            if not _dead(entry):
                continue
            if dry_run:
                removed.append(entry)
                continue
            async with self._exclusive(entry.name):
                if self.table.get(entry.name) is not entry:
                    continue  # granted, released or removed meanwhile
                key = PREFIX + entry.name
                result = await self._store.txn(
                    (Compare(key, "mod", "==", entry.mod_revision),), (Delete(key),)
                )
                if result.succeeded:
                    self.table.remove(entry.name)
                    removed.append(entry)
        if removed and not dry_run:
            log.info("lease_records_removed", leases=[e.name for e in removed])
        return removed

    async def watch(self, request: LeaseWatch, peer: Peer) -> LeaseEvents:
        log_ = self.events
        if request.after is None:
            return LeaseEvents(cursor=log_.seq, epoch=log_.epoch)
        if request.epoch and request.epoch != log_.epoch:
            raise Compacted(
                "fleetd restarted since that cursor: list the leases, then watch again",
                cursor=log_.seq,
                epoch=log_.epoch,
            )
        if not 0 <= request.wait <= MAX_WAIT:
            raise InvalidRequest(f"wait must be between 0 and {MAX_WAIT:g}s", wait=request.wait)
        events, cursor = await log_.wait(request.after, request.prefix, request.wait)
        return LeaseEvents(cursor=cursor, epoch=log_.epoch, events=events)

    # Acquire ---------------------------------------------------------------------------------

    def _contested(self, name: str, owner: str) -> LeaseResult | None:
        """Answer a plainly contested acquire without queueing on the name's lock."""
        entry = self.table.get(name)
        if entry is None or entry.record.owner == owner:
            return None  # never contested: spare the /proc read deciding so
        decision = decide_acquire(entry, owner, self._clock(), proc.is_alive)
        if decision.verdict is not Verdict.CONTEST:
            return None
        assert entry is not None
        return self._contest(entry)

    async def _acquire_locked(
        self, request: LeaseAcquire, holder: Identity, peer: Peer
    ) -> LeaseResult:
        """Decided on the record as known here; on a shared store another fleetd may have
        written it since, and then it is read again and decided anew."""
        for _ in range(MOVED_RETRIES):
            try:
                return await self._acquire_once(request, holder, peer)
            except _Moved:
                await self._refresh(request.name)
        raise StoreUnavailable(f"lease {request.name!r} kept changing under other fleetds")

    async def _acquire_once(
        self, request: LeaseAcquire, holder: Identity, peer: Peer
    ) -> LeaseResult:
        entry = self.table.get(request.name)
        decision = decide_acquire(entry, request.owner, self._clock(), proc.is_alive)
        match decision.verdict:
            case Verdict.CONTEST:
                assert entry is not None
                return self._contest(entry)
            case Verdict.RENEW:
                assert entry is not None
                return await self._renew(entry, request.ttl)
        fence = ""
        if decision.stale is not None:
            fence = await self._fence(decision.stale, peer)
        granted = await self._grant(request, holder, entry)
        result = LeaseResult(
            outcome=Outcome.ACQUIRED,
            lease=self._info(granted),
            previous=self._info(decision.stale) if decision.stale else None,
            fence=fence,
            message=_grant_message(granted, decision, fence),
        )
        self.events.append("acquired", result.lease)  # type: ignore[arg-type]
        return result

    async def _renew(self, entry: Entry, ttl: float) -> LeaseResult:
        """Same owner: the full TTL again (a new TTL is written, and may move the deadline
        earlier, so the written entry goes into the heap at its new deadline)."""
        if ttl != entry.record.ttl:
            entry = await self._write(entry, state="held", ttl=ttl)
        else:
            self.table.renew(entry, self._clock())
        return LeaseResult(
            outcome=Outcome.ALREADY_ACQUIRED,
            lease=self._info(entry),
            message=f"{entry.record.owner} already holds {entry.name!r} (token {entry.token})",
        )

    async def _fence(self, stale: Entry, peer: Peer) -> str:
        """STONITH the stale holder, unless it is the caller itself or an ancestor of it."""
        target = stale.record.identity
        if proc.is_local(target) and proc.is_ancestor_or_self(target.pid, peer.pid):
            return "self"
        self._fencing.add(stale.name)
        try:
            outcome = await proc.fence(target, peer.uid, self._grace)
        finally:
            self._fencing.discard(stale.name)
        log.info(
            "lease_holder_fenced",
            lease=stale.name,
            owner=stale.record.owner,
            pid=target.pid,
            fence=outcome,
        )
        return outcome

    async def _grant(self, request: LeaseAcquire, holder: Identity, entry: Entry | None) -> Entry:
        record = StoredLease(
            owner=request.owner,
            identity=holder,
            ttl=request.ttl,
            state="held",
            keeper=self._keeper(),
        )
        key = PREFIX + request.name
        guard = (
            Compare(key, "mod", "==", entry.mod_revision)
            if entry is not None
            else Compare(key, "create", "==", 0)
        )
        result = await self._put(key, guard, record)
        granted = Entry(
            request.name,
            msgspec.structs.replace(record, token=result.revision),
            result.revision,
            deadline=self._clock() + request.ttl,
        )
        self._install(granted)
        return granted

    # Writes ----------------------------------------------------------------------------------

    async def _write(self, entry: Entry, *, state: LeaseState, ttl: float | None = None) -> Entry:
        """Rewrite `entry`'s record (same token) and install the result."""
        record = msgspec.structs.replace(
            entry.record, state=state, ttl=entry.record.ttl if ttl is None else ttl
        )
        if state == "held":
            record = msgspec.structs.replace(record, keeper=self._keeper())
        key = PREFIX + entry.name
        result = await self._put(key, Compare(key, "mod", "==", entry.mod_revision), record)
        deadline = self._clock() + record.ttl if state == "held" else 0.0
        written = Entry(entry.name, record, result.revision, deadline)
        self._install(written)
        return written

    async def _put(self, key: str, guard: Compare, record: StoredLease) -> TxnResult:
        """Write `record` if `guard` holds; a held one with our presence (shared store).
        Raises _Moved when another fleetd wrote the key since (a bug on a store of our own)."""
        lease = record.keeper if record.state == "held" else 0
        try:
            result = await self._store.txn((guard,), (Put(key, _encode(record), lease),))
        except Absent:  # the presence expired between our check and the write
            raise StoreUnavailable(
                "fleetd's presence in the store lapsed; it is being renewed: try again"
            ) from None
        if result.succeeded:
            return result
        if self._presence is None:
            raise Internal(f"lease record {key!r} changed behind the lease manager")
        raise _Moved

    def _keeper(self) -> int:
        """Our presence, for a held record (0 with a store of our own). Raises
        StoreUnavailable while we have none (etcd was lost; fleetd keeps trying)."""
        if self._presence is None:
            return 0
        if not self._presence.valid(self._clock()):
            raise StoreUnavailable(
                "fleetd has lost touch with its store (etcd): no lease can be granted until "
                "it is back"
            )
        return self._presence.id

    def _present(self, now: float) -> bool:
        return self._presence is None or self._presence.valid(now)

    async def _refresh(self, name: str) -> None:
        """Read `name`'s record again (another fleetd wrote it)."""
        kv = await self._store.get(PREFIX + name)
        if kv is None:
            self.table.remove(name)
        else:
            self._install(self._entry_of(kv))

    def _install(self, entry: Entry) -> None:
        if self.table.install(entry):
            self._alarm.wake()

    def _exclusive(self, name: str) -> "NameLock":
        return self._locks.hold(name)

    # Expiry ----------------------------------------------------------------------------------

    async def _expire_forever(self) -> None:
        while True:
            expired = self.table.pop_expired(self._clock())
            LEASES_EXPIRED.inc(amount=len(expired))
            if expired:
                self._expired(expired)
            await self._alarm.sleep_until(self.table.next_deadline())

    def _expired(self, expired: Iterable[tuple[Entry, float]], *, persist: bool = True) -> None:
        assert self._writers is not None
        now = self._clock()
        for entry, deadline in expired:
            self.events.append("expired", self._info(entry), deadline)
            log.info(
                "lease_expired",
                lease=entry.name,
                owner=entry.record.owner,
                late_ms=round((now - deadline) * 1e3, 1),
            )
            if persist:
                self._writers.start_soon(self._persist_expiry, entry)

    async def _persist_expiry(self, entry: Entry) -> None:
        """Write an expiry decided in memory, unless the name moved on meanwhile. A full disk
        postpones the write (retried every EXPIRY_RETRY seconds until it lands or the name
        moves on); any other failure leaves the record held on disk, which a restart renews
        for its TTL, after which it expires again."""
        while True:
            try:
                async with self._exclusive(entry.name):
                    if self.table.get(entry.name) is entry:
                        await self._write(entry, state="expired")
                return
            except StoreFull:
                log.warning("lease_expiry_postponed", lease=entry.name, reason="disk full")
                await anyio.sleep(EXPIRY_RETRY)
            except _Moved:  # another fleetd wrote it after our presence lapsed
                with contextlib.suppress(FleetError):
                    await self._refresh(entry.name)
                return
            except Exception as exc:
                log.warning("lease_expiry_not_written", lease=entry.name, error=repr(exc))
                return

    # A shared store ---------------------------------------------------------------------------

    def _presence_lost(self) -> None:
        """Every lease held through us is lost at once: etcd deletes (or has deleted) their
        records with our presence. Their holders hear not_owned at their next heartbeat."""
        self._expired(self.table.expire_all(), persist=False)

    async def _follow(self, loaded_at: int) -> None:
        """Apply the other fleetds' writes to the table as the store's watch reports them,
        from the revision after our load; resumed (gRPC reconnects) or, once the history is
        compacted, everything read again."""
        after = loaded_at
        while True:
            try:
                async with self._store.watch(PREFIX, start_revision=after + 1) as events:
                    async for event in events:
                        self._apply(event)
                        after = event.revision
            except Compacted:
                after = await self._reload()
            except FleetError as exc:
                log.warning("lease_watch_broken", error=exc.message)
                await anyio.sleep(FOLLOW_RETRY)

    def _apply(self, event: Event) -> None:
        name = event.kv.key.removeprefix(PREFIX)
        current = self.table.get(name)
        if current is not None and event.revision <= current.mod_revision:
            return  # our own write, or one we read since
        if event.type == "delete":
            if current is not None:
                self.table.remove(name)
                if current.foreign and current.record.state == "held":
                    gone = msgspec.structs.replace(current.record, state="expired")
                    self.events.append("expired", self._info(Entry(name, gone, event.revision)))
            return
        entry = self._entry_of(event.kv)
        if self._presence is not None and entry.record.keeper == self._presence.id:
            return  # our own write, which this fleetd installed (or is installing) itself
        self._install(entry)
        self.events.append(_EVENT_OF[entry.record.state], self._info(entry))

    # Answers ---------------------------------------------------------------------------------

    def _info(self, entry: Entry) -> LeaseInfo:
        return info(entry, self._clock(), time.time())

    def _contest(self, entry: Entry) -> LeaseResult:
        lease = self._info(entry)
        return LeaseResult(
            outcome=Outcome.CONTESTED,
            lease=lease,
            message=f"{entry.name!r} is held by {lease.owner} (pid {lease.identity.pid}, "
            f"token {lease.token}) for {lease.remaining:g}s more",
        )

    def _not_owned(self, entry: Entry | None, owner: str, now: float) -> LeaseResult:
        if entry is None:
            return LeaseResult(outcome=Outcome.NOT_OWNED, message="no such lease")
        lease = info(entry, now, time.time())
        if entry.foreign:
            why = "it is held through another fleetd, which keeps its deadline: use that one"
        elif entry.record.owner != owner:
            why = f"it was last held by {entry.record.owner!r}, not {owner!r}"
        elif entry.live(now):
            why = f"{owner!r} holds it under a newer token ({entry.token})"
        else:
            why = (
                f"the lease is {entry.record.state if entry.record.state != 'held' else 'expired'}"
            )
        return LeaseResult(
            outcome=Outcome.NOT_OWNED, lease=lease, message=f"{entry.name!r} not owned: {why}"
        )


def _dead(entry: Entry) -> bool:
    return entry.record.state != "held" and not proc.is_alive(entry.record.identity)


def _identify(pid: int, peer: Peer, fleetd: int) -> Identity:
    """The identity of the process a lease binds to: the peer, or an ancestor it names. Never
    init nor fleetd: every process descends from init, and neither ever exits, so a lease
    bound to one would never lose its holder."""
    target = pid or peer.pid
    if target in (1, fleetd):
        what = "init (pid 1)" if target == 1 else f"fleetd itself (pid {target})"
        raise InvalidRequest(
            f"a lease cannot be bound to {what}: it would outlive every holder; bind it to "
            "the process that uses the lease (fleetctl lease acquire binds to its parent, so "
            "run it from that process, or run the work under fleetctl coord-run)",
            pid=target,
        )
    if pid and not proc.is_ancestor_or_self(pid, peer.pid):
        raise InvalidRequest(
            f"pid {pid} is neither the caller ({peer.pid}) nor one of its ancestors", pid=pid
        )
    try:
        return proc.identify(pid) if pid and pid != peer.pid else peer.identity()
    except proc.ProcessGone:
        raise InvalidRequest(f"cannot identify process {target}: it is gone", pid=target) from None


def _grant_message(granted: Entry, decision: AcquireDecision, fence: str) -> str:
    text = f"{granted.record.owner} acquired {granted.name!r} (token {granted.token})"
    if decision.stale is not None:
        stale = decision.stale.record
        text += (
            f", taken over from {stale.owner} (pid {stale.identity.pid}, {decision.reason}"
            f"{'; ' + fence if fence else ''})"
        )
    return text

"""A run's events: one ordered record, `seq` from 1 without gaps, appended durably in batches.

Appends that arrive while a write is under way wait for the next one, which carries them
all (with the records written alongside: a task's state and its events are one transaction),
as the store's own group commit does: a run's events cost a commit per batch, not per event,
and share a key (fleetd.tasks.records).
The caller that finds no write under way writes: there is no writer task to keep. A batch
stays within what one etcd transaction takes.

The run's last TAIL events are kept encoded, so that a follower at the head reads memory.

A full disk fails the writes of a log that is not `patient` (a run being submitted: its
submitter is told no_space); a patient log (its run was submitted) waits it out, trying again
every RETRY_FULL seconds, and what was appended meanwhile is written once space returns, in
order: nothing fleetd saw of a running task is lost to a full disk. When the first write of
a log that is not patient fails, so do what was appended after it and every later append:
nothing is written of a run whose submit was not (fleetd.tasks.service starts its first
workers while that write is on its way).
"""

import collections
from collections.abc import Sequence

import anyio
import msgspec
import structlog

from fleetd.store import Compare, Operation, Put, Store, TxnResult
from fleetd.tasks.records import EVENT_BUCKET, event_bucket, event_key, seq_key
from protocol.errors import Internal, StoreFull
from protocol.tasks import WorkerEvent

BATCH_OPS = 1000
"""Events and operations in one append's transaction at most, unless the store takes fewer
operations (etcd: 128; its batch then keeps a few for the sequence key and the store's own
nesting). Events share keys (fleetd.tasks.records), so this bounds the transaction's size."""
TAIL = 4096
"""Events of each run kept in memory, encoded."""
RETRY_FULL = 1.0
"""Seconds between tries of a patient log's write that a full disk refused."""

log = structlog.get_logger("fleetd.tasks")

_encode = msgspec.json.Encoder().encode


class Pending:
    """Events (with the ops written alongside) waiting for their write."""

    __slots__ = ("done", "error", "events", "ops", "seqs")

    def __init__(self, events: Sequence[WorkerEvent], ops: Sequence[Operation]) -> None:
        self.events = events
        self.ops = ops
        self.seqs: list[int] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None


class EventLog:
    """One run's events: `last_seq` is the last one written, `tail` the latest, encoded."""

    def __init__(self, store: Store, run: str, last_seq: int, *, patient: bool = True) -> None:
        self.store = store
        self.batch_ops = (
            min(BATCH_OPS, store.max_operations - 8) if store.max_operations else BATCH_OPS
        )
        self.run = run
        self.last_seq = last_seq
        self.tail: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=TAIL)
        self._queue: collections.deque[Pending] = collections.deque()
        self._writing = False
        self.patient = patient
        """Whether a full disk is waited out (see the module)."""
        self._refused: BaseException | None = None
        """Why its first write failed, not patient: every later write fails so."""

    async def append(
        self, events: Sequence[WorkerEvent], ops: Sequence[Operation] = ()
    ) -> list[int]:
        """Write `events` (their seq is given here) with `ops`, durably; their seqs.
        `ops` of appends that share a batch may put the same key: the later put wins."""
        return await self.written(self.enqueue(events, ops))

    def enqueue(self, events: Sequence[WorkerEvent], ops: Sequence[Operation] = ()) -> Pending:
        """`events` take their place in the run's order now, to be written once `written` is
        awaited (so that what happens meanwhile is ordered after them)."""
        mine = Pending(events, ops)
        self._queue.append(mine)
        return mine

    async def written(self, mine: Pending) -> list[int]:
        """The seqs of `mine`, once it is durable."""
        if not self._writing:
            self._writing = True
            try:
                while self._queue:
                    await self._write(self._take_batch())
            finally:
                self._writing = False
        await mine.done.wait()
        if mine.error is not None:
            raise mine.error
        return mine.seqs

    def _take_batch(self) -> list[Pending]:
        batch: list[Pending] = []
        size = 0
        while self._queue:
            cost = len(self._queue[0].events) + len(self._queue[0].ops)
            if batch and size + cost > self.batch_ops:
                break
            batch.append(self._queue.popleft())
            size += cost
        return batch

    async def _write(self, batch: list[Pending]) -> None:
        if self._refused is not None:
            _fail(batch, self._refused)
            return
        seq = self.last_seq
        puts: dict[str, Operation] = {}
        encoded: list[tuple[int, bytes]] = []
        for item in batch:
            for event in item.events:
                seq += 1
                encoded.append((seq, _encode(msgspec.structs.replace(event, seq=seq))))
                item.seqs.append(seq)
            for op in item.ops:
                puts[getattr(op, "key", "")] = op
        for first, lines in _by_bucket(encoded):
            key = event_key(self.run, first)
            puts[key] = Put(key, b"\n".join(lines))
        guard = self._seq_guard()
        if seq != self.last_seq:
            puts[seq_key(self.run)] = Put(seq_key(self.run), str(seq).encode())
        try:
            result = await self._commit(guard, list(puts.values()))
            if not result.succeeded:
                raise Internal(f"run {self.run}: its events were appended by another fleetd")
        except Exception as exc:
            if not self.patient and self.last_seq == 0:
                self._refused = exc
                batch += self._queue
                self._queue.clear()
            _fail(batch, exc)
            return
        self.last_seq = seq
        self.tail.extend(encoded)
        for item in batch:
            item.done.set()

    async def _commit(self, guard: list[Compare], puts: list[Operation]) -> TxnResult:
        full = False
        while True:
            try:
                with anyio.CancelScope(shield=True):  # others wait on this write: it must end
                    result = await self.store.txn(guard, puts)
            except StoreFull:
                if not self.patient:
                    raise
                if not full:
                    log.warning("events_write_postponed", run=self.run, reason="disk full")
                full = True
                await anyio.sleep(RETRY_FULL)
                continue
            if full:
                log.info("events_written_late", run=self.run)
            return result

    def _seq_guard(self) -> list[Compare]:
        key = seq_key(self.run)
        if self.last_seq == 0:
            return [Compare(key, "create", "==", 0)]
        return [Compare(key, "value", "==", str(self.last_seq).encode())]

    async def read(self, after: int, limit: int) -> list[bytes]:
        """Up to `limit` encoded events with seq > `after`, in order."""
        if after >= self.last_seq:
            return []
        if self.tail and self.tail[0][0] <= after + 1:
            start = after + 1 - self.tail[0][0]
            return [data for _, data in list(self.tail)[start : start + limit]]
        return await read_stored(self.store, self.run, after, limit)


def _fail(batch: list[Pending], error: BaseException) -> None:
    for item in batch:
        item.seqs.clear()
        item.error = error
        item.done.set()


def _by_bucket(encoded: list[tuple[int, bytes]]) -> list[tuple[int, list[bytes]]]:
    """Consecutive events, split where a bucket begins: each part's first seq, and its events."""
    parts: list[tuple[int, list[bytes]]] = []
    for seq, data in encoded:
        if not parts or seq % EVENT_BUCKET == 0:
            parts.append((seq, []))
        parts[-1][1].append(data)
    return parts


async def read_stored(store: Store, run: str, after: int, limit: int) -> list[bytes]:
    """Events of `run` after seq `after`, from the store: bucket by bucket from its own. A
    key holds the events from its seq on, a line each (one, as stores written before
    fleetd wrote them together hold)."""
    found: list[bytes] = []
    bucket = (after + 1) // EVENT_BUCKET
    while len(found) < limit:
        kvs = await store.range(event_bucket(run, bucket))
        if not kvs:
            break
        for kv in kvs:
            skip = max(after + 1 - int(kv.key.rsplit("/", 1)[1]), 0)
            found += kv.value.split(b"\n")[skip : skip + limit - len(found)]
            if len(found) == limit:
                break
        bucket += 1
    return found


async def stored_last_seq(store: Store, run: str) -> int:
    kv = await store.get(seq_key(run))
    return int(kv.value) if kv is not None else 0

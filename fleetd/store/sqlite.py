"""The SQLite backend: one file in WAL mode, ``synchronous=FULL``, one database thread.

    _LeaseTable      live leases and their deadlines; pure, every decision is given `now`
    _Database        the connection and all the work done on it, on the database thread
    _DatabaseThread  that thread: it takes the queued jobs and runs them as a batch
    _Watcher         one watch's queue of events
    SQLiteStore      the async face: the queue, the lease timer, the watchers

Group commit: a thread hop costs more than a small SQLite transaction, so callers never hop
themselves. They queue a job and wait; the jobs queued in one turn of the event loop go to the
database thread together, which runs everything it has been handed in one SQLite transaction
(each job with its own revision), commits once (one fsync) and only then has the loop wake the
callers, so an answer always means durable. Reads queue the same way: no database work is ever
done on the event loop. The thread is the store's own (`_DatabaseThread`), not a pool's: a
job then costs the loop no task wake-up and no worker hand-off, about half of what a hop
through anyio.to_thread cost. Each statement costs the database thread a release of the GIL
and a wait to take it back from the event loop, which holds it most of the time, so a compare
reads its row from memory when the thread read it lately (`_Database._known`, exact: the
connection is the table's only writer): a guarded write of a key in use is two statements,
not three.

Leases follow etcd: grant and revoke are durable writes, a keepalive only moves a deadline in
memory, and a reopened store gives every lease its full TTL again, because the time that passed
while no store was running is unknown. Lease holders must therefore fence with revisions.

History: every write also inserts its events into the `history` table (the last HISTORY
revisions), which watches resuming from a past revision read. Only tests and benchmarks watch
today, but this stays: it is the history seam described on `Store` (fleetd.store), which the
etcd backend (issue 14) and the task event log (issue 15) build on. Its parts here:
`_Database._record` and `history_since`, `_compact`, `_Watcher`, `_EventStream` and
`SQLiteStore.watch`.

Continuity: given a `Watermark` (fleetd.store.watermark), the store refuses to open a database
that is not the one the watermark describes, or that went back behind it. Before a batch is
answered, the watermark holds a revision no less than the batch's: a commit that would pass
it advances it RESERVED revisions ahead (on a thread of its own, its flush alongside the
COMMIT's); the others only note the floor, flushed within NOTES_FLUSHED_WITHIN. A file that
SQLite cannot read as a database is refused with StoreCorrupt, never opened as a new one.
"""

import asyncio
import errno
import operator
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, cast

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from msgspec.structs import astuple

from fleetd.core.metrics import STORE_BATCH_JOBS, STORE_COMMIT_SECONDS
from fleetd.core.timers import Alarm, DeadlineHeap
from fleetd.store import (
    Compare,
    CompareOp,
    Delete,
    DeleteRange,
    DeleteResult,
    Event,
    Get,
    KeyValue,
    Lease,
    Operation,
    Put,
    PutResult,
    Range,
    RangeResult,
    Response,
    Store,
    StoreStatistics,
    Target,
    TxnResult,
    check_branch,
)
from fleetd.store.watermark import (
    Continuity,
    Mark,
    StoreIdentity,
    Watermark,
    check_continuity,
)
from protocol.errors import (
    Absent,
    AlreadyRunning,
    Compacted,
    FleetError,
    Incompatible,
    Internal,
    InvalidRequest,
    StoreCorrupt,
    StoreFull,
)

__all__ = ["HISTORY", "MIGRATIONS", "SQLiteStore", "peek_revision", "restart_from"]

T = TypeVar("T")

log = structlog.get_logger("fleetd.store")

HISTORY = 10_000
"""Revisions of events kept for watches that resume; older ones are compacted."""

QUEUE = 1024
"""Jobs waiting for the database thread; callers beyond it wait to queue (back-pressure)."""

WATCH_QUEUE = 1024
"""Events a watch holds for a slow reader before it falls back to reading the history."""

REVOKE_RETRY = 1.0
"""Seconds before retrying to delete an expired lease's keys after the disk was full."""

RESERVED = 1 << 16
"""Revisions the watermark is advanced past the store's when a commit would pass it: the
commits meanwhile only note theirs, with no flush to wait for (fleetd.store.watermark). A
reset skips at most this many."""

KNOWN, KNOWN_BYTES = 256, 1024
"""Rows the database thread remembers, and the largest value it keeps (see `_Database._get`)."""

NOTES_FLUSHED_WITHIN = 1.0
"""Seconds within which a noted floor is flushed: by the next commit's advance, or by the
database thread once idle."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO meta VALUES ('revision', 1), ('compact_revision', 0), ('next_lease', 1)",
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
        " create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,"
        " version INTEGER NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID",
        "CREATE INDEX kv_lease ON kv (lease)",
        "CREATE TABLE leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL)",
        "CREATE TABLE history (id INTEGER PRIMARY KEY, revision INTEGER NOT NULL,"
        " key TEXT NOT NULL, event BLOB NOT NULL)",
        "CREATE INDEX history_revision ON history (revision)",
    ),
    ("INSERT INTO meta VALUES ('store_id', random() & 9223372036854775807), ('watermarked', 0)",),
)
"""Schema migrations in order: applying entry i moves ``PRAGMA user_version`` from i to i + 1.
Append only; never edit an entry that has shipped."""

_SELECT_KV = "SELECT key, value, create_revision, mod_revision, version, lease FROM kv"
_COMPARATORS: dict[CompareOp, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_ENCODE_EVENT = msgspec.msgpack.Encoder().encode
_DECODE_EVENT = msgspec.msgpack.Decoder(Event).decode


def _prefix_end(prefix: str) -> str | None:
    """The least key above every key that starts with `prefix`; None when that is all keys."""
    stripped = prefix.rstrip(chr(sys.maxunicode))
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates cannot be encoded for SQLite
        following = 0xE000
    return stripped[:-1] + chr(following)


def _under(prefix: str) -> tuple[str, tuple[str, ...]]:
    """A WHERE condition on `key` (and its parameters) that an index can serve."""
    end = _prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


def _target(kv: KeyValue | None, target: Target) -> bytes | int | None:
    """The compared field, with etcd's zeros for an absent key (None: no value to compare)."""
    if kv is None:
        return None if target == "value" else 0
    match target:
        case "value":
            return kv.value
        case "version":
            return kv.version
        case "create":
            return kv.create_revision
        case "mod":
            return kv.mod_revision


def _compacted(revision: int, compact_revision: int) -> Compacted:
    return Compacted(
        f"revision {revision} is compacted: the history starts after {compact_revision}",
        revision=revision,
        compact_revision=compact_revision,
    )


def _is_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.Error) and error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL


_IN_USE = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _disk_full_under(path: str) -> bool:
    """SQLite reports a -wal file it could not create on a full disk as an I/O error: ask
    the file system whether a page would still fit."""
    try:
        found = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < 65536


def _translate(error: Exception) -> FleetError:
    """The one mapping from what the database thread raised to what callers see."""
    if isinstance(error, FleetError):
        return error
    if _is_full(error):
        translated: FleetError = StoreFull("the store's disk is full; nothing was written")
    else:
        translated = Internal(f"the store failed: {error!r}")
    translated.__cause__ = error
    return translated


class _LeaseTable:
    """Live leases and when each expires.

    The deadlines live in a dict that a DeadlineHeap reads: a keepalive only moves the lease's
    deadline in the dict, and a lease found early when it comes up goes back at its current
    deadline. So a keepalive is O(1) and the timer wakes once per actual expiry, not once per
    keepalive.
    """

    def __init__(self) -> None:
        self._ttls: dict[int, float] = {}
        self._deadlines: dict[int, float] = {}
        self._heap = DeadlineHeap(self._deadlines.get)

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, lease: int, ttl: float, now: float) -> bool:
        """A new lease (ids are never reused); whether its deadline is now the earliest."""
        self._ttls[lease] = ttl
        self._deadlines[lease] = now + ttl
        return self._heap.push(lease, now + ttl)

    def renew(self, lease: int, now: float) -> float:
        """The full TTL again, or 0 if the lease is unknown or already past its deadline."""
        deadline = self._deadlines.get(lease)
        if deadline is None or deadline <= now:
            return 0.0
        ttl = self._ttls[lease]
        self._deadlines[lease] = now + ttl
        return ttl

    def discard(self, lease: int) -> bool:
        """Forgets the lease; whether it was live. Its heap item is dropped when it comes up."""
        self._ttls.pop(lease, None)
        return self._deadlines.pop(lease, None) is not None

    def clear(self) -> None:
        self._ttls.clear()
        self._deadlines.clear()
        self._heap.clear()

    def next_deadline(self) -> float | None:
        return self._heap.next_deadline()

    def pop_expired(self, now: float) -> list[int]:
        expired = self._heap.pop_due(now)
        for lease in expired:
            self.discard(lease)
        return expired

    def snapshot(self, now: float) -> tuple[Lease, ...]:
        return tuple(
            Lease(lease, self._ttls[lease], max(0.0, deadline - now))
            for lease, deadline in sorted(self._deadlines.items())
        )


@dataclass(slots=True)
class _State:
    """What the database thread counts; persisted are the first three (in `meta`)."""

    revision: int = 0
    compact_revision: int = 0
    next_lease: int = 0
    transactions: int = 0
    operations: int = 0
    commits: int = 0

    def copy(self) -> "_State":
        """dataclasses.replace, at a fraction of its cost: this runs once per job."""
        return _State(
            self.revision,
            self.compact_revision,
            self.next_lease,
            self.transactions,
            self.operations,
            self.commits,
        )


class _Job(Generic[T]):
    """One request on its way through the database thread and back; `answered` is done
    once its batch is over, on the event loop."""

    __slots__ = ("answered", "apply", "error", "result", "settled")

    def __init__(self, apply: "Callable[[_Database], T]", answered: "asyncio.Future[None]") -> None:
        self.apply = apply
        self.answered = answered
        self.result: T | None = None
        self.error: BaseException | None = None
        self.settled = False

    def succeed(self, result: T) -> None:
        self.result, self.error, self.settled = result, None, True

    def fail(self, error: BaseException) -> None:
        self.result, self.error, self.settled = None, error, True

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.result)


class _DatabaseThread:
    """The thread that owns the database while the store serves: it takes every job queued,
    runs them as one batch and hands the batch back to the event loop (`answer`, called
    there), then takes what queued meanwhile. A caller queues without a loop turn or a task
    in between, and its answer comes with one wake-up of the loop. `failed` is done if the
    thread ends with an error (a bug: run_batch handles the database's errors)."""

    def __init__(
        self,
        database: "_Database",
        answer: "Callable[[list[_Job[Any]], _Report | None, float], None]",
    ) -> None:
        self._database = database
        self._answer = answer
        self._loop = asyncio.get_running_loop()
        self.failed: asyncio.Future[None] = self._loop.create_future()
        self._queued: list[_Job[Any]] = []
        self._wake = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fleetd-store", daemon=True)
        self._thread.start()

    def queue(self, jobs: list["_Job[Any]"]) -> None:
        with self._wake:
            self._queued += jobs
            self._wake.notify()

    def stop(self) -> list["_Job[Any]"]:
        """Ends the thread after the batch it runs (its answer still comes); returns the
        jobs it had not taken."""
        with self._wake:
            self._stopping = True
            left, self._queued = self._queued, []
            self._wake.notify()
        return left

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            while batch := self._next_batch():
                self._run_batch(batch)
        except BaseException as error:
            self._loop.call_soon_threadsafe(self._fail, error)

    def _run_batch(self, batch: list["_Job[Any]"]) -> None:
        report = None
        started = time.perf_counter()
        try:
            report = self._database.run_batch(batch)
        finally:  # a committed batch always gets answered
            seconds = time.perf_counter() - started
            self._loop.call_soon_threadsafe(self._answer, batch, report, seconds)

    def _fail(self, error: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(error)

    def _next_batch(self) -> list["_Job[Any]"]:
        """The jobs queued; while none are, the watermark's notes are flushed when due (out of
        the lock: the event loop queues under it)."""
        while True:
            with self._wake:
                due = self._database.notes_due_in()
                while not (self._queued or self._stopping) and (due is None or due > 0):
                    self._wake.wait(due)
                    due = self._database.notes_due_in()
                if self._queued or self._stopping:
                    batch, self._queued = self._queued, []
                    return batch
            self._database.flush_notes()


def _done(future: "asyncio.Future[None]") -> None:
    """Wake its waiter, unless the waiter was cancelled (which cancels the future)."""
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True, slots=True)
class _Report:
    """What one batch changed, handed from the database thread back to the event loop."""

    events: tuple[Event, ...]
    state: _State


class _Database:
    """The connection and everything done with it. Used by one thread at a time, in turn."""

    def __init__(self, connection: sqlite3.Connection, history: int) -> None:
        self._db = connection
        self._history = history
        self._default_max_pages: int = self._pragma("max_page_count")
        meta = dict(connection.execute("SELECT name, value FROM meta"))
        self.state = _State(meta["revision"], meta["compact_revision"], meta["next_lease"])
        self.identity = StoreIdentity(meta["store_id"], meta["revision"], bool(meta["watermarked"]))
        self.events: list[Event] = []
        self._known: dict[str, KeyValue | None] = {}
        """Rows (None: no row) as the kv table has them, the last KNOWN read from it (and
        written since): exact, as this connection is the table's only writer."""
        self._watermark: Watermark | None = None
        self._marking = ThreadPoolExecutor(1, thread_name_prefix="fleetd-watermark")

    @classmethod
    def open(cls, path: str, history: int, watermark: Watermark | None = None) -> "_Database":
        """Opens (or creates) the database; with a `watermark`, only the store it describes,
        at or past its revision (StateLost otherwise). StoreCorrupt when SQLite cannot read
        the file as a database."""
        mark = watermark.read() if watermark is not None else None
        if mark is not None and not _has_content(path):
            _judge(mark, None, path, watermark)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise _unreadable(path, exc) from None
        try:
            connection.execute("PRAGMA locking_mode = EXCLUSIVE")  # before the first read
            if mark is not None and _schema_version(connection) == 0:
                _judge(mark, None, path, watermark)
            _use_wal_mode(connection, path)
            _migrate(connection, path)
            _check_integrity(connection, path)
            database = cls(connection, history)
            if watermark is not None:
                database._keep(watermark, mark, path)
            return database
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise _unreadable(path, exc) from None
        except BaseException:
            connection.close()
            raise

    def _keep(self, watermark: Watermark, mark: Mark | None, path: str) -> None:
        """Check the store against the watermark, then keep the watermark up to date."""
        if _judge(mark, self.identity, path, watermark) is Continuity.ADOPT:
            watermark.create(Mark.at(self.identity.store_id, self.state.revision))
        else:
            watermark.open()
        self._watermark = watermark
        self.set_watermarked()

    def set_watermarked(self) -> None:
        """From now on a missing watermark means a lost one (written after the watermark:
        a crash in between leaves a watermark the next start finds, which is as good)."""
        if not self.identity.watermarked:
            self._db.execute("UPDATE meta SET value = 1 WHERE name = 'watermarked'")
            self.identity = replace(self.identity, watermarked=True)

    def raise_revision(self, floor: int) -> None:
        """Move the revision up to `floor`: the next write gets a greater one."""
        if floor > self.state.revision:
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (floor,))
            self.state.revision = floor

    def close(self) -> None:
        self._db.close()
        self._marking.shutdown()
        if self._watermark is not None:
            self.flush_notes()
            self._watermark.close()

    def leases(self) -> list[tuple[int, float]]:
        return self._db.execute("SELECT id, ttl FROM leases").fetchall()

    # Batches -------------------------------------------------------------------------------

    def run_batch(self, jobs: Sequence[_Job[Any]]) -> _Report:
        """Runs the jobs in one transaction and commits once.

        Jobs almost never fail, so the batch first runs without savepoints (they would be two
        more statements per job). If any job fails, all of it is rolled back and the batch
        runs again with each job under a savepoint: a job that fails while the transaction
        survives (an unknown lease, a bug) is then rolled back to its savepoint alone. But
        SQLite ends the whole transaction itself on SQLITE_FULL (observed with
        max_page_count), and a COMMIT can fail when the WAL cannot grow; then nothing of the
        batch was written, and each job is run again in a transaction of its own, so that
        only the jobs that still fail report the error. Retrying costs one fsync per job, but
        only on that rare path.
        """
        self.events = []
        if not (self._commit(jobs, savepoints=False) or self._commit(jobs, savepoints=True)):
            for job in jobs:
                self._commit([job], savepoints=True)
        return _Report(tuple(self.events), self.state.copy())

    def _advance_watermark(self, floor: int) -> "Future[None] | None":
        """Just before the COMMIT, the watermark's write: an advance past this commit's
        revision, started on its own thread so that its flush and the database's run
        together, when the commit would pass the mark or notes are due; else a note of the
        floor, at once. `floor` is the revision committed before this transaction (see
        fleetd.store.watermark)."""
        watermark = self._watermark
        if watermark is None or watermark.mark is None or self.state.revision == floor:
            return None
        due = self.notes_due_in()
        if self.state.revision <= watermark.mark.revision and (due is None or due > 0):
            try:
                watermark.note(floor)
            except OSError as exc:
                log.error("watermark_not_written", path=watermark.path, error=str(exc))
            return None
        return self._marking.submit(watermark.advance, floor, self.state.revision + RESERVED)

    def notes_due_in(self) -> float | None:
        """Seconds until the watermark's notes are due for a flush; None without notes."""
        noted_at = self._watermark.noted_at if self._watermark is not None else None
        if noted_at is None:
            return None
        return noted_at + NOTES_FLUSHED_WITHIN - time.monotonic()

    def flush_notes(self) -> None:
        """A failure is logged, and the notes are flushed again a while later (or by a
        commit's advance)."""
        if self._watermark is None:
            return
        try:
            self._watermark.sync()
        except OSError as exc:
            log.error("watermark_not_written", path=self._watermark.path, error=str(exc))
            self._watermark.noted_at = time.monotonic()  # tried again when due again

    def _advanced(self, marking: "Future[None] | None") -> None:
        """Before the batch is answered. A failure (an I/O error: the write is in place and
        allocates nothing, so a full disk cannot cause one; or a bug) is logged and retried
        with the next commit, never raised: the COMMIT may have happened, and a batch that
        committed must not be run again."""
        if marking is None:
            return
        assert self._watermark is not None
        try:
            marking.result()
        except OSError as exc:
            log.error("watermark_not_written", path=self._watermark.path, error=str(exc))
        except Exception as exc:
            log.error("watermark_not_written", path=self._watermark.path, exc_info=exc)

    def _commit(self, jobs: Sequence[_Job[Any]], *, savepoints: bool) -> bool:
        """Whether the jobs were committed; without `savepoints`, a job that fails fails the
        whole attempt (and reports nothing: the jobs are run again)."""
        before, mark = self.state.copy(), len(self.events)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job in jobs:
                if savepoints:
                    self._run(job)
                else:
                    job.succeed(job.apply(self))
            self._compact()
            self._save(before)
            marking = self._advance_watermark(before.revision)
            try:
                self._db.execute("COMMIT")
            finally:
                self._advanced(marking)
        except Exception as error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.state = before
            self._rolled_back(mark)
            if savepoints and len(jobs) == 1:
                jobs[0].fail(_translate(error))
            return False
        self.state.commits += 1
        return True

    def _run(self, job: _Job[Any]) -> None:
        before, mark = self.state.copy(), len(self.events)
        self._db.execute("SAVEPOINT job")
        try:
            result = job.apply(self)
        except Exception as error:
            if not self._db.in_transaction:
                raise
            self._db.execute("ROLLBACK TO job")
            self._db.execute("RELEASE job")
            self.state = before
            self._rolled_back(mark)
            job.fail(_translate(error))
        else:
            self._db.execute("RELEASE job")
            job.succeed(result)

    def _compact(self) -> None:
        floor = self.state.revision - self._history
        if floor > self.state.compact_revision:
            self._db.execute("DELETE FROM history WHERE revision <= ?", (floor,))
            self.state.compact_revision = floor

    def _save(self, before: _State) -> None:
        for name in ("revision", "compact_revision", "next_lease"):
            value = getattr(self.state, name)
            if value != getattr(before, name):
                self._db.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))

    # Jobs ----------------------------------------------------------------------------------

    def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation],
    ) -> TxnResult:
        read: dict[str, KeyValue | None] = {}
        succeeded = all(self._holds(compare, read) for compare in compares)
        operations = success if succeeded else failure
        self._require_leases(operations)
        revision, mark = self.state.revision + 1, len(self.events)
        responses = tuple(self._apply(operation, revision, read) for operation in operations)
        if len(self.events) > mark:
            self.state.revision = revision
        self.state.transactions += 1
        self.state.operations += len(operations)
        return TxnResult(succeeded, self.state.revision, responses)

    def grant(self, ttl: float) -> int:
        lease = self.state.next_lease
        self._db.execute("INSERT INTO leases VALUES (?, ?)", (lease, ttl))
        self.state.next_lease += 1
        return lease

    def revoke(self, leases: Sequence[int]) -> None:
        """Each lease's keys go in a revision of their own, as in etcd."""
        for lease in leases:
            kvs = self._select("lease = ?", (lease,))
            if kvs:
                self.state.revision += 1
                self._delete(kvs, self.state.revision)
            self._db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def history_since(self, prefix: str, revision: int) -> tuple[list[Event], int]:
        """Events under `prefix` from `revision` on, and the revision they are complete to."""
        if revision <= self.state.compact_revision:
            raise _compacted(revision, self.state.compact_revision)
        condition, parameters = _under(prefix)
        rows = self._db.execute(
            f"SELECT event FROM history WHERE revision >= ? AND {condition} ORDER BY id",
            (revision, *parameters),
        )
        return [_DECODE_EVENT(event) for (event,) in rows], self.state.revision

    def set_max_pages(self, pages: int | None) -> int:
        return self._pragma(f"max_page_count = {int(pages or self._default_max_pages)}")

    # Operations ----------------------------------------------------------------------------

    def _holds(self, compare: Compare, read: dict[str, KeyValue | None]) -> bool:
        """`read` collects the keys compared, for a put of the same key to reuse."""
        if compare.key not in read:
            read[compare.key] = self._get(compare.key)
        actual = _target(read[compare.key], compare.target)
        return actual is not None and _COMPARATORS[compare.op](actual, compare.operand)

    def _require_leases(self, operations: Sequence[Operation]) -> None:
        """Checked before any write, so that a put with a lost lease changes nothing."""
        for lease in {op.lease for op in operations if isinstance(op, Put) and op.lease}:
            if self._db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
                raise Absent(f"lease {lease} not found", lease=lease)

    def _apply(
        self, operation: Operation, revision: int, read: dict[str, KeyValue | None]
    ) -> Response:
        """`read`: keys as the compares found them (a branch writes each key at most once, so
        a put finds its key still so)."""
        match operation:
            case Put():
                return self._put(operation, revision, read)
            case Delete(key=key):
                return DeleteResult(self._delete(self._select("key = ?", (key,)), revision))
            case DeleteRange(prefix=prefix):
                return DeleteResult(self._delete(self._select(*_under(prefix)), revision))
            case Get(key=key):
                kv = self._get(key)
                return RangeResult((kv,) if kv else ())
            case Range(prefix=prefix, limit=limit):
                return self._range(prefix, limit)

    def _put(self, put: Put, revision: int, read: dict[str, KeyValue | None]) -> PutResult:
        prev = read.pop(put.key) if put.key in read else self._get(put.key)
        create = prev.create_revision if prev else revision
        version = prev.version + 1 if prev else 1
        kv = KeyValue(put.key, put.value, create, revision, version, put.lease)
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)", astuple(kv))
        if put.key in self._known:
            self._know(put.key, kv)
        self._record(Event("put", kv, prev))
        return PutResult()

    def _range(self, prefix: str, limit: int) -> RangeResult:
        """Reads one key past `limit` to tell whether there are more."""
        condition, parameters = _under(prefix)
        if not limit:
            return RangeResult(self._select(f"{condition} ORDER BY key", parameters))
        kvs = self._select(f"{condition} ORDER BY key LIMIT ?", (*parameters, limit + 1))
        return RangeResult(kvs[:limit], more=len(kvs) > limit)

    def _delete(self, kvs: tuple[KeyValue, ...], revision: int) -> tuple[KeyValue, ...]:
        self._db.executemany("DELETE FROM kv WHERE key = ?", [(kv.key,) for kv in kvs])
        for kv in kvs:
            if kv.key in self._known:
                self._know(kv.key, None)
            self._record(Event("delete", KeyValue(kv.key, b"", 0, revision, 0), kv))
        return kvs

    def _record(self, event: Event) -> None:
        self._db.execute(
            "INSERT INTO history (revision, key, event) VALUES (?, ?, ?)",
            (event.revision, event.kv.key, _ENCODE_EVENT(event)),
        )
        self.events.append(event)

    def _rolled_back(self, mark: int) -> None:
        """Events from `mark` on were rolled back, and what `_known` says may have been."""
        del self.events[mark:]
        self._known.clear()

    def _get(self, key: str) -> KeyValue | None:
        if key in self._known:
            return self._known[key]
        kvs = self._select("key = ?", (key,))
        kv = kvs[0] if kvs else None
        self._know(key, kv)
        return kv

    def _know(self, key: str, kv: KeyValue | None) -> None:
        """Remember the row, when small: a compare's read was a statement per write. Only
        rows read are remembered (and kept as they are written): most rows written without a
        compare (a cluster's member records, a run's events) are never read again."""
        self._known.pop(key, None)
        if kv is None or len(kv.value) <= KNOWN_BYTES:
            self._known[key] = kv
            if len(self._known) > KNOWN:
                del self._known[next(iter(self._known))]

    def _select(self, condition: str, parameters: tuple[Any, ...]) -> tuple[KeyValue, ...]:
        rows = self._db.execute(f"{_SELECT_KV} WHERE {condition}", parameters)
        return tuple(KeyValue(*row) for row in rows)

    def _pragma(self, name: str) -> int:
        return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])


def restart_from(path: str, watermark: Watermark, floor: int) -> Mark:
    """Open the store at `path` (a new one if it is missing) whatever the watermark says, move
    its revision up to `floor`, and write a new watermark describing it: how `fleetd
    reset-state` ends, so that no revision, and so no fencing token, is ever given twice."""
    database = _Database.open(path, HISTORY)
    try:
        database.raise_revision(floor)
        mark = Mark.at(database.identity.store_id, database.state.revision)
        watermark.create(mark)
        watermark.close()
        database.set_watermarked()
    finally:
        database.close()
    return mark


def peek_revision(path: str) -> int | None:
    """The store's revision, or None when it cannot be read at all. Opened as fleetd opens it
    (a read-only connection cannot read a WAL whose index is gone), so call it only while
    holding the state directory's lock."""
    if not _has_content(path):
        return None
    try:
        connection = sqlite3.connect(path)
        try:
            connection.execute("PRAGMA locking_mode = EXCLUSIVE")
            row = connection.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def _use_wal_mode(connection: sqlite3.Connection, path: str) -> None:
    """WAL and durable commits. The connection holds an exclusive lock (fleetd is the store's
    only user: it holds the state directory's lock too), so the WAL index lives in memory,
    not in a -shm file that a full disk could keep fleetd from creating at start-up."""
    if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise Internal(f"{path}: SQLite refused WAL mode")
    connection.execute("PRAGMA synchronous = FULL")


def _has_content(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except FileNotFoundError:
        return False


def _schema_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _judge(
    mark: Mark | None, found: StoreIdentity | None, path: str, watermark: Watermark | None
) -> Continuity:
    assert watermark is not None
    return check_continuity(mark, found, store=path, watermark=watermark.path)


def _check_integrity(connection: sqlite3.Connection, path: str) -> None:
    """quick_check reads every page once (milliseconds for a store of megabytes): a file cut
    short or overwritten is refused at start-up, not found out by a request later."""
    problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        raise StoreCorrupt(
            f"{path} is damaged ({'; '.join(problems)}): restore it from a backup, or run "
            "`fleetd reset-state` to archive it and start empty",
            path=path,
        )


def _unreadable(path: str, error: Exception) -> FleetError:
    if isinstance(error, sqlite3.Error) and error.sqlite_errorcode & 0xFF in _IN_USE:
        return AlreadyRunning(
            f"another process has {path} open ({error}): fleetd must be its only user",
            path=path,
        )
    if _is_full(error) or _disk_full_under(path):
        return StoreFull(
            f"cannot open {path}: the disk holding it is full; free some space and start "
            "fleetd again",
            path=path,
        )
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return StoreCorrupt(
        f"cannot open {path} as a store: {reason}. Restore it from a backup, or run "
        "`fleetd reset-state` to archive it and start empty",
        path=path,
    )


def _migrate(connection: sqlite3.Connection, path: str) -> None:
    """Brings the schema up to date, or refuses a database written by a newer fleetd."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise Incompatible(
            f"{path} has schema version {version}, newer than this fleetd knows "
            f"({len(MIGRATIONS)}): upgrade fleetd",
            path=path,
            version=version,
        )
    if version == len(MIGRATIONS):
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        for migration in MIGRATIONS[version:]:
            for statement in migration:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class _Watcher:
    """One watch's queue.

    After each commit the store offers the new events. A watcher that starts in the past, or
    whose queue would overflow because its reader is slow, is `lagging`: it is offered nothing
    and its reader reads the history instead, until that reaches the store's revision. Nothing
    is lost and nothing is delivered twice: every event below `next_revision` has been queued,
    and no event at or above it has.
    """

    __slots__ = ("arrived", "closed", "lagging", "next_revision", "pending", "prefix")

    def __init__(self, prefix: str, next_revision: int, *, lagging: bool) -> None:
        self.prefix = prefix
        self.next_revision = next_revision
        self.lagging = lagging
        self.pending: deque[Event] = deque()
        self.arrived = anyio.Event()
        self.closed = False

    def offer(self, events: Sequence[Event], revision: int) -> None:
        if self.lagging:
            return
        matching = [
            event
            for event in events
            if event.kv.key.startswith(self.prefix) and event.revision >= self.next_revision
        ]
        if len(self.pending) + len(matching) > WATCH_QUEUE:
            self.lagging = True
        else:
            self.pending.extend(matching)
            self.next_revision = max(self.next_revision, revision + 1)
        if matching or self.lagging:
            self.arrived.set()

    def catch_up(self, events: Sequence[Event], complete_to: int, revision: int) -> None:
        self.pending.extend(events)
        self.next_revision = max(self.next_revision, complete_to + 1)
        self.lagging = complete_to < revision

    def close(self) -> None:
        self.closed = True
        self.arrived.set()


class _EventStream:
    """What a watch yields; it ends when the store closes."""

    def __init__(self, store: "SQLiteStore", watcher: _Watcher) -> None:
        self._store = store
        self._watcher = watcher

    def __aiter__(self) -> "_EventStream":
        return self

    async def __anext__(self) -> Event:
        watcher = self._watcher
        while not watcher.pending:
            if watcher.closed:
                raise StopAsyncIteration
            if watcher.lagging:
                await self._store._catch_up(watcher)
            else:
                watcher.arrived = anyio.Event()
                await watcher.arrived.wait()
        return watcher.pending.popleft()


class SQLiteStore(Store):
    """The store in one SQLite file; see the module docstring for how it commits.

    Run it with ``await tg.start(store.serve)``, or ``async with SQLiteStore.open(path)``.

    Args:
        path: the database file; its directory must exist.
        clock: the monotonic clock that lease deadlines are measured on.
        history: how many revisions of events are kept for watches that resume.
        watermark: the state directory's watermark: the store opens only if it is the store
            the watermark describes, at or past its revision, and keeps it up to date.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        history: int = HISTORY,
        watermark: Watermark | None = None,
    ) -> None:
        self._path = os.fspath(path)
        self._clock = clock
        self._history = history
        self._watermark = watermark
        self._thread: _DatabaseThread | None = None
        self._in_flight = 0
        """Jobs queued or running, not yet answered."""
        self._queued: list[_Job[Any]] = []
        """Jobs queued in this turn of the event loop: handed to the thread together at its
        end (`_hand_over`), a batch for the thread to take at once."""
        self._room: asyncio.Future[None] | None = None
        """Done when the jobs in flight fall below QUEUE again, for callers waiting to queue."""
        self._closed = False
        self._state = _State()
        self._leases = _LeaseTable()
        self._doomed: set[int] = set()
        """Leases expired or revoked whose keys could not be deleted yet (disk full)."""
        self._alarm = Alarm(clock)
        """Wakes the lease timer early: a grant with the earliest deadline, a keepalive that
        found its lease overdue, doomed keys to delete."""
        self._watchers: set[_Watcher] = set()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        history: int = HISTORY,
    ) -> AsyncIterator["SQLiteStore"]:
        """The store, served for the duration of the block."""
        store = cls(path, clock=clock, history=history)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(store.serve)
                yield store
            except Exception as error:  # raised below, not wrapped in an exception group
                failure = error
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Opens the database, then serves until cancelled; ready once the database is open."""
        try:
            with anyio.CancelScope(shield=True):
                database = await self._in_thread(
                    _Database.open, self._path, self._history, self._watermark
                )
            try:
                await self._serve(database, task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._in_thread(database.close)
        finally:
            self._stop()

    async def _serve(self, database: "_Database", task_status: TaskStatus[None]) -> None:
        self._state = replace(database.state)
        now = self._clock()
        for lease, ttl in await self._in_thread(database.leases):
            self._leases.add(lease, ttl, now)
        self._thread = _DatabaseThread(database, self._answer)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._expire_leases)
                task_status.started()
                await self._thread.failed
        finally:
            with anyio.CancelScope(shield=True):
                self._stop()
                await self._in_thread(self._thread.join)  # its last answer comes first

    # Store -----------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._state.revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation] = (),
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        guards, then, otherwise = tuple(compares), tuple(success), tuple(failure)
        check_branch(then)
        check_branch(otherwise)
        return await self._submit(lambda db: db.txn(guards, then, otherwise))

    async def grant(self, ttl: float) -> tuple[int, float]:
        if not ttl > 0:
            raise InvalidRequest("a lease TTL must be positive", ttl=ttl)
        with anyio.CancelScope(shield=True):  # a granted lease must reach the timer
            lease = await self._submit(lambda db: db.grant(ttl))
            if self._leases.add(lease, ttl, self._clock()):
                self._alarm.wake()
        return lease, ttl

    async def keepalive(self, lease: int) -> float:
        ttl = self._leases.renew(lease, self._clock())
        if not ttl:
            self._alarm.wake()  # it may be overdue: expire it now, not at the timer's leisure
        return ttl

    async def revoke(self, lease: int) -> None:
        if not self._leases.discard(lease):
            raise Absent(f"lease {lease} not found", lease=lease)
        try:
            await self._submit(lambda db: db.revoke((lease,)))
        except StoreFull:
            self._doomed.add(lease)  # the timer retries, so its keys still go
            self._alarm.wake()
            raise

    async def leases(self) -> tuple[Lease, ...]:
        return self._leases.snapshot(self._clock())

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        watcher = self._watcher(prefix, start_revision)
        self._watchers.add(watcher)
        try:
            yield _EventStream(self, watcher)
        finally:
            self._watchers.discard(watcher)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            revision=self._state.revision,
            compact_revision=self._state.compact_revision,
            transactions=self._state.transactions,
            operations=self._state.operations,
            commits=self._state.commits,
            queued=self._in_flight,
            leases=len(self._leases),
            watchers=len(self._watchers),
        )

    async def set_max_pages(self, pages: int | None) -> int:
        """Caps the database at `pages` pages (None: SQLite's default cap) and returns the cap,
        which SQLite never sets below the current size. At the cap SQLite fails exactly as on
        a full disk, which is how the tests exercise StoreFull."""
        return await self._submit(lambda db: db.set_max_pages(pages))

    # Internals -------------------------------------------------------------------------------

    @staticmethod
    async def _in_thread(function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(function, *args)

    async def _submit(self, apply: Callable[[_Database], T]) -> T:
        """Queue without a checkpoint of its own while the queue has room (waiting for the
        answer is the checkpoint): a yield here would cost every write a loop turn."""
        while self._in_flight >= QUEUE and not self._closed:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)  # shared: a cancelled waiter must not cancel it
        if self._closed or self._thread is None:
            raise anyio.ClosedResourceError("the store is closed")
        loop = asyncio.get_running_loop()
        job = _Job(apply, loop.create_future())
        self._in_flight += 1
        if not self._queued:
            loop.call_soon(self._hand_over)
        self._queued.append(job)
        await job.answered
        return job.outcome()

    def _hand_over(self) -> None:
        queued, self._queued = self._queued, []
        if self._thread is not None and not self._closed:
            self._thread.queue(queued)

    def _answer(self, batch: list[_Job[Any]], report: _Report | None, seconds: float) -> None:
        """On the event loop, once the database thread has run `batch` (in `seconds`);
        `report` is None if it failed, and then no job's result is known to be committed."""
        STORE_BATCH_JOBS.observe(len(batch))
        STORE_COMMIT_SECONDS.observe(seconds)
        if report is not None:
            self._publish(report)
        for job in batch:
            if report is None:
                job.fail(Internal("the store's database thread failed; see the daemon log"))
            _done(job.answered)
        self._in_flight -= len(batch)
        if self._room is not None and self._in_flight < QUEUE:
            _done(self._room)
            self._room = None

    def _publish(self, report: _Report) -> None:
        self._state = report.state
        if report.events:
            for watcher in self._watchers:
                watcher.offer(report.events, report.state.revision)

    async def _expire_leases(self) -> None:
        while True:
            self._doomed.update(self._leases.pop_expired(self._clock()))
            if self._doomed:
                await self._delete_doomed()
            await self._alarm.sleep_until(self._next_wake())

    async def _delete_doomed(self) -> None:
        doomed = tuple(sorted(self._doomed))
        try:
            await self._submit(lambda db: db.revoke(doomed))
        except StoreFull:
            return
        self._doomed.difference_update(doomed)

    def _next_wake(self) -> float | None:
        """The next lease deadline, or sooner while doomed keys wait for disk space."""
        deadline = self._leases.next_deadline()
        if not self._doomed:
            return deadline
        retry = self._clock() + REVOKE_RETRY
        return retry if deadline is None else min(deadline, retry)

    def _watcher(self, prefix: str, start_revision: int | None) -> _Watcher:
        if start_revision is None:
            return _Watcher(prefix, self.revision + 1, lagging=False)
        if start_revision <= self._state.compact_revision:
            raise _compacted(start_revision, self._state.compact_revision)
        return _Watcher(prefix, start_revision, lagging=True)

    async def _catch_up(self, watcher: _Watcher) -> None:
        prefix, since = watcher.prefix, watcher.next_revision
        events, complete_to = await self._submit(lambda db: db.history_since(prefix, since))
        watcher.catch_up(events, complete_to, self.revision)

    def _stop(self) -> None:
        """Refuses new requests, fails the queued ones and ends the watches."""
        self._closed = True
        if self._thread is not None:
            closed = anyio.ClosedResourceError("the store is closed")
            left, self._queued = self._queued, []
            for job in left + self._thread.stop():
                job.fail(closed)
                _done(job.answered)
        if self._room is not None:
            _done(self._room)
            self._room = None
        self._leases.clear()
        for watcher in self._watchers:
            watcher.close()

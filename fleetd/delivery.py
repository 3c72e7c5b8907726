"""The claims' files: staged many at a time, then renamed into place.

    staged_name     a staging file's name, unique across fleetd runs (a claim record names it)
    StageJob        one file to stage: its content written to claims-staging/ and out to the disk
    run_batch       a batch of them in one pass over the disk (blocking)
    FileBatches     how the claim handlers reach the disk: batches, renames, reused files
    place / unlink / sync   single renames, unlinks and fsyncs (blocking)
    deliver / withdraw   one file, durably (start-up, tests)

A delivery has two steps. Staging writes the content to a file in ``claims-staging/`` and
writes it out to the disk (sync_file_range: written and waited for, not flushed from the
disk's cache). Placing renames it into its directory (``inbox/OWNER``, ``files``). A reader
never sees a partial file, after a power loss too: a file is renamed in only once its data
is written out, and the journal commit that makes a rename durable flushes the disk's cache
first (ext4's jbd2, XFS's log; a rename is atomic across a crash on a journaling file system,
which is what fleetd's state directory must live on). A withdrawal moves the file out of its
directory, by a rename into the staging directory, where it waits to be reused (below).

Staging makes no file durable by itself: a small content is durable in the claim's record,
which fleetd.claims commits alongside, and from which start-up delivers again a file a power
loss took (fleetd.claims). So such an acquire waits for one flush, the store's, where
flushing its file too cost a second one: a disk runs flushes one after the other. A larger
content, which the record does not hold, is staged `durable`: its file is flushed, its data
and its name (the staging directory's fsync).

What waits for the disk. Staging does (a write, no flush), and its callers wait for it
(fleetd.claims awaits it together with the claim's store commit: a lone staging's wait then
finds it done). Placing and withdrawing do not: a rename waits for no disk, so they are done
on the event loop (an unlink may wait for the file system's journal, ~0.2 ms on ext4, so it
is left to a batch), and the directories they touch are fsynced in the background within
about IDLE_SYNC_DELAY, by a batch (never lost silently: a failure is logged). Until then a
power loss may undo the rename; fleetd.claims's start-up reconciliation redoes it from the
records, which are durable.

Batches. Concurrent handlers queue their staging, and a runner takes all of it into one
thread hop (``run_batch``) that writes every file, then writes them all out at once, and
fsyncs the directories renamed into or out of when they have waited IDLE_SYNC_DELAY. Only
then are its callers answered. Two runners take turns, so that one batch writes while the
other waits for the disk. A lone staging into a pooled file is done on the event loop
instead (FileBatches.stage): a hop to a thread and back would cost it more than its writes.

Reused files. Creating a file and unlinking it cost the file system more than the rest of a
claim's file work (allocating an inode; freeing its blocks, which on a file system mounted
with ``discard`` waits for the disk). So a withdrawn file is not unlinked: it goes to the
pool once it is found a plain file (at most POOL files; the next batch unlinks the others),
for a later staging to overwrite (write, truncate, write out) instead of creating a file.
What a pooled file holds before its write-out returns (the old content, or a mix) is never
placed: it is renamed in only after it, and start-up rolls a held claim forward only from a
staging file whose size and digest match its record (fleetd.claims).

Each job succeeds or fails alone: a file that cannot be written (a full disk shows at the
write or at the write-out) fails its own request and its staging file is removed; the
others go on. Every file operation goes through the state directory's descriptor
(fleetd.core.dirs): a link planted in the inbox is refused, never followed.
"""

import asyncio
import contextlib
import ctypes
import errno
import itertools
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import anyio
import structlog
from anyio.abc import TaskStatus

from fleetd.core.dirs import PrivateDir, write_all
from protocol.errors import FleetError, Internal, StoreFull

log = structlog.get_logger("fleetd.delivery")

STAGING = "claims-staging"
BATCHES_AT_ONCE = 2
"""Batches on their way to disk together (see FileBatches)."""
POOL = 256
"""Withdrawn files kept in the staging directory for stagings to reuse (see FileBatches):
more than the claims in flight under the heaviest load measured (bench/claims.py)."""
DIRECTORIES = 256
"""Directories FileBatches holds open (the staging directory, the inbox, owners' inboxes)."""
POOLED = 16 * 1024
"""The largest file kept for reuse: the pool holds at most POOL * POOLED bytes of disk."""
SYNCFS_AT = 8
"""Files in a batch from which one syncfs writes them all out (see _write_out)."""
SYNC_THREADS = 16
"""Directories fsynced at once, at most (see _SYNCERS)."""
IDLE_SYNC_DELAY = 0.2
"""Seconds a runner with only directories to fsync (or withdrawn files to unlink) waits for
staging work to join them: under load the next batch takes them along, and the disk is
spared a flush of its own."""

_SYNCERS = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fleetd-dirsync")
"""fsync of many directories at once: a journaling file system commits together the flushes
it is asked for together (ext4's jbd2, XFS's log force), where one after the other each would
cost a journal commit of its own. Its threads start on first use."""
_BATCHES = ThreadPoolExecutor(BATCHES_AT_ONCE, thread_name_prefix="fleetd-claim-files")
"""Where the batches run: a hop through an executor of our own costs the event loop about
half of one through anyio.to_thread (no cancel scope, limiter or backend lookup), which an
acquire waits for."""
_RUN = secrets.token_hex(4)
_names = itertools.count()

Where = tuple[str, ...]
"""A path under the state directory, one component a part."""


def staged_name() -> str:
    """A new staging file's name, never used by another fleetd run: a claim record names its
    staging file until it is replaced, and start-up rolls forward only the file it names."""
    return f"{os.getpid()}-{_RUN}-{next(_names)}.tmp"


@dataclass(eq=False, slots=True)
class StageJob:
    """Stage `content` as `staged` in the staging directory, for the file at `parts` (which
    names it in errors). `error` says why it failed once its batch has run."""

    parts: Where
    content: bytes
    staged: str = field(default_factory=staged_name)
    reused: bool = False
    """`staged` is a pooled file: it is overwritten."""
    durable: bool = False
    """Flushed, its data and its name, rather than written out: for a content that nothing
    else holds durably (fleetd.claims keeps only small ones in their records)."""
    error: FleetError | None = None
    settled: bool = False
    """Its batch has run (FileBatches)."""
    done: anyio.Event | None = None
    """Set when its batch has run (FileBatches)."""
    _fd: int = -1

    def fail(self, error: FleetError) -> None:
        if self.error is None:
            self.error = error


# One batch ---------------------------------------------------------------------------------


def run_batch(
    state: PrivateDir,
    jobs: Sequence[StageJob],
    dirty: Iterable[Where] = (),
    withdrawn: Sequence[str] = (),
) -> None:
    """Stage `jobs` in one pass over the disk: write every file, then write them all out,
    unlink the `withdrawn` files (moved from their place to the staging directory, not
    pooled), and fsync the `dirty` directories (those placed into or withdrawn from since the
    last batch). Every job ends with `error` set or not, and a failed job leaves no staging
    file; this never raises for one job's failure."""
    try:
        staging = state.subdir(STAGING) if jobs or withdrawn else None
    except (OSError, FleetError) as exc:
        for job in jobs:
            job.fail(translated(exc, state, job.parts))
        staging = None
    try:
        if staging is not None:
            for job in jobs:
                _write(state, staging, job)
            _write_out(state, staging, [job for job in jobs if job.error is None])
            for name in withdrawn:
                _discard_quietly(staging, name)
        _sync_directories(state, dirty)
    finally:
        for job in jobs:
            _close(job)
            if job.error is not None and staging is not None:
                _discard_quietly(staging, job.staged)
        if staging is not None:
            staging.close()


def _write(state: PrivateDir, staging: PrivateDir, job: StageJob) -> None:
    with _failing(state, job):
        if job.reused:
            job._fd = staging.open_file(job.staged, os.O_WRONLY)
            write_all(job._fd, job.content)
            os.ftruncate(job._fd, len(job.content))
        else:
            job._fd = staging.open_file(job.staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            write_all(job._fd, job.content)


def _poolable(entry: os.stat_result | None, pool: Sequence[str]) -> bool:
    """A plain file of at most POOLED bytes (a link or a directory moved aside from the inbox
    is no file to reuse), while the pool has room."""
    return (
        entry is not None
        and stat.S_ISREG(entry.st_mode)
        and entry.st_size <= POOLED
        and len(pool) < POOL
    )


def _write_out(state: PrivateDir, staging: PrivateDir, jobs: Sequence[StageJob]) -> None:
    """Each file's data written to the disk and waited for, without a flush of the disk's
    cache (started for them all, then waited for one by one); a `durable` job's flushed
    instead, with the staging directory (its name), all at once. A full disk may show only
    here, as the file system allocates blocks for the data written earlier.

    SYNCFS_AT files or more are written out by one syncfs of their file system instead,
    which also flushes them: a call a file costs more CPU than the flush saves once many
    files share it. The price: it also waits for whatever else is dirty on that file
    system. When it fails, the error may be anybody's: a call a file then tells which job
    it is."""
    if len(jobs) >= SYNCFS_AT and _syncfs(staging.fd) is None:
        return
    flushed = [job for job in jobs if job.durable]
    written = [job for job in jobs if not job.durable]
    for job in written:
        _sync_file_range(job._fd, _START)
    if flushed:
        flushes = [partial(_fdatasync, job._fd) for job in flushed]
        *errors, staging_error = _all_at_once([*flushes, partial(_fsync, staging)])
        for job, error in zip(flushed, errors, strict=True):
            if (failure := error or staging_error) is not None:
                job.fail(translated(failure, state, job.parts))
    _wait_written(state, written)


def _wait_written(state: PrivateDir, jobs: Sequence[StageJob]) -> None:
    """Wait for each file's write-out (started, or not yet), and fail the jobs it fails."""
    for job in jobs:
        error = _sync_file_range(job._fd, _START_AND_WAIT)
        if error is not None:
            job.fail(translated(error, state, job.parts))


def _sync_directories(state: PrivateDir, dirty: Iterable[Where]) -> None:
    """Fsync the `dirty` directories, all at once; a failure is logged (nothing waits for
    them: see the module's docstring)."""
    directories = _open_dirty(state, dirty)
    try:
        errors = _all_at_once([partial(_fsync, directory) for _, directory in directories])
    finally:
        for _, directory in directories:
            directory.close()
    for (where, _), error in zip(directories, errors, strict=True):
        if error is not None:
            log.error(
                "claims_directory_not_synced",
                path=os.path.join(state.path, *where),
                error=str(error),
            )


def _all_at_once(flushes: Sequence[Callable[[], OSError | None]]) -> list[OSError | None]:
    """Each flush's error, the last one run in this thread (a hop to a syncer and back
    costs two context switches), the others in the syncer threads meanwhile."""
    if not flushes:
        return []
    others: list[Future[OSError | None]] = [_SYNCERS.submit(flush) for flush in flushes[:-1]]
    last = flushes[-1]()
    return [other.result() for other in others] + [last]


def _open_dirty(state: PrivateDir, dirty: Iterable[Where]) -> list[tuple[Where, PrivateDir]]:
    """Each dirty directory that still exists, opened link-free (deepest first)."""
    opened = []
    for where in sorted(dirty, key=len, reverse=True):
        try:
            opened.append((where, _open(state, where, create=False, dirty=None)))
        except FileNotFoundError:
            continue  # gone, and its parent with it or dirty too
        except (OSError, FleetError) as exc:
            log.error(
                "claims_directory_not_synced", path=os.path.join(state.path, *where), error=str(exc)
            )
    return opened


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_START = 2
"""SYNC_FILE_RANGE_WRITE: start writing the dirty pages out."""
_START_AND_WAIT = 1 | 2 | 4
"""SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER: every dirty page written out, and waited
for (its error, if any, reported)."""


def _syncfs(fd: int) -> OSError | None:
    """syncfs(2) (not in Python's os): every dirty file and directory of the file system
    holding `fd` written and flushed to the disk."""
    if _LIBC.syncfs(fd) == 0:
        return None
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def _sync_file_range(fd: int, flags: int) -> OSError | None:
    """sync_file_range(2) over the whole file (not in Python's os)."""
    if _LIBC.sync_file_range(fd, 0, 0, flags) == 0:
        return None
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def _fdatasync(fd: int) -> OSError | None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        return exc
    return None


def _fsync(directory: PrivateDir) -> OSError | None:
    try:
        directory.fsync()
    except OSError as exc:
        return exc
    return None


def _close(job: StageJob) -> None:
    if job._fd >= 0:
        os.close(job._fd)
        job._fd = -1


def _discard_quietly(staging: PrivateDir, name: str) -> None:
    with contextlib.suppress(OSError):  # start-up removes staging files no held record names
        staging.unlink(name)


# Renames and unlinks -----------------------------------------------------------------------


def _open(state: PrivateDir, where: Where, *, create: bool, dirty: set[Where] | None) -> PrivateDir:
    """The directory at `where`, link-free; made if missing and `create` (its parent is then
    added to `dirty`). FileNotFoundError when it is missing and not `create`."""
    directory = state
    try:
        for depth, part in enumerate(where):
            try:
                inner = directory.subdir(part, create=False)
            except FileNotFoundError:
                if not create:
                    raise
                inner = directory.subdir(part, create=True)
                if dirty is not None:
                    dirty.add(where[:depth])
            if directory is not state:
                directory.close()
            directory = inner
    except BaseException:
        if directory is not state:
            directory.close()
        raise
    return directory if directory is not state else PrivateDir(os.dup(state.fd), state.path)


def present(state: PrivateDir, parts: Where) -> bool:
    """Whether an entry is at `parts`, found without following a link on the way."""
    try:
        directory = _open(state, parts[:-1], create=False, dirty=None)
    except FileNotFoundError:
        return False
    with directory:
        return directory.entry(parts[-1]) is not None


def place(state: PrivateDir, staged: str, parts: Where, dirty: set[Where]) -> None:
    """Rename the staged file into place (its directory made if missing), replacing what is
    there; the directories changed are added to `dirty`, to be fsynced."""
    with Directories(state) as directories:
        directories.place(staged, parts, dirty)


def unlink(state: PrivateDir, parts: Where, dirty: set[Where]) -> None:
    """Remove the file at `parts` (one already gone, or its directory, is fine); its
    directory is added to `dirty`, to be fsynced."""
    try:
        directory = _open(state, parts[:-1], create=False, dirty=None)
    except FileNotFoundError:
        return
    with directory:
        if directory.unlink(parts[-1]):
            dirty.add(parts[:-1])


class Directories:
    """The directories that files are renamed into and out of, held open between renames:
    opening one link-free costs an open, an fstat and a close a level, and a claim's renames
    would pay that for the staging directory, the inbox and the owner's directory each time.

    Before each use every level is checked to be still the directory opened there (an lstat
    of its name in its parent: the same device and inode), so a directory since replaced (by
    a link, say) is never used: it is opened again, and refused as `_open` refuses it. Call
    `close` when done. What `open` returns is borrowed: it stays open until `close`, or until
    `size` other directories have been opened since (only the least recently used close)."""

    def __init__(self, state: PrivateDir, size: int = DIRECTORIES) -> None:
        self._state = state
        self._size = size
        self._held: OrderedDict[Where, tuple[PrivateDir, int, int]] = OrderedDict()

    def __enter__(self) -> "Directories":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for directory, _, _ in self._held.values():
            directory.close()
        self._held.clear()

    def open(self, where: Where, *, create: bool, dirty: set[Where] | None) -> PrivateDir:
        """The directory at `where`, as `_open` gives it."""
        directory = self._state
        for depth in range(1, len(where) + 1):
            directory = self._level(directory, where[:depth], create, dirty)
        return directory

    def place(self, staged: str, parts: Where, dirty: set[Where]) -> None:
        """As `place` (the module's function)."""
        staging = self.open((STAGING,), create=False, dirty=None)
        target = self.open(parts[:-1], create=True, dirty=dirty)
        staging.move(staged, target, parts[-1])
        dirty.add(parts[:-1])

    def set_aside(self, parts: Where, name: str, dirty: set[Where]) -> os.stat_result | None:
        """Move the file at `parts` to the staging directory as `name`, and return what it is
        there (a link is not followed); None when there is none (or no directory of it). Its
        directory is added to `dirty`."""
        try:
            directory = self.open(parts[:-1], create=False, dirty=None)
        except FileNotFoundError:
            return None
        staging = self.open((STAGING,), create=True, dirty=dirty)
        try:
            directory.move(parts[-1], staging, name)
        except FileNotFoundError:
            return None
        dirty.add(parts[:-1])
        return staging.entry(name)

    def _level(
        self, parent: PrivateDir, where: Where, create: bool, dirty: set[Where] | None
    ) -> PrivateDir:
        held = self._held.pop(where, None)
        if held is not None:
            directory, device, inode = held
            entry = parent.entry(where[-1])
            if entry is not None and (entry.st_dev, entry.st_ino) == (device, inode):
                self._held[where] = held
                return directory
            directory.close()
        try:
            directory = parent.subdir(where[-1], create=False)
        except FileNotFoundError:
            if not create:
                raise
            directory = parent.subdir(where[-1], create=True)
            if dirty is not None:
                dirty.add(where[:-1])
        opened = os.fstat(directory.fd)
        self._held[where] = (directory, opened.st_dev, opened.st_ino)
        if len(self._held) > self._size:
            _, (evicted, _, _) = self._held.popitem(last=False)
            evicted.close()
        return directory


def discard(state: PrivateDir, staged: str) -> None:
    """Remove a staging file that will not be placed (one already gone is fine)."""
    try:
        with _open(state, (STAGING,), create=False, dirty=None) as staging:
            staging.unlink(staged)
    except FileNotFoundError:
        pass


def sync(state: PrivateDir, dirty: Iterable[Where]) -> None:
    """Fsync the `dirty` directories now (deepest first); raises the first failure."""
    for where in sorted(dirty, key=len, reverse=True):
        try:
            directory = _open(state, where, create=False, dirty=None)
        except FileNotFoundError:
            continue
        with directory:
            directory.fsync()


def withdraw(state: PrivateDir, parts: Where) -> None:
    """Remove one delivered file now, durably; one already gone (or its directory) is fine."""
    dirty: set[Where] = set()
    unlink(state, parts, dirty)
    sync(state, dirty)


def deliver(state: PrivateDir, parts: Where, content: bytes) -> None:
    """Deliver one file now, durably (start-up and tests); raises what failed it."""
    job = StageJob(parts, content, durable=True)
    run_batch(state, (job,))
    if job.error is not None:
        raise job.error
    dirty: set[Where] = set()
    place(state, job.staged, parts, dirty)
    sync(state, dirty)


@contextmanager
def _failing(state: PrivateDir, job: StageJob) -> Iterator[None]:
    """What goes wrong here fails `job` alone."""
    try:
        yield
    except (OSError, FleetError) as exc:
        job.fail(translated(exc, state, job.parts))


def translated(
    error: Exception, state: PrivateDir, parts: Where, what: str = "deliver"
) -> FleetError:
    """A file operation's error as callers see it: a full disk is StoreFull."""
    if isinstance(error, FleetError):
        return error
    path = os.path.join(state.path, *parts)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"cannot {what} {path}: the disk is full; nothing was written")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return Internal(f"cannot {what} {path}: {reason}")


# Group commit ------------------------------------------------------------------------------


class FileBatches:
    """The claim handlers' file work. Serve it with ``await tg.start(files.serve)``; then
    ``files.stage(parts, content)`` stages a file (into a pooled file at once, else queued
    for a batch) and returns its job, and ``await files.staged(job)`` returns once that file
    is written out in the staging directory (or raises why not); ``files.place(job)``
    renames it into place and ``files.withdraw`` moves a file out of its place into the
    pool, both at once, their directories fsynced by a later batch."""

    def __init__(self, state: PrivateDir, *, at_once: int = BATCHES_AT_ONCE) -> None:
        self._state = state
        self._at_once = at_once
        self._directories = Directories(state)
        self._queue: list[StageJob] = []
        self._dirty: set[Where] = set()
        self._withdrawn: list[str] = []
        self._pool: list[str] = []
        """Staging files free to be overwritten: plain files of at most POOLED bytes."""
        self._in_flight: set[StageJob] = set()
        """Jobs staged, not yet placed or discarded."""
        self._dirty_seen: float | None = None
        """When a runner first found the directories dirty now (see _take_dirty)."""
        self._queued_done = anyio.Event()
        """Set once the batch that takes the jobs queued now has run."""
        self._work_due = anyio.Event()
        self._waiting = 0
        """Runners waiting for `_work_due`."""
        self._idle = 0
        """Those of them with nothing at all to do."""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as runners:
                for _ in range(self._at_once):
                    runners.start_soon(self._run_batches)
                task_status.started()
        finally:
            self._directories.close()

    def stage(self, parts: Where, content: bytes, *, durable: bool = False) -> StageJob:
        """A lone staging (no other placed or discarded yet) into a pooled file is written
        now, on the event loop, and its write-out started: a write to the page cache costs
        less than a hop to a thread and back, and the write-out is done by the time its
        caller has committed the record. Concurrent stagings share batches instead, which
        keep their file work off the event loop; a new file goes to a batch too (allocating
        its inode may wait for the journal), and so does a `durable` one (its flushes)."""
        lone = not self._in_flight and not durable
        if lone and self._pool and len(content) <= POOLED:
            job = StageJob(parts, content, self._pool.pop(), reused=True, settled=True)
            self._write_now(job)
        else:
            if self._pool:
                job = StageJob(parts, content, self._pool.pop(), reused=True, durable=durable)
            else:
                job = StageJob(parts, content, durable=durable)
            job.done = self._queued_done
            self._queue.append(job)
            self._wake(staging=True)
        self._in_flight.add(job)
        return job

    async def staged(self, job: StageJob) -> None:
        """Shielded: file work cannot be taken back half done, so a caller cancelled meanwhile
        learns so once its batch has run (and discards its file, if it must)."""
        if job.done is None:
            self._written_out_now(job)
        elif not job.settled:  # often it is: its batch ran while its record was committed
            with anyio.CancelScope(shield=True):
                await job.done.wait()
        if job.error is not None:
            raise job.error

    def _write_now(self, job: StageJob) -> None:
        with _failing(self._state, job):
            staging = self._directories.open((STAGING,), create=False, dirty=None)
            _write(self._state, staging, job)
        if job.error is None:
            _sync_file_range(job._fd, _START)  # an error shows at the wait
        else:
            self._remove_now(job)

    def _written_out_now(self, job: StageJob) -> None:
        """The wait for a pooled file's write-out (`_write_now`), once: after a store commit
        it returns at once. A failed job's file is removed, as a batch's is."""
        if job._fd < 0:
            return
        _wait_written(self._state, [job])
        _close(job)
        if job.error is not None:
            self._remove_now(job)

    def _remove_now(self, job: StageJob) -> None:
        """A failed job's staging file, closed and removed (start-up clears what is left)."""
        _close(job)
        with contextlib.suppress(OSError, FleetError):
            self._directories.open((STAGING,), create=False, dirty=None).unlink(job.staged)

    def place(self, job: StageJob) -> None:
        """Raises what failed it: its caller then discards it."""
        try:
            self._directories.place(job.staged, job.parts, self._dirty)
            self._in_flight.discard(job)
        except (OSError, FleetError) as exc:
            raise translated(exc, self._state, job.parts) from None
        finally:
            self._wake()

    def discard(self, job: StageJob) -> None:
        """Its staging file will not be placed: one its batch wrote goes back to the pool
        (what it holds is never placed: see fleetd.claims), any other is removed; a failure
        is logged (start-up removes it)."""
        self._in_flight.discard(job)
        written = job.settled and job.error is None
        if written and len(job.content) <= POOLED and len(self._pool) < POOL:
            self._pool.append(job.staged)
            return
        try:
            discard(self._state, job.staged)
        except (OSError, FleetError) as exc:
            log.warning("claim_staging_not_removed", staged=job.staged, error=str(exc))

    def withdraw(self, parts: Where) -> None:
        """Gone from its place at once, by a rename into the staging directory (an unlink
        may wait for the file system's journal), and into the pool; what the pool does not
        take, the next batch unlinks."""
        name = staged_name()
        try:
            entry = self._directories.set_aside(parts, name, self._dirty)
            if _poolable(entry, self._pool):
                self._pool.append(name)
            elif entry is not None:
                self._withdrawn.append(name)
        except (OSError, FleetError) as exc:
            raise translated(exc, self._state, parts, "remove") from None
        finally:
            self._wake()

    async def deliver(self, parts: Where, content: bytes, *, durable: bool = False) -> None:
        """Stage, then place: for a file whose record is already durable."""
        job = self.stage(parts, content, durable=durable)
        await self.staged(job)
        try:
            self.place(job)
        except BaseException:
            self.discard(job)
            raise

    def _wake(self, *, staging: bool = False) -> None:
        """Every runner waiting sees the new work (a busy one looks for it when its batch is
        done); without `staging` (directories to fsync) only if one has nothing to do at all,
        as the others wait for staging work to join them. Only the waker replaces the event:
        a runner that replaced it could leave the other waiting on one that is never set."""
        if self._idle if not staging else self._waiting:
            woken, self._work_due = self._work_due, anyio.Event()
            woken.set()

    async def _wait_for_work(self, *, idle: bool) -> None:
        self._waiting += 1
        self._idle += idle
        try:
            await self._work_due.wait()
        finally:
            self._waiting -= 1
            self._idle -= idle

    def _take_dirty(self, *, idle: bool) -> set[Where]:
        """The dirty directories, for a batch with no staging work or once they have waited
        IDLE_SYNC_DELAY: nothing waits for their fsync (see the module's docstring), so a
        batch that callers wait for does not take on one more flush for every rename."""
        if not self._dirty:
            return set()
        now = anyio.current_time()
        if self._dirty_seen is None:
            self._dirty_seen = now
        if not idle and now - self._dirty_seen < IDLE_SYNC_DELAY:
            return set()
        dirty, self._dirty, self._dirty_seen = self._dirty, set(), None
        return dirty

    async def _run_batches(self) -> None:
        while True:
            while not (self._queue or self._dirty or self._withdrawn):
                await self._wait_for_work(idle=True)
            if not self._queue:  # directories to fsync alone: staging work may join them
                with anyio.move_on_after(IDLE_SYNC_DELAY):
                    while not self._queue:
                        await self._wait_for_work(idle=False)
            jobs, self._queue = self._queue, []
            dirty = self._take_dirty(idle=not jobs)
            withdrawn, self._withdrawn = self._withdrawn, []
            if not (jobs or dirty or withdrawn):
                continue
            done, self._queued_done = self._queued_done, anyio.Event()
            with anyio.CancelScope(shield=True):  # callers wait for every batch to end
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        _BATCHES, run_batch, self._state, jobs, dirty, withdrawn
                    )
                except Exception as exc:  # a bug: these callers hear of it, the next batch runs
                    log.exception("claim_files_failed", jobs=len(jobs))
                    for job in jobs:
                        job.fail(Internal(f"the claims' file batch failed: {exc!r}"))
                finally:
                    for job in jobs:
                        job.settled = True
                    done.set()

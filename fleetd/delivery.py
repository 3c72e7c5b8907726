"""The claims' files: delivered and withdrawn atomically and durably, many at a time.

    FileJob         one file to deliver (its content) or withdraw
    run_batch       a batch of them in one pass over the disk (blocking)
    deliver / withdraw   one file (blocking): start-up reconciliation, tests
    FileBatches     how the claim handlers reach the disk: group commit

A delivery is atomic and durable: the content goes to a new file in ``claims-staging/``, whose
data is flushed to disk, then the file is renamed into its directory (``inbox/OWNER``,
``files``), and that directory is fsynced, so that the name too survives a power loss. A
reader never sees a partial file. A withdrawal unlinks the file and fsyncs its directory.

Group commit. Each flush waits for the disk, and each file created, renamed or unlinked costs
the file system's journal some work: done one request at a time, with a thread hop and three
directories opened each, that is most of what a claim costs. So the handlers queue their file
work, and a caller that finds work queued takes all of it into one thread hop (``run_batch``)
that stages every delivery, flushes all their data at once (unlinking the withdrawn files
meanwhile), renames them into place, and then fsyncs each directory it touched once. Only
then is any of its callers answered: an answer still means durable, as for the store's own
group commit (fleetd.store.sqlite). Two batches may be on their way at once, so that one
stages and renames while the other waits for the disk.

Each job succeeds or fails alone: a file that cannot be written (a full disk, a link where a
directory should be) fails its own request and leaves nothing behind, and the others go on. A
directory that cannot be fsynced fails the jobs under it, and the files it would have made
durable are removed again, so a failed delivery is never left in the inbox.

Every file operation goes through the state directory's descriptor (fleetd.core.dirs): a link
planted in the inbox is refused, never followed.
"""

import errno
import itertools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import structlog

from fleetd.core.dirs import PrivateDir, write_all
from protocol.errors import FleetError, Internal, StoreFull

log = structlog.get_logger("fleetd.delivery")

STAGING = "claims-staging"
BATCHES_AT_ONCE = 2
"""Batches on their way to disk together (see FileBatches)."""
SYNC_THREADS = 16
"""Staged files flushed at once, at most (see _SYNCERS)."""

_SYNCERS = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fleetd-fdatasync")
"""fdatasync of many files at once: a journaling file system commits together the flushes it
is asked for together (ext4's jbd2, XFS's log force), where one after the other each new
file would cost a journal commit of its own. Its threads start on first use."""
_batches = itertools.count()

Where = tuple[str, ...]
"""A path under the state directory, one component a part."""


@dataclass(eq=False, slots=True)
class FileJob:
    """Deliver `content` at `parts` under the state directory, or withdraw the file there
    (`content` None). `error` says why it failed once its batch has run."""

    parts: Where
    content: bytes | None = None
    error: FleetError | None = None
    settled: bool = False
    """Its batch has run (FileBatches)."""
    _staged: str = ""
    _fd: int = -1
    _placed: bool = False

    @property
    def delivering(self) -> bool:
        return self.content is not None

    def fail(self, error: FleetError) -> None:
        if self.error is None:
            self.error = error


# One batch ---------------------------------------------------------------------------------


def run_batch(state: PrivateDir, jobs: Sequence[FileJob]) -> None:
    """Deliver and withdraw `jobs` in one pass over the disk: stage, flush the data of all
    (unlinking the withdrawn files meanwhile), rename, fsync each directory touched once.
    Every job ends with `error` set or not; this never raises for one job's failure."""
    delivering = [job for job in jobs if job.delivering]
    withdrawing = [job for job in jobs if not job.delivering]
    with _Directories(state) as directories:
        try:
            staging = _stage(directories, delivering) if delivering else None
            with _flushing(directories.state, delivering, in_threads=bool(withdrawing)):
                for job in withdrawing:
                    _unlink(directories, job)
            if staging is not None:
                _place(directories, staging, delivering)
            directories.fsync(jobs)
        finally:
            for job in delivering:
                _clean_up(directories, job)


def _stage(directories: "_Directories", jobs: Sequence[FileJob]) -> PrivateDir | None:
    """Each job's content in a new file of the staging directory (None: there is none)."""
    try:
        staging = directories.get((STAGING,), create=True)
    except (OSError, FleetError) as exc:
        for job in jobs:
            job.fail(_translated(exc, directories.state, job))
        return None
    prefix = f"{os.getpid()}-{next(_batches)}"
    for index, job in enumerate(jobs):
        with _failing(directories.state, job):
            name = f"{prefix}-{index}.tmp"
            job._fd = staging.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            job._staged = name
            assert job.content is not None
            write_all(job._fd, job.content)
    return staging


@contextmanager
def _flushing(state: PrivateDir, jobs: Sequence[FileJob], *, in_threads: bool) -> Iterator[None]:
    """The data of every staged file on disk once the block is done; `in_threads`: flushed
    while the block runs, not after it. (A full disk may only show here, as the file system
    allocates blocks for data written earlier.)"""
    staged = [job for job in jobs if job.error is None]
    fds = [job._fd for job in staged]
    flushing = _SYNCERS.map(_fdatasync, fds) if len(fds) > 1 or (fds and in_threads) else None
    try:
        yield
    finally:
        errors = list(flushing) if flushing is not None else [_fdatasync(fd) for fd in fds]
        for job, error in zip(staged, errors, strict=True):
            if error is not None:
                job.fail(_translated(error, state, job))
        for job in jobs:
            if job._fd >= 0:
                os.close(job._fd)
                job._fd = -1


def _fdatasync(fd: int) -> OSError | None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        return exc
    return None


def _place(directories: "_Directories", staging: PrivateDir, jobs: Sequence[FileJob]) -> None:
    """Each staged file renamed into its directory (made if missing), replacing what is there."""
    for job in jobs:
        if job.error is not None:
            continue
        with _failing(directories.state, job):
            target = directories.get(job.parts[:-1], create=True)
            staging.move(job._staged, target, job.parts[-1])
            job._staged, job._placed = "", True
            directories.touch(job.parts[:-1])


def _unlink(directories: "_Directories", job: FileJob) -> None:
    """One already gone, or its directory, is fine."""
    with _failing(directories.state, job):
        try:
            directory = directories.get(job.parts[:-1], create=False)
        except FileNotFoundError:
            return
        if directory.unlink(job.parts[-1]):
            directories.touch(job.parts[:-1])


def _clean_up(directories: "_Directories", job: FileJob) -> None:
    """A failed delivery leaves nothing: its staging file, or the file it placed whose
    directory could not be fsynced."""
    if job._fd >= 0:
        os.close(job._fd)
        job._fd = -1
    if job.error is None:
        return
    try:
        if job._staged:
            directories.get((STAGING,), create=False).unlink(job._staged)
        elif job._placed:
            directories.get(job.parts[:-1], create=False).unlink(job.parts[-1])
    except (OSError, FleetError):
        pass  # start-up clears staging and quarantines a file no record explains


class _Directories:
    """The directories of one batch, each opened once (link-free) and fsynced once if touched:
    an entry renamed in or unlinked, or a directory made in it."""

    def __init__(self, state: PrivateDir) -> None:
        self.state = state
        self._open: dict[Where, PrivateDir] = {(): state}
        self._touched: set[Where] = set()

    def __enter__(self) -> "_Directories":
        return self

    def __exit__(self, *_: object) -> None:
        for where, directory in self._open.items():
            if where:
                directory.close()

    def get(self, where: Where, *, create: bool) -> PrivateDir:
        """The directory at `where`; FileNotFoundError when it is missing and not `create`."""
        found = self._open.get(where)
        if found is None:
            parent = self.get(where[:-1], create=create)
            try:
                found = parent.subdir(where[-1], create=False)
            except FileNotFoundError:
                if not create:
                    raise
                found = parent.subdir(where[-1], create=True)
                self.touch(where[:-1])
            self._open[where] = found
        return found

    def touch(self, where: Where) -> None:
        self._touched.add(where)

    def fsync(self, jobs: Sequence[FileJob]) -> None:
        """Each touched directory, deepest first; one that fails fails every job under it."""
        for where in sorted(self._touched, key=len, reverse=True):
            try:
                self._open[where].fsync()
            except OSError as exc:
                for job in jobs:
                    if job.parts[: len(where)] == where:
                        job.fail(_translated(exc, self.state, job))


@contextmanager
def _failing(state: PrivateDir, job: FileJob) -> Iterator[None]:
    """What goes wrong here fails `job` alone."""
    try:
        yield
    except (OSError, FleetError) as exc:
        job.fail(_translated(exc, state, job))


def _translated(error: Exception, state: PrivateDir, job: FileJob) -> FleetError:
    if isinstance(error, FleetError):
        return error
    what = "deliver" if job.delivering else "remove"
    path = os.path.join(state.path, *job.parts)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"cannot {what} {path}: the disk is full; nothing was written")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return Internal(f"cannot {what} {path}: {reason}")


def deliver(state: PrivateDir, parts: Where, content: bytes) -> None:
    """Deliver one file now; raises what failed it."""
    _one(state, FileJob(parts, content))


def withdraw(state: PrivateDir, parts: Where) -> None:
    """Remove one delivered file now, durably; one already gone (or its directory) is fine."""
    _one(state, FileJob(parts))


def _one(state: PrivateDir, job: FileJob) -> None:
    run_batch(state, (job,))
    if job.error is not None:
        raise job.error


# Group commit ------------------------------------------------------------------------------


class FileBatches:
    """The claim handlers' file work, batched: ``await files.deliver(parts, content)`` and
    ``await files.withdraw(parts)`` return once the file is durably there, or gone.

    No task of its own: a caller that finds work queued and fewer than `at_once` batches
    running runs one for everything queued, in a worker thread; the others wait for a batch to
    end. The wait is shielded, as file work cannot be taken back half done: a caller cancelled
    meanwhile learns so once its file is written (and withdraws it, if it must)."""

    def __init__(self, state: PrivateDir, *, at_once: int = BATCHES_AT_ONCE) -> None:
        self._state = state
        self._at_once = at_once
        self._queue: list[FileJob] = []
        self._running = 0
        self._batch_done = anyio.Event()

    async def deliver(self, parts: Where, content: bytes) -> None:
        await self._submit(FileJob(parts, content))

    async def withdraw(self, parts: Where) -> None:
        await self._submit(FileJob(parts))

    async def _submit(self, job: FileJob) -> None:
        self._queue.append(job)
        with anyio.CancelScope(shield=True):
            while not job.settled:
                if self._queue and self._running < self._at_once:
                    await self._run()
                else:
                    await self._batch_done.wait()
        if job.error is not None:
            raise job.error

    async def _run(self) -> None:
        batch, self._queue = self._queue, []
        self._running += 1
        try:
            await anyio.to_thread.run_sync(run_batch, self._state, batch)
        except Exception as exc:  # a bug: these callers hear of it, the next batch runs
            log.exception("claim_files_failed", jobs=len(batch))
            for job in batch:
                job.fail(Internal(f"the claims' file batch failed: {exc!r}"))
        finally:
            for job in batch:
                job.settled = True
            self._running -= 1
            done, self._batch_done = self._batch_done, anyio.Event()
            done.set()

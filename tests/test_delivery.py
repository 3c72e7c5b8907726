"""The claims' files staged in batches (one pass over the disk for many requests, each
failing or succeeding alone, nothing left behind by a failure), then renamed into place and
withdrawn at once, their directories fsynced in the background."""

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from fleetd import delivery
from fleetd.core.dirs import PrivateDir
from fleetd.delivery import STAGING, FileBatches, StageJob, Where, run_batch
from protocol.errors import StoreFull, UnsafePath
from tests.processes import wait_until

UNPOOLED = b"x" * (delivery.POOLED + 1)
"""A content no pooled file takes: it goes to a batch."""


@pytest.fixture
def state(tempdir: str) -> Iterator[PrivateDir]:
    with PrivateDir.open(os.path.join(tempdir, "state")) as opened:
        yield opened


@pytest.fixture
def synced(state: PrivateDir, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories fsynced from now on, relative to the state directory, in order."""
    synced: list[str] = []
    fsync = PrivateDir.fsync

    def counted(directory: PrivateDir) -> None:
        synced.append(os.path.relpath(directory.path, state.path))
        fsync(directory)

    monkeypatch.setattr(PrivateDir, "fsync", counted)
    return synced


def _read(state: PrivateDir, *parts: str) -> bytes | None:
    try:
        with open(os.path.join(state.path, *parts), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _staging(state: PrivateDir) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(state.path, STAGING)))
    except FileNotFoundError:
        return []


def _staged_contents(state: PrivateDir) -> list[bytes]:
    """What the staging files hold."""
    return sorted(_read(state, STAGING, name) or b"" for name in _staging(state))


@pytest.fixture
async def files(state: PrivateDir) -> AsyncIterator[FileBatches]:
    batches = FileBatches(state)
    async with anyio.create_task_group() as tasks:
        await tasks.start(batches.serve)
        yield batches
        tasks.cancel_scope.cancel()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The jobs of each batch run from now on."""
    ran: list[int] = []

    def counted(
        state: PrivateDir, jobs: list[StageJob], dirty: set[Where], withdrawn: list[str]
    ) -> None:
        ran.append(len(jobs))
        run_batch(state, jobs, dirty, withdrawn)

    monkeypatch.setattr(delivery, "run_batch", counted)
    return ran


def _failing_write_out(content: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write-out of a file of `content`'s size (and only it) fails as on a full disk."""
    sync_file_range = delivery._sync_file_range

    def full(fd: int, flags: int) -> OSError | None:
        if flags == delivery._START_AND_WAIT and os.fstat(fd).st_size == len(content):
            return OSError(errno.ENOSPC, "No space left on device")
        return sync_file_range(fd, flags)

    monkeypatch.setattr(delivery, "_sync_file_range", full)


@pytest.fixture
def written_out(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the files written out and waited for held, in order."""
    done: list[bytes] = []
    sync_file_range = delivery._sync_file_range

    def recorded(fd: int, flags: int) -> OSError | None:
        error = sync_file_range(fd, flags)
        if flags == delivery._START_AND_WAIT:
            with open(f"/proc/self/fd/{fd}", "rb") as written:
                done.append(written.read())
        return error

    monkeypatch.setattr(delivery, "_sync_file_range", recorded)
    return done


def _full_for(content: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing `content` (and only it) fails as on a full disk."""
    write = os.write

    def full(fd: int, data: Any) -> int:
        if bytes(data) == content:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(delivery.os, "write", full)


def test_a_batch_writes_every_file_out_and_flushes_nothing(
    state: PrivateDir, synced: list[str], written_out: list[bytes]
) -> None:
    """The content is durable in the claim's record: the file needs only to be on the disk
    before its rename, which the rename's journal commit then flushes with it."""
    jobs = [StageJob(("inbox", "a", f"k{n}"), f"{n}".encode()) for n in range(5)]
    run_batch(state, jobs)
    assert [job.error for job in jobs] == [None] * 5
    assert _staging(state) == sorted(job.staged for job in jobs)
    assert [_read(state, STAGING, job.staged) for job in jobs] == [b"0", b"1", b"2", b"3", b"4"]
    assert written_out == [b"0", b"1", b"2", b"3", b"4"]
    assert synced == [], "no directory: a staging file's name need not be durable"


def test_a_durable_job_is_flushed_with_the_staging_directory(
    state: PrivateDir, synced: list[str], written_out: list[bytes], flushed: list[int]
) -> None:
    """Its content is durable nowhere else."""
    jobs = [StageJob(("files", "big"), b"big", durable=True), StageJob(("files", "small"), b"s")]
    run_batch(state, jobs)
    assert [job.error for job in jobs] == [None, None]
    assert len(flushed) == 1 and synced == [STAGING]
    assert written_out == [b"s"]


def test_a_durable_job_whose_flush_fails_fails_alone_and_leaves_no_file(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        delivery, "_fdatasync", lambda fd: OSError(errno.ENOSPC, "No space left on device")
    )
    jobs = [StageJob(("files", "big"), b"big", durable=True), StageJob(("files", "small"), b"s")]
    run_batch(state, jobs)
    assert isinstance(jobs[0].error, StoreFull) and jobs[1].error is None
    assert _staging(state) == [jobs[1].staged]


def test_a_batch_fsyncs_the_directories_made_dirty_since_the_last(
    state: PrivateDir, synced: list[str]
) -> None:
    delivery.deliver(state, ("inbox", "a", "old"), b"old")
    synced.clear()
    run_batch(state, [StageJob(("files", "k"), b"x")], dirty={("inbox", "a"), ("files",)})
    assert synced == ["inbox/a"], "files/ does not exist yet"


def test_staged_names_are_never_reused() -> None:
    names = {delivery.staged_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(name.startswith(f"{os.getpid()}-") for name in names)


def test_a_full_disk_fails_only_the_stagings_that_hit_it(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"too big", monkeypatch)
    jobs = [StageJob(("files", "a"), b"a"), StageJob(("files", "b"), b"too big")]
    jobs.append(StageJob(("files", "c"), b"c"))
    run_batch(state, jobs)
    assert isinstance(jobs[1].error, StoreFull)
    assert jobs[1].error.message == (
        f"cannot deliver {state.path}/files/b: the disk is full; nothing was written"
    )
    assert (jobs[0].error, jobs[2].error) == (None, None)
    assert _staging(state) == sorted([jobs[0].staged, jobs[2].staged])


def test_a_write_out_that_fails_fails_its_job_and_removes_its_staging_file(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk may show only at the write-out."""
    _failing_write_out(b"unlucky", monkeypatch)
    jobs = [StageJob(("files", "a"), b"a"), StageJob(("files", "b"), b"unlucky")]
    run_batch(state, jobs)
    assert isinstance(jobs[1].error, StoreFull) and jobs[0].error is None
    assert _staging(state) == [jobs[0].staged]


def test_a_batch_that_is_all_full_disk_leaves_nothing(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"x", monkeypatch)
    jobs = [StageJob(("files", f"k{n}"), b"x") for n in range(4)]
    run_batch(state, jobs)
    assert all(isinstance(job.error, StoreFull) for job in jobs)
    assert _staging(state) == []


def test_placing_renames_into_place_and_marks_the_directories_changed(state: PrivateDir) -> None:
    job = StageJob(("inbox", "new-owner", "k"), b"x")
    run_batch(state, [job])
    dirty: set[Where] = set()
    delivery.place(state, job.staged, job.parts, dirty)
    assert _read(state, "inbox", "new-owner", "k") == b"x"
    assert _staging(state) == []
    assert dirty == {(), ("inbox",), ("inbox", "new-owner")}


def test_placing_refuses_a_planted_link_and_keeps_the_staged_file(
    state: PrivateDir, tempdir: str
) -> None:
    os.makedirs(os.path.join(state.path, "inbox"), mode=0o700)
    os.symlink(tempdir, os.path.join(state.path, "inbox", "planted"))
    job = StageJob(("inbox", "planted", "k"), b"x")
    run_batch(state, [job])
    with pytest.raises(UnsafePath):
        delivery.place(state, job.staged, job.parts, set())
    assert not os.path.exists(os.path.join(tempdir, "k"))
    assert _staging(state) == [job.staged]


async def test_a_held_directory_replaced_by_a_link_is_refused(
    state: PrivateDir, files: FileBatches, tempdir: str
) -> None:
    await files.deliver(("inbox", "a", "first"), b"1")
    inbox = os.path.join(state.path, "inbox", "a")
    elsewhere = os.path.join(tempdir, "elsewhere")
    os.rename(inbox, elsewhere)
    os.symlink(elsewhere, inbox)
    with pytest.raises(UnsafePath):
        await files.deliver(("inbox", "a", "second"), b"2")
    assert os.listdir(elsewhere) == ["first"]


async def test_a_held_directory_removed_meanwhile_is_made_again(
    state: PrivateDir, files: FileBatches
) -> None:
    await files.deliver(("inbox", "a", "first"), b"1")
    files.withdraw(("inbox", "a", "first"))
    os.rmdir(os.path.join(state.path, "inbox", "a"))
    await files.deliver(("inbox", "a", "second"), b"2")
    assert _read(state, "inbox", "a", "second") == b"2"


async def test_concurrent_callers_share_batches(
    state: PrivateDir, files: FileBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []

    def counted(
        state: PrivateDir, jobs: list[StageJob], dirty: set[Where], withdrawn: list[str]
    ) -> None:
        if jobs:
            batches.append(len(jobs))
        run_batch(state, jobs, dirty, withdrawn)

    monkeypatch.setattr(delivery, "run_batch", counted)
    async with anyio.create_task_group() as tasks:
        for n in range(64):
            tasks.start_soon(files.deliver, ("files", f"k{n}"), f"{n}".encode())
    assert sum(batches) == 64 and len(batches) < 64
    assert sorted(os.listdir(os.path.join(state.path, "files"))) == sorted(
        f"k{n}" for n in range(64)
    )


async def test_two_batches_are_on_their_way_at_once_whatever_came_before(
    files: FileBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After deliveries and withdrawals, and runners that waited idle for staging work to
    join their directories' fsyncs, a batch that waits for the disk still leaves the other
    runner free to take the next one."""
    for n in range(3):
        await files.deliver(("files", f"warm-{n}"), b"x")
        files.withdraw(("files", f"warm-{n}"))
        await anyio.sleep(delivery.IDLE_SYNC_DELAY * 2)
    held = threading.Event()
    taken = [anyio.Event(), anyio.Event()]
    running: list[int] = []
    loop = asyncio.get_running_loop()

    def waiting_for_the_disk(
        state: PrivateDir, jobs: list[StageJob], dirty: set[Where], withdrawn: list[str]
    ) -> None:
        if jobs:
            running.append(len(jobs))
            loop.call_soon_threadsafe(taken[len(running) - 1].set)
            if len(running) == 1:
                held.wait(10)
        run_batch(state, jobs, dirty, withdrawn)

    monkeypatch.setattr(delivery, "run_batch", waiting_for_the_disk)
    async with anyio.create_task_group() as tasks:
        try:
            tasks.start_soon(files.deliver, ("files", "first"), UNPOOLED)
            with anyio.fail_after(5):
                await taken[0].wait()
            tasks.start_soon(files.deliver, ("files", "second"), UNPOOLED)
            with anyio.fail_after(5):
                await taken[1].wait()
        finally:
            held.set()


async def test_a_failing_caller_does_not_fail_its_batch_mates(
    state: PrivateDir, files: FileBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"too big", monkeypatch)
    failed: list[str] = []

    async def deliver(key: str, content: bytes) -> None:
        try:
            await files.deliver(("files", key), content)
        except StoreFull:
            failed.append(key)

    async with anyio.create_task_group() as tasks:
        for n in range(16):
            tasks.start_soon(deliver, f"k{n}", b"too big" if n % 4 == 1 else b"ok")
    assert sorted(failed) == sorted(f"k{n}" for n in range(1, 16, 4))
    assert len(os.listdir(os.path.join(state.path, "files"))) == 12
    assert _staged_contents(state) == []


async def test_a_placed_files_directory_is_fsynced_in_the_background(
    files: FileBatches, synced: list[str]
) -> None:
    await files.deliver(("inbox", "a", "k"), b"x")
    await anyio.to_thread.run_sync(wait_until, lambda: "inbox/a" in synced)


async def test_a_withdrawn_files_directory_is_fsynced_in_the_background(
    state: PrivateDir, files: FileBatches, synced: list[str]
) -> None:
    delivery.deliver(state, ("inbox", "a", "k"), b"x")
    synced.clear()
    files.withdraw(("inbox", "a", "k"))
    assert _read(state, "inbox", "a", "k") is None
    await anyio.to_thread.run_sync(wait_until, lambda: "inbox/a" in synced)


async def test_a_withdrawn_file_is_set_aside_then_reused_by_a_later_staging(
    state: PrivateDir, files: FileBatches
) -> None:
    """No inode is made or freed: the file goes to the pool, and the staging after it
    overwrites it, a shorter content cutting it short."""
    delivery.deliver(state, ("inbox", "a", "k"), b"old and longer")
    inode = os.stat(os.path.join(state.path, "inbox", "a", "k")).st_ino
    files.withdraw(("inbox", "a", "k"))
    assert os.listdir(os.path.join(state.path, "inbox", "a")) == []
    assert _staged_contents(state) == [b"old and longer"], "pooled"
    await files.deliver(("files", "new"), b"new")
    assert os.stat(os.path.join(state.path, "files", "new")).st_ino == inode
    assert _read(state, "files", "new") == b"new"
    assert _staging(state) == []


async def test_a_staging_into_a_pooled_file_needs_no_batch(
    state: PrivateDir, files: FileBatches, batches: list[int]
) -> None:
    """It is written on the event loop: a hop to a batch's thread and back would cost more."""
    await files.deliver(("files", "k"), b"first")
    files.withdraw(("files", "k"))
    batches.clear()
    await files.deliver(("files", "k"), b"again")
    assert _read(state, "files", "k") == b"again"
    assert not any(batches)


async def test_concurrent_stagings_share_batches_and_reuse_pooled_files(
    state: PrivateDir, files: FileBatches, batches: list[int]
) -> None:
    """Each makes no file while the pool has one: freeing a file's blocks is the dearest of
    its file work."""
    for n in range(8):
        await files.deliver(("files", f"old{n}"), b"old")
    pooled = {os.stat(os.path.join(state.path, "files", f"old{n}")).st_ino for n in range(8)}
    for n in range(8):
        files.withdraw(("files", f"old{n}"))
    batches.clear()
    jobs = [files.stage(("files", f"new{n}"), b"new") for n in range(8)]
    for job in jobs:
        await files.staged(job)
        files.place(job)
    assert sum(batches) == 7, "all but the first, which was alone"
    reused = {os.stat(os.path.join(state.path, "files", f"new{n}")).st_ino for n in range(8)}
    assert reused == pooled


async def test_a_pooled_staging_whose_write_out_fails_fails_and_removes_its_file(
    state: PrivateDir, files: FileBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    await files.deliver(("files", "k"), b"first")
    files.withdraw(("files", "k"))
    _failing_write_out(b"unlucky", monkeypatch)
    with pytest.raises(StoreFull, match="the disk is full"):
        await files.deliver(("files", "k"), b"unlucky")
    assert _read(state, "files", "k") is None
    assert _staging(state) == []


async def test_a_withdrawn_link_is_not_pooled_and_the_next_batch_unlinks_it(
    state: PrivateDir, files: FileBatches, tempdir: str
) -> None:
    os.makedirs(os.path.join(state.path, "files"), mode=0o700)
    os.symlink(tempdir, os.path.join(state.path, "files", "planted"))
    files.withdraw(("files", "planted"))
    await files.deliver(("files", "k"), b"x")
    await anyio.to_thread.run_sync(wait_until, lambda: _staging(state) == [])


def test_a_batch_unlinks_the_withdrawn_files_it_is_given(state: PrivateDir, tempdir: str) -> None:
    staging = os.path.join(state.path, STAGING)
    os.makedirs(staging, mode=0o700)
    os.symlink(tempdir, os.path.join(staging, "link.tmp"))
    _write_file(os.path.join(staging, "a.tmp"), b"x")
    run_batch(state, [], withdrawn=["link.tmp", "a.tmp"])
    assert _staging(state) == []
    assert os.path.isdir(tempdir)


def _write_file(path: str, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


async def test_withdrawing_a_file_already_gone_is_fine(files: FileBatches) -> None:
    files.withdraw(("inbox", "nobody", "k"))


async def test_a_cancelled_caller_still_has_its_file_staged(
    state: PrivateDir, files: FileBatches
) -> None:
    job = files.stage(("files", "k"), b"written")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await files.staged(job)
    assert job.settled and job.error is None
    assert _read(state, STAGING, job.staged) == b"written"

"""The claims' files delivered and withdrawn in batches: one pass over the disk for many
requests, each request failing or succeeding alone, nothing left behind by a failure."""

import errno
import os
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleetd import delivery
from fleetd.core.dirs import PrivateDir
from fleetd.delivery import STAGING, FileBatches, FileJob, run_batch
from protocol.errors import StoreFull, UnsafePath


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
    return os.listdir(os.path.join(state.path, STAGING))


def _full_for(content: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing `content` (and only it) fails as on a full disk."""
    write = os.write

    def full(fd: int, data: Any) -> int:
        if bytes(data) == content:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(delivery.os, "write", full)


def test_a_batch_delivers_and_withdraws_together(state: PrivateDir) -> None:
    delivery.deliver(state, ("inbox", "a", "old"), b"old")
    jobs = [FileJob(("inbox", "a", f"k{n}"), f"{n}".encode()) for n in range(5)]
    jobs += [FileJob(("inbox", "a", "old")), FileJob(("files", "never-there"))]
    run_batch(state, jobs)
    assert [job.error for job in jobs] == [None] * 7
    assert [_read(state, "inbox", "a", f"k{n}") for n in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert _read(state, "inbox", "a", "old") is None
    assert _staging(state) == []


def test_a_batch_fsyncs_each_directory_it_touched_once(
    state: PrivateDir, synced: list[str]
) -> None:
    delivery.deliver(state, ("inbox", "a", "old"), b"old")
    delivery.deliver(state, ("files", "f"), b"f")
    synced.clear()  # what the batch alone fsyncs
    jobs = [FileJob(("inbox", "a", f"k{n}"), b"x") for n in range(10)]
    run_batch(state, [*jobs, FileJob(("inbox", "a", "old")), FileJob(("files", "f"))])
    assert sorted(synced) == ["files", "inbox/a"]


def test_a_new_directory_is_made_durable_in_its_parent(
    state: PrivateDir, synced: list[str]
) -> None:
    run_batch(state, [FileJob(("inbox", "new-owner", "k"), b"x")])
    assert synced == ["inbox/new-owner", "inbox", "."]


def test_one_failing_delivery_does_not_fail_the_others(state: PrivateDir, tempdir: str) -> None:
    os.makedirs(os.path.join(state.path, "inbox"), mode=0o700)
    os.symlink(tempdir, os.path.join(state.path, "inbox", "planted"))
    jobs = [
        FileJob(("inbox", "a", "k1"), b"1"),
        FileJob(("inbox", "planted", "k2"), b"2"),
        FileJob(("inbox", "a", "k3"), b"3"),
    ]
    run_batch(state, jobs)
    assert isinstance(jobs[1].error, UnsafePath)
    assert (jobs[0].error, jobs[2].error) == (None, None)
    assert (_read(state, "inbox", "a", "k1"), _read(state, "inbox", "a", "k3")) == (b"1", b"3")
    assert not os.path.exists(os.path.join(tempdir, "k2"))
    assert _staging(state) == []


def test_a_full_disk_fails_only_the_deliveries_that_hit_it(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"too big", monkeypatch)
    jobs = [FileJob(("files", "a"), b"a"), FileJob(("files", "b"), b"too big")]
    jobs.append(FileJob(("files", "c"), b"c"))
    run_batch(state, jobs)
    assert isinstance(jobs[1].error, StoreFull)
    assert jobs[1].error.message == (
        f"cannot deliver {state.path}/files/b: the disk is full; nothing was written"
    )
    assert (jobs[0].error, jobs[2].error) == (None, None)
    assert sorted(os.listdir(os.path.join(state.path, "files"))) == ["a", "c"]
    assert _staging(state) == []


def test_a_batch_that_is_all_full_disk_leaves_nothing(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"x", monkeypatch)
    jobs = [FileJob(("files", f"k{n}"), b"x") for n in range(4)]
    run_batch(state, jobs)
    assert all(isinstance(job.error, StoreFull) for job in jobs)
    assert not os.path.exists(os.path.join(state.path, "files"))
    assert _staging(state) == []


def test_a_directory_that_cannot_be_fsynced_fails_its_jobs_and_removes_their_files(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = PrivateDir.fsync

    def failing(directory: PrivateDir) -> None:
        if directory.path.endswith("/files"):
            raise OSError(errno.EIO, "Input/output error")
        fsync(directory)

    monkeypatch.setattr(PrivateDir, "fsync", failing)
    jobs = [FileJob(("files", "f"), b"f"), FileJob(("inbox", "a", "k"), b"k")]
    run_batch(state, jobs)
    assert jobs[0].error is not None and "Input/output error" in jobs[0].error.message
    assert jobs[1].error is None
    assert (_read(state, "files", "f"), _read(state, "inbox", "a", "k")) == (None, b"k")


async def test_concurrent_callers_share_batches(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []

    def counted(state: PrivateDir, jobs: list[FileJob]) -> None:
        batches.append(len(jobs))
        run_batch(state, jobs)

    monkeypatch.setattr(delivery, "run_batch", counted)
    files = FileBatches(state)
    async with anyio.create_task_group() as tasks:
        for n in range(64):
            tasks.start_soon(files.deliver, ("files", f"k{n}"), f"{n}".encode())
    assert sum(batches) == 64 and len(batches) < 64
    assert sorted(os.listdir(os.path.join(state.path, "files"))) == sorted(
        f"k{n}" for n in range(64)
    )


async def test_a_failing_caller_does_not_fail_its_batch_mates(
    state: PrivateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_for(b"too big", monkeypatch)
    files = FileBatches(state)
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


async def test_a_cancelled_caller_still_has_its_file_written(state: PrivateDir) -> None:
    files = FileBatches(state)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await files.deliver(("files", "k"), b"written")
    assert _read(state, "files", "k") == b"written"

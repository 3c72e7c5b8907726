import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress

import pytest
import structlog

from fleetd import delivery
from fleetd.core import cgroups
from tests.processes import (
    RUN_TAG,
    Fleetd,
    cgroup_problem,
    kill_holders,
    mount_tmpfs,
    running_fleetd,
    short_tempdir,
    tagged_processes,
    tempdir_prefix,
)

LEAK_GRACE = 5.0


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as Python takes it by default, even when the suite was started with SIGINT
    ignored (a background job of a shell script): the programs the tests signal would
    inherit the ignore, and tests of what Ctrl-C does would fail."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors fleetd.delivery flushes (fdatasync) from now on, in order."""
    fds: list[int] = []
    fdatasync = delivery._fdatasync

    def counted(fd: int) -> OSError | None:
        fds.append(fd)
        return fdatasync(fd)

    monkeypatch.setattr(delivery, "_fdatasync", counted)
    return fds


@pytest.fixture(scope="session", autouse=True)
def run_tag() -> Iterator[str]:
    """Tag the environment that every spawned process inherits, to find leftovers."""
    tag = uuid.uuid4().hex
    os.environ[RUN_TAG] = tag
    yield tag


def _tempdirs() -> set[str]:
    prefix = tempdir_prefix()
    return {name for name in os.listdir("/tmp") if name.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_leaks(run_tag: str) -> Iterator[None]:
    """Fail any test that leaves a process, or a short temp dir (and the sockets in it), behind."""
    dirs_before = _tempdirs()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while (left := tagged_processes(run_tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, _ in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    new_dirs = _tempdirs() - dirs_before
    for name in new_dirs:
        shutil.rmtree(os.path.join("/tmp", name), ignore_errors=True)
    assert not left, f"test left processes behind: {left}"
    assert not new_dirs, f"test left temp dirs behind: {sorted(new_dirs)}"


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def tempdir() -> Iterator[str]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fleetd(tempdir: str) -> Iterator[Fleetd]:
    with running_fleetd(tempdir) as daemon:
        yield daemon


@pytest.fixture
def holders(fleetd: Fleetd) -> Iterator[Fleetd]:
    """fleetd, and at the end no holder of it left running (holders outlive fleetd)."""
    try:
        yield fleetd
    finally:
        kill_holders(fleetd)


@pytest.fixture
def on_small_disk(tempdir: str) -> Iterator[Fleetd]:
    """fleetd with its state directory on a 2 MiB tmpfs of its own."""
    daemon = Fleetd(tempdir)
    if not mount_tmpfs(daemon.state_dir, "2m"):
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        daemon.start()
        yield daemon
    finally:
        kill_holders(daemon)
        daemon.close()
        subprocess.run(["umount", "-l", daemon.state_dir], check=False)


@pytest.fixture
def member_cgroup() -> Iterator[cgroups.Cgroup]:
    """A fresh cgroup under ours, made as a holder makes a member's, or skip: cgroup v2 must
    be mounted and writable here."""
    problem = cgroup_problem()
    if problem:
        pytest.skip(problem)
    holder = cgroups.Cgroup(
        os.path.join(cgroups.own_directory() or "", f"fleet-test-member.{os.getpid()}")
    )
    holder.create()
    member = cgroups.Cgroup(os.path.join(holder.path, "m.member"))
    member.create()
    yield member
    holder.kill()
    assert holder.remove()

"""Spawning members: the trampoline gives them a parent-death signal, puts them in their cgroup,
and gets out of the way."""

import asyncio
import contextlib
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable

import anyio
import pytest

from fleetd.core import cgroups
from fleetd.holder import spawn as spawn_module
from fleetd.holder.spawn import TRAMPOLINE, Spawner
from tests.processes import cgroup_problem, needs_root

SETPRIV = spawn_module._SETPRIV

NOT_X86_64 = "the trampoline is an x86-64 executable"
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason=NOT_X86_64)
PATHS = [pytest.param("trampoline", marks=x86_64_only), "setpriv", "preexec"]
"""The three ways a holder spawns (see FALLBACKS): the trampoline where it can run."""


def trampoline_fd() -> int:
    fd = os.memfd_create("test-trampoline", 0)
    os.write(fd, TRAMPOLINE)
    return fd


def run_spawned(argv: list[str], env: dict[str, str]) -> str:
    read, write = os.pipe()
    try:
        child = Spawner().spawn(argv, env, None, write, write)
    finally:
        os.close(write)
    with os.fdopen(read) as output:
        text = output.read()
    os.waitpid(child.pid, 0)
    return text


def test_a_spawned_program_gets_its_arguments_and_environment_verbatim() -> None:
    argv = ["sh", "-c", 'echo "$0" "$1" "$GREETING"', "zero", "one; two"]
    env = {"PATH": os.environ["PATH"], "GREETING": "hello"}
    assert run_spawned(argv, env) == "zero one; two hello\n"


@x86_64_only
def test_the_trampoline_refuses_to_run_for_a_parent_it_was_not_started_by() -> None:
    fd = trampoline_fd()
    try:
        path = f"/proc/self/fd/{fd}"
        done = subprocess.run(
            [path, "1", "", "/bin/echo", "ran"], capture_output=True, pass_fds=(fd,), check=False
        )
    finally:
        os.close(fd)
    assert (done.returncode, done.stdout) == (127, b"")


@x86_64_only
def test_the_trampoline_runs_the_program_for_its_parent() -> None:
    fd = trampoline_fd()
    try:
        path = f"/proc/self/fd/{fd}"
        command = [path, str(os.getpid()), "", "/bin/echo", "ran"]
        done = subprocess.run(command, capture_output=True, pass_fds=(fd,), check=False)
    finally:
        os.close(fd)
    assert (done.returncode, done.stdout) == (0, b"ran\n")


@x86_64_only
@pytest.mark.parametrize("where", ["missing", "a regular file"])
def test_the_trampoline_that_cannot_join_its_cgroup_says_so_and_runs_nothing(
    tempdir: str, where: str
) -> None:
    procs = os.path.join(tempdir, "cgroup.procs")
    if where == "a regular file":
        with open(procs, "wb") as f:
            f.write(b"\x7fELF")  # the trampoline writes only to cgroup2 files
    fd = trampoline_fd()
    try:
        path = f"/proc/self/fd/{fd}"
        command = [path, str(os.getpid()), procs, "/bin/echo", "ran"]
        done = subprocess.run(command, capture_output=True, pass_fds=(fd,), check=False)
    finally:
        os.close(fd)
    assert (done.returncode, done.stdout) == (127, b"")
    assert done.stderr == b"fleet: cannot join the member's cgroup\n"
    if where == "a regular file":
        with open(procs, "rb") as f:
            assert f.read() == b"\x7fELF"


def writable_cgroup() -> str:
    """A fresh cgroup under ours, or skip: cgroup v2 must be mounted and writable here."""
    problem = cgroup_problem()
    if problem:
        pytest.skip(problem)
    path = os.path.join(cgroups.own_directory() or "", f"fleet-test-spawn.{os.getpid()}")
    cgroups.Cgroup(path).create()
    return path


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_runs_in_its_cgroup(path: str) -> None:
    """From its first instruction (its first child sees the cgroup), but through setpriv,
    whose child the holder moves once posix_spawn returns: a cgroup move may wait for an RCU
    grace period, milliseconds, so only what the program forks after that is sure to be in."""
    if path == "setpriv" and SETPRIV is None:
        pytest.skip("setpriv not installed (util-linux)")
    cgroup = writable_cgroup()
    try:
        later = "sleep 0.5; " if path == "setpriv" else ""
        seen = spawned_through(path, ["sh", "-c", later + "cat /proc/self/cgroup"], cgroup=cgroup)
        assert f"0::{cgroups.Cgroup(cgroup).name}\n" in seen
    finally:
        assert cgroups.Cgroup(cgroup).remove()


FALLBACKS = {
    "trampoline": "",
    "setpriv": "spawn._trampoline_path = lambda: None",
    "preexec": "spawn._trampoline_path = lambda: None; spawn._SETPRIV = None",
}


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_dies_with_the_process_that_spawned_it(path: str) -> None:
    assert_dies_with_its_spawner(path)


def assert_dies_with_its_spawner(
    path: str, setup: str = "spawn.NO_SETUP", uid: int | None = None
) -> None:
    """`sleep 60` spawned through `path` with `setup` (code), as user `uid` (else ours), dies
    once the process that spawned it is SIGKILLed."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from fleetd.holder import spawn
        {FALLBACKS[path]}
        child = spawn.Spawner().spawn(["sleep", "60"], dict(os.environ), None, 1, 2, setup={setup})
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    spawner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert spawner.stdout is not None
    with spawner.stdout:
        pid = int(spawner.stdout.readline())
    try:
        # Running the program, past any trampoline (setpriv has no check for a parent that
        # died before its prctl: a spawner killed that early leaves the child behind).
        until(lambda: os.readlink(f"/proc/{pid}/exe").endswith("/sleep"))
        assert os.stat(f"/proc/{pid}").st_uid == (os.geteuid() if uid is None else uid)
        spawner.send_signal(signal.SIGKILL)
        spawner.wait()
        until(lambda: not os.path.exists(f"/proc/{pid}"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still false after {timeout}s"
        time.sleep(0.005)


async def spawned_soon(
    spawner: Spawner, argv: list[str], cwd: str | None = None
) -> tuple[spawn_module.Outcome, str, int]:
    """Spawn on a spawning thread: the outcome, the child's output, and the thread `done`
    ran on."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[tuple[spawn_module.Outcome, int]] = loop.create_future()
    read, write = os.pipe()
    try:
        spawner.spawn_soon(
            argv,
            dict(os.environ),
            cwd,
            write,
            write,
            done=lambda result: outcome.set_result((result, threading.get_ident())),
        )
    finally:
        os.close(write)
    result, thread = await outcome
    with os.fdopen(read) as output:
        text = await anyio.to_thread.run_sync(output.read)
    if isinstance(result, spawn_module.Child):
        await anyio.to_thread.run_sync(os.waitpid, result.pid, 0)
    return result, text, thread


async def test_a_spawn_on_a_spawning_thread_reports_on_the_event_loops_thread() -> None:
    outcome, text, thread = await spawned_soon(Spawner(), ["echo", "hi"])
    assert isinstance(outcome, spawn_module.Child)
    assert text == "hi\n"
    assert thread == threading.get_ident()


async def test_a_spawn_on_a_spawning_thread_that_fails_reports_its_os_error() -> None:
    outcome, _, _ = await spawned_soon(Spawner(), ["/no/such/program"])
    assert isinstance(outcome, FileNotFoundError)


async def test_spawns_run_in_their_directories_without_moving_the_spawning_process() -> None:
    spawner, here = Spawner(), os.getcwd()
    first, second = tempfile.mkdtemp(dir="/tmp"), tempfile.mkdtemp(dir="/tmp")
    try:
        results = await asyncio.gather(
            spawned_soon(spawner, ["pwd"], first), spawned_soon(spawner, ["pwd"], second)
        )
        assert [text for _, text, _ in results] == [f"{first}\n", f"{second}\n"]
        assert os.getcwd() == here
    finally:
        os.rmdir(first)
        os.rmdir(second)


async def test_a_program_spawned_on_a_spawning_thread_inherits_only_its_output() -> None:
    inheritable = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inheritable, True)  # even one the spawning process lets children have
    try:
        _, text, _ = await spawned_soon(Spawner(), ["ls", "/proc/self/fd"])
    finally:
        os.close(inheritable)
    assert text.split() == ["0", "1", "2", "3"]  # 3: ls's own listing of the directory


async def test_where_unshare_is_refused_spawns_run_on_the_event_loops_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(flags: int) -> None:
        raise PermissionError(1, "unshare: Operation not permitted")

    monkeypatch.setattr(spawn_module, "_unshare", refused)
    spawner, here = Spawner(), os.getcwd()
    directory = tempfile.mkdtemp(dir="/tmp")
    try:
        outcome, text, thread = await spawned_soon(spawner, ["pwd"], directory)
    finally:
        os.rmdir(directory)
    assert isinstance(outcome, spawn_module.Child)
    assert (text, thread) == (f"{directory}\n", threading.get_ident())
    assert spawner.in_flight == 0
    assert os.getcwd() == here


def spawned_through(
    path: str,
    argv: list[str],
    setup: spawn_module.Setup = spawn_module.NO_SETUP,
    *,
    cgroup: str | None = None,
) -> str:
    """What `argv` prints, spawned through `path` (see FALLBACKS) with `setup`, in `cgroup`."""
    spawner = Spawner()
    try:
        if path != "trampoline":
            spawner._trampoline = None
        if path == "preexec":
            spawn_module._SETPRIV = None
        read, write = os.pipe()
        try:
            env = {"PATH": os.environ["PATH"]}
            child = spawner.spawn(argv, env, None, write, write, cgroup=cgroup, setup=setup)
        finally:
            os.close(write)
        with os.fdopen(read) as output:
            seen = output.read()
        _, status = os.waitpid(child.pid, 0)
        child.reaped(os.waitstatus_to_exitcode(status))
        return seen
    finally:
        spawn_module._SETPRIV = SETPRIV


LIMITED = spawn_module.Setup(limits=((resource.RLIMIT_NOFILE, 100, 200),))
AS_NOBODY = spawn_module.Setup(
    limits=((resource.RLIMIT_CORE, -1, -1),),
    credentials=spawn_module.Credentials(65534, 65534, (65534, 100)),
)


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_gets_its_limits_from_its_first_instruction(path: str) -> None:
    """Through setpriv, the holder sets them once posix_spawn returns (see the module)."""
    later = "sleep 0.5; " if path == "setpriv" else ""
    seen = spawned_through(path, ["sh", "-c", later + "cat /proc/self/limits"], LIMITED)
    assert re.search(r"^Max open files +100 +200 ", seen, re.MULTILINE), seen


@needs_root
@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_runs_as_its_user_with_its_groups(path: str) -> None:
    """Needs root. setpriv would lose the parent-death signal: its path uses the preexec hook."""
    seen = spawned_through(path, ["sh", "-c", "id -u; id -g; id -G; ulimit -c"], AS_NOBODY)
    assert seen.split("\n") == ["65534", "65534", "65534 100", "unlimited", ""]


@x86_64_only
def test_the_trampoline_that_cannot_set_a_limit_says_so_and_runs_nothing() -> None:
    impossible = spawn_module.Setup(limits=((resource.RLIMIT_NOFILE, 2**40, 2**40),))
    seen = spawned_through("trampoline", ["echo", "ran"], impossible)
    assert seen == "fleet: cannot set the member's limits\n"


@needs_root
@pytest.mark.parametrize("path", PATHS)
def test_a_program_spawned_as_another_user_still_dies_with_its_spawner(path: str) -> None:
    """A change of user clears the parent-death signal: it is set after (needs root)."""
    nobody = "spawn.Setup(credentials=spawn.Credentials(65534, 65534, (65534,)))"
    assert_dies_with_its_spawner(path, nobody, uid=65534)

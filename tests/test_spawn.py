"""Spawning members: in-process through clone3 (or else through the trampoline) they get a
parent-death signal, their limits and user, start in their cgroup, and get nothing else of the
spawner's."""

import asyncio
import contextlib
import errno
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
from tests.processes import needs_root

SETPRIV = spawn_module._SETPRIV

NOT_X86_64 = "the trampoline is an x86-64 executable"
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason=NOT_X86_64)


def trampoline_fd() -> int:
    fd = os.memfd_create("test-trampoline", 0)
    os.write(fd, TRAMPOLINE)
    return fd


def run_spawned(
    argv: list[str],
    env: dict[str, str],
    spawner: Spawner | None = None,
    *,
    cgroup: cgroups.Cgroup | None = None,
    setup: spawn_module.Setup = spawn_module.NO_SETUP,
) -> str:
    """What `argv` prints, once it exited (the spawn's OSError when it fails)."""
    read, write = os.pipe()
    with os.fdopen(read) as output:
        try:
            child = (spawner or Spawner()).spawn(
                argv, env, None, write, write, cgroup=cgroup, setup=setup
            )
        finally:
            os.close(write)
        text = output.read()
    child.reaped(os.waitstatus_to_exitcode(os.waitpid(child.pid, 0)[1]))
    return text


REQUIRE_CLONE3_ENV = "FLEET_REQUIRE_CLONE3"
"""Set to 1 (CI sets it), the clone3 tests fail where clone3 is refused instead of skipping:
CI never passes without the spawn path members take on x86-64."""

PATHS = [
    pytest.param("clone3", marks=x86_64_only),
    pytest.param("trampoline", marks=x86_64_only),
    "setpriv",
    "preexec",
]
"""The four ways a holder spawns (see FALLBACKS): clone3 and the trampoline where they can run."""


@pytest.fixture
def spawner_through(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Spawner]:
    """A Spawner that takes the path named (see PATHS), or skip where this machine has not
    got it."""

    def through(path: str) -> Spawner:
        if path == "setpriv" and SETPRIV is None:
            pytest.skip("setpriv not installed (util-linux)")
        spawner = Spawner()
        if path == "clone3" and spawner._clone is None:
            if os.environ.get(REQUIRE_CLONE3_ENV) == "1":
                pytest.fail(f"clone3 is required here ({REQUIRE_CLONE3_ENV}=1): it was refused")
            pytest.skip("clone3 or executable memory refused here")
        if path != "clone3":
            spawner._clone = None
        if path not in ("clone3", "trampoline"):
            spawner._trampoline = None
        if path == "preexec":
            monkeypatch.setattr(spawn_module, "_SETPRIV", None)
        return spawner

    return through


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


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_runs_in_its_cgroup(
    path: str, spawner_through: Callable[[str], Spawner], member_cgroup: cgroups.Cgroup
) -> None:
    """From its first instruction (its first child sees the cgroup), but through setpriv,
    whose child the holder moves once posix_spawn returns: a cgroup move may wait for an RCU
    grace period, milliseconds, so only what the program forks after that is sure to be in."""
    later = "sleep 0.5; " if path == "setpriv" else ""
    argv = ["sh", "-c", later + "cat /proc/self/cgroup"]
    seen = run_spawned(argv, dict(os.environ), spawner_through(path), cgroup=member_cgroup)
    assert f"0::{member_cgroup.name}\n" in seen


class _UnwritableProcs(cgroups.Cgroup):
    """A cgroup whose cgroup.procs a spawn cannot write (it names a missing file)."""

    __slots__ = ()

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "no-such-file")


def test_a_clone3_child_is_born_into_a_fresh_cgroup_without_writing_its_procs(
    spawner_through: Callable[[str], Spawner], member_cgroup: cgroups.Cgroup
) -> None:
    """CLONE_INTO_CGROUP: no write to cgroup.procs, whose wait for an RCU grace period the
    spawning thread would wait through. Only once its cgroup was killed is it joined so."""
    spawner = spawner_through("clone3")
    cgroup = _UnwritableProcs(member_cgroup.path)
    cgroup.born_into = member_cgroup.born_into
    assert cgroup.born_into
    argv = ["cat", "/proc/self/cgroup"]
    assert f"0::{cgroup.name}\n" in run_spawned(argv, dict(os.environ), spawner, cgroup=cgroup)
    cgroup.kill()
    with pytest.raises(FileNotFoundError, match="cannot join the member's cgroup"):
        run_spawned(argv, dict(os.environ), spawner, cgroup=cgroup)


def test_a_cgroup_that_existed_already_is_not_born_into(member_cgroup: cgroups.Cgroup) -> None:
    """Whatever was done to it before (a kill), a child joins it by a write."""
    again = cgroups.Cgroup(member_cgroup.path)
    again.create()
    assert member_cgroup.born_into
    assert not again.born_into


@pytest.mark.parametrize("path", PATHS)
def test_a_spawn_into_a_cgroup_that_was_killed_runs_in_it(
    path: str, spawner_through: Callable[[str], Spawner], member_cgroup: cgroups.Cgroup
) -> None:
    """A member restarts into the cgroup whose leftovers cgroup.kill ended. (On Linux 6.18
    clone3's CLONE_INTO_CGROUP SIGKILLs at birth a child it puts in such a cgroup: the child
    joins by a write instead.)"""
    member_cgroup.kill()
    assert not member_cgroup.born_into
    later = "sleep 0.5; " if path == "setpriv" else ""
    argv = ["sh", "-c", later + "cat /proc/self/cgroup"]
    seen = run_spawned(argv, dict(os.environ), spawner_through(path), cgroup=member_cgroup)
    assert f"0::{member_cgroup.name}\n" in seen


def test_a_clone3_child_killed_at_birth_by_its_cgroup_is_spawned_again_by_a_write(
    spawner_through: Callable[[str], Spawner], member_cgroup: cgroups.Cgroup
) -> None:
    """A kill of the cgroup above a member's empties the member's too, unbeknown to its
    Cgroup: the kernel kills the child born into it, and the spawn goes on by a write."""
    cgroups.Cgroup(os.path.dirname(member_cgroup.path)).kill()
    assert member_cgroup.born_into
    argv = ["cat", "/proc/self/cgroup"]
    seen = run_spawned(argv, dict(os.environ), spawner_through("clone3"), cgroup=member_cgroup)
    assert f"0::{member_cgroup.name}\n" in seen
    assert not member_cgroup.born_into


def test_a_spawner_in_a_cgroup_that_was_killed_joins_even_fresh_cgroups_by_a_write(
    member_cgroup: cgroups.Cgroup,
) -> None:
    """Linux 6.18 kills at birth a child born into a fresh cgroup when the spawner's own
    cgroup was killed once (it compares the two): the first such child is spawned again by a
    write, and births stop there, in every cgroup."""
    holder = os.path.dirname(member_cgroup.path)
    script = textwrap.dedent(
        f"""
        import os
        from fleetd.core.cgroups import Cgroup
        from fleetd.holder import spawn
        own = Cgroup({holder!r} + "/spawner")
        own.create()
        own.kill()
        own.move(os.getpid())
        spawner = spawn.Spawner()
        for name in ("a.member", "b.member"):
            cgroup = Cgroup({holder!r} + "/" + name)
            cgroup.create()
            child = spawner.spawn(["cat", "/proc/self/cgroup"], dict(os.environ), None, 1, 2,
                                  cgroup=cgroup)
            os.waitpid(child.pid, 0)
        print(spawner._clone._births, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    name = cgroups.Cgroup(holder).name
    seen = [line for line in done.stdout.splitlines() if line.startswith(("0::", "False"))]
    assert seen == [f"0::{name}/a.member", f"0::{name}/b.member", "False"]
    assert done.stdout.count("cgroup_births_killed") == 1, done.stdout


@pytest.mark.parametrize("born_into", [True, False])
def test_a_clone3_spawn_into_a_missing_cgroup_fails_and_runs_nothing(
    tempdir: str, born_into: bool, spawner_through: Callable[[str], Spawner]
) -> None:
    missing = cgroups.Cgroup(os.path.join(tempdir, "gone.member"))
    missing.born_into = born_into
    read, write = os.pipe()
    try:
        with pytest.raises(FileNotFoundError, match="cannot join the member's cgroup"):
            spawner_through("clone3").spawn(
                ["echo", "ran"], dict(os.environ), None, write, write, cgroup=missing
            )
    finally:
        os.close(write)
    with os.fdopen(read) as output:
        assert output.read() == ""


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_has_no_blocked_ignored_or_handled_signal_and_its_own_group(
    path: str, spawner_through: Callable[[str], Spawner]
) -> None:
    """Whatever the spawner blocks (the holder blocks SIGCHLD), ignores (Python ignores
    SIGPIPE and SIGXFSZ) or handles."""
    spawner = spawner_through(path)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        text = run_spawned(["cat", "/proc/self/status", "/proc/self/stat"], {}, spawner)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        signal.signal(signal.SIGUSR1, previous)
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    ours = {signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGUSR1}
    for mask in ("SigBlk", "SigIgn", "SigCgt"):
        assert {s for s in ours if int(fields[mask], 16) >> (s - 1) & 1} == set(), mask
    stat = text.splitlines()[-1]
    assert int(stat.split()[0]) == int(stat.rsplit(")", 1)[1].split()[2])


def test_where_clone3_is_refused_spawns_go_through_the_trampoline_from_then_on(
    monkeypatch: pytest.MonkeyPatch, spawner_through: Callable[[str], Spawner]
) -> None:
    """As a seccomp filter refuses it (ENOSYS, in Docker's default profile)."""
    spawner = spawner_through("clone3")
    monkeypatch.setattr(spawner._clone, "_call", lambda address: -errno.ENOSYS)
    assert run_spawned(["echo", "spawned"], {}, spawner) == "spawned\n"
    assert spawner._clone is None


def test_a_program_that_exec_refuses_is_an_os_error_of_the_clone3_spawn(
    tempdir: str, spawner_through: Callable[[str], Spawner]
) -> None:
    """Found and executable, and still refused by exec (a script with no interpreter): the
    error of the spawn, as posix_spawn reports it, where the trampoline could only exit 127."""
    script = os.path.join(tempdir, "script")
    with open(script, "w") as f:
        f.write("#!/no/such/interpreter\n")
    os.chmod(script, 0o700)
    with pytest.raises(FileNotFoundError):
        spawner_through("clone3").spawn([script], {}, None, 1, 2)


FALLBACKS = {
    "clone3": "",
    "trampoline": "spawn._clone_spawn = lambda: None",
    "setpriv": "spawn._clone_spawn = spawn._trampoline_path = lambda: None",
    "preexec": "spawn._clone_spawn = spawn._trampoline_path = lambda: None; spawn._SETPRIV = None",
}
"""What a spawning process runs to take each path."""


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


LIMITED = spawn_module.Setup(limits=((resource.RLIMIT_NOFILE, 100, 200),))
AS_NOBODY = spawn_module.Setup(
    limits=((resource.RLIMIT_CORE, -1, -1),),
    credentials=spawn_module.Credentials(65534, 65534, (65534, 100)),
)


ENV = {"PATH": os.environ["PATH"]}


@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_gets_its_limits_from_its_first_instruction(
    path: str, spawner_through: Callable[[str], Spawner]
) -> None:
    """Through setpriv, the holder sets them once posix_spawn returns (see the module)."""
    later = "sleep 0.5; " if path == "setpriv" else ""
    argv = ["sh", "-c", later + "cat /proc/self/limits"]
    seen = run_spawned(argv, ENV, spawner_through(path), setup=LIMITED)
    assert re.search(r"^Max open files +100 +200 ", seen, re.MULTILINE), seen


@needs_root
@pytest.mark.parametrize("path", PATHS)
def test_a_spawned_program_runs_as_its_user_with_its_groups(
    path: str, spawner_through: Callable[[str], Spawner]
) -> None:
    """Needs root. setpriv would lose the parent-death signal: its path uses the preexec hook."""
    argv = ["sh", "-c", "id -u; id -g; id -G; ulimit -c"]
    seen = run_spawned(argv, ENV, spawner_through(path), setup=AS_NOBODY)
    assert seen.split("\n") == ["65534", "65534", "65534 100", "unlimited", ""]


@needs_root
def test_a_clone3_child_born_into_its_cgroup_gets_its_limits_and_user(
    spawner_through: Callable[[str], Spawner], member_cgroup: cgroups.Cgroup
) -> None:
    """Needs root: every step of the child, in one spawn."""
    argv = ["sh", "-c", "id -u; id -G; ulimit -c; cat /proc/self/cgroup"]
    seen = run_spawned(argv, ENV, spawner_through("clone3"), cgroup=member_cgroup, setup=AS_NOBODY)
    assert seen.split("\n")[:3] == ["65534", "65534 100", "unlimited"]
    assert f"0::{member_cgroup.name}\n" in seen


IMPOSSIBLE = spawn_module.Setup(limits=((resource.RLIMIT_NOFILE, 2**40, 2**40),))
"""Above fs.nr_open: refused even to root."""


@x86_64_only
def test_the_trampoline_that_cannot_set_a_limit_says_so_and_runs_nothing(
    spawner_through: Callable[[str], Spawner],
) -> None:
    seen = run_spawned(["echo", "ran"], ENV, spawner_through("trampoline"), setup=IMPOSSIBLE)
    assert seen == "fleet: cannot set the member's limits\n"


def test_a_clone3_spawn_that_cannot_set_a_limit_fails_saying_so_and_runs_nothing(
    spawner_through: Callable[[str], Spawner],
) -> None:
    with pytest.raises(PermissionError, match="cannot set the member's limits"):
        run_spawned(["echo", "ran"], ENV, spawner_through("clone3"), setup=IMPOSSIBLE)


@needs_root
@pytest.mark.parametrize("path", PATHS)
def test_a_program_spawned_as_another_user_still_dies_with_its_spawner(path: str) -> None:
    """A change of user clears the parent-death signal: it is set after (needs root)."""
    nobody = "spawn.Setup(credentials=spawn.Credentials(65534, 65534, (65534,)))"
    assert_dies_with_its_spawner(path, nobody, uid=65534)

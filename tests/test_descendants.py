"""No process outlives its member: what a member starts, in another session or a cleared
environment, ends with its stop, its exit, `down`, and (through its cgroup) a SIGKILLed holder.

Most tests run twice: with a cgroup per member (skipped where cgroup v2 is not writable), and
with FLEET_CGROUPS=off, as on a machine without (the holder then goes by /proc)."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress

import anyio
import pytest

import fleetctl
from fleetd.core import cgroups
from fleetd.holder.descendants import (
    CgroupDescendants,
    Lineage,
    Process,
    TreeDescendants,
    member_of,
)
from fleetd.holder.spawn import Spawner
from protocol.members import MemberState
from tests.processes import (
    Fleetd,
    cgroup_problem,
    kill_holders,
    running_fleetd,
    wait_gone,
    wait_until,
)
from tests.processes import fleetctl as run_fleetctl

ESCAPE = "setsid sleep 1000 & echo $! > {dir}/escapee; "
"""A member's first step: a child in a session of its own, its pid in {dir}/escapee."""

DOUBLE_FORK = (
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.execvpe('sleep', ['sleep', '1000'], ENV)\n"
    "    os._exit(0)\n"
    "os.wait()\n"
)
"""A daemon's double fork: the grandchild is orphaned at once (re-parented to the holder) and
runs with ENV, the member's environment or a cleared one."""


def cgroup_of(pid: int | None) -> str:
    """A member's cgroup directory, from its process (what an operator would read), once its
    trampoline joined it (a member runs as soon as it is spawned, ready "none")."""
    wait_until(lambda: (cgroups.cgroup_of(pid or 0) or "").endswith(".member"))
    found = cgroups.cgroup_directory(pid or 0)
    assert found is not None, f"no cgroup for {pid}"
    return found


@pytest.fixture(params=["cgroup", "proc"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the holders of the test find a member's processes (they inherit our environment)."""
    if request.param == "cgroup":
        problem = cgroup_problem()
        if problem:
            pytest.skip(problem)
    else:
        monkeypatch.setenv("FLEET_CGROUPS", "off")
    return str(request.param)


@pytest.fixture
def cgroup_mode() -> None:
    problem = cgroup_problem()
    if problem:
        pytest.skip(problem)


def members(**tables: dict[str, object]) -> dict[str, object]:
    return {"members": tables}


def shell(script: str, **more: object) -> dict[str, object]:
    return {"command": ["sh", "-c", script], **more}


def double_fork(env: str = "dict(os.environ)") -> list[str]:
    """A member that double-forks a `sleep 1000` with `env`, then sleeps."""
    return [sys.executable, "-c", f"import os, time\nENV = {env}\n{DOUBLE_FORK}time.sleep(60)\n"]


def read_text(path: str) -> str:
    with suppress(FileNotFoundError), open(path) as f:
        return f.read()
    return ""


def read_pid(path: str) -> int:
    wait_until(lambda: read_text(path).strip())
    return int(read_text(path).split()[-1])


def sleepers(environment: bytes = b"") -> list[int]:
    """`sleep 1000` processes whose environment holds `environment`: a daemon's grandchild,
    found from outside."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != b"sleep\x001000\x00":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if environment in f.read():
                    found.append(int(entry))
    return found


class Held:
    """Processes held by pidfd, so that "gone" cannot be fooled by a recycled pid."""

    def __init__(self, *pids: int) -> None:
        self.pidfds = {pid: os.pidfd_open(pid) for pid in pids}

    def alive(self) -> list[int]:
        return [pid for pid, fd in self.pidfds.items() if not _readable(fd)]

    def close(self) -> None:
        for fd in self.pidfds.values():
            with suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def held() -> Iterator[Callable[..., Held]]:
    made: list[Held] = []

    def hold(*pids: int) -> Held:
        made.append(Held(*pids))
        return made[-1]

    yield hold
    for each in made:
        each.close()


# --- bound clusters -----------------------------------------------------------------------------


def test_stop_ends_what_a_member_started_in_other_sessions(
    mode: str, held: Callable[..., Held]
) -> None:
    spec = members(
        a=shell(ESCAPE + "exec sleep 60"),
        d={"command": double_fork()},
        sibling=shell(ESCAPE + "exec sleep 60"),
    )
    with fleetctl.cluster(spec, name="esc") as c:
        running = c.wait_running()
        escapee = read_pid(os.path.join(c.runtime_dir, "a", "escapee"))
        ours = f"FLEET_HOLDER={c.holder_pid}-".encode()
        wait_until(lambda: [p for p in sleepers(b"FLEET_MEMBER=d\0") if _environ_has(p, ours)])
        (orphan,) = [p for p in sleepers(b"FLEET_MEMBER=d\0") if _environ_has(p, ours)]
        sibling = read_pid(os.path.join(c.runtime_dir, "sibling", "escapee"))
        processes = held(escapee, orphan, sibling)
        assert os.getsid(escapee) != os.getsid(running["a"].pid or 0)
        # The grandchild can exec before its parent exits; then it is re-parented to the holder.
        wait_until(lambda: _parent(orphan) == c.holder_pid)
        started = time.monotonic()
        assert c.stop("a").state == MemberState.STOPPED
        assert c.stop("d").state == MemberState.STOPPED
        assert time.monotonic() - started < 2  # they went on SIGTERM, with their members
        assert processes.alive() == [sibling]
        assert c.status("sibling").state == MemberState.RUNNING
    wait_until(lambda: not processes.alive())


def _environ_has(pid: int, entry: bytes) -> bool:
    with suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
        return entry in f.read()
    return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def test_processes_that_ignore_the_stop_signal_are_killed_after_stop_timeout(
    mode: str, held: Callable[..., Held]
) -> None:
    stubborn = "setsid sh -c 'trap \"\" TERM; echo $$ > {dir}/escapee; exec sleep 1000' & "
    spec = shell(stubborn + "exec sleep 60", stop_timeout="300ms")
    with fleetctl.cluster(members(a=spec)) as c:
        c.wait_running()
        processes = held(read_pid(os.path.join(c.runtime_dir, "a", "escapee")))
        started = time.monotonic()
        c.stop("a")
        assert 0.3 <= time.monotonic() - started < 2.5
        assert processes.alive() == []


def test_a_crashed_members_processes_are_ended_before_it_restarts(
    mode: str, held: Callable[..., Held]
) -> None:
    # Each run first says which of the earlier runs' escapees still live (none may).
    script = (
        "for p in $(cat {dir}/escapees 2>/dev/null); do"
        " [ \"$(tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null)\" = 'sleep 1000.125 ' ]"
        ' && echo "alive $p"; done; '
        "setsid sleep 1000.125 & echo $! >> {dir}/escapees; sleep 0.2; exit 3"
    )
    spec = shell(script, restart="on-failure", ready="none")
    with fleetctl.cluster(members(crash=spec)) as c:
        escapees = os.path.join(c.runtime_dir, "crash", "escapees")
        wait_until(lambda: len(read_text(escapees).split()) >= 3)
        c.stop("crash")
        assert c.logs("crash") == ""


def test_a_member_whose_main_process_exits_takes_its_processes_along(
    mode: str, held: Callable[..., Held]
) -> None:
    spec = shell(ESCAPE + "echo started; sleep 0.3", ready="log:started")
    with fleetctl.cluster(members(once=spec, other={"command": ["sleep", "60"]})) as c:
        c.wait_running(["once"])
        processes = held(read_pid(os.path.join(c.runtime_dir, "once", "escapee")))
        wait_until(lambda: c.status("once").state == MemberState.STOPPED)
        wait_until(lambda: not processes.alive(), timeout=3)
        assert c.status("once").lingering == 0


def test_a_process_that_cleared_its_environment_ends_with_its_member_in_its_cgroup(
    cgroup_mode: None, held: Callable[..., Held]
) -> None:
    """Nothing in /proc ties it to its member: the cgroup does."""
    spec = {"command": double_fork(env="{'PATH': os.environ['PATH']}")}
    with fleetctl.cluster(members(env_less=spec, other={"command": ["sleep", "60"]})) as c:
        status = c.wait_running()["env_less"]
        path = cgroup_of(status.pid)
        member_cgroup = cgroups.Cgroup(path)
        wait_until(lambda: set(sleepers()) & set(member_cgroup.processes()))
        (orphan,) = set(sleepers()) & set(member_cgroup.processes())
        processes = held(orphan)
        assert not _environ_has(orphan, b"FLEET")
        c.stop("env_less")
        assert processes.alive() == []
        assert not os.path.exists(path)


def test_without_cgroups_an_unattributable_process_ends_with_the_holder(
    monkeypatch: pytest.MonkeyPatch, held: Callable[..., Held]
) -> None:
    monkeypatch.setenv("FLEET_CGROUPS", "off")
    spec = {"command": double_fork(env="{'PATH': os.environ['PATH']}")}
    with fleetctl.cluster(members(env_less=spec, other={"command": ["sleep", "60"]})) as c:
        c.wait_running()
        wait_until(lambda: [p for p in sleepers() if _parent(p) == c.holder_pid])
        (orphan,) = [p for p in sleepers() if _parent(p) == c.holder_pid]
        processes = held(orphan)
        c.stop("env_less")
        assert processes.alive() == [orphan]  # it cannot be told from a sibling's
    wait_until(lambda: not processes.alive(), timeout=3)


def test_each_member_has_a_cgroup_of_its_own_removed_when_it_leaves(
    cgroup_mode: None, held: Callable[..., Held]
) -> None:
    spec = shell(ESCAPE + "exec sleep 60")
    with fleetctl.cluster(members(a=spec, b=spec), name="cg") as c:
        running = c.wait_running()
        paths = {name: cgroup_of(status.pid) for name, status in running.items()}
        holder_cgroup = os.path.dirname(paths["a"])
        assert paths == {name: f"{holder_cgroup}/{name}.member" for name in ("a", "b")}
        holder, started = c.holder_pid or 0, cgroups.holder_of(os.path.basename(holder_cgroup))
        assert os.path.basename(holder_cgroup).startswith("fleet-cg.") and started
        assert started[0] == holder
        assert os.path.dirname(holder_cgroup) == cgroups.cgroup_directory(holder)  # beside it
        escapee = read_pid(os.path.join(c.runtime_dir, "a", "escapee"))
        processes = held(escapee)
        a = cgroups.Cgroup(paths["a"])
        assert a.holds(running["a"].pid or 0) and a.holds(escapee)
        assert cgroups.Cgroup(paths["b"]).holds(running["b"].pid or 0)
        c.stop("a")
        assert processes.alive() == [] and not os.path.exists(paths["a"])
        assert os.path.exists(paths["b"])
    assert not os.path.exists(holder_cgroup)


async def ended_after(descendants: CgroupDescendants, argv: list[str]) -> int:
    """`argv` spawned into the member's cgroup and reaped, then the member's end, as its
    supervisor calls it once the main process exited: how many processes linger."""
    assert descendants.cgroup is not None
    child = Spawner().spawn(argv, dict(os.environ), None, 1, 2, cgroup=descendants.cgroup)
    _, status = await anyio.to_thread.run_sync(os.waitpid, child.pid, 0)
    child.reaped(os.waitstatus_to_exitcode(status))
    with anyio.fail_after(5):
        return await descendants.end()


def test_a_cgroup_is_removed_with_the_cgroups_its_member_made_below_it(
    member_cgroup: cgroups.Cgroup,
) -> None:
    below = cgroups.Cgroup(os.path.join(member_cgroup.path, "own", "deeper"))
    os.makedirs(below.path)
    assert member_cgroup.remove()
    assert not os.path.exists(member_cgroup.path)


def test_a_cgroup_a_process_is_in_is_not_removed(member_cgroup: cgroups.Cgroup) -> None:
    child = Spawner().spawn(["sleep", "60"], dict(os.environ), None, 1, 2, cgroup=member_cgroup)
    try:
        assert not member_cgroup.remove()
        assert member_cgroup.holds(child.pid)
    finally:
        member_cgroup.kill()
        os.waitpid(child.pid, 0)
        child.reaped(-9)


async def test_a_member_that_left_nothing_behind_keeps_a_cgroup_its_restart_is_born_into(
    member_cgroup: cgroups.Cgroup,
) -> None:
    """No cgroup.kill of an empty cgroup: a restart then joins it without a write to
    cgroup.procs, and its wait for an RCU grace period (fleetd.holder.spawn)."""
    descendants = CgroupDescendants(member_cgroup)
    assert await ended_after(descendants, ["true"]) == 0
    assert member_cgroup.born_into


async def test_a_member_that_left_a_process_behind_has_it_killed_and_is_joined_by_a_write(
    member_cgroup: cgroups.Cgroup,
) -> None:
    descendants = CgroupDescendants(member_cgroup)
    assert await ended_after(descendants, ["sh", "-c", "sleep 1000 &"]) == 0
    assert not member_cgroup.populated()
    assert not member_cgroup.born_into


# --- detached clusters ----------------------------------------------------------------------------


@pytest.fixture
def daemon(mode: str, tempdir: str) -> Iterator[Fleetd]:
    extra = {"FLEET_CGROUPS": "off"} if mode == "proc" else {}
    with running_fleetd(tempdir, **extra) as fleetd:
        try:
            yield fleetd
        finally:
            kill_holders(fleetd)


def up(daemon: Fleetd, text: str) -> dict[str, object]:
    path = os.path.join(daemon.root, "fleet.toml")
    with open(path, "w") as f:
        f.write(text)
    done = run_fleetctl("--json", "up", "-f", path, "--wait", env=daemon.env)
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-2000:])
    envelope: dict[str, object] = json.loads(done.stdout)
    return envelope


ESCAPING = (
    'name = "esc"\n'
    "[members.a]\n"
    f'command = ["sh", "-c", "{ESCAPE}exec sleep 60"]\n'
    "[members.b]\n"
    f'command = ["sh", "-c", "{ESCAPE}exec sleep 60"]\n'
)


def test_down_ends_every_process_of_every_member(daemon: Fleetd, held: Callable[..., Held]) -> None:
    envelope = up(daemon, ESCAPING)
    runtime_dir = str(envelope["runtime_dir"])
    escapees = [read_pid(os.path.join(runtime_dir, m, "escapee")) for m in ("a", "b")]
    processes = held(*escapees)
    done = run_fleetctl("--json", "down", "esc", env=daemon.env)
    assert done.returncode == 0, done.stdout
    assert processes.alive() == []


def test_fleetd_ends_what_a_sigkilled_holder_left_in_its_cgroup(
    cgroup_mode: None, tempdir: str, held: Callable[..., Held]
) -> None:
    with running_fleetd(tempdir) as daemon:
        try:
            envelope = up(daemon, ESCAPING)
            runtime_dir, holder = str(envelope["runtime_dir"]), int(str(envelope["holder_pid"]))
            escapees = [read_pid(os.path.join(runtime_dir, m, "escapee")) for m in ("a", "b")]
            processes = held(*escapees)
            statuses = json.loads(run_fleetctl("--json", "status", env=daemon.env).stdout)
            holder_cgroup = os.path.dirname(cgroup_of(statuses["members"][0]["pid"]))
            os.kill(holder, signal.SIGKILL)
            assert wait_gone(holder, 5)
            # The members die by their parent-death signal, what they started by fleetd's hand.
            wait_until(lambda: not processes.alive(), timeout=5)
            wait_until(lambda: not os.path.exists(holder_cgroup), timeout=5)
        finally:
            kill_holders(daemon)
    assert "holder_cgroup_removed" in daemon.log()


# --- the pieces -------------------------------------------------------------------------------


def test_a_process_belongs_to_the_member_its_environment_names_under_this_holder() -> None:
    environ = b"PATH=/bin\0FLEET_MEMBER=web\0FLEET_CLUSTER=c\0FLEET_HOLDER=42-7\0"
    assert member_of(environ, "42-7") == "web"
    assert member_of(environ, "43-7") is None  # a nested holder's, or another cluster's
    assert member_of(b"PATH=/bin\0", "42-7") is None
    assert member_of(b"", "42-7") is None  # unreadable, or a zombie's


def test_holder_cgroup_names_say_which_process_made_them() -> None:
    name = cgroups.holder_cgroup_name("web.v2", 4242, 98765)
    assert name == "fleet-web.v2.4242-98765"
    assert cgroups.holder_of(name) == (4242, 98765)
    for other in ("fleet-web", "fleet-x.12", "fleetd.service", "fleet-x.1-a", "system.slice"):
        assert cgroups.holder_of(other) is None


async def test_a_process_that_would_not_die_counts_as_lingering_until_it_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a member's status reports as lingering, with the test as the holder: one process
    of the member refuses its SIGKILL (as another user's would for an unprivileged holder)."""
    lineage = Lineage("t", watched=set)
    env = {**os.environ, "FLEET_HOLDER": lineage.token, "FLEET_MEMBER": "m"}
    parent = subprocess.Popen(  # noqa: ASYNC220 (a moment's fork and exec)
        ["sh", "-c", "setsid sleep 1000 & echo $!; exec sleep 1000"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    stubborn = int(parent.stdout.readline())
    refuse = Process.send

    def send(self: Process, signum: int) -> bool:
        return False if self.pid == stubborn else refuse(self, signum)

    monkeypatch.setattr(Process, "send", send)
    descendants = TreeDescendants(lineage, "m")
    try:
        with anyio.fail_after(10):
            assert await descendants.end() == 1  # the parent was killed; its child remains
            assert parent.wait() == -signal.SIGKILL
            os.kill(stubborn, signal.SIGKILL)
            await descendants.wait_gone()
            assert await descendants.end() == 0
    finally:
        descendants.close()
        with suppress(ProcessLookupError):
            os.kill(stubborn, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()

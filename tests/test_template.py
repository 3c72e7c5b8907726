"""Holders forked from a warm template (fleetd.holder.template): fleetd's, and the one a client
process keeps for its bound clusters. A forked holder keeps every guarantee of an exec'd one
(its own session, journaled before it runs, adopted by the next fleetd); a template that is
gone only means holders are exec'd again, until a new one runs."""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from fleetctl.bound import cluster
from fleetctl.template import Template
from fleetd.core.identity import ProcessGone, children, proc_stat
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import Unavailable
from protocol.members import HOLDER_PIDFILE, MemberState
from protocol.template import Fork, Forked, Refused, decode_answer, encode
from tests.processes import (
    FLEETCTL,
    HOLDER_NAME,
    TEMPLATE_NAME,
    Fleetd,
    fleetctl,
    gate_pid,
    gated_fleetd,
    kill_holders,
    open_gate,
    process_name,
    runtime_root,
    wait_gone,
    wait_until,
)

SLEEPER = {"members": {"a": {"command": ["sleep", "60"]}}}


def parent(pid: int) -> int:
    return proc_stat(pid).ppid


def alive(pid: int) -> bool:
    try:
        proc_stat(pid)
    except ProcessGone:
        return False
    return True


def pid_of(daemon: Fleetd) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def template_of(daemon: Fleetd) -> int:
    """fleetd's template: its live child named so (waiting until there is one)."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [
            pid
            for pid in children(pid_of(daemon))
            if process_name(pid) == TEMPLATE_NAME and alive(pid)
        ]
        return bool(found)

    wait_until(look, 20)
    (pid,) = found
    return pid


def up(daemon: Fleetd, name: str, *args: str) -> int:
    """`fleetctl up` of a one-member `sleep` cluster; its holder's pid."""
    path = os.path.join(daemon.root, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n[members.a]\ncommand = ["sleep", "60"]\n')
    done = fleetctl("--json", "up", "-f", path, *args, env=daemon.env)
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-3000:])
    return int(json.loads(done.stdout)["holder_pid"])


def holder_claim(daemon: Fleetd, name: str) -> dict[str, Any]:
    done = fleetctl("claims", "inspect", "--kind", "holder", "--key", name, env=daemon.env)
    claim: dict[str, Any] = json.loads(done.stdout)["claim"]
    return claim


# --- fleetd's template ------------------------------------------------------------------------


def test_a_forked_holder_is_a_session_leader_the_template_started(holders: Fleetd) -> None:
    template = template_of(holders)
    assert parent(template) == pid_of(holders)
    holder = up(holders, "one", "--wait")
    assert parent(holder) == template
    assert os.getsid(holder) == holder and os.getpgid(holder) == holder
    assert process_name(holder) == HOLDER_NAME  # what ps -e shows, not the template's name


def command_line(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def descriptors(pid: int) -> dict[int, str]:
    """What each open descriptor names; one closed between the listing and its read (fleetd
    serves meanwhile) is left out."""
    directory = f"/proc/{pid}/fd"
    found: dict[int, str] = {}
    for fd in os.listdir(directory):
        with contextlib.suppress(FileNotFoundError):
            found[int(fd)] = os.readlink(os.path.join(directory, fd))
    return found


def test_fleetds_first_template_is_forked_from_it_holding_none_of_its_descriptors(
    holders: Fleetd,
) -> None:
    """Forked, it shares the pages of every module fleetd imported (fleetd.clusters.warm)."""
    template = template_of(holders)
    assert command_line(template) == command_line(pid_of(holders))
    assert parent(up(holders, "one")) == template  # it serves: done with its start-up
    held = descriptors(template)
    assert (held.pop(0), held.pop(1), held.pop(2)) == (
        "/dev/null",
        "/dev/null",
        descriptors(pid_of(holders))[2],
    )
    kinds = sorted(target.split(":")[0] for target in held.values())
    assert kinds == ["anon_inode", "pipe", "pipe", "socket"]  # owner's pidfd, wake-up, requests


def _without_stdin_and_stdout() -> None:
    os.close(0)
    os.close(1)


def test_a_template_forked_from_fleetd_without_stdin_or_stdout_serves(tempdir: str) -> None:
    """Its socket may take a free stdio number in fleetd: never one the template reopens."""
    daemon = Fleetd(tempdir)
    try:
        daemon.start(preexec_fn=_without_stdin_and_stdout)
        template = template_of(daemon)
        assert parent(up(daemon, "one", "--wait")) == template
        held = descriptors(template)
        assert (held[0], held[1]) == ("/dev/null", "/dev/null")
    finally:
        kill_holders(daemon)
        daemon.close()


def test_a_forked_holder_is_journaled_before_it_runs(tempdir: str) -> None:
    with gated_fleetd(tempdir) as daemon:
        path = os.path.join(tempdir, "one.toml")
        with open(path, "w") as f:
            f.write('name = "one"\n[members.a]\ncommand = ["sleep", "60"]\n')
        with subprocess.Popen([*FLEETCTL, "up", "-f", path], env=daemon.env) as launching:
            holder = gate_pid(daemon)  # it waits where its own code would begin
            assert parent(holder) == template_of(daemon)
            claim = holder_claim(daemon, "one")
            start_time = proc_stat(holder).start_time
            assert (claim["owner"], claim["detail"]) == (f"pid:{holder}:{start_time}", "starting")
            pidfile = os.path.join(runtime_root(daemon), "one", HOLDER_PIDFILE)
            assert not os.path.exists(pidfile)
            open_gate(daemon)
            assert launching.wait(20) == 0
        with open(pidfile) as f:  # the holder names itself as the journal did: a fork's time
            assert f.read().split() == [str(holder), str(start_time)]
        assert fleetctl("down", "one", env=daemon.env).returncode == 0
        assert wait_gone(holder, 10)


def test_holders_are_execd_while_the_template_is_gone_until_another_runs(holders: Fleetd) -> None:
    first = template_of(holders)
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first, 5)
    execd = up(holders, "one")  # fleetd waits a few seconds before it starts another
    assert parent(execd) == pid_of(holders)
    assert process_name(execd) == HOLDER_NAME
    second = template_of(holders)  # after a pause
    assert second != first
    assert b"fleetd.holder.template" in command_line(second)  # exec'd: fleetd has threads now
    assert parent(up(holders, "two")) == second
    assert "holder_template_exited" in holders.log()


def test_a_restarted_fleetd_adopts_forked_holders(holders: Fleetd) -> None:
    template = template_of(holders)
    holder = up(holders, "one", "--wait")
    holders.signal(signal.SIGKILL)
    holders.wait()
    assert wait_gone(template, 5)  # its owner went: it went too, leaving its holders
    assert alive(holder)
    holders.start()
    done = fleetctl("--json", "status", "one/a", env=holders.env)
    (member,) = json.loads(done.stdout)["members"]
    assert (member["state"], member["holder_pid"]) == ("running", holder)
    assert fleetctl("down", "one", env=holders.env).returncode == 0
    assert wait_gone(holder, 10)


# --- the template itself, spoken to directly ------------------------------------------------


def spec_file(tempdir: str) -> str:
    path = os.path.join(tempdir, "cluster.json")
    spec = ClusterSpec(name="t", members=[MemberSpec(name="a", command=["sleep", "60"])])
    with open(path, "wb") as f:
        f.write(msgspec.json.encode(spec))
    return path


@pytest.fixture
def template() -> Iterator[Template]:
    started = Template.start(os.environ)
    try:
        yield started
    finally:
        started.close()


def readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def fork_gated(template: Template, tempdir: str) -> tuple[int, int, int]:
    """A holder forked behind a gate: its pidfd, the gate's write end, the ready pipe's read
    end."""
    runtime_dir = os.path.join(tempdir, "rt")
    gate_read, gate_write = os.pipe()
    ready_read, ready_write = os.pipe()
    log = os.open(os.path.join(tempdir, "holder.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        argv = [f"--spec={spec_file(tempdir)}", f"--dir={runtime_dir}", "--ready-fd=3"]
        forked = template.fork(
            argv,
            os.environ,
            stdio=(null, log, log),
            keep=(ready_write,),
            gate=gate_read,
            session=True,
        )
    finally:
        for fd in (gate_read, ready_write, log, null):
            os.close(fd)
    return forked.pidfd, gate_write, ready_read


def test_a_gate_closed_unopened_runs_nothing(template: Template, tempdir: str) -> None:
    pidfd, gate, ready = fork_gated(template, tempdir)
    try:
        os.close(gate)  # the launcher died before it journaled the holder
        assert readable(pidfd, 10)
        with open(ready, "rb") as report:
            assert report.read() == b""  # never ready
    finally:
        os.close(pidfd)
    assert not os.path.exists(os.path.join(tempdir, "rt"))  # the holder would have made it
    assert os.path.getsize(os.path.join(tempdir, "holder.log")) == 0


def test_a_gate_given_a_line_runs_the_holder(template: Template, tempdir: str) -> None:
    pidfd, gate, ready = fork_gated(template, tempdir)
    try:
        os.write(gate, b"go\n")
        os.close(gate)
        with open(ready, "rb") as report:
            assert report.readline() == b"ready\n"
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)  # it stops its member and exits
        assert readable(pidfd, 10)
        wait_until(lambda: not children(template.pid))  # and the template reaped it
    finally:
        os.close(pidfd)


def raw_template() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetd.holder.template",
                f"--owner={os.getpid()}",
                f"--socket-fd={theirs.fileno()}",
            ],
            pass_fds=(theirs.fileno(),),
        )
    ours.settimeout(30)
    return process, ours


def test_a_malformed_request_is_refused_and_the_template_serves_on() -> None:
    process, sock = raw_template()
    with sock, open(os.devnull, "rb") as null:
        sock.send(b"not json")
        assert isinstance(decode_answer(sock.recv(65536)), Refused)
        too_few = encode(Fork(argv=[], env={}, gated=True))
        socket.send_fds(sock, [too_few], [null.fileno()] * 3)
        answer = decode_answer(sock.recv(65536))
        assert isinstance(answer, Refused) and "at least 4 descriptors" in answer.message
        assert process.poll() is None
    assert process.wait(10) == 0  # our end closed: it exits


def test_a_fork_answers_with_the_pid_and_a_pidfd_of_it() -> None:
    """A holder given no valid arguments exits at once: still forked, and seen to exit."""
    process, sock = raw_template()
    with sock, open(os.devnull, "r+b") as null:
        socket.send_fds(sock, [encode(Fork(argv=[], env={}))], [null.fileno()] * 3)
        data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
        answer = decode_answer(data)
        assert isinstance(answer, Forked) and len(fds) == 1
        try:
            assert readable(fds[0], 10)
        finally:
            os.close(fds[0])
    assert process.wait(10) == 0


# --- bound clusters ---------------------------------------------------------------------------


def test_a_second_bound_cluster_forks_from_the_same_template() -> None:
    with cluster(SLEEPER, name="one") as one, cluster(SLEEPER, name="two") as two:
        assert one.holder_pid is not None and two.holder_pid is not None
        template = parent(one.holder_pid)
        assert parent(two.holder_pid) == template
        assert process_name(template) == TEMPLATE_NAME and parent(template) == os.getpid()
        assert two.wait_running()["a"].state == MemberState.RUNNING


async def test_the_async_form_forks_from_the_template_too() -> None:
    async with cluster(SLEEPER) as c:
        assert c.holder_pid is not None
        assert process_name(parent(c.holder_pid)) == TEMPLATE_NAME
        assert (await c.wait_running())["a"].state == MemberState.RUNNING


def test_a_bound_holder_takes_the_environment_of_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with cluster(SLEEPER):  # the template runs from here on
        monkeypatch.setenv("FLEET_TEST_LATE", "yes")
        said = {"command": ["sh", "-c", "echo late=$FLEET_TEST_LATE; exec sleep 60"]}
        with cluster({"members": {"a": {**said, "ready": "log:^late="}}}) as c:
            assert process_name(parent(c.holder_pid or 0)) == TEMPLATE_NAME
            c.wait_running()
            assert "late=yes" in c.logs("a")


def test_a_bound_holder_with_another_pythonpath_forks_from_a_template_started_with_it(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked interpreter cannot start over with a new PYTHONPATH (a sitecustomize, say):
    the template it started with makes way for one started in the new environment."""
    with cluster(SLEEPER) as first:
        before = parent(first.holder_pid or 0)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tempdir, *sys.path]))
    with cluster(SLEEPER) as c:
        template = parent(c.holder_pid or 0)
        assert template != before and process_name(template) == TEMPLATE_NAME
        assert f"PYTHONPATH={tempdir}".encode() in read_environ(template)
    assert wait_gone(before, 10)


def test_a_process_back_in_its_own_environment_forks_from_a_template_again(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template first started by a cluster in a passing environment (one test's PYTHONPATH)
    is not kept for the rest of the process: later clusters fork from one of their own."""
    with monkeypatch.context() as passing:
        passing.setenv("PYTHONPATH", os.pathsep.join([tempdir, *sys.path]))
        with cluster(SLEEPER):
            pass
    with cluster(SLEEPER, name="one") as one, cluster(SLEEPER, name="two") as two:
        template = parent(one.holder_pid or 0)
        assert parent(two.holder_pid or 0) == template and process_name(template) == TEMPLATE_NAME
        assert tempdir.encode() not in read_environ(template)


def read_environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


CLIENT = textwrap.dedent(
    """
    import json, time
    from fleetctl import cluster
    SLEEP = {"members": {"a": {"command": ["sleep", "60"]}, "b": {"command": ["sleep", "60"]}}}
    with cluster(SLEEP, name="one") as one, cluster(SLEEP, name="two") as two:
        pids = [s.pid for c in (one, two) for s in c.wait_running().values()]
        holders = [one.holder_pid, two.holder_pid]
        print(json.dumps({"holders": holders, "members": pids}), flush=True)
        time.sleep(60)
    """
)


def test_a_sigkilled_client_takes_its_template_holders_and_members_along() -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, text=True)
    with client:
        try:
            assert client.stdout is not None
            report = json.loads(client.stdout.readline())
            (template,) = {parent(pid) for pid in report["holders"]}
            assert parent(template) == client.pid
            pids = [template, *report["holders"], *report["members"]]
            assert all(alive(pid) for pid in pids)
        finally:
            client.kill()
    wait_until(lambda: not any(alive(pid) for pid in pids))


FORKING_CLIENT = textwrap.dedent(
    """
    import json, os
    from fleetctl import cluster
    SLEEP = {"members": {"a": {"command": ["sleep", "60"]}}}

    def parent(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])

    with cluster(SLEEP, name="parent") as c:
        ours = parent(c.holder_pid)
        child = os.fork()
        if child == 0:
            with cluster(SLEEP, name="child") as d:
                theirs = parent(d.holder_pid)
                print(json.dumps({"template": theirs, "owner": parent(theirs)}), flush=True)
            os._exit(0)
        os.waitpid(child, 0)
        print(json.dumps({"template": ours, "owner": os.getpid(), "child": child}), flush=True)
    """
)


def test_a_forked_client_starts_a_template_of_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORKING_CLIENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    in_child, in_parent = map(json.loads, done.stdout.splitlines())
    assert in_parent["template"] != in_child["template"]
    assert in_child["owner"] == in_parent["child"]


def test_a_template_that_does_not_answer_is_taken_out_of_use(
    template: Template, tempdir: str
) -> None:
    """A launch then execs its holder, instead of waiting on a template that hangs."""
    os.kill(template.pid, signal.SIGSTOP)
    with open(os.devnull, "r+b") as null, pytest.raises(Unavailable, match="did not answer"):
        template.fork([], {}, stdio=(null.fileno(),) * 3, timeout=0.5)
    assert template.out_of_use()
    assert readable(template.pidfd, 10)  # it was killed

"""Holders with real member processes: readiness, restarts, stops, bound-mode lifetimes."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

import fleetctl
from fleetctl.bound import SyncCluster, answered_all
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import is_running, pidfile_text, process_start_time
from fleetd.holder.members import LineMatcher, LogFile, Reaper
from protocol.errors import (
    Absent,
    FleetError,
    Incompatible,
    InvalidRequest,
    MemberFailed,
)
from protocol.framing import decode_response, encode
from protocol.members import (
    HOLDER_LOG,
    Ack,
    Bind,
    MemberState,
    MemberStatus,
    Status,
    StatusAll,
    WatchResult,
    member_socket_path,
)
from tests.processes import wait_until

SLEEPER = ["sleep", "60"]
HTTP = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
PRINT_ARGS = "import sys; print(repr(sys.argv[1:]), flush=True)"


def members(**tables: dict[str, object]) -> dict[str, object]:
    return {"members": tables}


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def member_pids(cluster: SyncCluster) -> list[int]:
    return [s.pid for s in cluster.status().values() if s.pid is not None]


# --- readiness --------------------------------------------------------------------------------


def test_http_members_become_ready_on_tcp_and_serve() -> None:
    web = {"command": HTTP, "ready": "tcp"}
    with fleetctl.cluster(members(a=web, b=web)) as c:
        statuses = c.wait_running(timeout=20)
        assert statuses["a"].state == MemberState.RUNNING and statuses["a"].running
        for name in ("a", "b"):
            with urllib.request.urlopen(f"http://{c.address(name)}/", timeout=5) as page:
                assert page.status == 200
        assert statuses["a"].holder_pid == c.holder_pid
        assert stat.S_IMODE(os.stat(c.runtime_dir).st_mode) == 0o700
        socket_mode = os.stat(member_socket_path(c.runtime_dir, "a")).st_mode
        assert stat.S_ISSOCK(socket_mode) and stat.S_IMODE(socket_mode) == 0o600
        wait_until(lambda: "GET / HTTP" in c.logs("a", stderr=True))
        runtime_dir = c.runtime_dir
    assert not os.path.exists(runtime_dir)


needs_systemd_notify = pytest.mark.skipif(
    shutil.which("systemd-notify") is None,
    reason="systemd-notify not installed (CI installs systemd, which has it)",
)


@needs_systemd_notify
def test_a_member_is_ready_when_systemd_notify_says_so() -> None:
    script = "sleep 0.3; systemd-notify --ready; echo notified; exec sleep 60"
    with fleetctl.cluster(members(n={"command": ["sh", "-c", script], "ready": "notify"})) as c:
        assert c.status("n").state == MemberState.STARTING
        started = time.monotonic()
        c.wait_running(timeout=10)
        assert time.monotonic() - started < 3, "the barrier of systemd-notify was not answered"
        wait_until(lambda: "notified" in c.logs("n"))


@needs_systemd_notify
def test_members_that_notify_as_soon_as_they_run_are_all_ready() -> None:
    """A member may speak before its holder has heard how its spawn went (spawns run on
    other threads): what it said then is its own once the holder knows its pid."""
    script = "systemd-notify --ready; exec sleep 60"
    notifying = {"command": ["sh", "-c", script], "ready": "notify"}
    with fleetctl.cluster(members(**{f"n{i}": notifying for i in range(40)})) as c:
        c.wait_running(timeout=20)


async def test_an_exit_reaped_before_its_child_is_watched_is_handed_over() -> None:
    """While a spawn is on its way, its child may exit and be reaped before anyone watches
    it: the exit waits for the watch."""
    reaper = Reaper(spawning=lambda: True)
    pid = exited_unreaped(["sh", "-c", "exit 3"])
    reaper.reap()
    codes: list[int] = []
    reaper.watch(pid, codes.append)
    await anyio.lowlevel.checkpoint()
    assert codes == [3]


def exited_unreaped(argv: list[str]) -> int:
    """A child of ours that has exited and is not reaped yet."""
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    return pid


def test_a_member_is_ready_when_its_output_matches() -> None:
    script = "echo warming up; sleep 0.3; echo >&2 'listening on 8080'; exec sleep 60"
    with fleetctl.cluster(
        members(l={"command": ["sh", "-c", script], "ready": r"log:listening on \d+"})
    ) as c:
        assert c.status("l").state == MemberState.STARTING
        c.wait_running(timeout=10)
        assert c.logs("l") == "warming up\n" and "listening" in c.logs("l", stderr=True)


def test_a_member_is_ready_when_its_unix_socket_accepts() -> None:
    server = (
        "import socket, time; time.sleep(0.2); s = socket.socket(socket.AF_UNIX);"
        " s.bind('{dir}/api.sock'); s.listen(); time.sleep(60)"
    )
    spec = {"command": ["python3", "-c", server], "ready": "unix:{dir}/api.sock"}
    with fleetctl.cluster(members(u=spec)) as c:
        status = c.wait_running(timeout=10)["u"]
        assert status.address == os.path.join(c.runtime_dir, "u", "api.sock")


def test_not_ready_within_start_timeout_is_an_error() -> None:
    spec = {"command": SLEEPER, "ready": "tcp", "start_timeout": "300ms", "stop_timeout": "1s"}
    with fleetctl.cluster(members(slow=spec)) as c:
        with pytest.raises(MemberFailed, match=r"not ready within 0\.3s"):
            c.wait_running(timeout=10)
        assert c.status("slow").state == MemberState.ERROR


def test_prepare_runs_once_before_the_member() -> None:
    spec = {
        "command": ["sh", "-c", "cat {dir}/prepared; exec sleep 60"],
        "prepare": ["sh", "-c", "echo prepared >> {dir}/prepared"],
    }
    with fleetctl.cluster(members(p=spec)) as c:
        c.wait_running(timeout=10)
        wait_until(lambda: c.logs("p") == "prepared\n")


# --- processes and restarts -------------------------------------------------------------------


def test_a_crashing_member_is_restarted_and_in_error_while_it_waits() -> None:
    """When it restarts is the lifecycle's decision (tests/test_lifecycle.py); here, that the
    holder carries it out: each restart spawns the command again."""
    script = "echo start >> {dir}/starts; exit 3"
    spec = {"command": ["sh", "-c", script], "restart": "on-failure"}
    with fleetctl.cluster(members(crash=spec)) as c:
        starts_file = os.path.join(c.runtime_dir, "crash", "starts")
        wait_until(lambda: "restarting at" in c.status("crash").error)
        status = c.status("crash")
        assert status.state == MemberState.ERROR and status.exit_code == 3
        assert re.search(r"exited with code 3; restarting at \d\d:\d\d:\d\d$", status.error)
        with open(starts_file) as f:
            assert len(f.read().split()) >= max(2, status.restarts)
        with pytest.raises(MemberFailed, match="exited with code 3"):
            c.wait_running(timeout=10)


def test_a_failed_members_error_ends_with_what_it_printed_last() -> None:
    script = "echo starting; echo one >&2; echo 'boom: DATABASE_URL not set' >&2; exit 3"
    crash = {"command": ["sh", "-c", script], "ready": "log:^ready$"}
    with fleetctl.cluster(members(crash=crash)) as c, pytest.raises(MemberFailed) as failed:
        c.wait_running(timeout=10)
    assert failed.value.message.endswith(
        "exited with code 3 before it was ready; stderr: one | boom: DATABASE_URL not set; "
        "stdout: starting"
    ), failed.value.message


def test_a_restarted_members_error_says_what_its_last_run_printed_only() -> None:
    script = "n=$(cat {dir}/runs 2>/dev/null || echo 0); echo $((n+1)) > {dir}/runs; "
    script += "echo run $((n+1)) >&2; exit 3"
    spec = {"command": ["sh", "-c", script], "restart": "on-failure"}
    with fleetctl.cluster(members(crash=spec)) as c:
        wait_until(lambda: c.status("crash").restarts >= 2 and "stderr" in c.status("crash").error)
        error = c.status("crash").error
    run = re.search(r"stderr: run (\d+)", error)
    assert run is not None and "|" not in error.split("stderr: ")[1], error


def test_a_member_stopped_for_its_start_timeout_says_what_it_printed_last() -> None:
    spec = {
        "command": ["sh", "-c", "echo still loading >&2; exec sleep 60"],
        "ready": "log:^ready$",
        "start_timeout": "0.5s",
    }
    with fleetctl.cluster(members(slow=spec)) as c, pytest.raises(MemberFailed) as failed:
        c.wait_running(timeout=10)
    assert "not ready within 0.5s; stderr: still loading" in failed.value.message


def test_an_env_file_is_read_at_start_under_the_members_env(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("FROM_FILE=file\nBOTH=file\n")
    spec = {
        "command": ["sh", "-c", "echo $FROM_FILE $BOTH; exec sleep 60"],
        "env_file": str(env_file),
        "env": {"BOTH": "env"},
        "ready": "log:^file env$",
    }
    with fleetctl.cluster(members(m=spec)) as c:
        c.wait_running(timeout=10)


def test_a_missing_env_file_fails_the_start_naming_it(tmp_path: Path) -> None:
    spec = {"command": ["sleep", "60"], "env_file": str(tmp_path / "missing.env")}
    with fleetctl.cluster(members(m=spec)) as c, pytest.raises(MemberFailed) as failed:
        c.wait_running(timeout=10)
    assert f"env_file: No such file or directory: '{tmp_path}/missing.env'" in failed.value.message


def test_a_missing_cwd_fails_the_start_naming_it(tmp_path: Path) -> None:
    spec = {"command": ["sleep", "60"], "cwd": str(tmp_path / "gone")}
    with fleetctl.cluster(members(m=spec)) as c, pytest.raises(MemberFailed) as failed:
        c.wait_running(timeout=10)
    assert f"cwd: No such file or directory: '{tmp_path}/gone'" in failed.value.message


def test_a_killed_member_is_restarted_with_a_new_pid() -> None:
    with fleetctl.cluster(members(s={"command": SLEEPER, "restart": "on-failure"})) as c:
        first = c.wait_running()["s"]
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: c.status("s").restarts == 1 and c.status("s").pid is not None)
        again = c.wait_running()["s"]
        assert again.pid != first.pid and again.exit_code == -9 and alive(again.pid)


def test_a_missing_program_is_an_error_with_the_os_error_and_backs_off() -> None:
    spec = {"command": ["fleet-no-such-program"], "restart": "always"}
    with fleetctl.cluster(members(ghost=spec)) as c:
        with pytest.raises(MemberFailed, match="No such file or directory"):
            c.wait_running(timeout=10)
        # Between a backoff's end and the failed spawn the error has no restart time yet.
        wait_until(lambda: "restarting at" in c.status("ghost").error)
        wait_until(lambda: c.status("ghost").restarts >= 2)
        status = c.status("ghost")
        assert status.state == MemberState.ERROR and "fleet-no-such-program" in status.error


def test_a_member_ignoring_sigterm_is_killed_after_stop_timeout() -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('up', flush=True); time.sleep(60)"
    )
    spec = {"command": ["python3", "-c", stubborn], "ready": "log:up", "stop_timeout": "500ms"}
    with fleetctl.cluster(members(stubborn=spec, other={"command": SLEEPER})) as c:
        c.wait_running(timeout=10)
        started = time.monotonic()
        stopped = c.stop("stubborn")
        assert time.monotonic() - started >= 0.5  # SIGKILL only once stop_timeout passed
        assert stopped.state == MemberState.STOPPED and stopped.exit_code == -signal.SIGKILL


def test_shell_metacharacters_are_passed_literally() -> None:
    args = ["$HOME; touch pwned", "`id`", "*", "a b", "'q'", "{name}", "{unknown}"]
    spec = {"command": ["python3", "-c", PRINT_ARGS, *args], "cwd": "{dir}"}
    with fleetctl.cluster(members(lit=spec)) as c:
        wait_until(lambda: c.logs("lit").endswith("\n"))
        expected = [*args[:5], "lit", "{unknown}"]
        assert c.logs("lit") == repr(expected) + "\n"
        assert not os.path.exists(os.path.join(c.runtime_dir, "lit", "pwned"))


def test_members_get_their_identity_and_peers() -> None:
    show = "echo $FLEET_MEMBER $FLEET_CLUSTER $FLEET_PEERS $NOTIFY_SOCKET $GREETING; exec sleep 60"
    spec = {"command": ["sh", "-c", show], "env": {"GREETING": "hi-{name}"}, "ready": "log:hi"}
    with fleetctl.cluster(
        members(web={"command": HTTP, "ready": "tcp"}, me=spec), name="crew"
    ) as c:
        c.wait_running(timeout=20)
        name, cluster, peers, notify, greeting = c.logs("me").split()
        assert (name, cluster, greeting) == ("me", "crew", "hi-me")
        assert peers == f"web={c.address('web')}"
        assert notify == os.path.join(c.runtime_dir, "notify")


def test_the_first_member_to_start_sees_every_sibling_after_it() -> None:
    show = ["sh", "-c", "echo peers=$FLEET_PEERS; exec sleep 60"]
    with fleetctl.cluster(
        members(
            first={"command": show, "ready": "log:peers"},
            b={"command": SLEEPER},
            c={"command": SLEEPER},
        )
    ) as c:
        c.wait_running(timeout=20)
        line = c.logs("first").strip()
        assert sorted(line.removeprefix("peers=").split(",")) == ["b=", "c="]


def test_members_given_ports_at_once_get_distinct_ports() -> None:
    sleeper = {"command": SLEEPER, "env": {"PORT": "{port}"}, "ready": "none"}
    with fleetctl.cluster(members(**{f"m{i}": sleeper for i in range(100)})) as c:
        addresses = [status.address for status in c.wait_running().values()]
        assert len(set(addresses)) == 100


def test_a_member_added_to_a_live_cluster_sees_its_peers() -> None:
    with fleetctl.cluster(
        members(web={"command": HTTP, "ready": "tcp"}, s={"command": SLEEPER})
    ) as c:
        c.wait_running(timeout=20)
        show = ["sh", "-c", "echo peers=$FLEET_PEERS; exec sleep 60"]
        added = c.add({"name": "late", "command": show, "ready": "log:peers"}, sibling="s")
        assert added.state == MemberState.RUNNING
        line = c.logs("late").strip()
        assert sorted(line.removeprefix("peers=").split(",")) == sorted(
            [f"web={c.address('web')}", "s="]
        )
        with pytest.raises(InvalidRequest, match="already in cluster"):
            c.add({"name": "late", "command": SLEEPER})


def test_stopping_one_member_leaves_its_siblings_running() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER}, b={"command": SLEEPER})) as c:
        running = c.wait_running()
        stopped = c.stop("a")
        assert stopped.state == MemberState.STOPPED and not alive(running["a"].pid or 0)
        wait_until(lambda: not os.path.exists(member_socket_path(c.runtime_dir, "a")))
        assert c.status("b").state == MemberState.RUNNING and alive(running["b"].pid or 0)
        assert c.status("a").state == MemberState.STOPPED
        assert c.status("nobody").state == MemberState.ABSENT
        with pytest.raises(Absent):
            c.wait_running(["nobody"])


def test_every_members_status_comes_in_one_answer_stopped_ones_included() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER}, b={"command": SLEEPER})) as c:
        c.wait_running()
        with closing(connect(member_socket_path(c.runtime_dir, "b"))) as sock:
            answer = raw_request(sock, encode(StatusAll(id=1)))
        assert answer["ok"]
        result = msgspec.json.decode(answer["result"], type=WatchResult)
        assert [status.name for status in result.members] == ["a", "b"]
        c.stop("a")
        everyone = c.status()
        assert list(everyone) == ["a", "b"]
        assert everyone["a"].state == MemberState.STOPPED
        assert everyone["b"].state == MemberState.RUNNING


def statuses(*names: str, state: MemberState = MemberState.RUNNING) -> list[MemberStatus]:
    return [MemberStatus(name=name, state=state) for name in names]


def test_an_answer_of_every_member_is_taken_in_the_order_known() -> None:
    known = {status.name: status for status in statuses("a", "b", "c", state=MemberState.STARTING)}
    every = answered_all(known, statuses("c", "a", "b"))
    assert every is not None
    assert list(every) == ["a", "b", "c"]
    assert {status.state for status in every.values()} == {MemberState.RUNNING}


@pytest.mark.parametrize("answer", [["a", "b"], ["a", "b", "c", "d"], ["a", "b", "d"]])
def test_an_answer_missing_a_member_known_or_with_another_is_not_taken(answer: list[str]) -> None:
    known = {status.name: status for status in statuses("a", "b", "c")}
    assert answered_all(known, statuses(*answer)) is None


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_holder_stops_polling_once_requests_stop() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER})) as c:
        c.wait_running()
        assert c.holder_pid is not None
        for _ in range(2000):
            c.status("a")
        time.sleep(0.05)
        before = cpu_ticks(c.holder_pid)
        time.sleep(1.0)
        assert cpu_ticks(c.holder_pid) - before <= 1, "an idle holder kept using the CPU"


def test_the_holder_exits_when_its_last_member_leaves(tempdir: str) -> None:
    with fleetctl.cluster(members(only={"command": SLEEPER}), runtime_dir=tempdir) as c:
        c.wait_running()
        c.stop("only")
        holder = c.holder_pid
        assert holder is not None
        wait_until(lambda: not alive(holder))
        assert c.status("only").state == MemberState.STOPPED  # from its state file


def test_two_clusters_live_side_by_side() -> None:
    same = members(a={"command": SLEEPER}, b={"command": SLEEPER})
    with fleetctl.cluster(same, name="one") as one, fleetctl.cluster(same, name="two") as two:
        pids_one, pids_two = member_pids(one), member_pids(two)
        assert one.holder_pid != two.holder_pid and not set(pids_one) & set(pids_two)
        one.stop("a")
        assert two.wait_running()["a"].state == MemberState.RUNNING
    assert not any(alive(pid) for pid in pids_one + pids_two)


# --- lifetimes ------------------------------------------------------------------------------

CLIENT = textwrap.dedent(
    """
    import json, sys, time, fleetctl
    with fleetctl.cluster({"members": {"a": {"command": ["sleep", "60"]},
                                       "b": {"command": ["sleep", "60"]}}}) as c:
        c.wait_running()
        pids = [s.pid for s in c.status().values()]
        print(json.dumps({"holder": c.holder_pid, "members": pids, "dir": c.runtime_dir}),
              flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def bound_client() -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """A separate process holding a bound cluster, and what it reported about it."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert client.stdout is not None
        yield client, json.loads(client.stdout.readline())
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()


def test_a_sigkilled_client_takes_its_holder_and_members_along(
    bound_client: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    client, report = bound_client
    pids = [report["holder"], *report["members"]]  # type: ignore[list-item]
    assert all(alive(pid) for pid in pids)
    client.kill()
    client.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids))
    wait_until(lambda: not os.path.exists(str(report["dir"])))


def test_a_sigkilled_holder_leaves_no_member() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER}, b={"command": SLEEPER})) as c:
        pids = member_pids(c)
        assert c.holder_pid is not None
        os.kill(c.holder_pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in pids))
        with pytest.raises(fleetctl.ConnectionLost):
            c.wait_running()


def raw_request(sock: socket.socket, frame: bytes) -> dict[str, object]:
    sock.sendall(frame)
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(65536)
    response = decode_response(data[:-1])
    return {"ok": response.ok, "error": response.error, "result": response.result}


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_a_bind_with_another_protocol_version_is_refused() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER})) as c:
        with closing(connect(member_socket_path(c.runtime_dir, "a"))) as sock:
            answer = raw_request(sock, encode(Bind(id=1, version=999, pid=os.getpid())))
        assert not answer["ok"] and answer["error"].code == Incompatible.code  # type: ignore[union-attr]
        time.sleep(0.2)
        assert c.status("a").state == MemberState.RUNNING


def test_connections_closed_before_the_ack_tear_nothing_down() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER})) as c:
        path = member_socket_path(c.runtime_dir, "a")
        connect(path).close()  # a probe
        with closing(connect(path)) as sock:  # a dial that gives up mid-handshake
            assert raw_request(sock, encode(Bind(id=1, version=1, pid=os.getpid())))["ok"]
        with closing(connect(path)) as sock:
            assert not raw_request(sock, encode(Ack(id=1)))["ok"]  # ack without bind
        time.sleep(0.3)
        assert c.status("a").state == MemberState.RUNNING and alive(c.holder_pid or 0)


def test_a_second_acked_connection_closing_stops_the_cluster() -> None:
    with fleetctl.cluster(members(a={"command": SLEEPER})) as c:
        pid = c.wait_running()["a"].pid or 0
        with closing(connect(member_socket_path(c.runtime_dir, "a"))) as sock:
            assert raw_request(sock, encode(Bind(id=1, version=1, pid=os.getpid())))["ok"]
            assert raw_request(sock, encode(Ack(id=2)))["ok"]
            assert raw_request(sock, encode(Status(id=3)))["ok"]
        wait_until(lambda: not alive(pid) and not alive(c.holder_pid or 0))


def test_a_socket_path_over_the_limit_fails_clearly() -> None:
    too_deep = "/tmp/" + "d" * 100
    defs = members(a={"command": SLEEPER})
    with (
        pytest.raises(InvalidRequest, match="107-byte limit"),
        fleetctl.cluster(defs, runtime_dir=too_deep),
    ):
        pass


def test_the_holder_refuses_a_bad_spec_file(tempdir: str) -> None:
    spec = os.path.join(tempdir, "spec.json")
    with open(spec, "w") as f:
        f.write('{"name": "x", "members": [{"name": "Bad Name", "command": ["x"]}]}')
    result = subprocess.run(
        [sys.executable, "-m", "fleetd.holder", f"--spec={spec}", f"--dir={tempdir}/rt"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "invalid member name 'Bad Name'" in result.stderr


async def test_the_async_form() -> None:
    async with fleetctl.cluster(
        members(a={"command": SLEEPER}, w={"command": HTTP, "ready": "tcp"})
    ) as c:
        statuses = await c.wait_running(timeout=20)
        assert set(statuses) == {"a", "w"}
        assert (await c.status("a")).state == MemberState.RUNNING
        await c.stop("a")
        with anyio.fail_after(5):
            assert (await c.status())["a"].state == MemberState.STOPPED
        with pytest.raises(MemberFailed, match="'a' failed: it is stopped"):  # as fleetd's wait
            await c.wait_running(["a"], timeout=20)


# --- pieces ---------------------------------------------------------------------------------


CHATTY = "import time\nwhile True:\n    print('x' * 1000, flush=True)\n    time.sleep(0.001)"


def test_a_full_disk_under_the_logs_stops_no_member_and_not_the_holder(tempdir: str) -> None:
    runtime_dir = os.path.join(tempdir, "small")
    os.makedirs(runtime_dir)
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", runtime_dir]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True, check=False)
    if not mounted or mounted.returncode != 0:
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        chatty = {"command": [sys.executable, "-c", CHATTY]}
        definitions = members(chatty=chatty, quiet={"command": SLEEPER})
        with fleetctl.cluster(definitions, runtime_dir=runtime_dir) as c:
            c.wait_running()
            wait_until(lambda: os.statvfs(runtime_dir).f_bavail == 0)
            assert c.status("chatty").state == MemberState.RUNNING
            assert c.stop("quiet").state == MemberState.STOPPED  # a state change, on a full disk
            assert c.status("chatty").state == MemberState.RUNNING
    finally:
        subprocess.run(["umount", "-l", runtime_dir], check=False)


def test_is_running_never_trusts_a_pid_alone(tempdir: str) -> None:
    pidfile = os.path.join(tempdir, "pid")
    with open(pidfile, "wb") as f:
        f.write(pidfile_text(os.getpid()))
    assert is_running(pidfile)
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()} {(process_start_time(os.getpid()) or 0) + 1}\n")
    assert not is_running(pidfile), "a recycled pid (other start time) passed"
    with open(pidfile, "w") as f:
        f.write("999999999 1\n")
    assert not is_running(pidfile)
    with open(pidfile, "w") as f:
        f.write("garbage")
    assert not is_running(pidfile)
    assert not is_running(os.path.join(tempdir, "missing"))


def test_log_files_are_capped_and_rotated_once(tempdir: str) -> None:
    path = os.path.join(tempdir, "out.log")
    with PrivateDir.open(tempdir) as directory:
        log = LogFile(directory, "out.log", max_bytes=10)
        assert not os.path.exists(path)
        for chunk in (b"12345", b"67890", b"abc", b"defghijkl", b"z"):
            log.write(chunk)
        log.close()
    with open(path, "rb") as f, open(path + ".1", "rb") as g:
        assert (g.read(), f.read()) == (b"abc", b"defghijklz")


def test_log_readiness_sees_whole_lines_across_chunks_and_streams() -> None:
    matcher = LineMatcher(r"^ready on \d+$")
    assert not matcher.feed(1, b"rea")
    assert not matcher.feed(2, b"dy on 80\n")  # another stream: not the same line
    assert not matcher.feed(1, b"dy on 80")
    assert matcher.feed(1, b"80\n")


@pytest.mark.parametrize("module", ["fleetctl.bound", "fleetctl.pytest_plugin", "protocol.members"])
def test_the_library_never_imports_fleetd(module: str) -> None:
    from tests.test_layering import modules_after, top_level

    loaded = top_level(modules_after(f"import {module}"))
    assert "fleetd" not in loaded
    if module.startswith("protocol"):
        assert not loaded & {"anyio", "socket", "asyncio", "structlog"}


_CRASHING_SPAWNER = """
import fleetd.holder.spawn

_spawn = fleetd.holder.spawn.Spawner.spawn


def spawn(self, argv, *args, **kwargs):
    if "crash-me" in argv:
        raise RuntimeError("a bug in spawning")
    return _spawn(self, argv, *args, **kwargs)


fleetd.holder.spawn.Spawner.spawn = spawn
"""


def patch_holders(tempdir: str, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Holders started from now on run `source` first (as their sitecustomize)."""
    with open(os.path.join(tempdir, "sitecustomize.py"), "w") as f:
        f.write(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tempdir, *sys.path]))


def test_a_failure_inside_supervision_puts_that_member_in_error(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in supervising one member (here: its spawn raises in the holder) makes that
    member `error`, with the exception's text; its siblings keep running, and no wait
    reports it running."""
    patch_holders(tempdir, monkeypatch, _CRASHING_SPAWNER)
    defs = members(bad={"command": ["sleep", "60", "crash-me"]}, good={"command": SLEEPER})
    with fleetctl.cluster(defs) as c:
        with pytest.raises(MemberFailed, match="supervision failed: RuntimeError: a bug"):
            c.wait_running()
        assert c.status("bad").state == MemberState.ERROR
        wait_until(lambda: c.status("good").state == MemberState.RUNNING)


def test_a_link_planted_as_a_members_directory_is_refused(tempdir: str) -> None:
    runtime_dir, victim = os.path.join(tempdir, "rt"), os.path.join(tempdir, "victim")
    os.mkdir(runtime_dir, 0o700)
    os.mkdir(victim, 0o755)
    os.symlink(victim, os.path.join(runtime_dir, "bad"))
    defs = members(bad={"command": ["sh", "-c", "echo hi; sleep 60"]}, good={"command": SLEEPER})
    with fleetctl.cluster(defs, runtime_dir=runtime_dir) as c:
        with pytest.raises(MemberFailed, match="is a symbolic link"):
            c.wait_running()
        wait_until(lambda: c.status("good").state == MemberState.RUNNING)
    assert os.listdir(victim) == []


def test_a_runtime_directory_others_may_write_is_refused(tempdir: str) -> None:
    runtime_dir = os.path.join(tempdir, "open")
    os.mkdir(runtime_dir)
    os.chmod(runtime_dir, 0o777)
    cluster = fleetctl.cluster(members(a={"command": SLEEPER}), runtime_dir=runtime_dir)
    with pytest.raises(FleetError, match="writable by group or others"), cluster:
        pytest.fail("the holder served a directory others may write")


_COUNTING_PIDS = """
import os
import fleetd.holder.program

_member_changed = fleetd.holder.program.Holder.member_changed


def member_changed(self, member):
    _member_changed(self, member)
    with open(os.environ["FLEET_TEST_PIDS"], "a") as f:
        f.write(f"{len(self._by_pid)}\\n")


fleetd.holder.program.Holder.member_changed = member_changed
"""


def test_a_crash_looping_member_leaves_no_pid_of_its_past_runs_in_the_holder(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder maps live pids to members (to attribute sd_notify messages): a restart
    replaces the entry, it does not add one."""
    counts = os.path.join(tempdir, "pids")
    monkeypatch.setenv("FLEET_TEST_PIDS", counts)
    patch_holders(tempdir, monkeypatch, _COUNTING_PIDS)
    crash = {"command": ["sh", "-c", "exit 3"], "restart": "on-failure"}
    with fleetctl.cluster(members(crash=crash, steady={"command": SLEEPER})) as c:
        wait_until(lambda: c.status("crash").restarts >= 5)
        with open(counts) as f:
            assert max(int(line) for line in f) <= 2  # the crashing one's and the steady one's


_BREAKING_CONNECTIONS = """
import os
import fleetd.holder.program

_admit = fleetd.holder.program.admit


async def admit(stream):
    if os.path.exists(os.environ["FLEET_TEST_BREAK"]):
        raise RuntimeError("a bug in a connection")
    return await _admit(stream)


fleetd.holder.program.admit = admit
"""


def test_a_bug_in_one_connection_is_logged_with_its_traceback_and_harms_no_other(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = os.path.join(tempdir, "break")
    monkeypatch.setenv("FLEET_TEST_BREAK", switch)
    patch_holders(tempdir, monkeypatch, _BREAKING_CONNECTIONS)
    with fleetctl.cluster(members(a={"command": SLEEPER})) as c:
        c.wait_running()
        open(switch, "w").close()
        with closing(connect(member_socket_path(c.runtime_dir, "a"))) as sock:
            assert sock.recv(1) == b""  # the holder dropped it
        os.unlink(switch)
        assert c.status("a").state == MemberState.RUNNING
        with closing(connect(member_socket_path(c.runtime_dir, "a"))) as sock:
            assert raw_request(sock, encode(Status(id=1)))["ok"]
        with open(os.path.join(c.runtime_dir, HOLDER_LOG)) as f:
            failures = [line for line in f if "connection_failed" in line]
        assert len(failures) == 1
        assert "Traceback (most recent call last)" in failures[0]
        assert "RuntimeError: a bug in a connection" in failures[0]

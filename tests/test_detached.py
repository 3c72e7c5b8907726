"""Detached clusters under a real fleetd: up, status, wait, stop, add, down, and re-adoption of
live holders (and clean-up of dead ones) when fleetd starts again.

A detached holder is a session leader that outlives fleetd on purpose, so every test here ends
by stopping the holders it started (the `holders` fixture), whatever state fleetd is in.
"""

import json
import os
import signal
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import pytest

from fleetctl.cli import run
from fleetctl.sync import SyncClient
from fleetd.members import is_running, read_pidfile
from protocol.errors import Absent, InvalidRequest, MemberFailed
from protocol.members import HOLDER_PIDFILE, MemberState, member_socket_path
from tests.processes import Fleetd, fleetctl

HTTP = '["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]'
PEERS = '["sh", "-c", "echo peers=$FLEET_PEERS; exec sleep 60"]'


def definition(name: str, **members: str) -> str:
    """A fleet.toml: each member's command (a TOML array) and readiness in one string."""
    tables = [f'name = "{name}"']
    for member, body in members.items():
        tables.append(f"[members.{member}]\n{body}")
    return "\n".join(tables) + "\n"


WEB = definition("web", a=f'command = {HTTP}\nready = "tcp"', b=f'command = {HTTP}\nready = "tcp"')


def runtime_root(daemon: Fleetd) -> str:
    return os.path.join(daemon.root, "c")


def holder_pidfiles(daemon: Fleetd) -> list[str]:
    root = runtime_root(daemon)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, name, HOLDER_PIDFILE) for name in os.listdir(root)]


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether `pid` exited within `timeout` (a pidfd, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        import select

        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def kill_holders(daemon: Fleetd) -> None:
    """SIGTERM every live holder of this fleetd's runtime root (it stops its members), SIGKILL
    its session if it does not go."""
    for pidfile in holder_pidfiles(daemon):
        if not is_running(pidfile):
            continue
        pid, _ = read_pidfile(pidfile)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 10.0):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def holders(fleetd: Fleetd) -> Iterator[Fleetd]:
    """fleetd, and at the end no holder of it left running (holders outlive fleetd)."""
    try:
        yield fleetd
    finally:
        kill_holders(fleetd)


def write(daemon: Fleetd, name: str, text: str) -> str:
    path = os.path.join(daemon.root, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def ctl(daemon: Fleetd, *args: str) -> tuple[int, str, str]:
    done = fleetctl(*args, env=daemon.env)
    return done.returncode, done.stdout, done.stderr


def client(daemon: Fleetd) -> SyncClient:
    return SyncClient(daemon.socket_path, timeout=10)


def statuses(daemon: Fleetd, *names: str) -> dict[str, dict[str, object]]:
    _, out, _ = ctl(daemon, "--json", "status", *names)
    members = json.loads(out)["members"]
    return {f"{m.get('cluster', '')}/{m['name']}": m for m in members}


def up(daemon: Fleetd, text: str, *args: str) -> dict[str, Any]:
    code, out, err = ctl(daemon, "--json", "up", "-f", write(daemon, "fleet.toml", text), *args)
    assert code == 0, (out, err, daemon.log()[-3000:])
    envelope: dict[str, Any] = json.loads(out)
    return envelope


# --- the tests ----------------------------------------------------------------------------


def test_up_wait_status_stop_down(holders: Fleetd) -> None:
    envelope = up(holders, WEB, "--wait", "--timeout", "20s")
    assert envelope["outcome"] == "acquired" and envelope["cluster"] == "web"
    try:
        running = statuses(holders)
        assert {k: v["state"] for k, v in running.items()} == {
            "web/a": "running",
            "web/b": "running",
        }
        for member in running.values():
            with urllib.request.urlopen(f"http://{member['address']}/", timeout=5) as page:
                assert page.status == 200
        code, table, _ = ctl(holders, "status")
        assert code == 0
        assert table.splitlines()[0].split() == [
            "MEMBER",
            "STATE",
            "PID",
            "RESTARTS",
            "ADDRESS",
            "ERROR",
        ]
        assert any(line.split()[:2] == ["web/a", "running"] for line in table.splitlines())

        code, out, _ = ctl(holders, "--json", "stop", "b")
        assert code == 0 and json.loads(out)["members"][0]["state"] == "stopped"
        after = statuses(holders, "a", "b")
        assert (
            after["web/a"]["state"] == "running"
            and after["web/a"]["pid"] == running["web/a"]["pid"]
        )
        assert after["web/b"]["state"] == "stopped"
        assert not os.path.exists(member_socket_path(str(envelope["runtime_dir"]), "b"))
    finally:
        code, out, _ = ctl(holders, "--json", "down", "web")
    assert code == 0 and json.loads(out)["outcome"] == "released"
    assert statuses(holders, "a")["web/a"]["state"] == "stopped"
    assert ctl(holders, "--json", "down", "web")[0] == 0  # already_released
    assert not any(is_running(p) for p in holder_pidfiles(holders))


def test_wait_times_out_with_13_and_returns_early_on_error(holders: Fleetd) -> None:
    never = 'command = ["sleep", "60"]\nready = "log:never printed"\nstart_timeout = "1m"'
    failing = 'command = ["sh", "-c", "echo boom >&2; exit 3"]'
    up(holders, definition("slow", never=never, bad=failing))
    try:
        started = time.monotonic()
        code, out, _ = ctl(holders, "--json", "wait", "never", "--timeout", "0.5s")
        assert code == 13 and json.loads(out)["outcome"] == "timeout"
        code, out, _ = ctl(holders, "--json", "wait", "never", "bad", "--timeout", "20s")
        assert code == 1, out
        assert "bad" in json.loads(out)["error"]["message"]
        assert time.monotonic() - started < 10
    finally:
        ctl(holders, "down", "slow")


def test_idempotent_up_and_contested(holders: Fleetd) -> None:
    first = up(holders, WEB)
    try:
        again = up(holders, WEB, "--idempotent")
        assert again["outcome"] == "already_acquired"
        assert again["holder_pid"] == first["holder_pid"]
        path = write(holders, "fleet.toml", WEB)
        code, out, _ = ctl(holders, "--json", "up", "-f", path)
        assert code == 12 and json.loads(out)["outcome"] == "contested"
        other = WEB.replace('ready = "tcp"', 'ready = "none"', 1)
        code, out, _ = ctl(
            holders, "--json", "up", "-f", write(holders, "o.toml", other), "--idempotent"
        )
        assert code == 12 and "another definition" in json.loads(out)["error"]["message"]
    finally:
        ctl(holders, "down", "web")


def test_unknown_member_is_absent_exit_11(holders: Fleetd) -> None:
    for args in (["status", "nope"], ["stop", "nope"], ["logs", "nope"], ["down", "nope"]):
        code, out, _ = ctl(holders, "--json", *args)
        assert code == 11, (args, out)
        assert json.loads(out)["outcome"] == "absent"


def test_add_member_sees_its_peers(holders: Fleetd) -> None:
    peers = f'command = {PEERS}\nready = "none"'
    up(holders, definition("p", a=peers, b=peers))
    try:
        code, out, _ = ctl(holders, "--json", "add", "c", "--sibling", "a", "--wait")
        assert code == 0, out
        assert json.loads(out)["members"][0]["state"] == "running"
        with client(holders) as c:
            assert [s.state for s in c.member_status(["p/c"])] == [MemberState.RUNNING]
            log_path = c.member_logs("c").stdout
        deadline = time.monotonic() + 10
        text = ""
        while "peers=" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = ctl(holders, "logs", "c")[1]
        line = next(line for line in text.splitlines() if line.startswith("peers="))
        assert sorted(p.split("=")[0] for p in line[len("peers=") :].split(",")) == ["a", "b"]
        assert log_path.endswith("c/stdout.log")
        extra = write(holders, "extra.toml", definition("x", tmpl='command = ["sleep", "60"]'))
        code, out, _ = ctl(
            holders, "--json", "add", "d", "--sibling", "b", "-f", extra, "--member", "tmpl"
        )
        assert code == 0, out
        assert set(statuses(holders)) == {"p/a", "p/b", "p/c", "p/d"}
    finally:
        ctl(holders, "down", "p")


def test_fleetd_killed_and_restarted_readopts_without_restarting(holders: Fleetd) -> None:
    envelope = up(holders, WEB, "--wait", "--timeout", "20s")
    try:
        before = statuses(holders)
        holders.signal(signal.SIGKILL)
        holders.wait()
        holders.start()
        after = statuses(holders)
        assert after == before
        assert all(m["holder_pid"] == envelope["holder_pid"] for m in after.values())
        assert all(m.get("restarts", 0) == 0 for m in after.values())
        with client(holders) as c:  # the re-adopted watch still delivers changes
            assert c.member_stop("web/b").state == MemberState.STOPPED
            assert c.member_status(["b"])[0].state == MemberState.STOPPED
        holders.signal(signal.SIGTERM)  # a clean stop of fleetd leaves holders running too
        assert holders.wait() == 0
        assert wait_gone(int(envelope["holder_pid"]), 0.2) is False
        holders.start()
        assert statuses(holders, "a")["web/a"]["pid"] == before["web/a"]["pid"]
    finally:
        code, _, _ = ctl(holders, "down", "web")
    assert code == 0


def test_holder_killed_while_fleetd_was_down_is_cleaned_up(holders: Fleetd) -> None:
    envelope = up(holders, WEB, "--wait", "--timeout", "20s")
    runtime_dir = str(envelope["runtime_dir"])
    holders.signal(signal.SIGKILL)
    holders.wait()
    os.kill(int(envelope["holder_pid"]), signal.SIGKILL)
    assert wait_gone(int(envelope["holder_pid"]), 5)
    holders.start()  # journals it exited; its start-up gc then collects what it left
    assert {m["state"] for m in statuses(holders, "a", "b").values()} == {"absent"}
    assert statuses(holders) == {}
    assert not os.path.exists(runtime_dir)
    code, out, _ = ctl(holders, "--json", "down", "web")
    assert code == 11 and json.loads(out)["outcome"] == "absent"
    with client(holders) as c, pytest.raises(Absent):
        c.member_stop("nope")


def test_two_clusters_side_by_side(holders: Fleetd) -> None:
    sleeper = 'command = ["sleep", "60"]'
    up(holders, definition("one", web=sleeper, x=sleeper))
    try:
        up(holders, definition("two", web=sleeper))
        with client(holders) as c:
            c.member_wait(["one/web", "two/web", "x"], 10)
            with pytest.raises(InvalidRequest, match="CLUSTER/web"):
                c.member_status(["web"])
            assert c.cluster_down("one").outcome == "released"
            assert c.member_status(["two/web"])[0].state == MemberState.RUNNING
            with pytest.raises(MemberFailed):
                c.member_wait(["one/web"], 5)
    finally:
        ctl(holders, "down", "one")
        ctl(holders, "down", "two")


def test_definition_errors_are_clear(holders: Fleetd) -> None:
    bad = textwrap.dedent(
        """\
        [members.a]
        command = ["sleep", "60"]
        colour = "red"
        """
    )
    code, out, _ = ctl(holders, "--json", "up", "-f", write(holders, "bad.toml", bad))
    assert code == 1 and "colour" in json.loads(out)["error"]["message"]
    long_name = "m" * 60
    deep = definition("d" * 60, **{long_name: 'command = ["sleep", "60"]'})
    code, out, _ = ctl(holders, "--json", "up", "-f", write(holders, "deep.toml", deep))
    assert code == 1 and "107" in json.loads(out)["error"]["message"], out


# --- the pure core ------------------------------------------------------------------------


def test_decide_up() -> None:
    from fleetd.holders import decide_up
    from protocol.definitions import ClusterSpec, MemberSpec
    from protocol.outcomes import Outcome

    spec = ClusterSpec(name="c", members=[MemberSpec(name="a", command=["true"])])
    other = ClusterSpec(name="c", members=[MemberSpec(name="a", command=["false"])])
    assert decide_up(None, spec, idempotent=False) is Outcome.ACQUIRED
    assert decide_up(spec, spec, idempotent=True) is Outcome.ALREADY_ACQUIRED
    assert decide_up(spec, spec, idempotent=False) is Outcome.CONTESTED
    assert decide_up(spec, other, idempotent=True) is Outcome.CONTESTED


def test_resolve_names() -> None:
    from fleetd.holders import resolve

    clusters = {"one": ["web", "db"], "two": ["web"]}
    assert resolve("db", clusters) == ("one", "db")
    assert resolve("two/web", clusters) == ("two", "web")
    assert resolve("nope", clusters) is None
    assert resolve("two/db", clusters) is None
    with pytest.raises(InvalidRequest, match="one, two"):
        resolve("web", clusters)
    with pytest.raises(InvalidRequest, match="invalid member name"):
        resolve("Bad Name", clusters)


def test_holder_env_drops_what_systemd_meant_for_fleetd() -> None:
    from fleetd.holders import holder_env

    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/n", "LISTEN_FDS": "1", "WATCHDOG_USEC": "5"}
    assert holder_env(environ) == {"PATH": "/bin"}


def test_wait_verdict() -> None:
    from fleetd.holders import wait_verdict
    from protocol.members import MemberStatus

    def s(state: MemberState, error: str = "") -> MemberStatus:
        return MemberStatus(name="m", state=state, error=error)

    assert wait_verdict({"a": s(MemberState.RUNNING)}) is True
    assert wait_verdict({"a": s(MemberState.RUNNING), "b": s(MemberState.STARTING)}) is False
    with pytest.raises(MemberFailed, match="exit 3"):
        wait_verdict({"a": s(MemberState.ERROR, "exit 3")})
    with pytest.raises(Absent):
        wait_verdict({"a": s(MemberState.ABSENT)})


def test_status_fast_path_prints_what_the_click_command_prints(
    holders: Fleetd, capfd: pytest.CaptureFixture[str]
) -> None:
    up(holders, definition("pair", a='command = ["sleep", "60"]', b='command = ["sleep", "60"]'))
    try:
        for names in ([], ["a"], ["pair/b", "nobody"], ["nobody"]):
            fast = fleetctl("status", *names, env=holders.env)
            code = run(["--socket", holders.socket_path, "status", *names])
            captured = capfd.readouterr()
            assert (fast.returncode, fast.stdout, fast.stderr) == (code, captured.out, captured.err)
        assert fast.returncode == 11
    finally:
        ctl(holders, "down", "pair")


# --- fleetd's registry against a scripted holder ------------------------------------------


async def test_a_push_read_with_the_watch_snapshot_is_not_undone_by_it(tempdir: str) -> None:
    """A holder sends a watch's snapshot, then a push per change: both may arrive in one read,
    and the push, being the newer, is what fleetd must keep (a member reported running is not
    set back to starting)."""
    import anyio
    import msgspec
    from anyio.abc import SocketStream

    from fleetd.dispatch import Peer
    from fleetd.holders import HolderRecord, HolderRegistry
    from fleetd.members import write_pidfile
    from fleetd.store.sqlite import SQLiteStore
    from protocol.clusters import MemberStatusRequest
    from protocol.definitions import ClusterSpec, MemberSpec
    from protocol.members import HOLDER_PIDFILE

    runtime_dir = os.path.join(tempdir, "c", "w")
    os.makedirs(runtime_dir)
    write_pidfile(os.path.join(runtime_dir, HOLDER_PIDFILE), os.getpid())  # a "live" holder

    async def holder(stream: SocketStream) -> None:
        async with stream:
            watch = json.loads(await stream.receive())
            starting = {"members": [{"name": "m", "state": "starting"}]}
            frames = [
                {"id": watch["id"], "ok": True, "result": starting},
                {"id": watch["id"], "ok": True, "result": {"name": "m", "state": "running"}},
            ]
            await stream.send(b"".join(json.dumps(frame).encode() + b"\n" for frame in frames))
            await anyio.sleep_forever()

    spec = ClusterSpec(name="w", members=[MemberSpec(name="m", command=["true"])])
    pid, start_time = read_pidfile(os.path.join(runtime_dir, HOLDER_PIDFILE))
    record = HolderRecord(
        spec=spec, dir=runtime_dir, log="", pid=pid, start_time=start_time, state="live"
    )
    listener = await anyio.create_unix_listener(member_socket_path(runtime_dir, "m"))
    async with listener, SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        await store.put("holders/w", msgspec.json.encode(record))
        registry = HolderRegistry(store, os.path.join(tempdir, "state"))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, holder)
            await tasks.start(registry.serve, tempdir)  # re-adopts it: watch, snapshot
            me = Peer(os.getpid(), os.getuid(), os.getgid())
            answer = registry.status(MemberStatusRequest(id=1, names=["m"]), me)
            assert [s.state for s in answer.members] == [MemberState.RUNNING]
            tasks.cancel_scope.cancel()

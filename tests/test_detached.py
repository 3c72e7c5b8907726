"""Detached clusters under a real fleetd: up, status, wait, stop, add, down, and re-adoption of
live holders (and clean-up of dead ones) when fleetd starts again, including holders fleetd
was still starting when it was killed.

A detached holder is a session leader that outlives fleetd on purpose, so every test here ends
by stopping the holders it started (the `holders` fixture), whatever state fleetd is in.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fleetctl.cli import run
from fleetctl.definitions import load_toml
from fleetctl.sync import SyncClient
from fleetd.clusters.records import HolderRecord
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import is_running, process_start_time, read_pidfile
from fleetd.store.sqlite import SQLiteStore
from protocol.definitions import cluster_from_dict
from protocol.errors import Absent, InvalidRequest, MemberFailed
from protocol.members import (
    CLUSTER_FILE,
    HOLDER_LOG,
    HOLDER_PIDFILE,
    MemberState,
    MemberStatus,
    member_socket_path,
    member_statefile,
)
from tests.processes import (
    FLEETCTL,
    Fleetd,
    fleetctl,
    gate_pid,
    gated_fleetd,
    holder_pidfiles,
    kill_holders,
    open_gate,
    runtime_root,
    wait_gone,
    wait_until,
)

HTTP = '["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]'
PEERS = '["sh", "-c", "echo peers=$FLEET_PEERS; exec sleep 60"]'


def definition(name: str, **members: str) -> str:
    """A fleet.toml: each member's command (a TOML array) and readiness in one string."""
    tables = [f'name = "{name}"']
    for member, body in members.items():
        tables.append(f"[members.{member}]\n{body}")
    return "\n".join(tables) + "\n"


WEB = definition("web", a=f'command = {HTTP}\nready = "tcp"', b=f'command = {HTTP}\nready = "tcp"')


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


def state(daemon: Fleetd, name: str) -> str:
    """One member's state, as `fleetctl status NAME` says."""
    (member,) = statuses(daemon, name).values()
    return str(member["state"])


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
            "UPTIME",
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


def test_every_members_status_follows_each_change(holders: Fleetd) -> None:
    sleeper = 'command = ["sleep", "60"]\nrestart = "always"'
    up(holders, definition("z", a=sleeper, b=sleeper), "--wait")
    with client(holders) as daemon:
        try:
            watch_every_members_status(daemon)
        finally:
            ctl(holders, "down", "z")


def watch_every_members_status(daemon: SyncClient) -> None:
    """Changes show in the every-member answer: a stop, then a restart's new pid."""

    def everyone() -> dict[str, MemberStatus]:
        return {s.name: s for s in daemon.member_status()}

    first = everyone()
    assert {n: s.state for n, s in first.items()} == {"a": "running", "b": "running"}
    daemon.member_stop("b")
    assert everyone()["b"].state == "stopped"
    os.kill(first["a"].pid or 0, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while everyone()["a"].pid in (None, first["a"].pid):
        assert time.monotonic() < deadline, "the restart never showed"
        time.sleep(0.02)


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
        message = json.loads(out)["error"]["message"]
        assert code == 12 and "another definition: `fleetctl apply` brings it" in message
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


# --- fleetd killed mid-launch: the holder journaled `starting` -------------------------------

STORE_FILE = "fleet.db"
"""fleetd.daemon.STORE_FILE: not imported, as importing fleetd.daemon adds its error classes to
those test_framing finds."""

SLEEPERS = definition("nap", a='command = ["sleep", "60"]', b='command = ["sleep", "60"]')


@pytest.fixture
def gated(tempdir: str) -> Iterator[Fleetd]:
    with gated_fleetd(tempdir) as daemon:
        yield daemon


def killed_mid_launch(daemon: Fleetd, text: str) -> int:
    """`fleetctl up`, and fleetd SIGKILLed while its holder waits at the gate: the holder
    runs, fleetd journaled it `starting` and never heard it was ready. Its pid."""
    path = write(daemon, "fleet.toml", text)
    with subprocess.Popen(
        [*FLEETCTL, "up", "-f", path], env=daemon.env, stdout=subprocess.PIPE, text=True
    ) as launching:
        pid = gate_pid(daemon)
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        assert launching.wait(10) != 0  # fleetd died under it
    return pid


def running_on_disk(runtime_dir: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """The members' state files once every one says running (a holder writes them)."""
    deadline = time.monotonic() + 10
    while True:
        found = {}
        for name in names:
            with suppress(OSError, ValueError), open(member_statefile(runtime_dir, name)) as f:
                found[name] = json.load(f)
        if all(found.get(name, {}).get("state") == "running" for name in names):
            return found
        assert time.monotonic() < deadline, f"members not running: {found}"
        time.sleep(0.02)


def holder_detail(daemon: Fleetd, cluster: str) -> str:
    """The holder's state as the journal has it: starting, live or exited."""
    _, out, _ = ctl(daemon, "claims", "inspect", "--kind", "holder", "--key", cluster)
    return str(json.loads(out)["claim"]["detail"])


def test_a_holder_that_started_as_fleetd_died_is_adopted_with_its_members_untouched(
    gated: Fleetd,
) -> None:
    holder_pid = killed_mid_launch(gated, SLEEPERS)
    open_gate(gated)
    on_disk = running_on_disk(os.path.join(runtime_root(gated), "nap"), ["a", "b"])
    gated.start()
    after = statuses(gated, "a", "b")
    assert {
        key: (m["state"], m["pid"], m["holder_pid"], m.get("restarts", 0))
        for key, m in after.items()
    } == {f"nap/{name}": ("running", on_disk[name]["pid"], holder_pid, 0) for name in ("a", "b")}
    assert holder_detail(gated, "nap") == "live"
    code, out, _ = ctl(gated, "--json", "down", "nap")
    assert (code, json.loads(out)["outcome"]) == (0, "released")
    assert wait_gone(holder_pid, 5)


def test_a_holder_still_starting_when_fleetd_returns_is_kept_and_adopted_once_it_serves(
    gated: Fleetd,
) -> None:
    holder_pid = killed_mid_launch(gated, SLEEPERS)
    gated.start()  # start-up gc included, while the holder has written nothing yet
    assert os.path.isdir(os.path.join(runtime_root(gated), "nap"))
    assert ctl(gated, "up", "-f", write(gated, "again.toml", SLEEPERS))[0] == 12  # it is taken
    assert state(gated, "a") == "starting"
    open_gate(gated)
    assert ctl(gated, "wait", "a", "b", "--timeout", "10s")[0] == 0
    assert {m["holder_pid"] for m in statuses(gated).values()} == {holder_pid}
    deadline = time.monotonic() + 5  # journaled live once it served (just after its members)
    while holder_detail(gated, "nap") != "live":
        assert time.monotonic() < deadline, holder_detail(gated, "nap")
        time.sleep(0.02)
    assert ctl(gated, "down", "nap")[0] == 0
    assert wait_gone(holder_pid, 5)


def test_a_starting_holder_that_dies_before_it_serves_frees_its_name(gated: Fleetd) -> None:
    holder_pid = killed_mid_launch(gated, SLEEPERS)
    gated.start()
    os.kill(holder_pid, signal.SIGKILL)
    assert wait_gone(holder_pid, 5)
    deadline = time.monotonic() + 5
    while state(gated, "a") == "starting":
        assert time.monotonic() < deadline, "fleetd did not see the holder die"
        time.sleep(0.02)
    assert state(gated, "a") == "absent"  # it never ran a member
    path = write(gated, "again.toml", SLEEPERS)
    with subprocess.Popen([*FLEETCTL, "up", "-f", path], env=gated.env) as again:
        open_gate(gated)  # its new holder waits there too
        assert again.wait(10) == 0
    assert ctl(gated, "down", "nap")[0] == 0


def refused_unavailable(daemon: Fleetd, why: str) -> None:
    """`stop` and `add` of a member whose holder fleetd cannot reach: exit 14, saying why."""
    for args in (["stop", "a"], ["add", "c", "--sibling", "a"]):
        code, out, _ = ctl(daemon, "--json", *args)
        envelope = json.loads(out)
        assert (code, envelope["outcome"]) == (14, "unavailable"), (args, out)
        assert why in envelope["error"]["message"]


def stopped_once_reachable(daemon: Fleetd, name: str) -> None:
    """`stop NAME` until fleetd reaches the holder (it retries in the background)."""
    deadline = time.monotonic() + 15
    while (done := ctl(daemon, "--json", "stop", name))[0] == 14:
        assert time.monotonic() < deadline, done
        time.sleep(0.05)
    assert done[0] == 0 and json.loads(done[1])["members"][0]["state"] == "stopped", done


def test_stop_and_add_beside_a_holder_still_starting_say_they_could_not(gated: Fleetd) -> None:
    """Stop used to answer the member's status (`starting`) as a success, stopping nothing."""
    holder_pid = killed_mid_launch(gated, SLEEPERS)
    gated.start()
    refused_unavailable(gated, "still starting")
    open_gate(gated)
    stopped_once_reachable(gated, "a")
    assert state(gated, "b") == "running"
    assert ctl(gated, "down", "nap")[0] == 0
    assert wait_gone(holder_pid, 5)


@pytest.mark.slow
def test_stop_and_add_beside_a_holder_that_does_not_answer_say_they_could_not(
    holders: Fleetd,
) -> None:
    """A holder alive but SIGSTOPped when fleetd starts: adopted all the same (after its watch
    timed out), refused `unavailable` for what needs it, and reached once it goes on."""
    holder_pid = int(up(holders, SLEEPERS, "--wait")["holder_pid"])
    member_pid = statuses(holders, "a")["nap/a"]["pid"]
    os.kill(holder_pid, signal.SIGSTOP)
    try:
        holders.signal(signal.SIGKILL)
        holders.wait()
        holders.start(timeout=30)  # adoption waits out one watch request (10 s)
        refused_unavailable(holders, "does not answer")
        assert process_start_time(int(str(member_pid))) is not None  # nothing was stopped
    finally:
        os.kill(holder_pid, signal.SIGCONT)
    stopped_once_reachable(holders, "a")
    assert ctl(holders, "down", "nap")[0] == 0
    assert wait_gone(holder_pid, 5)


@pytest.mark.parametrize("recorded", ["no pid", "a pid that is gone"])
def test_a_holder_that_never_started_is_cleaned_up_and_its_name_comes_up_again(
    tempdir: str, recorded: str
) -> None:
    """As fleetd leaves a launch it died in before its holder ran: the definition written, the
    runtime directory made, the record `starting` (with the pid of a gate that then saw fleetd
    gone and exited, or no pid yet), and no holder."""
    daemon = Fleetd(tempdir)
    runtime_dir = os.path.join(runtime_root(daemon), "nap")
    definition_dir = os.path.join(daemon.state_dir, "clusters", "nap")
    spec = load_toml(write(daemon, "fleet.toml", SLEEPERS))
    os.makedirs(runtime_dir)
    os.makedirs(definition_dir)
    with open(os.path.join(definition_dir, CLUSTER_FILE), "wb") as f:
        f.write(msgspec.json.encode(spec))
    pid = start_time = 0
    if recorded == "a pid that is gone":
        with subprocess.Popen(["sleep", "60"]) as gone:
            pid, start_time = gone.pid, process_start_time(gone.pid) or 0
            gone.kill()
    record = HolderRecord(
        spec=spec,
        dir=runtime_dir,
        log=os.path.join(runtime_dir, HOLDER_LOG),
        pid=pid,
        start_time=start_time,
        state="starting",
    )

    async def journal() -> None:
        async with SQLiteStore.open(os.path.join(daemon.state_dir, STORE_FILE)) as store:
            await store.put("holders/nap", msgspec.json.encode(record))

    anyio.run(journal)
    try:
        daemon.start()
        assert {m["state"] for m in statuses(daemon, "a", "b").values()} == {"absent"}
        assert not os.path.exists(runtime_dir) and not os.path.exists(definition_dir)
        code, out, _ = ctl(daemon, "--json", "up", "-f", write(daemon, "fleet.toml", SLEEPERS))
        assert (code, json.loads(out)["outcome"]) == (0, "acquired")
        assert ctl(daemon, "wait", "a", "b")[0] == 0
        assert ctl(daemon, "down", "nap")[0] == 0
    finally:
        kill_holders(daemon)
        daemon.close()


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
    from fleetd.clusters.registry import decide_up
    from protocol.definitions import ClusterSpec, MemberSpec
    from protocol.outcomes import Outcome

    spec = ClusterSpec(name="c", members=[MemberSpec(name="a", command=["true"])])
    other = ClusterSpec(name="c", members=[MemberSpec(name="a", command=["false"])])
    assert decide_up(None, spec, idempotent=False) is Outcome.ACQUIRED
    assert decide_up(spec, spec, idempotent=True) is Outcome.ALREADY_ACQUIRED
    assert decide_up(spec, spec, idempotent=False) is Outcome.CONTESTED
    assert decide_up(spec, other, idempotent=True) is Outcome.CONTESTED


def test_resolve_names() -> None:
    from fleetd.clusters.index import MemberNames

    names = MemberNames()
    names.replace("one", ["web", "db"])
    names.replace("two", ["web"])
    resolve = names.resolve
    assert resolve("db") == ("one", "db")
    assert resolve("two/web") == ("two", "web")
    assert resolve("nope") is None
    assert resolve("two/db") is None
    with pytest.raises(InvalidRequest, match="one, two"):
        resolve("web")
    with pytest.raises(InvalidRequest, match="invalid member name"):
        resolve("Bad Name")


def test_holder_env_drops_what_systemd_meant_for_fleetd() -> None:
    from fleetd.clusters.launch import holder_env

    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/n", "LISTEN_FDS": "1", "WATCHDOG_USEC": "5"}
    assert holder_env(environ) == {"PATH": "/bin"}


def gated_process(tempdir: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """A holder's first process as fleetd spawns it, with a command that writes its pid and
    start time to a file in place of the holder; the gate's write end, and that file."""
    from fleetd.clusters.launch import popen_detached

    ran = os.path.join(tempdir, "ran")
    report = (
        "from fleetd.holder.members import pidfile_text; import os; "
        f"open({ran!r}, 'wb').write(pidfile_text(os.getpid()))"
    )
    gate_read, gate_write = os.pipe()
    ready_read, ready_write = os.pipe()
    log = os.open(os.path.join(tempdir, "log"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        process = popen_detached([sys.executable, "-c", report], log, gate_read, ready_write)
    finally:
        for fd in (gate_read, ready_read, ready_write, log):
            os.close(fd)
    return process, gate_write, ran


def test_the_holder_gate_once_opened_becomes_the_holder_same_pid_same_start_time(
    tempdir: str,
) -> None:
    process, gate, ran = gated_process(tempdir)
    journaled = (process.pid, process_start_time(process.pid))  # what fleetd journals
    os.write(gate, b"go\n")
    os.close(gate)
    assert process.wait(10) == 0
    assert read_pidfile(ran) == journaled


def test_the_holder_gate_closed_unopened_runs_nothing(tempdir: str) -> None:
    process, gate, ran = gated_process(tempdir)
    os.close(gate)  # fleetd died before it journaled the pid
    assert process.wait(10) != 0
    assert not os.path.exists(ran)


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

    from fleetd.clusters.records import HolderRecord
    from fleetd.clusters.registry import HolderRegistry
    from fleetd.core.dispatch import Peer
    from fleetd.core.pidfiles import pidfile_text
    from fleetd.store.sqlite import SQLiteStore
    from protocol.clusters import MemberStatusRequest
    from protocol.definitions import ClusterSpec, MemberSpec

    runtime_dir = os.path.join(tempdir, "c", "w")
    os.makedirs(runtime_dir)
    pidfile = os.open(os.path.join(runtime_dir, HOLDER_PIDFILE), os.O_WRONLY | os.O_CREAT)
    os.write(pidfile, pidfile_text(os.getpid()))  # a "live" holder
    os.close(pidfile)

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
        with (
            PrivateDir.open(os.path.join(tempdir, "state")) as state,
            PrivateDir.open(tempdir) as runtime,
        ):
            registry = HolderRegistry(store, state)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listener.serve, holder)
                await tasks.start(registry.serve, runtime)  # re-adopts it: watch, snapshot
                me = Peer(os.getpid(), os.getuid(), os.getgid())
                answer = registry.status(MemberStatusRequest(id=1, names=["m"]), me)
                assert [s.state for s in answer.members] == [MemberState.RUNNING]
                tasks.cancel_scope.cancel()


def test_a_member_runs_beside_its_fleet_toml(holders: Fleetd) -> None:
    """`python3 app.py` next to the file, whatever directory `fleetctl up` ran in."""
    project = os.path.join(holders.root, "project")
    os.makedirs(os.path.join(project, "sub"))
    with open(os.path.join(project, "app.py"), "w") as f:
        f.write("import os; print(os.getcwd(), flush=True); import time; time.sleep(60)\n")
    path = os.path.join(project, "fleet.toml")
    with open(path, "w") as f:
        f.write(
            'name = "beside"\n'
            '[members.app]\ncommand = ["python3", "app.py"]\n'
            '[members.deeper]\ncommand = ["sh", "-c", "pwd; exec sleep 60"]\ncwd = "sub"\n'
        )
    code, out, err = ctl(holders, "up", "-f", os.path.relpath(path), "--wait")
    assert code == 0, (out, err)
    wait_until(lambda: ctl(holders, "logs", "app")[1] == f"{project}\n")
    wait_until(lambda: ctl(holders, "logs", "deeper")[1] == f"{project}/sub\n")


def test_members_of_a_spec_sent_by_the_library_run_in_the_callers_directory(
    holders: Fleetd, tmp_path: Path
) -> None:
    spec = cluster_from_dict({"members": {"here": {"command": ["sh", "-c", "pwd; sleep 60"]}}})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with client(holders) as c:
            c.cluster_up(spec)
    finally:
        os.chdir(cwd)
    wait_until(lambda: ctl(holders, "logs", "here")[1] == f"{tmp_path}\n")


def test_status_of_a_cluster_name_shows_its_members(holders: Fleetd) -> None:
    sleep = 'command = ["sleep", "60"]'
    up(holders, definition("pair", a=sleep, b=sleep), "--wait")
    assert sorted(statuses(holders, "pair")) == ["pair/a", "pair/b"]
    assert state(holders, "a") == "running"  # a member's name still means the member
    code, out, _ = ctl(holders, "status", "pair")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["MEMBER", "STATE", "PID", "UPTIME"]

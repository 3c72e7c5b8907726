"""The verbs beside up, stop and down: `fleetctl start NAME`, `restart NAME|CLUSTER` and
`apply`, under a real fleetd (and start and restart on a bound cluster).

A member keeps its port and its directory across a start or a restart: each member here
appends its pid to {dir}/runs at every start, so the directory shows it was the same one.
"""

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

import fleetctl
from fleetd.clusters.registry import plan_apply
from protocol.clusters import Change
from protocol.definitions import cluster_from_dict
from protocol.members import MemberState
from tests.processes import FLEETCTL, Fleetd, wait_gone
from tests.processes import fleetctl as run_fleetctl

SERVE = '["sh", "-c", "echo $$ >> {dir}/runs; exec python3 -m http.server {port} --bind 127.0.0.1"]'
"""A member on a {port} that writes its pid to {dir}/runs as it starts."""
SLEEP = 'command = ["sleep", "60"]'


def definition(name: str, **members: str) -> str:
    tables = [f'name = "{name}"']
    tables += [f"[members.{member}]\n{body}" for member, body in members.items()]
    return "\n".join(tables) + "\n"


def served(env: str = "") -> str:
    """A SERVE member's table, ready on its port; `env` tells two definitions apart."""
    extra = f'\nenv = {{ FLAVOUR = "{env}" }}' if env else ""
    return f'command = {SERVE}\nready = "tcp"{extra}'


def ctl(daemon: Fleetd, *args: str) -> tuple[int, dict[str, Any]]:
    """`fleetctl --json ARGS`: the exit code and the envelope."""
    done = run_fleetctl("--json", *args, env=daemon.env)
    assert done.stdout, (done.stderr, daemon.log()[-3000:])
    envelope: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, envelope


def text(daemon: Fleetd, *args: str) -> tuple[int, str]:
    done = run_fleetctl(*args, env=daemon.env)
    return done.returncode, done.stdout + done.stderr


def write(daemon: Fleetd, text_: str, name: str = "fleet.toml") -> str:
    path = os.path.join(daemon.root, name)
    with open(path, "w") as f:
        f.write(text_)
    return path


def up(daemon: Fleetd, text_: str) -> dict[str, Any]:
    code, envelope = ctl(daemon, "up", "-f", write(daemon, text_), "--wait")
    assert code == 0, envelope
    return envelope


def members(daemon: Fleetd, *names: str) -> dict[str, dict[str, Any]]:
    _, envelope = ctl(daemon, "status", *names)
    return {m["name"]: m for m in envelope["members"]}


def runs(envelope: dict[str, Any], member: str) -> list[str]:
    """The pids the member wrote to {dir}/runs, one per start."""
    with open(os.path.join(envelope["runtime_dir"], member, "runs")) as f:
        return f.read().split()


@pytest.fixture
def web(holders: Fleetd) -> Iterator[tuple[Fleetd, dict[str, Any]]]:
    """Cluster web (a and b, each on a port) up and running; down at the end."""
    envelope = up(holders, definition("web", a=served(), b=served()))
    try:
        yield holders, envelope
    finally:
        text(holders, "down", "web")


# --- start ----------------------------------------------------------------------------------


def test_stop_then_start_keeps_port_and_directory_with_a_new_process(
    web: tuple[Fleetd, dict[str, Any]],
) -> None:
    daemon, envelope = web
    before = members(daemon)
    assert text(daemon, "stop", "a")[0] == 0
    code, started = ctl(daemon, "start", "a", "--wait")
    assert code == 0 and started["outcome"] == "acquired", started
    assert started["changes"] == {"a": "started"}
    (a,) = started["members"]
    assert a["state"] == "running" and a["address"] == before["a"]["address"]
    assert a["pid"] != before["a"]["pid"]
    assert runs(envelope, "a") == [str(before["a"]["pid"]), str(a["pid"])]
    assert members(daemon)["b"]["pid"] == before["b"]["pid"]


def test_start_of_a_running_member_is_already_acquired_and_touches_nothing(
    web: tuple[Fleetd, dict[str, Any]],
) -> None:
    daemon, _ = web
    before = members(daemon)
    code, started = ctl(daemon, "start", "web/a")
    assert code == 0 and started["outcome"] == "already_acquired"
    assert started["changes"] == {"a": "running"}
    assert members(daemon)["a"]["pid"] == before["a"]["pid"]
    code, out = text(daemon, "start", "a")
    assert code == 0 and "a running" in out


def test_start_of_the_last_member_to_stop_starts_its_holder_again(holders: Fleetd) -> None:
    envelope = up(holders, definition("solo", a=served(), b=SLEEP))
    try:
        before = members(holders)
        assert text(holders, "stop", "b")[0] == 0
        assert text(holders, "stop", "a")[0] == 0  # the last: its holder exits
        assert wait_gone(envelope["holder_pid"], 10)
        code, started = ctl(holders, "start", "a", "--wait")
        assert code == 0 and started["outcome"] == "acquired", started
        (a,) = started["members"]
        assert a["address"] == before["a"]["address"] and a["pid"] != before["a"]["pid"]
        assert started["holder_pid"] != envelope["holder_pid"]
        assert runs(envelope, "a") == [str(before["a"]["pid"]), str(a["pid"])]
        assert members(holders)["b"]["state"] == "stopped"  # kept stopped, still known
        code, started = ctl(holders, "start", "b", "--wait")  # in the new holder
        assert code == 0 and started["members"][0]["state"] == "running"
    finally:
        text(holders, "down", "solo")


def test_stopping_every_member_twice_answers_stopped(holders: Fleetd) -> None:
    """The second round asks a holder that exits as it is asked (its last member left), or
    has exited: each member is stopped all the same."""
    up(holders, definition("pair", a=SLEEP, b=SLEEP))
    try:
        for _ in range(2):
            for name in ("a", "b"):
                code, envelope = ctl(holders, "stop", name)
                assert code == 0 and envelope["members"][0]["state"] == "stopped", envelope
    finally:
        text(holders, "down", "pair")


def test_a_stopped_member_starts_on_its_port_after_a_fleetd_restart(
    web: tuple[Fleetd, dict[str, Any]],
) -> None:
    daemon, envelope = web
    before = members(daemon)
    assert text(daemon, "stop", "a")[0] == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    daemon.start()  # re-adopts the holder, which kept a's definition and port
    code, started = ctl(daemon, "start", "a", "--wait")
    assert code == 0 and started["outcome"] == "acquired", started
    assert started["members"][0]["address"] == before["a"]["address"]
    assert started["holder_pid"] == envelope["holder_pid"]


def test_members_of_a_cluster_brought_down_are_not_started_again(holders: Fleetd) -> None:
    up(holders, definition("gone", a=SLEEP))
    assert text(holders, "down", "gone")[0] == 0
    for verb, name in (("start", "a"), ("restart", "gone")):
        code, envelope = ctl(holders, verb, name)
        assert code == 11 and "brought down" in envelope["error"]["message"], envelope
    code, envelope = ctl(holders, "status", "a")
    assert envelope["members"][0]["state"] == "stopped"


def test_start_and_restart_of_an_unknown_name_are_absent(holders: Fleetd) -> None:
    for verb in ("start", "restart"):
        code, envelope = ctl(holders, verb, "nope")
        assert code == 11 and envelope["outcome"] == "absent", envelope
        code, out = text(holders, verb, "nope")
        assert code == 11 and "nope" in out


# --- restart --------------------------------------------------------------------------------


def test_restart_member_keeps_port_and_directory(web: tuple[Fleetd, dict[str, Any]]) -> None:
    daemon, envelope = web
    before = members(daemon)
    code, restarted = ctl(daemon, "restart", "a", "--wait")
    assert code == 0 and restarted["outcome"] == "acquired"
    assert restarted["changes"] == {"a": "restarted"}
    (a,) = restarted["members"]
    assert a["state"] == "running" and a["address"] == before["a"]["address"]
    assert a["pid"] != before["a"]["pid"] and a["holder_pid"] == envelope["holder_pid"]
    assert runs(envelope, "a") == [str(before["a"]["pid"]), str(a["pid"])]
    assert members(daemon)["b"]["pid"] == before["b"]["pid"]


def test_restart_cluster_restarts_every_member(web: tuple[Fleetd, dict[str, Any]]) -> None:
    daemon, envelope = web
    before = members(daemon)
    code, restarted = ctl(daemon, "restart", "web", "--wait")
    assert code == 0 and restarted["changes"] == {"a": "restarted", "b": "restarted"}
    after = {m["name"]: m for m in restarted["members"]}
    for name in ("a", "b"):
        assert after[name]["state"] == "running"
        assert after[name]["address"] == before[name]["address"]
        assert after[name]["pid"] != before[name]["pid"]
        assert after[name]["holder_pid"] == envelope["holder_pid"]


def test_restart_of_a_single_members_cluster_keeps_its_holder(holders: Fleetd) -> None:
    envelope = up(holders, definition("one", a=served()))
    try:
        code, restarted = ctl(holders, "restart", "a", "--wait")
        assert code == 0 and restarted["holder_pid"] == envelope["holder_pid"]
        assert restarted["members"][0]["state"] == "running"
    finally:
        text(holders, "down", "one")


# --- apply ----------------------------------------------------------------------------------

BEFORE = definition("app", a=served(), b=served(), c=SLEEP)
AFTER = definition("app", a=served(env="new"), b=served(), d=SLEEP)
"""a changed, b unchanged, c removed, d added."""


def test_apply_restarts_only_the_changed_member_adds_and_removes(holders: Fleetd) -> None:
    envelope = up(holders, BEFORE)
    try:
        before = members(holders)
        code, applied = ctl(holders, "apply", "-f", write(holders, AFTER), "--wait")
        assert code == 0 and applied["outcome"] == "ok", applied
        assert applied["changes"] == {
            "a": "restarted",
            "b": "unchanged",
            "d": "added",
            "c": "removed",
        }
        after = members(holders)
        assert set(after) == {"a", "b", "d"}
        assert after["a"]["pid"] != before["a"]["pid"]
        assert after["a"]["address"] == before["a"]["address"]
        assert runs(envelope, "a") == [str(before["a"]["pid"]), str(after["a"]["pid"])]
        assert after["b"]["pid"] == before["b"]["pid"]
        assert after["d"]["state"] == "running"
        assert after["a"]["holder_pid"] == envelope["holder_pid"]
        code, status = ctl(holders, "status", "app/c")
        assert code == 11 and status["members"][0]["state"] == "absent"
        code, _ = ctl(holders, "start", "app/c")
        assert code == 11
    finally:
        text(holders, "down", "app")


def test_apply_text_says_what_happened_to_each_member(holders: Fleetd) -> None:
    up(holders, BEFORE)
    try:
        code, out = text(holders, "apply", "-f", write(holders, AFTER))
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith("cluster app ok (holder pid ")
        assert lines[1:5] == ["a restarted", "b unchanged", "d added", "c removed"]
    finally:
        text(holders, "down", "app")


def test_up_of_the_applied_file_is_already_acquired_also_after_a_fleetd_restart(
    holders: Fleetd,
) -> None:
    up(holders, BEFORE)
    try:
        after = write(holders, AFTER)
        assert ctl(holders, "apply", "-f", after)[0] == 0
        code, envelope = ctl(holders, "up", "-f", after, "--idempotent")
        assert code == 0 and envelope["outcome"] == "already_acquired"
        code, envelope = ctl(holders, "up", "-f", write(holders, BEFORE, "old.toml"))
        assert code == 12 and envelope["outcome"] == "contested"
        holders.signal(signal.SIGTERM)
        assert holders.wait() == 0
        holders.start()
        code, envelope = ctl(holders, "up", "-f", after, "--idempotent")
        assert code == 0 and envelope["outcome"] == "already_acquired", envelope
        code, envelope = ctl(holders, "apply", "-f", after)
        assert code == 0 and envelope["outcome"] == "already_acquired"
        assert set(envelope["changes"].values()) == {"unchanged"}
        assert set(envelope["changes"]) == {"a", "b", "d"}
    finally:
        text(holders, "down", "app")


def test_apply_of_a_cluster_not_up_starts_it(holders: Fleetd) -> None:
    try:
        code, envelope = ctl(holders, "apply", "-f", write(holders, AFTER), "--wait")
        assert code == 0 and envelope["outcome"] == "acquired"
        assert envelope["changes"] == {"a": "added", "b": "added", "d": "added"}
        assert {m["state"] for m in envelope["members"]} == {"running"}
    finally:
        text(holders, "down", "app")


def test_apply_starts_a_stopped_member_it_leaves_defined_as_it_was(holders: Fleetd) -> None:
    up(holders, BEFORE)
    try:
        assert text(holders, "stop", "b")[0] == 0
        code, envelope = ctl(holders, "apply", "-f", write(holders, BEFORE), "--wait")
        assert code == 0 and envelope["outcome"] == "ok"
        assert envelope["changes"] == {"a": "unchanged", "b": "started", "c": "unchanged"}
    finally:
        text(holders, "down", "app")


def test_apply_of_a_broken_file_changes_nothing(holders: Fleetd) -> None:
    up(holders, BEFORE)
    try:
        before = members(holders)
        code, envelope = ctl(holders, "apply", "-f", write(holders, "name = 'app'\n[members.a]\n"))
        assert code == 1 and envelope["outcome"] == "error"
        assert members(holders) == before
    finally:
        text(holders, "down", "app")


def test_apply_of_a_member_with_a_user_that_cannot_be_had_leaves_it_running(
    holders: Fleetd,
) -> None:
    up(holders, BEFORE)
    try:
        before = members(holders)
        changed = BEFORE.replace("[members.a]\n", '[members.a]\nuser = "fleet-no-such-user"\n')
        assert changed != BEFORE
        code, envelope = ctl(holders, "apply", "-f", write(holders, changed))
        assert code != 0 and "fleet-no-such-user" in json.dumps(envelope), envelope
        assert members(holders)["a"]["pid"] == before["a"]["pid"]
    finally:
        text(holders, "down", "app")


def test_plan_apply_names_each_change() -> None:
    def spec(**members: list[str]) -> Any:
        tables = {name: {"command": command} for name, command in members.items()}
        return cluster_from_dict({"members": tables}, name="x")

    current = {m.name: m for m in spec(a=["a"], b=["b"], c=["c"], e=["e"]).members}
    wanted = spec(a=["a2"], b=["b"], d=["d"], e=["e"])
    states = {"a": MemberState.RUNNING, "b": MemberState.RUNNING, "e": MemberState.ERROR}
    assert plan_apply(current, states, wanted) == {
        "a": Change.RESTARTED,
        "b": Change.UNCHANGED,
        "d": Change.ADDED,
        "e": Change.STARTED,
        "c": Change.REMOVED,
    }


# --- a bound cluster ------------------------------------------------------------------------


def test_a_bound_clusters_member_restarts_and_starts_on_its_port() -> None:
    http = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    definitions = {
        "members": {"a": {"command": http, "ready": "tcp"}, "b": {"command": ["sleep", "60"]}}
    }
    with fleetctl.cluster(definitions) as c:
        first = c.wait_running()["a"]
        again = c.restart("a")
        assert again.state == "running" and again.pid != first.pid
        assert again.address == first.address
        c.stop("a")
        back = c.start("a")
        assert back.state == "running" and back.address == first.address
        assert c.start("a").pid == back.pid  # running: left alone


def test_a_restart_answers_after_the_pushes_of_what_it_did() -> None:
    """A member ready at spawn runs before the answer could be sent: the holder pushes its new
    status first, so the answer never leaves a watcher with the old process's, or `stopped`."""
    with fleetctl.cluster({"members": {"a": {"command": ["sleep", "60"]}}}) as c:
        pids = {c.wait_running()["a"].pid}
        for _ in range(10):
            status = c.restart("a", timeout=5)
            assert status.state == "running" and status.pid not in pids
            pids.add(status.pid)


def test_logs_follow_a_member_across_its_restart(web: tuple[Fleetd, dict[str, Any]]) -> None:
    daemon, _ = web
    follower = subprocess.Popen(
        [*FLEETCTL, "logs", "-f", "--stderr", "a"], env=daemon.env, stdout=subprocess.PIPE
    )
    try:
        assert text(daemon, "restart", "a", "--wait")[0] == 0
        assert follower.poll() is None  # the member came back: still followed
        assert text(daemon, "stop", "a")[0] == 0  # it left: the follower is done
        assert follower.wait(timeout=10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        assert follower.stdout is not None
        follower.stdout.close()

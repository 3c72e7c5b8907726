"""`fleetctl lease …` as scripts run it: one JSON envelope on stdout, the stable exit code."""

import json
import os
import subprocess
from typing import Any

import pytest

from tests.processes import FLEETCTL, Fleetd, fleetctl


def run(fleetd_env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = fleetctl("lease", *args, env=fleetd_env)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one envelope, got {result.stdout!r} ({result.stderr})"
    envelope: dict[str, Any] = json.loads(lines[0])
    return result.returncode, envelope


def test_lifecycle_envelopes_and_exit_codes(fleetd: Fleetd) -> None:
    env = fleetd.env
    code, acquired = run(env, "acquire", "build", "--owner", "a", "--ttl", "30s")
    assert (code, acquired["outcome"]) == (0, "acquired")
    lease = acquired["lease"]
    assert (lease["name"], lease["owner"], lease["ttl"], lease["state"]) == (
        "build",
        "a",
        30,
        "held",
    )
    token = lease["token"]
    assert run(env, "acquire", "build", "--owner", "a")[1]["outcome"] == "already_acquired"
    assert run(env, "heartbeat", "build", "--owner", "a", "--token", str(token))[0] == 0
    code, refused = run(env, "heartbeat", "build", "--owner", "b")
    assert (code, refused["outcome"]) == (10, "not_owned")
    code, inspected = run(env, "inspect", "build")
    assert (code, inspected["outcome"], inspected["lease"]["token"]) == (0, "ok", token)
    code, listed = run(env, "list")
    assert (code, [lease["name"] for lease in listed["leases"]]) == (0, ["build"])
    assert run(env, "release", "build", "--owner", "b")[0] == 10
    code, released = run(env, "release", "build", "--owner", "a")
    assert (code, released["outcome"], released["lease"]["state"]) == (0, "released", "released")
    assert run(env, "release", "build", "--owner", "a")[1]["outcome"] == "already_released"
    assert run(env, "release", "nothing", "--owner", "a") == (
        11,
        {"outcome": "absent", "lease": None, "message": "no lease named 'nothing'"},
    )
    assert run(env, "inspect", "nothing")[0] == 11


def test_acquire_binds_the_lease_to_the_calling_process(fleetd: Fleetd) -> None:
    _, acquired = run(fleetd.env, "acquire", "mine", "--owner", "a")
    assert acquired["lease"]["identity"]["pid"] == os.getpid()


def test_contested_acquire_from_two_processes_has_one_winner(fleetd: Fleetd) -> None:
    processes = [
        subprocess.Popen(
            [*FLEETCTL, "lease", "acquire", "duel", "--owner", owner],
            env=fleetd.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for owner in ("left", "right")
    ]
    outcomes = []
    for process in processes:
        stdout, _ = process.communicate(timeout=30)
        outcomes.append((process.returncode, json.loads(stdout)["outcome"]))
    assert sorted(outcomes) == [(0, "acquired"), (12, "contested")]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["acquire", "", "--owner", "a"], 1, "invalid lease name"),
        (["acquire", "bad name", "--owner", "a"], 1, "invalid lease name"),
        (["acquire", "x", "--owner", "a", "--ttl", "0"], 1, "invalid ttl 0s"),
        (["acquire", "x", "--owner", "a", "--ttl", "-5s"], 2, "a duration is never negative"),
        (["acquire", "x", "--owner", "a", "--ttl", "1000h"], 1, "invalid ttl"),
        (["acquire", "x", "--owner", "a", "--ttl", "soon"], 2, "invalid duration 'soon'"),
        (["acquire", "x"], 2, "Missing option '--owner'"),
        (["acquire", "x", "--owner", "a", "--pid", "1"], 1, "cannot be bound to init (pid 1)"),
    ],
)
def test_bad_input_gets_an_error_envelope(
    fleetd: Fleetd, args: list[str], code: int, message: str
) -> None:
    exit_code, envelope = run(fleetd.env, *args)
    assert exit_code == code
    assert envelope["outcome"] == ("error" if code == 1 else "usage")
    assert message in envelope["error"]["message"]


def test_a_ttl_takes_the_duration_grammar(fleetd: Fleetd) -> None:
    code, envelope = run(fleetd.env, "acquire", "x", "--owner", "a", "--ttl", "1m30s")
    assert (code, envelope["lease"]["ttl"]) == (0, 90.0)


def test_no_fleetd_is_unavailable_exit_14(tempdir: str) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "none.sock")}
    code, envelope = run(env, "inspect", "x")
    assert (code, envelope["outcome"]) == (14, "unavailable")

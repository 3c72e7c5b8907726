"""fleetd never follows a link and never uses another user's directory: links planted in its
directories before it starts are refused or moved aside, their targets untouched."""

import glob
import json
import os
import stat
from collections.abc import Iterator

import pytest

from tests.processes import Fleetd, fleetctl, kill_holders, run_fleetd, runtime_root

EX_NOPERM = 77
NOBODY = 65534


@pytest.fixture
def victim(tempdir: str) -> Iterator[str]:
    """A directory fleetd has no business touching, with a file in it."""
    path = os.path.join(tempdir, "victim")
    os.mkdir(path, 0o755)
    with open(os.path.join(path, "precious"), "w") as f:
        f.write("keep me\n")
    yield path


def _untouched(victim: str) -> None:
    assert sorted(os.listdir(victim)) == ["precious"]
    with open(os.path.join(victim, "precious")) as f:
        assert f.read() == "keep me\n"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755


def _plant(link: str, target: str) -> None:
    os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
    os.symlink(target, link)


def _quarantined(daemon: Fleetd, *parts: str) -> list[str]:
    return glob.glob(os.path.join(daemon.state_dir, "quarantine", "*", *parts))


@pytest.mark.parametrize(
    "where",
    [("claims-staging",), ("files",), ("inbox",), ("inbox", "agent-7")],
    ids="/".join,
)
def test_a_linked_claims_directory_is_moved_aside_and_its_target_untouched(
    tempdir: str, victim: str, where: tuple[str, ...]
) -> None:
    daemon = Fleetd(tempdir)
    _plant(os.path.join(daemon.state_dir, *where), victim)
    daemon.start()
    try:
        acquire = ["claims", "acquire", "--kind", "file", "--key", "k", "--owner", "a"]
        assert fleetctl(*acquire, env=daemon.env, input=b"x").returncode == 0
    finally:
        daemon.close()
    _untouched(victim)
    (moved,) = _quarantined(daemon, *where)
    assert os.path.islink(moved)


@pytest.mark.parametrize("lock", ["state/fleetd.lock", "fleetd.sock.lock"])
def test_a_linked_lock_file_is_refused_and_its_target_untouched(
    tempdir: str, victim: str, lock: str
) -> None:
    daemon = Fleetd(tempdir)
    os.mkdir(daemon.state_dir, 0o700)
    _plant(os.path.join(tempdir, lock), os.path.join(victim, "precious"))
    refused = run_fleetd(daemon.env)
    assert refused.returncode == EX_NOPERM
    assert "is a symbolic link" in refused.stderr
    _untouched(victim)


def test_a_linked_store_is_refused_and_nothing_is_made_at_its_target(
    tempdir: str, victim: str
) -> None:
    daemon = Fleetd(tempdir)
    _plant(os.path.join(daemon.state_dir, "fleet.db"), os.path.join(victim, "fleet.db"))
    refused = run_fleetd(daemon.env)
    assert refused.returncode == EX_NOPERM
    assert refused.stderr.count("\n") == 1 and "fleet.db: it is a symbolic link" in refused.stderr
    _untouched(victim)


def test_a_linked_runtime_dir_makes_up_fail_and_its_target_untouched(
    holders: Fleetd, victim: str, tempdir: str
) -> None:
    _plant(os.path.join(runtime_root(holders), "web"), victim)
    spec = os.path.join(tempdir, "fleet.toml")
    with open(spec, "w") as f:
        f.write('[members.m]\ncommand = ["sleep", "100"]\nready = "none"\n')
    result = fleetctl("--json", "up", "-f", spec, "--name", "web", env=holders.env)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "unsafe_path"
    _untouched(victim)
    assert fleetctl("ping", env=holders.env).returncode == 0


def test_gc_removes_a_link_in_an_exited_cluster_not_its_target(
    holders: Fleetd, victim: str, tempdir: str
) -> None:
    spec = os.path.join(tempdir, "fleet.toml")
    with open(spec, "w") as f:
        f.write('[members.m]\ncommand = ["sleep", "100"]\nready = "none"\n')
    assert fleetctl("up", "-f", spec, "--name", "web", "--wait", env=holders.env).returncode == 0
    assert fleetctl("down", "web", env=holders.env).returncode == 0
    runtime_dir = os.path.join(runtime_root(holders), "web")
    os.symlink(victim, os.path.join(runtime_dir, "m", "escape"))
    os.symlink(victim, os.path.join(runtime_dir, "x"))
    gc = fleetctl("--json", "gc", env=holders.env)
    assert gc.returncode == 0, gc.stderr
    assert not os.path.exists(runtime_dir)
    _untouched(victim)
    kill_holders(holders)


@pytest.mark.parametrize("which", ["state", "socket"])
def test_a_directory_another_user_made_first_is_refused(tempdir: str, which: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    daemon = Fleetd(tempdir)
    path = daemon.state_dir if which == "state" else os.path.join(tempdir, "run")
    daemon.extra_env["FLEET_SOCKET"] = os.path.join(tempdir, "run", "fleetd.sock")
    os.mkdir(path)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o777)
    refused = run_fleetd(daemon.env)
    assert refused.returncode == EX_NOPERM
    assert f"refusing {path}: it is owned by uid {NOBODY}" in refused.stderr
    assert os.listdir(path) == []


def test_a_directory_others_may_write_is_refused(tempdir: str) -> None:
    daemon = Fleetd(tempdir)
    os.mkdir(daemon.state_dir)
    os.chmod(daemon.state_dir, 0o777)
    refused = run_fleetd(daemon.env)
    assert refused.returncode == EX_NOPERM
    assert "writable by group or others (mode 0777)" in refused.stderr
    assert os.listdir(daemon.state_dir) == []

"""What a member runs with: its environment (minimal under fleetd, its client's when bound),
the limits its fleetd or client started with, its `limits`, and its `user` and `group`.

The `user`/`group` tests need root (as CI runs them): a holder of another user refuses them,
which `test_a_holder_that_is_not_root_refuses_a_member_of_another_user` checks on the
function that decides, with the process's ids patched (running a holder as another user
would need a copy of the interpreter that user may read)."""

import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import fleetctl
from fleetd.holder import runenv
from fleetd.holder.runenv import RunEnvs
from protocol.definitions import MemberSpec
from protocol.errors import FleetError, InvalidRequest
from tests.processes import Fleetd, kill_holders, needs_root, wait_until
from tests.processes import fleetctl as run_fleetctl

SHOW = ["env"]
LIMITS = ["sh", "-c", "cat /proc/self/limits"]
FLEET_OWN = {"FLEET_MEMBER", "FLEET_CLUSTER", "FLEET_PEERS", "FLEET_HOLDER", "NOTIFY_SOCKET"}
MINIMAL = {"PATH", "HOME", "USER", "LOGNAME", "SHELL"}


def members(**tables: dict[str, object]) -> dict[str, object]:
    return {"members": tables}


def limit(text: str, what: str) -> tuple[str, str]:
    """The soft and hard limit named `what` ("Max open files") in a /proc/PID/limits text."""
    for line in text.splitlines():
        if line.startswith(what):
            soft, hard = line[len(what) :].split()[:2]
            return soft, hard
    raise AssertionError(f"no {what!r} in {text!r}")


def environment(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def output_of(cluster: fleetctl.bound.SyncCluster, name: str) -> str:
    wait_until(lambda: cluster.logs(name).endswith("\n"))
    return cluster.logs(name)


@pytest.fixture
def low_nofile_fleetd(tempdir: str) -> Iterator[Fleetd]:
    """fleetd started as a service would be, with a soft open-file limit below its hard."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    daemon = Fleetd(tempdir, extra_env={"MEMBER_TEST_SECRET": "fleetd's"})
    daemon.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)))
    try:
        yield daemon
    finally:
        kill_holders(daemon)
        daemon.close()


def detached_output(daemon: Fleetd, member: str) -> str:
    path = os.path.join(daemon.root, "fleet.toml")
    with open(path, "w") as f:
        f.write(member)
    done = run_fleetctl("up", "-f", path, env=daemon.env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    logs = lambda: run_fleetctl("logs", "show", env=daemon.env).stdout  # noqa: E731
    wait_until(lambda: logs().endswith("\n"))
    return logs()


# --- the environment ----------------------------------------------------------------------


def test_a_detached_member_gets_only_the_minimal_environment_and_its_own(
    low_nofile_fleetd: Fleetd,
) -> None:
    env = detached_output(
        low_nofile_fleetd,
        f'name = "env"\n[members.show]\ncommand = {json.dumps(SHOW)}\n'
        'env = { GIVEN = "yes" }\nrestart = "no"\n',
    )
    seen = environment(env)
    extra = set(seen) - MINIMAL - FLEET_OWN - {"GIVEN", "LANG", "LANGUAGE"}
    assert {k for k in extra if not k.startswith("LC_")} == set()
    me = pwd.getpwuid(os.geteuid())
    assert seen["GIVEN"] == "yes" and seen["USER"] == me.pw_name and seen["HOME"] == me.pw_dir
    assert seen["PATH"] == os.environ["PATH"]


def test_a_detached_member_gets_the_open_file_limit_fleetd_started_with(
    low_nofile_fleetd: Fleetd,
) -> None:
    text = detached_output(
        low_nofile_fleetd, f'name = "lim"\n[members.show]\ncommand = {json.dumps(LIMITS)}\n'
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert limit(text, "Max open files") == ("512", str(hard))


def test_a_bound_member_inherits_its_clients_environment_under_its_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMBER_TEST_INHERITED", "from the test")
    monkeypatch.setenv("GIVEN", "overridden")
    with fleetctl.cluster(members(show={"command": SHOW, "env": {"GIVEN": "yes"}})) as c:
        seen = environment(output_of(c, "show"))
    assert seen["MEMBER_TEST_INHERITED"] == "from the test" and seen["GIVEN"] == "yes"
    assert seen["HOME"] == os.environ["HOME"]
    assert "FLEET_MEMBER_NOFILE" not in seen


def test_a_bound_member_gets_the_open_file_limit_its_client_started_with() -> None:
    """Not the holder's raised one: in a client process of its own, whose soft limit is low."""
    script = textwrap.dedent(
        f"""
        import resource, fleetctl
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        members = {{"members": {{"show": {{"command": {LIMITS!r}}}}}}}
        with fleetctl.cluster(members) as c:
            from tests.processes import wait_until
            wait_until(lambda: "Max open files" in c.logs("show"))
            print(c.logs("show"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert limit(done.stdout, "Max open files") == ("300", str(hard))


# --- limits -------------------------------------------------------------------------------


def test_a_members_limits_are_applied() -> None:
    table = {"command": LIMITS, "limits": {"nofile": [256, 512], "core": "infinity", "nproc": 99}}
    with fleetctl.cluster(members(show=table)) as c:
        text = output_of(c, "show")
    assert limit(text, "Max open files") == ("256", "512")
    assert limit(text, "Max core file size") == ("unlimited", "unlimited")
    assert limit(text, "Max processes") == ("99", "99")


def test_an_open_file_limit_above_the_kernels_fails_the_cluster_start() -> None:
    with open("/proc/sys/fs/nr_open") as f:
        above = int(f.read()) + 1
    table = {"command": LIMITS, "limits": {"nofile": above}}
    refused = pytest.raises(FleetError, match=r"limits\.nofile: .* above the kernel's most")
    with refused, fleetctl.cluster(members(show=table)):
        pass


# --- user and group (root) ----------------------------------------------------------------


@needs_root
def test_a_member_with_a_user_runs_as_that_user_and_its_output_is_collected() -> None:
    """Needs root."""
    show = ["sh", "-c", 'echo "$(id -u) $(id -g) $USER $HOME"; echo "$(id -G)" >&2']
    with fleetctl.cluster(members(who={"command": show, "user": "nobody"})) as c:
        out = output_of(c, "who").split()
        wait_until(lambda: c.logs("who", stderr=True).endswith("\n"))
        groups = c.logs("who", stderr=True).split()
    nobody = pwd.getpwnam("nobody")
    assert out == [str(nobody.pw_uid), str(nobody.pw_gid), "nobody", nobody.pw_dir]
    assert groups == [str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)]


@needs_root
def test_a_member_with_a_user_may_open_its_output_by_name() -> None:
    """As programs configured to log to /dev/stdout or /dev/stderr do (needs root)."""
    show = ["sh", "-c", "echo out > /dev/stdout; echo err > /dev/stderr"]
    with fleetctl.cluster(members(who={"command": show, "user": "nobody"})) as c:
        assert output_of(c, "who") == "out\n"
        wait_until(lambda: c.logs("who", stderr=True) == "err\n")


@needs_root
def test_a_member_with_a_group_by_number_runs_in_that_group() -> None:
    """Needs root."""
    show = ["sh", "-c", 'echo "$(id -u) $(id -g) $(id -G)"']
    with fleetctl.cluster(members(who={"command": show, "user": "nobody", "group": 100})) as c:
        out = output_of(c, "who").split()
    assert out[1] == "100" and "100" in out[2:]


@needs_root
@pytest.mark.skipif(
    shutil.which("systemd-notify") is None,
    reason="systemd-notify not installed (CI installs systemd, which has it)",
)
def test_a_member_with_a_user_becomes_ready_by_notify() -> None:
    """Its NOTIFY_SOCKET is in the abstract namespace: it may not enter the runtime directory
    (needs root)."""
    script = 'echo "$NOTIFY_SOCKET"; systemd-notify --ready; exec sleep 60'
    table = {"command": ["sh", "-c", script], "user": "nobody", "ready": "notify"}
    with fleetctl.cluster(members(who=table)) as c:
        c.wait_running(timeout=10)
        assert output_of(c, "who").startswith("@fleet-notify-")


def test_an_unknown_user_fails_the_cluster_start_naming_it() -> None:
    table = {"command": ["true"], "user": "no-such-user-here"}
    refused = pytest.raises(FleetError, match="member 'who': no such user: 'no-such-user-here'")
    with refused, fleetctl.cluster(members(who=table)):
        pass


def test_up_of_a_member_whose_user_cannot_be_had_fails_saying_why(
    low_nofile_fleetd: Fleetd,
) -> None:
    """As a fleetd that is not root refuses a member of another user (the check below)."""
    path = os.path.join(low_nofile_fleetd.root, "fleet.toml")
    with open(path, "w") as f:
        f.write('name = "who"\n[members.a]\ncommand = ["true"]\nuser = "no-such-user-here"\n')
    done = run_fleetctl("up", "-f", path, env=low_nofile_fleetd.env)
    assert done.returncode == 1
    assert "member 'a': no such user: 'no-such-user-here'" in done.stderr


def test_a_holder_that_is_not_root_refuses_a_member_of_another_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    envs = RunEnvs(inherit=False, member_nofile=1024)
    spec = MemberSpec(name="web", command=["true"], user="nobody")
    with pytest.raises(FleetError, match="member 'web': user 'nobody': the holder runs as uid"):
        envs.of(spec)


def test_a_holder_that_is_not_root_runs_a_member_of_its_own_user_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: nobody.pw_gid)
    setup = RunEnvs(inherit=False, member_nofile=1024).of(
        MemberSpec(name="web", command=["true"], user="nobody")
    )
    assert setup.setup.credentials is None
    assert setup.environment["USER"] == "nobody"


def test_a_holder_that_may_not_raise_a_hard_limit_refuses_a_member_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a holder not root, or root in a container without CAP_SYS_RESOURCE."""
    monkeypatch.setattr(runenv, "may_raise_hard_limits", lambda: False)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    spec = MemberSpec(name="web", command=["true"], limits={"nofile": [10, hard + 1]})
    with pytest.raises(FleetError, match=r"limits\.nofile: hard limit .* which it may not raise"):
        RunEnvs(inherit=False, member_nofile=1024).of(spec)


def test_adding_a_member_of_an_unknown_user_is_refused() -> None:
    refused = pytest.raises(InvalidRequest, match="no such user")
    with fleetctl.cluster(members(a={"command": ["sleep", "60"]})) as c, refused:
        c.add({"name": "b", "command": ["sleep", "60"], "user": "no-such-user-here"})

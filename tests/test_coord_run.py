"""`fleetctl coord-run`, every row of its exit-path matrix, each as a real process tree:
fleetd, coord-run, and a child that reports what it saw to a file."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from fleetctl import SyncClient
from protocol.outcomes import Outcome
from tests.processes import FLEETCTL, Fleetd, running_fleetd

CHILD = """
import os, signal, sys, time
report, mode, arg = sys.argv[1:4]
def note(line):
    with open(report, "a") as f:
        f.write(line + "\\n")
def on_signal(signum, frame):
    note(f"signal {signum}")
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, on_signal)
note(f"started {os.environ['FLEET_LEASE_TOKEN']}")
if mode == "exit":
    time.sleep(float(sys.argv[4]))
    sys.exit(int(arg))
while mode == "wait" and not os.path.exists(arg):
    time.sleep(0.02)
if mode == "sleep":
    time.sleep(60)
"""


@dataclass
class CoordRun:
    process: subprocess.Popen[str]
    root: str

    def report(self) -> list[str]:
        return _lines(os.path.join(self.root, "child"))

    def cleanups(self) -> list[str]:
        return _lines(os.path.join(self.root, "cleanup"))

    def wait_started(self, timeout: float = 10.0) -> int:
        """The child's fencing token, once it has started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = [line for line in self.report() if line.startswith("started")]
            if started:
                return int(started[0].split()[1])
            assert self.process.poll() is None, self.process.communicate()
            time.sleep(0.02)
        raise AssertionError("the child did not start")

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr


Start = Callable[..., CoordRun]
"""start(env, *child_args, ttl=, lease=, agent=): a coord-run process with CHILD as child."""


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@pytest.fixture
def coord_run(tempdir: str) -> Iterator[Start]:
    runs: list[CoordRun] = []

    def start(
        env: dict[str, str], *child: str, ttl: str = "1s", lease: str = "coord", agent: str = "ag"
    ) -> CoordRun:
        argv = [
            *FLEETCTL,
            "coord-run",
            "--agent",
            agent,
            "--lease",
            lease,
            "--ttl",
            ttl,
            "--grace",
            "2s",
            "--cleanup",
            f"echo $FLEET_EXIT_CODE >> {tempdir}/cleanup",
            "--",
            sys.executable,
            "-c",
            CHILD,
            os.path.join(tempdir, "child"),
            *child,
        ]
        process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        runs.append(CoordRun(process, tempdir))
        return runs[-1]

    yield start
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
        run.process.communicate()


@pytest.fixture
def fleetd(tempdir: str) -> Iterator[Fleetd]:
    """At debug level: the tests count the requests fleetd logged."""
    with running_fleetd(tempdir, FLEET_LOG_LEVEL="debug") as daemon:
        yield daemon


def releases(fleetd: Fleetd) -> int:
    return fleetd.log().count('"op":"lease_release"')


def inspect(fleetd: Fleetd, name: str = "coord") -> tuple[str, int, str]:
    with SyncClient(fleetd.socket_path) as client:
        lease = client.lease_inspect(name).lease
    assert lease is not None
    return lease.state, lease.token, lease.owner


def test_child_exit_zero_exits_zero_releasing_once_and_cleaning_up_once(
    fleetd: Fleetd, coord_run: Start
) -> None:
    run = coord_run(fleetd.env, "exit", "0", "0")
    assert run.finish()[0] == 0
    assert run.cleanups() == ["0"]
    assert releases(fleetd) == 1
    assert inspect(fleetd)[0] == "released"


def test_child_exit_code_passes_through_with_the_lease_held_all_along(
    fleetd: Fleetd, coord_run: Start
) -> None:
    run = coord_run(fleetd.env, "exit", "7", "1.2", ttl="0.4s")
    token = run.wait_started()
    time.sleep(0.9)  # over twice the TTL: only heartbeats keep it
    with SyncClient(fleetd.socket_path) as client:
        assert client.lease_acquire("coord", "rival", 5).outcome is Outcome.CONTESTED
    assert inspect(fleetd) == ("held", token, "ag")
    assert run.finish()[0] == 7
    assert run.cleanups() == ["7"]
    assert releases(fleetd) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_is_forwarded_and_coord_run_exits_128_plus_it(
    fleetd: Fleetd, coord_run: Start, signum: int
) -> None:
    run = coord_run(fleetd.env, "sleep", "-")
    run.wait_started()
    run.process.send_signal(signum)
    assert run.finish()[0] == 128 + signum
    assert run.report()[1:] == [f"signal {signum}"]
    assert run.cleanups() == [str(128 + signum)]
    assert releases(fleetd) == 1


def test_internal_error_exits_one_after_cleanup_and_release(
    fleetd: Fleetd, coord_run: Start, tempdir: str
) -> None:
    run = coord_run(fleetd.env, "exit", "0", "0")
    run.finish()
    broken = subprocess.run(
        [
            *FLEETCTL,
            *("coord-run", "--agent", "ag", "--lease", "coord2"),
            *("--cleanup", f"echo $FLEET_EXIT_CODE >> {tempdir}/cleanup2"),
            *("--", "/nonexistent/command"),
        ],
        env=fleetd.env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert broken.returncode == 1
    assert "cannot start '/nonexistent/command'" in broken.stderr
    assert _lines(os.path.join(tempdir, "cleanup2")) == ["1"]
    assert releases(fleetd) == 2
    assert inspect(fleetd, "coord2")[0] == "released"


def test_stands_down_when_a_healthy_leader_holds_the_lease(
    fleetd: Fleetd, coord_run: Start
) -> None:
    with SyncClient(fleetd.socket_path) as client:
        client.lease_acquire("coord", "leader", 30)
        run = coord_run(fleetd.env, "exit", "0", "0")
        code, stderr = run.finish()
    assert code == 0
    assert stderr.count("\n") == 1 and "standing down" in stderr and "leader" in stderr
    assert run.report() == []
    assert run.cleanups() == ["0"]
    assert releases(fleetd) == 0


def test_lease_lost_to_not_owned_stops_the_child_and_exits_10(
    fleetd: Fleetd, coord_run: Start
) -> None:
    run = coord_run(fleetd.env, "sleep", "-", ttl="0.6s")
    run.wait_started()
    with SyncClient(fleetd.socket_path) as client:  # an operator releases it under its feet
        assert client.lease_release("coord", "ag").outcome is Outcome.RELEASED
    code, stderr = run.finish()
    assert code == 10 and "lost" in stderr
    assert run.report()[1:] == [f"signal {signal.SIGTERM}"]
    assert run.cleanups() == ["10"]
    assert releases(fleetd) == 2  # the operator's, then coord-run's one attempt


def test_lease_lost_when_no_heartbeat_succeeds_before_the_deadline(
    fleetd: Fleetd, coord_run: Start
) -> None:
    run = coord_run(fleetd.env, "sleep", "-", ttl="0.6s")
    run.wait_started()
    fleetd.stop()
    code, stderr = run.finish()
    assert code == 10 and "no heartbeat succeeded" in stderr
    assert run.report()[1:] == [f"signal {signal.SIGTERM}"]
    assert run.cleanups() == ["10"]
    assert stderr.count("could not release") == 1


def test_unreachable_fleetd_exits_14(tempdir: str, coord_run: Start) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "absent.sock")}
    run = coord_run(env, "exit", "0", "0")
    code, stderr = run.finish()
    assert code == 14 and "unreachable" in stderr
    assert run.report() == []
    assert run.cleanups() == ["14"]


def test_reconnects_after_a_fleetd_restart_and_keeps_its_token(
    fleetd: Fleetd, coord_run: Start, tempdir: str
) -> None:
    go = os.path.join(tempdir, "go")
    run = coord_run(fleetd.env, "wait", go, ttl="2s")  # 1s lapsed on a loaded machine
    token = run.wait_started()
    fleetd.stop()
    fleetd.start()
    time.sleep(2.5)  # past the full TTL the restart gave: only re-affirmed heartbeats keep it
    assert inspect(fleetd) == ("held", token, "ag")
    open(go, "w").close()
    assert run.finish()[0] == 0
    assert releases(fleetd) == 1


def test_stonith_ends_a_stopped_coord_run_and_its_child(fleetd: Fleetd, coord_run: Start) -> None:
    run = coord_run(fleetd.env, "sleep", "-", ttl="0.4s")
    token = run.wait_started()
    run.process.send_signal(signal.SIGSTOP)
    time.sleep(0.6)
    with SyncClient(fleetd.socket_path) as client:
        taken = client.lease_acquire("coord", "successor", 5)
    assert taken.outcome is Outcome.ACQUIRED and taken.fence == "terminated"
    assert taken.lease is not None and taken.lease.token > token
    code, _ = run.finish()
    assert code in (10, 128 + signal.SIGTERM)
    # fleetd's STONITH and coord-run's own lease-loss stop may both reach the child first
    assert set(run.report()[1:]) == {f"signal {signal.SIGTERM}"}
    assert run.cleanups() == [str(code)]

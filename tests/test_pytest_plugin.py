"""The pytest plugin, run in a pytest of its own (pytester)."""

import json
import os
import shutil
from importlib.metadata import entry_points

import pytest

from protocol.members import member_log_path

pytest_plugins = ["pytester"]

PLUGIN = "fleetctl.pytest_plugin"


def plugin_args() -> list[str]:
    """Load the plugin by name unless it is installed (then its entry point loads it)."""
    installed = any(e.value == PLUGIN for e in entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]


def test_the_fixture_starts_clusters_and_stops_them_at_test_end(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json, os

        SLEEP = {"command": ["sleep", "60"]}

        def test_clusters(fleet_cluster):
            one = fleet_cluster({"members": {"a": SLEEP, "b": SLEEP}}, name="one")
            two = fleet_cluster({"members": {"a": SLEEP}}, name="two")
            assert one.status("a").state == "running" and two.status("a").state == "running"
            pids = [one.holder_pid, two.holder_pid]
            pids += [s.pid for c in (one, two) for s in c.status().values()]
            with open("pids.json", "w") as f:
                json.dump(pids, f)

        def test_failure_still_tears_down(fleet_cluster):
            c = fleet_cluster({"members": {"a": SLEEP}})
            with open("kept.txt", "w") as f:
                f.write(c.runtime_dir)
            raise AssertionError("on purpose")
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(passed=1, failed=1)
    shutil.rmtree((pytester.path / "kept.txt").read_text())  # kept for a look: ours to remove
    pids = json.loads((pytester.path / "pids.json").read_text())
    assert len(pids) == 5
    for pid in pids:
        assert not _alive(pid), f"process {pid} outlived its test"


def test_a_member_that_fails_fails_the_fixture_call(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from protocol.errors import MemberFailed

        def test_missing_program(fleet_cluster):
            with pytest.raises(MemberFailed, match="No such file"):
                fleet_cluster({"members": {"a": {"command": ["fleet-no-such-program"]}}})
        """
    )
    pytester.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_the_template_starts_before_the_first_cluster_is_asked_for(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os, time

        def templates():
            with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                pids = f.read().split()
            found = []
            for pid in pids:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if b"fleetd.holder.template" in cmdline.read().split(b"\\0"):
                        found.append(pid)
            return found

        def test_cluster(fleet_cluster):
            deadline = time.monotonic() + 10  # its command line shows once its exec is done
            while not templates() and time.monotonic() < deadline:
                time.sleep(0.01)
            (template,) = templates()  # started as collection ended
            c = fleet_cluster({"members": {"a": {"command": ["sleep", "60"]}}})
            with open(f"/proc/{c.holder_pid}/stat", "rb") as f:
                assert f.read().rsplit(b")", 1)[1].split()[1].decode() == template
        """
    )
    pytester.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=1)


def test_a_failed_tests_report_shows_its_clusters_logs_and_keeps_their_directory(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import time

        SAYS = {"command": ["sh", "-c", "echo hello out; echo hello err >&2; exec sleep 60"]}

        def test_fails(fleet_cluster):
            c = fleet_cluster({"members": {"talker": SAYS}}, name="web")
            c.wait_running()
            while "hello err" not in c.logs("talker", stderr=True) or not c.logs("talker"):
                time.sleep(0.01)
            with open("kept.txt", "w") as f:
                f.write(c.runtime_dir)
            raise AssertionError("on purpose")

        def test_passes(fleet_cluster):
            c = fleet_cluster({"members": {"quiet": {"command": ["sleep", "60"]}}})
            with open("removed.txt", "w") as f:
                f.write(c.runtime_dir)
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(passed=1, failed=1)
    kept = (pytester.path / "kept.txt").read_text()
    result.stdout.fnmatch_lines(
        [f"*fleet cluster web (kept: {kept})*", "--- talker stdout ---", "hello out"]
    )
    result.stdout.fnmatch_lines(["--- talker stderr ---", "hello err"])
    with open(member_log_path(kept, "talker")) as log:
        assert log.read() == "hello out\n"
    assert not os.path.exists((pytester.path / "removed.txt").read_text())
    shutil.rmtree(kept)


def test_a_crashing_members_stderr_is_in_the_error_and_in_the_report(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        CRASH = ["sh", "-c", "echo 'boom: DATABASE_URL not set' >&2; exit 3"]

        def test_crashes(fleet_cluster):
            fleet_cluster({"members": {"db": {"command": CRASH, "ready": "tcp"}}}, name="crashy")
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E *MemberFailed: member 'db' failed: exited with code 3 before it was ready; "
            "stderr: boom: DATABASE_URL not set",
            "*fleet cluster crashy (kept: *)*",
            "--- db stderr ---",
            "boom: DATABASE_URL not set",
        ]
    )
    kept = result.stdout.str().split("fleet cluster crashy (kept: ", 1)[1].split(")", 1)[0]
    shutil.rmtree(kept)


def test_a_cluster_that_fails_in_a_fixture_of_the_tests_is_reported_and_kept(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        CRASH = ["sh", "-c", "echo 'boom: DATABASE_URL not set' >&2; exit 3"]

        @pytest.fixture
        def db(fleet_cluster):
            return fleet_cluster({"members": {"db": {"command": CRASH, "ready": "tcp"}}})

        def test_uses_db(db):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fleet cluster * (kept: *)*", "--- db stderr ---", "boom: *"])
    kept = result.stdout.str().split(" (kept: ", 1)[1].split(")", 1)[0]
    assert os.path.isdir(kept)
    shutil.rmtree(kept)


def test_module_and_session_clusters_outlive_a_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        SLEEP = {"command": ["sleep", "60"]}

        @pytest.fixture(scope="module")
        def shared(fleet_cluster_module):
            return fleet_cluster_module({"members": {"a": SLEEP}}, name="shared")

        @pytest.fixture(scope="session")
        def everyone(fleet_cluster_session):
            return fleet_cluster_session({"members": {"a": SLEEP}}, name="everyone")

        PIDS = []

        def test_first(shared, everyone):
            PIDS.append((shared.holder_pid, everyone.holder_pid))

        def test_second(shared, everyone):
            assert (shared.holder_pid, everyone.holder_pid) == PIDS[0]
        """
    )
    pytester.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=2)


def test_a_relative_definitions_file_is_found_beside_the_test_file(
    pytester: pytest.Pytester,
) -> None:
    tests = pytester.mkdir("tests")
    (tests / "fleet.toml").write_text('name = "beside"\n[members.a]\ncommand = ["sleep", "60"]\n')
    (tests / "test_beside.py").write_text(
        "def test_it(fleet_cluster):\n"
        "    assert fleet_cluster('fleet.toml').status('a').state == 'running'\n"
    )
    pytester.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=1)  # run from above

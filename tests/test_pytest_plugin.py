"""The pytest plugin, run in a pytest of its own (pytester)."""

import json
from importlib.metadata import entry_points

import pytest

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
            fleet_cluster({"members": {"a": SLEEP}})
            raise AssertionError("on purpose")
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(passed=1, failed=1)
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

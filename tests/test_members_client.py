"""The client side of member sockets (fleetctl.members_client) and what waiting means in a
bound cluster: the same verdict as fleetd's member_wait (protocol.members.wait_verdict)."""

import os
import sys
import time

import msgspec
import pytest

import fleetctl
from fleetctl.members_client import status_on_disk
from protocol.errors import Absent, MemberFailed
from protocol.members import member_statefile, wait_verdict
from protocol.status import MemberState, MemberStatus

SLEEPER = ["sleep", "60"]


def _status(state: MemberState, error: str = "") -> MemberStatus:
    return MemberStatus(name="m", state=state, error=error)


# -- the verdict, as a table ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "verdict"),
    [
        (MemberState.RUNNING, True),
        (MemberState.STARTING, False),
        (MemberState.PREPARING, False),
        (MemberState.STOPPED, MemberFailed),
        (MemberState.ERROR, MemberFailed),
        (MemberState.ABSENT, Absent),
    ],
)
def test_the_wait_verdict_of_each_state(state: MemberState, verdict: object) -> None:
    if isinstance(verdict, bool):
        assert wait_verdict({"m": _status(state)}) is verdict
    else:
        with pytest.raises(verdict):  # type: ignore[call-overload]
            wait_verdict({"m": _status(state)})


def test_a_failed_member_fails_the_wait_with_its_error() -> None:
    with pytest.raises(MemberFailed, match="'m' failed: exited with code 3") as raised:
        wait_verdict({"m": _status(MemberState.ERROR, "exited with code 3")})
    assert raised.value.details == {"member": "m"}


# -- bound mode ---------------------------------------------------------------------------------


async def test_a_bound_wait_on_a_stopped_member_fails_at_once_as_fleetd_does() -> None:
    async with fleetctl.cluster({"members": {"a": {"command": SLEEPER}}}) as c:
        await c.wait_running(timeout=20)
        await c.stop("a")
        started = time.monotonic()
        with pytest.raises(MemberFailed, match="member 'a' failed: it is stopped"):
            await c.wait_running(["a"], timeout=20)
        assert time.monotonic() - started < 5, "the wait ran to its timeout"


def test_a_blocking_bound_wait_on_a_member_that_exited_fails_at_once() -> None:
    done = {"command": [sys.executable, "-c", "pass"], "restart": "no"}
    with fleetctl.cluster({"members": {"done": done, "a": {"command": SLEEPER}}}) as c:
        c.wait_running(["a"], timeout=20)
        deadline = time.monotonic() + 20
        while c.status("done").state != MemberState.STOPPED:  # it exits 0: stopped, not error
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(MemberFailed, match="member 'done' failed"):
            c.wait_running(["done"], timeout=20)
        assert time.monotonic() - started < 5, "the wait ran to its timeout"


async def test_a_bound_wait_for_an_unknown_member_is_absent() -> None:
    async with fleetctl.cluster({"members": {"a": {"command": SLEEPER}}}) as c:
        with pytest.raises(Absent, match="'nobody'"):
            await c.wait_running(["nobody"], timeout=20)


# -- the on-disk status of a member whose holder is gone ---------------------------------------


def _write_state(runtime_dir: str, name: str, data: bytes) -> None:
    path = member_statefile(runtime_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_a_member_without_a_state_file_is_absent(tmp_path: object) -> None:
    assert status_on_disk(str(tmp_path), "web").state == MemberState.ABSENT


def test_a_member_that_left_a_state_file_is_stopped(tmp_path: object) -> None:
    last = MemberStatus(name="web", state=MemberState.RUNNING, pid=42, running=True, restarts=2)
    _write_state(str(tmp_path), "web", msgspec.json.encode(last))
    status = status_on_disk(str(tmp_path), "web")
    assert (status.state, status.pid, status.running, status.restarts) == (
        MemberState.STOPPED,
        None,
        False,
        2,
    )


@pytest.mark.parametrize("data", [b"{not json", b'{"name": "web"}', b"", b"[[[[" * 1000])
def test_a_corrupt_state_file_says_so_rather_than_absent(tmp_path: object, data: bytes) -> None:
    _write_state(str(tmp_path), "web", data)
    status = status_on_disk(str(tmp_path), "web")
    assert status.state == MemberState.ERROR
    assert "state file" in status.error and "corrupt" in status.error
    assert member_statefile(str(tmp_path), "web") in status.error

"""What waiting means in a bound cluster: the same verdict as fleetd's member_wait
(protocol.members.wait_verdict)."""

import sys
import time

import pytest

import fleetctl
from protocol.errors import Absent, MemberFailed
from protocol.members import wait_verdict
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

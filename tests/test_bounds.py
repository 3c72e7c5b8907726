"""What one client can make fleetd (or a holder) hold, against real daemons over raw sockets:
unfinished frames against a shared budget, and time stalled mid-frame. The limits are in
fleetd.bounds.
"""

import fcntl
import socket
import struct
import termios
import time
from contextlib import ExitStack, suppress

from fleetd.bounds import (
    FRAME_IDLE_TIMEOUT,
    PARTIAL_FRAME_BUDGET,
    Limits,
)
from protocol import MAX_FRAME
from tests.processes import Fleetd, running_fleetd
from tests.wire import (
    TIMEOUT,
    ask,
    assert_ping_answered,
    assert_still_serving,
    error_of,
    frames_until_closed,
    raw,
    read_frames,
)

PARTIAL = MAX_FRAME - 4096
"""An unfinished frame just under the frame limit: the budget, not the limit, refuses it."""


def unfinished_ping(request_id: int, size: int = PARTIAL) -> bytes:
    """The first `size` bytes of a ping padded past them: `b'"}\\n'` finishes it."""
    start = b'{"op":"ping","id":%d,"pad":"' % request_id
    return start + b"x" * (size - len(start))


def wait_read(sock: socket.socket) -> None:
    """Until the peer has read every byte we sent (the send queue, SIOCOUTQ, is empty)."""
    deadline = time.monotonic() + TIMEOUT
    while struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]:
        assert time.monotonic() < deadline, "the daemon stopped reading"
        time.sleep(0.005)


def send_until_closed(sock: socket.socket, data: bytes) -> None:
    """Send what the daemon takes: it may close the connection while we still send."""
    with suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def limit_of(frame: dict[str, object]) -> object:
    error = frame["error"]
    assert isinstance(error, dict)
    return error["details"]["limit"]


# -- unfinished frames: one budget for every connection ------------------------------------


def test_unfinished_frames_past_the_budget_are_refused_and_the_others_keep_working(
    fleetd: Fleetd,
) -> None:
    fits = PARTIAL_FRAME_BUDGET // PARTIAL
    assert (fits + 1) * PARTIAL > PARTIAL_FRAME_BUDGET
    with ExitStack() as stack:
        holding = []
        for n in range(fits):
            sock = stack.enter_context(raw(fleetd))
            sock.sendall(unfinished_ping(n))
            wait_read(sock)
            holding.append(sock)
        for n in range(2):
            with raw(fleetd) as late:
                send_until_closed(late, unfinished_ping(100 + n))
                [refusal] = frames_until_closed(late)
            assert error_of(refusal) == (None, "limit_exceeded")
            assert limit_of(refusal) == "partial_frame_budget"
        with raw(fleetd) as bystander:
            assert_ping_answered(bystander, 1)
        for n, sock in enumerate(holding):
            sock.sendall(b'"}\n')
            assert read_frames(sock, 1) == [{"id": n, "ok": True, "result": {}}]
        with raw(fleetd) as after:  # the finished frames gave their share back
            after.sendall(unfinished_ping(7))
            wait_read(after)
            assert ask(after, b'"}\n') == {"id": 7, "ok": True, "result": {}}
    assert_still_serving(fleetd)


def test_a_peer_that_leaves_mid_frame_gives_its_share_of_the_budget_back(
    fleetd: Fleetd,
) -> None:
    fits = PARTIAL_FRAME_BUDGET // PARTIAL
    for _ in range(2):  # twice the budget in all, never more than it at once
        with ExitStack() as stack:
            for n in range(fits):
                sock = stack.enter_context(raw(fleetd))
                sock.sendall(unfinished_ping(n))
                wait_read(sock)
        assert_still_serving(fleetd)
    with raw(fleetd) as sock:
        sock.sendall(unfinished_ping(1))
        wait_read(sock)
        assert ask(sock, b'"}\n') == {"id": 1, "ok": True, "result": {}}


# -- stalled mid-frame ------------------------------------------------------------------------


def test_a_connection_stalled_mid_frame_is_closed_after_the_idle_timeout(tempdir: str) -> None:
    """Part of a frame and nothing more for the timeout: an error frame, then closed. A frame
    that keeps coming, however slowly, and a connection idle between frames, stay."""
    timeout = 1.0
    with running_fleetd(tempdir, FLEET_FRAME_IDLE_TIMEOUT=str(timeout)) as daemon:
        with raw(daemon) as idle, raw(daemon) as stalled, raw(daemon) as slow:
            assert_ping_answered(idle, 1)
            stalled.sendall(b'{"op":"ping","id":2')
            stalled_at = time.monotonic()
            for byte in b'{"op":"ping","id":3}':  # 2 s in all
                slow.sendall(bytes([byte]))
                time.sleep(timeout / 10)
            assert ask(slow, b"\n") == {"id": 3, "ok": True, "result": {}}
            [refusal] = frames_until_closed(stalled)
            assert time.monotonic() - stalled_at >= timeout
            assert error_of(refusal) == (None, "limit_exceeded")
            assert limit_of(refusal) == "frame_idle_timeout"
            assert_ping_answered(idle, 4)
        assert_still_serving(daemon)


def test_the_idle_timeout_comes_from_the_environment_else_its_default() -> None:
    assert Limits.from_environ({}).frame_idle_timeout == FRAME_IDLE_TIMEOUT
    assert Limits.from_environ({"FLEET_FRAME_IDLE_TIMEOUT": "0.25"}).frame_idle_timeout == 0.25
    for bad in ("soon", "0", "-1", "inf", "nan"):
        limits = Limits.from_environ({"FLEET_FRAME_IDLE_TIMEOUT": bad})
        assert limits.frame_idle_timeout == FRAME_IDLE_TIMEOUT, bad

"""What one client can make fleetd (or a holder) hold, against real daemons over raw sockets:
unfinished frames against a shared budget, time stalled mid-frame, long polls outstanding,
requests in flight, and the memory a client leaves behind. The limits are in fleetd.core.bounds.
"""

import fcntl
import os
import select
import socket
import struct
import termios
import time
from contextlib import ExitStack, closing, suppress

import anyio
from anyio.abc import UNIXSocketStream

import fleetctl
from fleetctl.polling import Poller
from fleetd.core.bounds import (
    FRAME_IDLE_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_WAITS,
    PARTIAL_FRAME_BUDGET,
    FrameBudget,
    Limits,
)
from fleetd.core.dispatch import Dispatcher, Peer
from fleetd.core.server import Connection
from protocol import MAX_FRAME
from protocol.clusters import MemberWait
from protocol.framing import encode
from protocol.members import MemberState, Watch, member_socket_path
from protocol.messages import Empty, LeaseAcquire, LeaseWatch, Ping
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
    assert Limits.from_environ({"FLEET_FRAME_IDLE_TIMEOUT": "1m30s"}).frame_idle_timeout == 90
    for bad in ("soon", "0", "-1", "inf", "nan"):
        limits = Limits.from_environ({"FLEET_FRAME_IDLE_TIMEOUT": bad})
        assert limits.frame_idle_timeout == FRAME_IDLE_TIMEOUT, bad


# -- long polls per connection --------------------------------------------------------------


def watch_frames(first_id: int, count: int, cursor: int, epoch: str) -> bytes:
    return b"".join(
        encode(LeaseWatch(id=i, prefix="b/", after=cursor, epoch=epoch, wait=30))
        for i in range(first_id, first_id + count)
    )


def test_waits_past_the_cap_are_refused_at_once_and_the_earlier_ones_still_answered(
    fleetd: Fleetd,
) -> None:
    with fleetctl.SyncClient(fleetd.socket_path) as client:
        start = client.lease_watch("b/")
        with raw(fleetd) as sock:
            sock.sendall(watch_frames(0, MAX_WAITS, start.cursor, start.epoch))
            past = [
                *watch_frames(MAX_WAITS, 2, start.cursor, start.epoch).splitlines(True),
                encode(MemberWait(id=MAX_WAITS + 2, names=["web"], wait=30)),
            ]
            sock.sendall(b"".join(past) + encode(Ping(id=MAX_WAITS + 3)))
            refused = read_frames(sock, 4)
            assert [error_of(f) for f in refused[:3]] == [
                (MAX_WAITS + n, "limit_exceeded") for n in range(3)
            ]
            assert {limit_of(f) for f in refused[:3]} == {"waits_per_connection"}
            assert refused[3] == {"id": MAX_WAITS + 3, "ok": True, "result": {}}
            client.lease_acquire("b/one", "me", 30)
            answered = read_frames(sock, MAX_WAITS)
            assert sorted(a["id"] for a in answered) == list(range(MAX_WAITS))  # type: ignore[type-var]
            assert all(a["ok"] and a["result"]["events"] for a in answered)  # type: ignore[index]
            # answered waits no longer count
            sock.sendall(watch_frames(0, MAX_WAITS, start.cursor + 1, start.epoch))
            client.lease_release("b/one", "me")
            assert all(f["ok"] for f in read_frames(sock, MAX_WAITS))
    assert_still_serving(fleetd)


def test_a_peer_that_hangs_up_leaves_nothing_behind(fleetd: Fleetd) -> None:
    """Its long polls end at once, not when they would have timed out: the connection is gone
    from fleetd (its descriptor closed) while they had a minute to go."""
    assert fleetd.process is not None
    descriptors = f"/proc/{fleetd.process.pid}/fd"
    with fleetctl.SyncClient(fleetd.socket_path) as client:
        start = client.lease_watch("b/")
        client.ping()
        before = len(os.listdir(descriptors))
        with raw(fleetd) as sock:
            sock.sendall(watch_frames(0, MAX_WAITS, start.cursor, start.epoch))
            assert ask(sock, encode(Ping(id=-1))) == {"id": -1, "ok": True, "result": {}}
            assert len(os.listdir(descriptors)) == before + 1
        deadline = time.monotonic() + 5
        while len(os.listdir(descriptors)) > before:
            assert time.monotonic() < deadline, "the connection outlived its peer"
            time.sleep(0.02)
    assert_still_serving(fleetd)


def test_a_peer_that_only_shuts_its_writing_half_still_gets_its_long_poll_answered(
    fleetd: Fleetd,
) -> None:
    with fleetctl.SyncClient(fleetd.socket_path) as client:
        start = client.lease_watch("b/")
    with raw(fleetd) as sock:
        sock.sendall(encode(LeaseWatch(id=1, prefix="b/", after=start.cursor, wait=0.5)))
        sock.shutdown(socket.SHUT_WR)
        [answer] = frames_until_closed(sock)
    assert answer["id"] == 1 and answer["ok"] and not answer["result"].get("events")  # type: ignore[union-attr]


def test_watches_on_a_member_socket_are_capped_per_connection() -> None:
    with fleetctl.cluster({"members": {"a": {"command": ["sleep", "60"]}}}) as c:
        c.wait_running()
        with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(member_socket_path(c.runtime_dir, "a"))
            sock.sendall(b"".join(encode(Watch(id=i)) for i in range(MAX_WAITS + 1)))
            answers = read_frames(sock, MAX_WAITS + 1)
        assert all(a["ok"] for a in answers[:MAX_WAITS])
        assert error_of(answers[MAX_WAITS]) == (MAX_WAITS, "limit_exceeded")
        assert c.status("a").state == MemberState.RUNNING


# -- requests in flight: backpressure, not errors -------------------------------------------


class _Gate:
    """A coroutine handler that waits for the test to open it, counting who entered; `full`
    is set once `expected` did."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.entered = 0
        self.full = anyio.Event()
        self.open = anyio.Event()

    async def enter(self, request: LeaseAcquire, peer: Peer) -> Empty:
        self.entered += 1
        if self.entered == self.expected:
            self.full.set()
        await self.open.wait()
        return Empty()


async def test_past_the_in_flight_limit_a_connection_is_not_read_until_one_is_answered() -> None:
    """Backpressure, not an error: every request is answered once the first ones are."""
    limit, sent = 8, 20
    gate = _Gate(limit)
    dispatcher = Dispatcher()
    dispatcher.register(LeaseAcquire, gate.enter)
    dispatcher.register(Ping, lambda request, peer: Empty())
    ours, theirs = socket.socketpair()
    theirs.settimeout(TIMEOUT)
    with closing(theirs):
        stream = await UNIXSocketStream.from_socket(ours)
        connection = Connection(
            stream,
            dispatcher,
            Peer(os.getpid(), os.getuid(), os.getgid()),
            Poller(),
            limits=Limits(max_in_flight=limit),
            budget=FrameBudget(PARTIAL_FRAME_BUDGET),
        )

        async def serve() -> None:
            async with stream, anyio.create_task_group() as in_flight:
                await connection.read_requests(in_flight)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            requests = [encode(LeaseAcquire(id=i, name="n", owner="o")) for i in range(sent)]
            theirs.sendall(b"".join(requests) + encode(Ping(id=sent)))  # one read's worth
            with anyio.fail_after(TIMEOUT):
                await gate.full.wait()
            await anyio.sleep(0.2)
            assert gate.entered == limit
            assert not select.select([theirs], [], [], 0)[0]  # not even the ping: unread
            gate.open.set()
            answers = await anyio.to_thread.run_sync(read_frames, theirs, sent + 1)
            theirs.shutdown(socket.SHUT_WR)
    assert gate.entered == sent
    assert sorted(a["id"] for a in answers) == list(range(sent + 1))  # type: ignore[type-var]
    assert all(a["ok"] for a in answers)


def test_the_in_flight_limit_leaves_room_for_every_wait_and_a_pipeline_beside_them() -> None:
    assert MAX_IN_FLIGHT >= MAX_WAITS + 256


# -- memory back when a client leaves ---------------------------------------------------------


def test_memory_returns_after_clients_with_thousands_of_watches_leave(fleetd: Fleetd) -> None:
    """RSS from /proc, loosely: CPython keeps some arenas that a few objects made during the
    load still pin (README, "Bounds"), but not the watches' own memory."""
    assert fleetd.process is not None
    pid = fleetd.process.pid
    with fleetctl.SyncClient(fleetd.socket_path) as client:
        start = client.lease_watch("b/")
        for _ in range(100):
            client.ping()
    rest = rss_mib(pid)
    with ExitStack() as stack:
        for _ in range(20):
            sock = stack.enter_context(raw(fleetd))
            sock.sendall(watch_frames(0, MAX_WAITS, start.cursor, start.epoch))
            assert ask(sock, encode(Ping(id=-1)))["ok"]
        held = rss_mib(pid)
    assert held > rest + 20, f"{20 * MAX_WAITS} watches cost only {held - rest:.1f} MiB"
    deadline = time.monotonic() + 10
    while (left := rss_mib(pid)) > rest + 30:
        assert time.monotonic() < deadline, f"RSS {rest:.0f} MiB at rest, {left:.0f} after"
        time.sleep(0.1)
    assert_still_serving(fleetd)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")

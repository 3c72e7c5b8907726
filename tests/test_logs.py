"""`fleetctl logs NAME -f` against real holders under a real fleetd: what is there, then what
the member writes, across the log's rotation and the member's restarts, until the member leaves
its cluster or a signal ends it.

Members here print when the test says so: they read a fifo (`feed`) that the test writes.
"""

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetctl.logs import last_lines
from fleetd.holder.members import LOG_MAX_BYTES
from tests.processes import FLEETCTL, Fleetd
from tests.test_detached import client, ctl, definition, up


@pytest.fixture
def feed(holders: Fleetd) -> str:
    """A fifo the members read: what the test writes there, a member prints."""
    path = os.path.join(holders.root, "feed")
    os.mkfifo(path)
    return path


def send(feed: str, data: bytes) -> None:
    """Blocks until the member opened the fifo, as a rendezvous does."""
    with open(feed, "wb", buffering=0) as fifo:
        fifo.write(data)


def echo(feed: str, *, fd: int = 1) -> str:
    """A member that prints `first` (its readiness), then whatever comes through `feed`."""
    redirect = "" if fd == 1 else f" >&{fd}"
    return (
        f'command = ["sh", "-c", "echo out; echo first{redirect}; exec cat {feed}{redirect}"]\n'
        'ready = "log:^first$"'
    )


class Follower:
    """`fleetctl logs -f` as a real process, and what it printed so far."""

    def __init__(self, daemon: Fleetd, *args: str) -> None:
        self.process = subprocess.Popen(
            [*FLEETCTL, "logs", "-f", *args],
            env=daemon.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Everything printed once `marker` was; fails after `timeout` seconds."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self.out:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"no {marker!r} within {timeout}s: {self.out[-200:]!r}")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise AssertionError(f"exited before {marker!r}: {self.out[-200:]!r}")
            self.out += chunk
        return self.out

    def wait(self, timeout: float) -> tuple[int, bytes, bytes]:
        """Its exit code, all it printed, and its stderr."""
        out, err = self.process.communicate(timeout=timeout)
        self.out += out
        return self.process.returncode, self.out, err

    def running_after(self, seconds: float) -> bool:
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def follow(holders: Fleetd) -> Iterator[type[Follower]]:
    """Start followers with follow(daemon, NAME, ...); each is killed at the end if it runs."""
    started: list[Follower] = []

    def start(daemon: Fleetd, *args: str) -> Follower:
        follower = Follower(daemon, *args)
        started.append(follower)
        return follower

    try:
        yield start  # type: ignore[misc]
    finally:
        for follower in started:
            follower.close()


def test_follow_prints_what_is_there_then_new_output_within_a_second(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m")
    assert follower.read_until(b"first\n", 5) == b"out\nfirst\n"
    sent = time.monotonic()
    send(feed, b"second\n")
    assert follower.read_until(b"second\n", 1.0) == b"out\nfirst\nsecond\n"
    assert time.monotonic() - sent < 1.0


def test_follow_stderr_follows_the_member_stderr(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed, fd=2)), "--wait")
    follower = follow(holders, "m", "--stderr")
    follower.read_until(b"first\n", 5)
    send(feed, b"second\n")
    assert follower.read_until(b"second\n", 1.0) == b"first\nsecond\n"


def test_follow_keeps_up_across_the_log_rotation(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    line = b"x" * 63 + b"\n"
    lines = LOG_MAX_BYTES // len(line) + 16384  # past the cap: rotated once, mid-stream
    loud = f"echo first; read go < {feed}; yes {line.decode().strip()} | head -n {lines}; echo last"
    up(holders, definition("f", m=f'command = ["sh", "-c", "{loud}; exec sleep 60"]'), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    send(feed, b"go\n")
    out = follower.read_until(b"last\n", 10)
    assert out == b"first\n" + line * lines + b"last\n"
    with client(holders) as c:
        log_path = c.member_logs("m").stdout
    assert os.path.getsize(f"{log_path}.1") > LOG_MAX_BYTES - 65536  # it did rotate
    assert ctl(holders, "logs", "m")[1].encode() == out  # and plain `logs` reads both parts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_follow_with_exit_0_and_no_traceback(
    holders: Fleetd, feed: str, follow: type[Follower], signum: int
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    follower.process.send_signal(signum)
    assert follower.wait(5) == (0, b"out\nfirst\n", b"")


def test_follow_exits_0_quietly_once_its_reader_is_gone(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m")  # as in `fleetctl logs -f m | head -2`
    follower.read_until(b"first\n", 5)
    assert follower.process.stdout is not None and follower.process.stderr is not None
    follower.process.stdout.close()
    send(feed, b"unread\n")
    assert follower.process.wait(2) == 0
    assert follower.process.stderr.read() == b""


def test_follow_of_an_unknown_member_is_absent_exit_11(
    holders: Fleetd, follow: type[Follower]
) -> None:
    code, out, err = follow(holders, "nope").wait(5)
    assert (code, out, err) == (11, b"", b"fleetctl: no member or cluster 'nope'\n")


def test_follow_ends_with_exit_0_once_the_member_is_stopped_and_its_last_words_printed(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    polite = "trap 'echo bye; exit 0' TERM; echo first; sleep 60 & wait"
    sleeper = 'command = ["sleep", "60"]'
    up(holders, definition("f", m=f'command = ["sh", "-c", "{polite}"]', s=sleeper), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    assert ctl(holders, "stop", "m")[0] == 0
    assert follower.wait(2) == (0, b"first\nbye\n", b"")


def test_follow_ends_with_exit_0_when_the_cluster_goes_down(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed), s='command = ["sleep", "60"]'), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    assert ctl(holders, "down", "f")[0] == 0
    assert follower.wait(2) == (0, b"out\nfirst\n", b"")


def test_follow_ends_with_exit_0_when_the_holder_is_killed(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    envelope = up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    os.kill(int(envelope["holder_pid"]), signal.SIGKILL)
    assert follower.wait(2) == (0, b"out\nfirst\n", b"")


def test_follow_of_a_member_whose_cluster_is_down_prints_its_log_and_exits_0(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    assert ctl(holders, "down", "f")[0] == 0
    assert follow(holders, "m").wait(2) == (0, b"out\nfirst\n", b"")


def test_follow_keeps_following_a_member_across_its_restarts(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    crashing = (
        f'command = ["sh", "-c", "echo run; read x < {feed}; exit 3"]\nrestart = "on-failure"'
    )
    up(holders, definition("f", m=crashing), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"run\n", 5)
    send(feed, b"crash\n")
    assert follower.read_until(b"run\nrun\n", 2) == b"run\nrun\n"
    assert follower.running_after(0.2)


def test_follow_outlives_a_fleetd_restart(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m")
    follower.read_until(b"first\n", 5)
    holders.signal(signal.SIGKILL)
    holders.wait()
    send(feed, b"while fleetd was down\n")
    follower.read_until(b"down\n", 1.0)
    holders.start()
    assert ctl(holders, "stop", "m")[0] == 0
    assert follower.wait(2) == (0, b"out\nfirst\nwhile fleetd was down\n", b"")


def test_plain_logs_prints_the_log_and_exits(holders: Fleetd, feed: str) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    assert ctl(holders, "logs", "m") == (0, "out\nfirst\n", "")


def test_tail_prints_only_the_last_lines(holders: Fleetd, feed: str) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    assert ctl(holders, "logs", "m", "--tail", "1") == (0, "first\n", "")
    assert ctl(holders, "logs", "m", "-n", "5") == (0, "out\nfirst\n", "")
    assert ctl(holders, "logs", "m", "-n", "0") == (0, "", "")


def test_follow_with_tail_starts_from_the_last_lines(
    holders: Fleetd, feed: str, follow: type[Follower]
) -> None:
    up(holders, definition("f", m=echo(feed)), "--wait")
    follower = follow(holders, "m", "--tail", "1")
    assert follower.read_until(b"first\n", timeout=10) == b"first\n"
    send(feed, b"later\n")
    assert follower.read_until(b"later\n", timeout=10) == b"first\nlater\n"


lines = st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"")), max_size=12)


@given(lines, st.booleans(), st.integers(0, 15))
def test_last_lines_are_the_last_lines(parts: list[bytes], ended: bool, count: int) -> None:
    data = b"\n".join(parts) + (b"\n" if ended and parts else b"")
    *whole, last = data.split(b"\n")
    every = [line + b"\n" for line in whole] + ([last] if last else [])
    assert last_lines(data, count) == (b"".join(every[-count:]) if count else b"")

"""`fleetctl top`: the live view of task runs, as a real process against a real fleetd with
real workers (tests/task_worker.py): plain text when piped or --once, and on a terminal (a
pseudo-terminal here) a display redrawn in place, which `q`, Ctrl-C and SIGTERM end cleanly.
"""

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetctl.sync import SyncClient
from fleetctl.top import _wait_for_quit, age_of, event_line, worker_rows
from protocol.runs import RunCancel, TaskView
from protocol.tasks import InboxEntry, timestamp
from tests.processes import FLEETCTL, Fleetd, fleetctl
from tests.test_tasks import submit, task, wait_run, wait_task, worker

SHOW_CURSOR = b"\x1b[?25h"
HIDE_CURSOR = b"\x1b[?25l"
CURSOR_UP = b"\x1b[1A"


@pytest.fixture
def daemon(holders: Fleetd) -> Fleetd:
    """fleetd, whose holders (its task workers' too) are gone at the end."""
    return holders


def cancel(daemon: Fleetd, run: str) -> None:
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)


# -- what is shown, as data -------------------------------------------------------------------


def view(tid: str, state: str, member: str = "w1.1", beat: float = 0.0) -> TaskView:
    entry = InboxEntry(run_id="run-1", task_id=tid, priority=0, enqueued_at=timestamp(0))
    return TaskView(
        entry=entry,
        state=state,  # type: ignore[arg-type]
        worker_id="w1",
        member=member,
        last_heartbeat_at=timestamp(beat) if beat else "",
    )


def test_a_worker_slot_shows_its_current_task_and_how_long_ago_it_heartbeat() -> None:
    tasks = [view("a", "done"), view("b", "running", beat=100.0), view("c", "queued", member="")]
    assert worker_rows(tasks, now=103.5) == [("w1.1", "w1", "run-1", "b", "running", "3.5s")]


def test_a_worker_slot_whose_tasks_ended_is_idle() -> None:
    assert worker_rows([view("a", "done"), view("b", "failed")], now=0) == [
        ("w1.1", "-", "run-1", "-", "idle", "-")
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0.25, "0.2s"), (42, "42s"), (185, "3m05s"), (7500, "2h05m")]
)
def test_heartbeat_ages_are_short(seconds: float, shown: str) -> None:
    assert age_of(timestamp(1000.0), 1000.0 + seconds) == shown


def test_an_event_is_one_line_of_time_run_seq_task_state_and_detail() -> None:
    event = {
        "state": "failed",
        "seq": 7,
        "run_id": "run-1",
        "worker_id": "w1",
        "task_id": "t1",
        "timestamp": "2026-06-12T17:00:00.250Z",
        "reason": "exited with code 3",
        "recoverable": True,
    }
    clock = time.strftime("%H:%M:%S", time.localtime(1781283600)) + ".250"
    assert event_line(event) == (
        f'{clock}  run-1  7  t1  failed  worker=w1 reason="exited with code 3" recoverable=true'
    )


# -- plain text ---------------------------------------------------------------------------------


def test_once_names_the_run_its_tasks_by_state_and_its_busy_workers(daemon: Fleetd) -> None:
    tasks = [task("long", {"sleep": 30}), task("quick")]
    run = submit(daemon, tasks, [worker("w1"), worker("w2")])
    wait_task(daemon, run, "quick", "done")
    wait_task(daemon, run, "long", "running")
    try:
        done = fleetctl("top", "--once", env=daemon.env)
    finally:
        cancel(daemon, run)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [run, "running", "done=1", "running=1", "test", "run"] in [ln.split() for ln in lines]
    busy = [ln.split() for ln in lines if " long " in f" {ln} " and "running" in ln]
    assert any(row[2:5] == [run, "long", "running"] for row in busy), done.stdout
    assert "\x1b" not in done.stdout


def test_once_with_json_is_one_envelope(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t1")], [worker()])
    wait_run(daemon, run)
    done = fleetctl("--json", "top", env=daemon.env)
    assert done.returncode == 0, done.stderr
    envelope = json.loads(done.stdout)
    assert envelope["outcome"] == "ok"
    assert [(r["id"], r["status"], r["tasks"]) for r in envelope["runs"]] == [
        (run, "completed", {"done": 1})
    ]
    assert envelope["events"][-1]["state"] == "completed"


def test_an_unknown_run_is_absent(daemon: Fleetd) -> None:
    done = fleetctl("top", "--once", "--run", "run-99", env=daemon.env)
    assert (done.returncode, done.stderr) == (11, "fleetctl: no run 'run-99'\n")


def test_without_fleetd_top_says_so_and_exits_unavailable(tempdir: str) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "none.sock")}
    done = fleetctl("top", "--once", env=env)
    assert done.returncode == 14
    assert "none.sock" in done.stderr and "fleetd" in done.stderr


def read_until(fd: int, seen: bytearray, done: Callable[[bytes], bool], timeout: float) -> None:
    """Read `fd` into `seen` until `done(seen)`."""
    deadline = time.monotonic() + timeout
    while not done(bytes(seen)):
        left = deadline - time.monotonic()
        assert left > 0, bytes(seen)[-3000:]
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                chunk = b""
            assert chunk, bytes(seen)[-3000:]
            seen += chunk


def test_piped_it_prints_each_new_event_as_a_line_until_killed(daemon: Fleetd) -> None:
    top = subprocess.Popen(
        [*FLEETCTL, "top"], env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out = bytearray()
        read_until(top.stdout.fileno(), out, lambda seen: b"no events\n" in seen, 10)  # type: ignore[union-attr]
        run = submit(daemon, [task("t1")], [worker()])
        completed = f"  {run}  ".encode()

        def has_completed(seen: bytes) -> bool:
            return any(completed in ln and b" completed " in ln for ln in seen.splitlines())

        read_until(top.stdout.fileno(), out, has_completed, 10)  # type: ignore[union-attr]
        top.send_signal(signal.SIGTERM)
        assert top.wait(10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        top.stdout.close()  # type: ignore[union-attr]
        top.stderr.close()  # type: ignore[union-attr]
    states = [ln.split()[4] for ln in out.decode().split("no events\n")[1].splitlines()]
    assert states[:3] == ["queued", "leased", "starting"]
    assert b"\x1b" not in out


# -- on a terminal ----------------------------------------------------------------------------


class Terminal:
    """fleetctl top on a pseudo-terminal of its own (its controlling terminal, so that Ctrl-C
    typed there interrupts it), 100x40."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        self.process = subprocess.Popen(
            [*FLEETCTL, "top", *args],
            env={**env, "TERM": "xterm-256color"},
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=_take_the_terminal,  # noqa: PLW1509 (tests start processes from one thread)
        )
        self.seen = bytearray()

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 10.0) -> None:
        read_until(self.master, self.seen, done, timeout)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 10.0) -> int:
        """Its exit code, reading what it writes meanwhile (a full terminal would block it)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None or select.select([self.master], [], [], 0)[0]:
            assert time.monotonic() < deadline, bytes(self.seen)[-3000:]
            if select.select([self.master], [], [], 0.05)[0]:
                self.seen += os.read(self.master, 65536)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def _take_the_terminal() -> None:
    """As an interactive shell starts a job: on its terminal, with Ctrl-C's default (a test
    runner started in the background inherits SIGINT ignored, and passes it on)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str, env: dict[str, str]) -> Terminal:
        opened.append(Terminal(list(args), env))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def last_frame(seen: bytes) -> bytes:
    """What was drawn since the cursor last went back up to redraw."""
    return seen.rsplit(CURSOR_UP, 1)[-1]


def test_on_a_terminal_the_view_is_redrawn_in_place_as_the_run_goes(
    daemon: Fleetd, terminal: Callable[..., Terminal]
) -> None:
    run = submit(daemon, [task("t1", {"sleep": 1}), task("t2", {"sleep": 1})], [worker()])
    term = terminal("--interval", "200ms", env=daemon.env)
    term.read_until(lambda seen: run.encode() in seen)
    term.read_until(lambda seen: b"completed" in last_frame(seen) and b"done=2" in last_frame(seen))
    assert CURSOR_UP in term.seen  # redrawn over the previous frame, not appended
    term.type(b"q")
    assert term.wait() == 0


def test_on_a_terminal_workers_show_their_current_task(
    daemon: Fleetd, terminal: Callable[..., Terminal]
) -> None:
    run = submit(daemon, [task("long", {"sleep": 30, "heartbeat": 0.2})], [worker("w7")])
    wait_task(daemon, run, "long", "running")
    term = terminal(env=daemon.env)
    try:
        term.read_until(lambda seen: b"w7.1" in seen and b"long" in seen)
        term.type(b"q")
        assert term.wait() == 0
    finally:
        cancel(daemon, run)


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda term: term.type(b"q"), id="q"),
        pytest.param(lambda term: term.type(b"\x03"), id="ctrl-c"),
        pytest.param(lambda term: term.process.send_signal(signal.SIGINT), id="sigint"),
        pytest.param(lambda term: term.process.send_signal(signal.SIGTERM), id="sigterm"),
    ],
)
def test_quitting_exits_0_with_the_terminal_restored(
    daemon: Fleetd, terminal: Callable[..., Terminal], stop: Callable[[Terminal], Any]
) -> None:
    term = terminal(env=daemon.env)
    term.read_until(lambda seen: b"no runs" in seen or b"runs" in seen)
    term.read_until(lambda seen: HIDE_CURSOR in seen)
    assert termios.tcgetattr(term.slave)[3] & termios.ECHO == 0  # keys read unechoed meanwhile
    stop(term)
    assert term.wait() == 0, bytes(term.seen)
    assert term.seen.rfind(SHOW_CURSOR) > term.seen.rfind(HIDE_CURSOR)
    assert termios.tcgetattr(term.slave) == term.before


def test_when_fleetd_goes_away_the_view_ends_unavailable_with_the_terminal_restored(
    daemon: Fleetd, terminal: Callable[..., Terminal]
) -> None:
    term = terminal(env=daemon.env)
    term.read_until(lambda seen: HIDE_CURSOR in seen)
    daemon.stop()
    assert term.wait() == 14
    assert term.seen.rfind(SHOW_CURSOR) > term.seen.rfind(HIDE_CURSOR)
    assert b"fleetctl: " in term.seen.rsplit(SHOW_CURSOR, 1)[-1]
    assert termios.tcgetattr(term.slave) == term.before


def test_a_ctrl_c_the_kernel_gives_another_thread_still_ends_the_view() -> None:
    """The view's main thread waits for a key; the kernel may deliver SIGINT to its feed
    thread instead, as here, and the wait must end all the same (not at the next key)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ended, end = os.pipe()
    gave_up: list[bool] = []

    def give_up() -> None:  # what ends the wait when the signal did not: the failure
        gave_up.append(True)
        os.write(end, b"!")

    interrupter = threading.Timer(
        0.1, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    )
    fallback = threading.Timer(5.0, give_up)
    try:
        interrupter.start()
        fallback.start()
        with pytest.raises(KeyboardInterrupt):
            _wait_for_quit(None, ended)
        assert not gave_up
    finally:
        fallback.cancel()
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
        os.close(ended)
        os.close(end)


def test_rich_is_loaded_by_top_alone() -> None:
    probe = "import sys, fleetctl.cli; print('rich' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"

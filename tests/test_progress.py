"""While `wait` and `up --wait` wait, a terminal shows which members are pending; a pipe shows
nothing extra. A failed `up --wait` says the cluster was left up, and how to bring it down."""

import json
import os
import pty
import select
import subprocess
import threading
import time

from fleetctl.progress import pending_line
from tests.processes import FLEETCTL, Fleetd
from tests.test_detached import ctl, definition, up, write

GATED = (
    'command = ["sh", "-c", "while [ ! -e {gate} ]; do sleep 0.02; done; echo go; exec sleep 60"]'
    '\nready = "log:^go$"'
)
"""Starting until the test creates its gate file (once the terminal showed it waiting)."""
CRASHING = 'command = ["sh", "-c", "echo boom >&2; exit 3"]\nready = "log:^go$"'


def test_the_line_names_the_pending_members_and_their_states() -> None:
    states = [("api", "running"), ("db", "starting"), ("cache", "backoff")]
    assert pending_line(states, 80) == "waiting for 2 of 3: db (starting), cache (backoff)"
    assert pending_line(states, 20) == "waiting for 2 of 3:…"
    assert pending_line([("api", "running")], 80) == ""


def slow(daemon: Fleetd) -> str:
    """A member of GATED whose gate is `daemon.root`/gate."""
    return GATED.replace("{gate}", os.path.join(daemon.root, "gate"))


def stderr_on_a_terminal(daemon: Fleetd, *args: str, timeout: float = 30) -> tuple[int, bytes]:
    """Run fleetctl with stderr on a pseudo-terminal; its exit code and what it showed there.
    Once it shows it is waiting, the gate of slow() opens."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*FLEETCTL, *args], env=daemon.env, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.1)[0]:
                try:
                    shown += os.read(controller, 4096)
                except OSError:  # the terminal closed with the process
                    break
                if b"waiting for" in shown:
                    open(os.path.join(daemon.root, "gate"), "a").close()
        return process.wait(timeout=max(0.0, deadline - time.monotonic())), shown
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_wait_on_a_terminal_shows_the_pending_members_then_clears_the_line(
    holders: Fleetd,
) -> None:
    up(holders, definition("slow", m=slow(holders)))
    code, shown = stderr_on_a_terminal(holders, "wait", "slow/m")
    assert code == 0
    assert b"waiting for 1 of 1: m (starting)" in shown
    assert shown.endswith(b"\r\x1b[K")


def test_up_wait_on_a_terminal_shows_them_too(holders: Fleetd) -> None:
    path = write(holders, "fleet.toml", definition("slow", m=slow(holders)))
    code, shown = stderr_on_a_terminal(holders, "up", "-f", path, "--wait")
    assert code == 0
    assert b"waiting for 1 of 1: m (starting)" in shown


def test_wait_into_a_pipe_shows_nothing_extra(holders: Fleetd) -> None:
    up(holders, definition("slow", m=slow(holders)))
    gate = threading.Timer(1.0, lambda: open(os.path.join(holders.root, "gate"), "a").close())
    gate.start()  # while the wait waits
    try:
        assert ctl(holders, "wait", "slow/m")[2] == ""
    finally:
        gate.join()


def test_a_failed_up_wait_says_the_cluster_was_left_up_and_how_to_stop_it(
    holders: Fleetd,
) -> None:
    path = write(holders, "fleet.toml", definition("crash", m=CRASHING))
    code, _, err = ctl(holders, "up", "-f", path, "--wait")
    assert code == 1
    assert "exited with code 3 before it was ready; stderr: boom" in err  # why it failed
    assert "cluster crash was left up: `fleetctl down crash` stops it" in err
    code, out, _ = ctl(holders, "--json", "up", "-f", path, "--wait", "--idempotent")
    assert code == 1
    assert "was left up" in json.loads(out)["error"]["message"]

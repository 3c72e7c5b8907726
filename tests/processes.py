"""Test support: a real fleetd as a subprocess, and the leak scan every test ends with."""

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import pytest

from fleetd.core import cgroups
from fleetd.core.pidfiles import is_running, read_pidfile
from protocol.members import HOLDER_PIDFILE

RUN_TAG = "FLEET_TEST_RUN"
"""Set in the environment of everything a test starts, so that leftovers can be found."""

FLEETD = [sys.executable, "-m", "fleetd"]
FLEETCTL = [sys.executable, "-m", "fleetctl"]
HOLDER_NAME = "fleetd-holder"
TEMPLATE_NAME = "fleetd-template"
"""What `ps -e` shows for a holder and for a holder template (fleetd.holder.program.name_process):
their command lines may be alike, a forked holder's being its template's."""


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs a member as another user: needs root (CI runs as root)"
)


def short_tempdir() -> str:
    """Unix socket paths must stay under 107 bytes: pytest's tmp_path is too deep."""
    return tempfile.mkdtemp(dir="/tmp", prefix=tempdir_prefix())


def tempdir_prefix() -> str:
    """Per test run, so that concurrent runs on one machine never see each other's dirs."""
    return f"fl-{os.environ.get(RUN_TAG, 'norun')[:6]}-"


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries this run's tag, with their
    command lines; but not this process's own template for bound clusters (fleetctl.template),
    which lives as long as this process does, on purpose."""
    return [
        (pid, _command_line(pid))
        for pid, parent in marked_processes(RUN_TAG, tag).items()
        if not (parent == os.getpid() and process_name(pid) == TEMPLATE_NAME)
    ]


def marked_processes(mark: str, value: str) -> dict[int, int]:
    """pid -> parent pid of every live process but this one (zombies are not live) whose
    environment carries `mark`=`value`: what a run started, whoever its parent is now."""
    needle = f"{mark}={value}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            found[int(entry)] = int(fields[1])
    return found


def process_name(pid: int) -> str:
    """What `ps -e` shows (its comm): "fleetd-holder" for a holder, however it started."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return "(gone)"


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def wait_ready(notify: socket.socket, process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """Wait for READY=1 on the NOTIFY_SOCKET we gave fleetd: its own word that it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notify.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = notify.recv(4096)
        except TimeoutError:
            break
        if b"READY=1" in message.split(b"\n"):
            return message
    process.kill()
    process.wait()
    raise AssertionError(f"fleetd did not become ready within {timeout}s")


@dataclass
class Fleetd:
    """A fleetd subprocess in its own short temporary directory."""

    root: str
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_message: bytes = b""

    @property
    def socket_path(self) -> str:
        return os.path.join(self.root, "fleetd.sock")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, "state")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "fleetd.log")

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLEET_SOCKET": self.socket_path,
            "FLEET_STATE_DIR": self.state_dir,
            **self.extra_env,
        }

    def start(
        self, timeout: float = 15.0, preexec_fn: Callable[[], None] | None = None
    ) -> "Fleetd":
        """`preexec_fn` runs in the child before fleetd (after its stdio is set up)."""
        notify_path = os.path.join(self.root, "notify.sock")
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(notify_path)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                FLEETD,
                env={**self.env, "NOTIFY_SOCKET": notify_path},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=preexec_fn,  # noqa: PLW1509 (tests start fleetd from one thread)
            )
        try:
            self.ready_message = wait_ready(self.notify, self.process, timeout)
        except AssertionError:
            self.close()
            raise AssertionError(f"fleetd did not become ready; its log:\n{self.log()}") from None
        return self

    def start_activated(self, mode: int = 0o600, group: int = -1) -> "Fleetd":
        """Started as systemd's socket activation starts it: handed a listening socket (of
        `mode` and `group`, as SocketMode= and SocketGroup= make it) as fd 3."""
        launcher = (
            "import os, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"s.bind({self.socket_path!r}); s.listen()\n"
            f"os.chmod({self.socket_path!r}, {mode}); os.chown({self.socket_path!r}, -1, {group})\n"
            "os.dup2(s.fileno(), 3); os.set_inheritable(3, True)\n"
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'fleetd', '--socket', '/none/x'])\n"
        )
        notify_path = os.path.join(self.root, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", launcher],
                env={**self.env, "NOTIFY_SOCKET": notify_path},
                stdout=log,
                stderr=log,
            )
        wait_ready(self.notify, self.process, 15)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it will not go."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        self.stop()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def fleetctl(
    *args: str, env: dict[str, str], input: bytes | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run fleetctl as a real process: what a shell script sees."""
    return subprocess.run(
        [*FLEETCTL, *args],
        env=env,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_fleetd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fleetd ARGS` to its end (a refusal to start, a reset-state): what a shell sees."""
    return subprocess.run(
        [*FLEETD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def running_fleetd(root: str, **extra_env: str) -> Iterator[Fleetd]:
    daemon = Fleetd(root, extra_env=extra_env).start()
    try:
        yield daemon
    finally:
        daemon.close()


def cgroup_problem() -> str | None:
    """Why holders here give members no cgroup (a skip reason), or None: cgroup v2 must be
    mounted, and our own cgroup writable (root, or a delegated subtree)."""
    own = cgroups.own_directory()
    if own is None:
        return "no cgroup2 hierarchy is mounted"
    if not os.access(os.path.join(own, "cgroup.procs"), os.W_OK):
        return f"{own}/cgroup.procs is not writable (not root, not delegated)"
    probe = os.path.join(own, f"fleet-probe.{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError as exc:
        return f"cgroup v2 is not writable here ({own}: {exc.strerror})"
    os.rmdir(probe)
    return None


# -- detached holders, which outlive fleetd ---------------------------------------------------


def runtime_root(daemon: Fleetd) -> str:
    return os.path.join(daemon.root, "c")


def holder_pidfiles(daemon: Fleetd) -> list[str]:
    root = runtime_root(daemon)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, name, HOLDER_PIDFILE) for name in os.listdir(root)]


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether `pid` exited within `timeout` (a pidfd, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def kill_holders(daemon: Fleetd) -> None:
    """SIGTERM every live holder of this fleetd's runtime root (it stops its members), SIGKILL
    its session if it does not go."""
    for pidfile in holder_pidfiles(daemon):
        try:
            if not is_running(pidfile):
                continue
            pid, _ = read_pidfile(pidfile)
        except FileNotFoundError:  # the holder exited since it was listed, and took it along
            continue
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 10.0):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


# -- holders caught mid-launch ----------------------------------------------------------------

GATE_HOOK = """\
import os

gate = os.environ.get("FLEET_TEST_HOLDER_GATE")


def wrap_holder():
    import fleetd.holder.program

    run = fleetd.holder.program.main
    if getattr(run, "gated", False):
        return

    def main(argv=None):
        with open(gate + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(gate + ".tmp", gate + ".pid")
        with open(gate, "rb") as fifo:
            fifo.read()
        return run(argv)

    main.gated = True
    fleetd.holder.program.main = main


if gate:
    with open("/proc/self/cmdline", "rb") as cmdline:
        argv = cmdline.read().split(b"\\0")
    if b"fleetd.holder" in argv or b"fleetd.holder.template" in argv:
        wrap_holder()
    elif b"fleetd" in argv:
        os.register_at_fork(after_in_child=wrap_holder)  # the template fleetd forks
"""
"""A sitecustomize for fleetd's environment: a holder, once it starts (exec'd, or forked from
the template, which loads this too or was forked from fleetd, which did) and before anything
of its own runs (its pidfile, its sockets), writes its pid to GATE.pid and waits until the
test opens the fifo GATE: a holder caught mid-launch for as long as a test needs."""


@contextmanager
def gated_fleetd(root: str) -> Iterator[Fleetd]:
    """fleetd whose holders wait at the gate (see GATE_HOOK); at the end no gate is left
    closed and no holder left running."""
    hooks = os.path.join(root, "hooks")
    os.mkdir(hooks)
    with open(os.path.join(hooks, "sitecustomize.py"), "w") as f:
        f.write(GATE_HOOK)
    gate = os.path.join(root, "gate")
    os.mkfifo(gate)
    daemon = Fleetd(root, extra_env={"PYTHONPATH": hooks, "FLEET_TEST_HOLDER_GATE": gate})
    try:
        yield daemon.start()
    finally:
        open_gate(daemon, wait=False)
        kill_holders(daemon)
        daemon.close()


def open_gate(daemon: Fleetd, *, wait: bool = True) -> None:
    """Let the holder waiting at the gate go on (with wait=False, only one already there)."""
    gate = daemon.extra_env["FLEET_TEST_HOLDER_GATE"]
    with suppress(OSError):  # ENXIO: nobody waits there
        os.close(os.open(gate, os.O_WRONLY | (0 if wait else os.O_NONBLOCK)))


def gate_pid(daemon: Fleetd, timeout: float = 10.0) -> int:
    """The pid of the holder that came to the gate (see GATE_HOOK)."""
    marker = daemon.extra_env["FLEET_TEST_HOLDER_GATE"] + ".pid"
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "no holder came to the gate"
        time.sleep(0.01)
    with open(marker) as f:
        return int(f.read())


def mount_tmpfs(path: str, size: str) -> bool:
    """Make `path` a small tmpfs of its own (to fill a real disk); False where that needs
    privileges this run does not have. Unmount it with `umount -l`."""
    if os.geteuid() != 0:
        return False
    os.makedirs(path)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        check=False,
    )
    return mounted.returncode == 0


def fill_disk(directory: str) -> str:
    """Fill the disk under `directory` to the last block; the filler's path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        return filler
    finally:
        os.close(fd)


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s: {condition}")
        time.sleep(0.02)
